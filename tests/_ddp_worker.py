"""Run under torchrun by tests/test_distributed.py: a few training steps of a tiny GPT.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT BATCH_SIZE
"""

import sys

import torch
import torch.distributed as dist

from companion.gpt import GPT, GPTConfig
from companion.train import TrainConfig, Trainer


def build_trainer(batch_size: int) -> Trainer:
    """The same model, data and settings in every process (and in the single-process reference)."""
    torch.manual_seed(0)
    # No biases: the key projection's bias only adds q.b to every score of a row, which the
    # softmax ignores, so its gradient is zero up to rounding, and AdamW turns that rounding
    # noise into steps of +-lr whose signs depend on the order of the sums. With biases the
    # two runs would differ there by 2 lr on some CPUs, for a weight that changes nothing.
    model = GPT(GPTConfig.preset("tiny", bias=False))
    tokens = torch.randint(0, 128, (5000,), generator=torch.Generator().manual_seed(1))
    config = TrainConfig(max_steps=4, batch_size=batch_size, context_length=16, learning_rate=1e-2, warmup_steps=1,
                         eval_interval=2, eval_batches=2, progress=False)
    return Trainer(model, tokens[:4000], tokens[4000:], config)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    trainer = build_trainer(int(sys.argv[2]))
    history = trainer.run()
    if dist.get_rank() == 0:
        torch.save({"state": trainer.model.state_dict(), "val": history.eval_val_loss,
                    "world_size": dist.get_world_size(), "tokens": history.tokens}, sys.argv[1])
    dist.destroy_process_group()
