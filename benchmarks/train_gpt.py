"""Training throughput of our GPT and of Hugging Face's GPT2LMHeadModel, side by side.

Both models get the same configuration, the same weights, the same batches and the same
optimizer (AdamW, decay on matrices); one step is forward + cross-entropy + backward +
clipping + AdamW. Rounds alternate between the two models so that a change in machine
load hits both; the median step time of each is reported, as tokens per second, with
the ratio ours / theirs (above 1: ours is faster). On a GPU, model FLOPs utilisation
(MFU) is printed too: training FLOPs per token (6N plus attention) times tokens per
second, over the peak given by --peak-tflops (default: an H100's 989 dense bf16 TFLOP/s).

    .venv/bin/python benchmarks/train_gpt.py                     # CPU, small sizes
    python benchmarks/train_gpt.py --device cuda --dtype bfloat16 --n-layer 12 --n-head 12 \\
        --n-embd 768 --context 1024 --vocab 50304 --batch 16 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from companion.bench import synchronize
from companion.gpt import gpt_from_hf
from companion.train import configure_optimizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (and compilation)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak, for MFU (GPU only)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    hf_config = GPT2Config(
        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n_positions=args.context,
        vocab_size=args.vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, use_cache=False,
    )
    theirs = GPT2LMHeadModel(hf_config)
    ours = gpt_from_hf(theirs).to(device).train()  # the same weights
    theirs = theirs.to(device).train()
    models = {
        "ours (companion.gpt)": (ours, lambda m, x: m(x)),
        "Hugging Face GPT2LMHeadModel": (theirs, lambda m, x: m(input_ids=x, use_cache=False).logits),
    }
    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=g).to(device)
               for _ in range(args.steps)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def make_step(model, run):
        optimizer = configure_optimizer(model, 1e-4, 0.1, device_type=device.type)
        fn = torch.compile(model) if args.compile else model

        def step(batch):
            x, y = batch[:, :-1], batch[:, 1:]
            with autocast:
                logits = run(fn, x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            return loss

        return step

    steps = {name: make_step(m, run) for name, (m, run) in models.items()}
    first = {name: step(batches[0]).item() for name, step in steps.items()}
    for name, step in steps.items():  # warm up: allocator, kernels, compilation
        for i in range(args.warmup):
            step(batches[i % len(batches)])
    synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for b in batches:
                step(b)
            synchronize(device)
            times[name].append((time.perf_counter() - start) / len(batches))

    tokens_per_step = args.batch * args.context
    flops_per_token = ours.flops_per_token(args.context)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    name_of_device = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"GPT training throughput on {name_of_device}{threads}, torch {torch.__version__}, "
          f"{args.dtype}{', compiled' if args.compile else ''}")
    print(f"config: n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} context={args.context} "
          f"vocab={args.vocab} batch={args.batch}; {ours.num_parameters() / 1e6:.2f}M parameters")
    print(f"first-step loss: ours {list(first.values())[0]:.6f}, theirs {list(first.values())[1]:.6f}")
    result = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        tps = tokens_per_step / median
        line = f"{name:30s} {median * 1e3:9.1f} ms/step {tps:12,.0f} tokens/s"
        if device.type == "cuda":
            mfu = flops_per_token * tps / (args.peak_tflops * 1e12)
            line += f"   MFU {100 * mfu:5.1f}% of {args.peak_tflops:g} TFLOP/s"
        print(line)
        result[name] = tps
    ratio = result["ours (companion.gpt)"] / result["Hugging Face GPT2LMHeadModel"]
    print(f"ratio ours / Hugging Face: {ratio:.2f}x (above 1: ours is faster)")
    return {"tokens_per_s": result, "ratio": ratio}


if __name__ == "__main__":
    main()
