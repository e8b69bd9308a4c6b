"""companion.generation.static_cache with a compiled step: the tokens of the eager loop, for all three families.

On a CPU the compiled step runs :class:`companion.layers.Linear`'s one-row path, the
multiply-and-sum loop or ``F.linear`` (``Linear.one_row_loop``); these tests check both inside
whole models, with biases (Phi) and with the rolling cache past the end of Mistral's window.
"""

import pytest
import torch

from companion.generation.static_cache import compile_step, decode
from companion.device import plan_device
from companion.llama import Llama, LlamaConfig
from companion.mistral import Mistral, MistralConfig
from companion.phi import Phi, PhiConfig

# torch.compile runs where the device's plan says it can (on a CPU: a C++ compiler and a
# vector instruction set for Inductor; not with ATEN_CPU_CAPABILITY=default).
CPU_PLAN = plan_device("cpu", verbose=False)
needs_compile = pytest.mark.skipif(not CPU_PLAN.compile, reason="; ".join(CPU_PLAN.reasons))

WINDOW = 8
MODELS = {
    "llama": lambda: Llama(LlamaConfig.preset("tiny", num_key_value_heads=2)),
    "mistral": lambda: Mistral(MistralConfig.preset("tiny", sliding_window=WINDOW)),
    "phi": lambda: Phi(PhiConfig.preset("tiny")),
}


def random_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms away from 1, random biases: varied tokens
            p.normal_(1.0, 0.2) if "norm" in name and name.endswith("weight") else p.normal_(0.0, 0.1)
    return model


@needs_compile
@pytest.mark.parametrize("one_row_loop", [True, False])
@pytest.mark.parametrize("name", MODELS)
def test_compiled_step_gives_the_eager_tokens(name, one_row_loop, monkeypatch):
    from companion.layers import Linear

    monkeypatch.setattr(Linear, "one_row_loop", one_row_loop)
    torch._dynamo.reset()  # one compilation per case: stay under Dynamo's recompile limit
    model = random_model(name)
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    n = 3 * WINDOW  # past the end of Mistral's window
    eager = decode(model, prompt, n)
    step = compile_step(model)
    assert torch.equal(decode(model, prompt, n, step=step), eager)
    assert torch.equal(decode(model, prompt, n, step=step), eager)  # the cache is reset and reused
    assert len(set(eager[0, 5:].tolist())) > 3  # not a degenerate run of one token


