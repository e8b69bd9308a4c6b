"""companion.bench: FLOP counts against PyTorch's FlopCounterMode, byte counts against the
models' own parameters and caches."""

import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from companion.bench import (H100_SXM, ModelShape, Peak, decode_bytes_per_token, forward_flops_per_token, peak_memory_mib,
                             measure_bandwidth, measure_matmul_flops, median_seconds, roofline_seconds,
                             training_flops_per_token)
from companion.gpt import GPT, GPTConfig
from companion.llama import Llama, LlamaConfig
from companion.mistral import Mistral, MistralConfig
from companion.phi import Phi, PhiConfig

# Eager attention: FlopCounterMode counts its matrix products, but has no formula for the fused
# SDPA kernel a CPU runs (_scaled_dot_product_flash_attention_for_cpu) and would miss attention.
CACHED = {
    "llama-gqa": (Llama, LlamaConfig.preset("tiny", num_key_value_heads=2, attn_implementation="eager")),
    "llama-tied": (Llama, LlamaConfig.preset("tiny", tie_word_embeddings=True, attn_implementation="eager")),
    "mistral": (Mistral, MistralConfig.preset("tiny", sliding_window=None, attn_implementation="eager")),
    "phi": (Phi, PhiConfig.preset("tiny", attn_implementation="eager")),
}


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", CACHED)
@pytest.mark.parametrize("context", [8, 40])
def test_decode_step_flops_match_the_flop_counter(name, context):
    cls, config = CACHED[name]
    model = cls(config).eval()
    model.setup_cache(1, context)
    token = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), start_pos=0)
        # a position in a tensor (a compiled step's): the step attends to every slot of the cache
        flops = counted_flops(lambda: model(token, start_pos=torch.tensor(3), last_only=True))
        # an int position: to the slots written so far, and its own
        flops_int = counted_flops(lambda: model(token, start_pos=3, last_only=True))
    assert flops == forward_flops_per_token(ModelShape.of(config), context)
    assert flops_int == forward_flops_per_token(ModelShape.of(config), 4)


@pytest.mark.parametrize("T", [1, 16])
def test_gpt_forward_and_training_flops_match_the_flop_counter(T):
    config = GPTConfig.preset("tiny", attn_implementation="explicit")
    model = GPT(config)
    idx = torch.zeros(1, T, dtype=torch.long)
    shape = ModelShape.of(config)
    # A whole sequence: T tokens' projections, and T x T scores (the causal mask is applied
    # to the full product), so every token attends to T keys.
    assert counted_flops(lambda: model(idx)) == T * forward_flops_per_token(shape, context=T)
    # Backward: two products for each forward product (the gradients of both operands).
    step = counted_flops(lambda: model(idx).square().mean().backward())
    assert step == T * training_flops_per_token(shape, context=T)


def test_gpt_training_flops_agree_with_the_models_own_mfu_estimate():
    config = GPTConfig.preset("gpt2")
    with torch.device("meta"):
        model = GPT(config)
    # GPT.flops_per_token counts biases and norm weights too: 0.1% more.
    assert training_flops_per_token(ModelShape.of(config), 1024) == pytest.approx(model.flops_per_token(1024), rel=2e-3)


@pytest.mark.parametrize("name", CACHED)
def test_matmul_weights_are_all_parameters_but_the_table_norms_and_biases(name):
    cls, config = CACHED[name]
    model = cls(config)
    shape = ModelShape.of(config)
    table = model.embed_tokens.weight.numel()
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # norm weights and biases
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    # A tied output layer multiplies by the table: it counts once as a parameter, but it is work.
    multiplied_table = table if config.tie_word_embeddings else 0
    assert shape.matmul_weights == shape.n_params - table - vectors + multiplied_table


@pytest.mark.parametrize("batch_size", [1, 4])
def test_decode_bytes_are_the_weights_and_the_cache(batch_size):
    config = LlamaConfig.preset("tiny", num_key_value_heads=2)
    model = Llama(config)
    model.setup_cache(batch_size, 24)
    weights = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    cache = sum(b.self_attn.cache.k.nbytes + b.self_attn.cache.v.nbytes for b in model.layers)
    got = decode_bytes_per_token(ModelShape.of(config), context=24, bytes_per_value=4, batch_size=batch_size)
    assert got == pytest.approx((weights + cache) / batch_size)


def test_published_counts():
    llama7b = ModelShape.of(LlamaConfig.preset("llama-2-7b"))
    assert llama7b.n_params == 6_738_415_616
    assert ModelShape.of(PhiConfig.preset("phi-2")).n_params == 2_779_683_840
    mistral = ModelShape.of(MistralConfig.preset("mistral-7b-v0.1"))
    assert (mistral.n_heads, mistral.n_kv_heads) == (32, 8)
    # Mistral's grouped keys and values: a quarter of Llama-2-7B's cache per position.
    assert (decode_bytes_per_token(mistral, 4097) - decode_bytes_per_token(mistral, 4096)) * 4 == \
        decode_bytes_per_token(llama7b, 4097) - decode_bytes_per_token(llama7b, 4096)


def test_roofline_takes_the_slower_of_compute_and_memory():
    peak = Peak("toy", flops=100.0, bandwidth=10.0)
    assert peak.balance == 10.0
    assert roofline_seconds(flops=1000, bytes_moved=1, peak=peak) == 10.0  # compute bound
    assert roofline_seconds(flops=1, bytes_moved=1000, peak=peak) == 100.0  # memory bound
    assert H100_SXM.balance == pytest.approx(295.2, abs=0.1)


def test_median_seconds_runs_warmup_then_repeats():
    calls = []
    median_seconds(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5
    with pytest.raises(ValueError, match="repeats=0"):
        median_seconds(lambda: None, repeats=0)


def test_measurements_are_positive_rates():
    assert measure_bandwidth(megabytes=8, repeats=2) > 1e8  # > 0.1 GB/s
    assert measure_matmul_flops(n=128, repeats=2) > 1e7


def test_bad_arguments_are_named():
    shape = ModelShape.of(LlamaConfig.preset("tiny"))
    with pytest.raises(ValueError, match="context=0"):
        forward_flops_per_token(shape, 0)
    with pytest.raises(ValueError, match="batch_size=0"):
        decode_bytes_per_token(shape, 8, batch_size=0)
    with pytest.raises(TypeError, match="no model family for dict"):
        ModelShape.of({})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the exact peak is read from /proc on Linux")
def test_peak_memory_counts_what_the_call_allocates_and_not_what_came_before():
    script = "import sys, torch; x = torch.ones(2**25); measure(lambda: torch.ones(int(sys.argv[1])).sum())"
    small = peak_memory_mib(script, 1)
    large = peak_memory_mib(script, 2**26)  # 256 MiB of float32, during the call only
    assert small < 16  # the 128 MiB allocated before the call does not count
    assert 240 < large < 300


def test_peak_memory_needs_one_measure_call_and_reports_failures():
    with pytest.raises(ValueError, match="exactly once; it called it 0 times"):
        peak_memory_mib("x = 1")
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        peak_memory_mib("measure(lambda: 1 / 0)")