@needs_compile
def test_compiled_step_logits_match_the_eager_step():
    model = random_model("llama")
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    step = compile_step(model)
    with torch.no_grad():
        model.setup_cache(1, 8)
        model(prompt, start_pos=0)
        compiled = step(prompt[:, :1], torch.tensor(6))
        model.setup_cache(1, 8)
        model(prompt, start_pos=0)
        eager = model(prompt[:, :1], start_pos=6, last_only=True)
    assert torch.allclose(compiled, eager, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_one_compiled_step_serves_requests_of_every_length(name):
    """The cache has the same shapes in every request, so the step compiles once (counted)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = random_model(name)
    counter = CompileCounter()  # a backend that counts the graphs it is given and runs them eagerly
    step = compile_step(model, backend=counter)
    gen = torch.Generator().manual_seed(4)
    for batch, prompt_len, n in [(2, 3, 5), (2, 11, 2), (2, 1, 3 * WINDOW), (2, 7, 9)]:
        prompt = torch.randint(0, 256, (batch, prompt_len), generator=gen)
        eager = decode(model, prompt, n, max_seq_len=64)
        assert torch.equal(decode(model, prompt, n, max_seq_len=64, step=step), eager)
    assert counter.frame_count == 1


def test_the_position_stays_on_the_device_and_advances_in_place():
    model = random_model("llama")
    seen = []

    def step(tok, pos):
        seen.append((id(pos), int(pos)))
        return model(tok, start_pos=pos, last_only=True)

    decode(model, torch.zeros(1, 4, dtype=torch.long), 6, step=step, max_seq_len=16)
    assert [p for _, p in seen] == [4, 5, 6, 7, 8]
    assert len({i for i, _ in seen}) == 1  # one tensor, advanced in place: no new tensor per token


def test_decode_sizes_the_cache_for_the_model_or_the_caller():
    model = random_model("llama")
    decode(model, torch.zeros(1, 2, dtype=torch.long), 3)
    assert model.layers[0].self_attn.cache.max_seq_len == model.config.max_position_embeddings
    decode(model, torch.zeros(1, 2, dtype=torch.long), 3, max_seq_len=10)
    assert model.layers[0].self_attn.cache.max_seq_len == 10
    with pytest.raises(ValueError, match="max_seq_len=10"):
        decode(model, torch.zeros(1, 8, dtype=torch.long), 3, max_seq_len=10)


@pytest.mark.parametrize("name", MODELS)
def test_eos_stops_each_row_as_generate_does(name):
    from companion.generation.sampling import generate

    model = random_model(name)
    prompt = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(5))
    free = decode(model, prompt, 12)
    eos = int(free[1, 4 + 2])  # row 1 produces this token at its third step
    stopped = decode(model, prompt, 12, eos_token_id=eos)
    reference = generate(model, prompt, 12, temperature=0, eos_token_id=eos, use_cache=True)
    assert torch.equal(stopped, reference)
    first = free[1, 4:].tolist().index(eos)  # where row 1 finishes (at its third step or before)
    row = stopped[1, 4:].tolist()
    assert first <= 2 and row[first] == eos and set(row[first:]) == {eos}  # finished: then padding
    assert not torch.equal(stopped, free)
    # alone, the row stops the whole decoding; finished rows are padded with pad_token_id
    alone = decode(model, prompt[1:2], 12, eos_token_id=eos)
    assert torch.equal(alone, free[1:2, : 4 + first + 1])
    padded = decode(model, prompt, 12, eos_token_id=eos, pad_token_id=0)
    assert padded[1, 4 + first + 1 :].eq(0).all() and padded[1, 4 + first] == eos


def test_cpp_wrapper_is_an_option_of_inductor_only():
    with pytest.raises(ValueError, match=r"cpp_wrapper=True is an option of the inductor backend.*backend='eager'"):
        compile_step(random_model("llama"), backend="eager", cpp_wrapper=True)
    with pytest.raises(ValueError, match=r"mode='max-autotune'"):
        compile_step(random_model("llama"), mode="max-autotune", cpp_wrapper=True)


def with_attention(name: str, attn: str) -> torch.nn.Module:
    """A model of :data:`MODELS` (or a GPT) with the given attention, float32, random weights."""
    from companion.gpt import GPT, GPTConfig

    if name == "gpt":
        torch.manual_seed(0)
        return GPT(GPTConfig.preset("tiny", n_positions=128,
                                    attn_implementation="explicit" if attn == "eager" else attn)).eval()
    model = random_model(name)
    for module in model.modules():
        if hasattr(module, "attn_implementation"):
            module.attn_implementation = attn
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", [*MODELS, "gpt"])
def test_an_int_start_pos_reads_only_the_slots_up_to_its_tokens(name, attn):
    """A prompt, a chunk, then single tokens, each fed with an int ``start_pos``: a cache of
    128 slots whose slots after the call's tokens hold NaN gives, to the bit, the logits of a
    cache just long enough (a slot that is read would carry its NaN into every logit), and
    those of the whole sequence run without a cache."""
    from companion.layers import KVCache

    model = with_attention(name, attn)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    calls = [(0, 6), (6, 9), (9, 10), (10, 11), (11, 12)]  # (start, end): a prompt, a chunk, then one token each
    logits = {}
    with torch.no_grad():
        for length in (12, 128):
            setup = {"rolling": False} if name == "mistral" else {}  # Mistral's KVCache, not its window's buffer
            model.setup_cache(2, length, **setup)
            caches = [m for m in model.modules() if isinstance(m, KVCache)]
            assert caches and all(c.max_seq_len == length for c in caches)
            logits[length] = []
            for start, end in calls:
                for cache in caches:
                    cache.k[:, :, end:] = float("nan")
                    cache.v[:, :, end:] = float("nan")
                logits[length].append(model(ids[:, start:end], start_pos=start))
        whole = model(ids)  # (B, 12, V): no cache, causal attention over the sequence
    for (start, end), short, long in zip(calls, logits[12], logits[128]):
        assert long.isfinite().all() and torch.equal(short, long)
        torch.testing.assert_close(long, whole[:, start:end], rtol=0, atol=1e-5)
