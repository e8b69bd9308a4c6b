"""companion.layers: RMSNorm, RoPE (both layouts, partial), SwiGLU, attention (eager and SDPA), KV caches.

Oracles: Hugging Face's Llama and Phi modules, torch's scaled_dot_product_attention, and
explicit loops written the slow, obvious way.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig as HFLlamaConfig
from transformers.models.llama import modeling_llama as hf_llama
from transformers.models.phi import modeling_phi as hf_phi

from companion.device import plan_device
from companion.layers import (KVCache, Linear, RMSNorm, RollingKVCache, SwiGLU, apply_rope, apply_rope_interleaved,
                              attention, attention_mask, half_split_to_interleaved, interleaved_to_half_split,
                              kv_cache_bytes, kv_head_of, rope_cos_sin, rope_inv_freq, rotate_half,
                              sdpa_attention)

FAST = settings(max_examples=25, deadline=None)




# ---- Linear ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_linear_is_nn_linear_in_eager_mode(bias):
    torch.manual_seed(0)
    ours, ref = Linear(12, 5, bias=bias), torch.nn.Linear(12, 5, bias=bias)
    ours.load_state_dict(ref.state_dict())
    for shape in [(1, 1, 12), (3, 4, 12), (12,)]:
        x = torch.randn(shape)
        assert torch.equal(ours(x), ref(x))


CPU_PLAN = plan_device("cpu", verbose=False)  # compiles with a C++ compiler and a vector ISA


@pytest.mark.skipif(not CPU_PLAN.compile, reason="; ".join(CPU_PLAN.reasons))
@pytest.mark.parametrize("one_row_loop", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_compiled_on_cpu_matches_nn_linear_for_one_row_and_many(bias, one_row_loop, monkeypatch):
    monkeypatch.setattr(Linear, "one_row_loop", one_row_loop)
    torch._dynamo.reset()  # Linear.forward compiles once per case and shape: stay under Dynamo's recompile limit
    torch.manual_seed(0)
    ours, ref = Linear(48, 20, bias=bias), torch.nn.Linear(48, 20, bias=bias)
    ours.load_state_dict(ref.state_dict())
    compiled = torch.compile(ours, fullgraph=True, dynamic=False)
    for shape in [(1, 1, 48), (1, 48), (2, 3, 48)]:  # one row (loop or F.linear), several rows
        x = torch.randn(shape)
        y = compiled(x)
        assert y.shape == ref(x).shape
        assert torch.allclose(y, ref(x), atol=1e-6)


@pytest.mark.parametrize("one_row_loop", [True, False])
def test_linear_traces_one_row_as_multiply_and_sum_only_where_asked(one_row_loop, monkeypatch):
    monkeypatch.setattr(Linear, "one_row_loop", one_row_loop)
    torch._dynamo.reset()  # a fresh cache: the setting is read when Linear.forward is traced

    def traced_ops(x: torch.Tensor) -> set[str]:
        graphs = []

        def record(gm, example_inputs):  # a torch.compile backend that keeps the traced graph
            graphs.append(gm)
            return gm.forward

        torch.compile(Linear(8, 4), backend=record, fullgraph=True, dynamic=False)(x)
        return {str(node.target) for node in graphs[0].graph.nodes if node.op in ("call_function", "call_method")}

    one_row, rows = traced_ops(torch.randn(1, 1, 8)), traced_ops(torch.randn(3, 8))
    assert ("sum" in one_row) == one_row_loop
    assert any("linear" in op for op in one_row) != one_row_loop
    assert any("linear" in op for op in rows) and "sum" not in rows


@pytest.mark.parametrize("vendor, processor, mkl, loop", [
    ("GenuineIntel", "x86_64", True, False), ("GenuineIntel", "x86_64", False, True),
    ("AuthenticAMD", "x86_64", True, True), ("", "", True, True),
    ("", "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel", True, False),  # no /proc/cpuinfo: Windows
])
def test_the_one_row_loop_is_the_default_except_for_mkl_on_intel(tmp_path, monkeypatch, vendor, processor, mkl, loop):
    from companion import device, layers

    assert Linear.one_row_loop is not layers.blas_splits_one_row()  # the default, set at import
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu avx2\n" if vendor else "")
    monkeypatch.setattr(layers, "cpu_info", lambda field: device.cpu_info(field, str(cpuinfo)))
    monkeypatch.setattr(layers.platform, "processor", lambda: processor)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    assert layers.blas_splits_one_row() is not loop
    assert device.cpu_info("flags", str(cpuinfo)) == ("fpu avx2" if vendor else "")
    assert device.cpu_info("vendor_id", str(tmp_path / "missing")) == ""


# ---- RMSNorm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hugging_face(dtype):
    torch.manual_seed(0)
    ours, ref = RMSNorm(24, eps=1e-5), hf_llama.LlamaRMSNorm(24, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    ours, ref = ours.to(dtype), ref.to(dtype)
    x = (torch.randn(3, 5, 24) * 7).to(dtype)
    assert torch.equal(ours(x), ref(x))


def test_rmsnorm_is_layernorm_without_mean_for_zero_mean_inputs():
    x = torch.randn(4, 16)
    x = x - x.mean(-1, keepdim=True)  # zero mean: the two norms agree
    norm = RMSNorm(16, eps=0.0)
    assert torch.allclose(norm(x), F.layer_norm(x, (16,), eps=0.0), atol=1e-5)
    shifted = x + 3.0  # RMSNorm does not remove a shift
    assert not torch.allclose(norm(shifted), F.layer_norm(shifted, (16,), eps=0.0), atol=1e-2)


# ---- rotary embeddings -----------------------------------------------------------------------


def test_cos_sin_match_hugging_face_rotary_embedding():
    config = HFLlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0)
    rotary = hf_llama.LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 7, 100, 4000])
    cos_ref, sin_ref = rotary(torch.zeros(1), positions[None])
    cos, sin = rope_cos_sin(positions, rotary_dim=16, theta=500.0)
    assert torch.equal(cos, cos_ref[0]) and torch.equal(sin, sin_ref[0])
    assert torch.equal(rope_inv_freq(16, 500.0), rotary.inv_freq)


def test_rotate_half_matches_hugging_face():
    x = torch.randn(2, 3, 5, 8)
    assert torch.equal(rotate_half(x), hf_llama.rotate_half(x))


def test_apply_rope_matches_hugging_face():
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 16)
    cos, sin = rope_cos_sin(torch.arange(6), 16)
    q_ref, k_ref = hf_llama.apply_rotary_pos_emb(q, k, cos[None], sin[None])
    assert torch.equal(apply_rope(q, cos, sin), q_ref)
    assert torch.equal(apply_rope(k, cos, sin), k_ref)


def test_partial_rope_rotates_only_the_first_features_like_phi():
    q, k = torch.randn(2, 3, 7, 20), torch.randn(2, 3, 7, 20)
    R = 8  # Phi-2's 0.4 of a head of 20
    cos, sin = rope_cos_sin(torch.arange(7), R)
    q_rot, k_rot = hf_phi.apply_rotary_pos_emb(q[..., :R], k[..., :R], cos[None], sin[None])
    assert torch.equal(apply_rope(q, cos, sin), torch.cat((q_rot, q[..., R:]), dim=-1))
    assert torch.equal(apply_rope(k, cos, sin)[..., R:], k[..., R:])  # no position in the rest
    with pytest.raises(ValueError, match="rotary dimension 32 is larger than the head dimension 20"):
        apply_rope(q, *rope_cos_sin(torch.arange(7), 32))


def test_interleaved_rope_turns_each_adjacent_pair():
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    positions = torch.arange(5)
    out = apply_rope_interleaved(x, positions, theta=100.0)
    expected = torch.empty_like(x)
    for t in range(5):
        for i in range(4):
            angle = t * 100.0 ** (-2 * i / 8)
            a, b = x[..., t, 2 * i], x[..., t, 2 * i + 1]
            expected[..., t, 2 * i] = a * math.cos(angle) - b * math.sin(angle)
            expected[..., t, 2 * i + 1] = a * math.sin(angle) + b * math.cos(angle)
    assert torch.allclose(out, expected, atol=1e-6)


def test_the_two_layouts_agree_once_the_projections_are_permuted():
    """Meta's checkpoints rotate adjacent pairs; Hugging Face's rotate halves. Same model."""
    torch.manual_seed(1)
    H, D, C, T = 3, 8, 12, 6
    w_meta = torch.randn(H * D, C)
    w_hf = interleaved_to_half_split(w_meta, H)
    x = torch.randn(2, T, C)
    positions = torch.arange(T)

    def heads(y):  # (B, T, H * D) -> (B, H, T, D)
        return y.view(2, T, H, D).transpose(1, 2)

    q_meta = apply_rope_interleaved(heads(x @ w_meta.T), positions)
    q_hf = apply_rope(heads(x @ w_hf.T), *rope_cos_sin(positions, D))
    # The same rotated features, in another order within each head ...
    order = interleaved_to_half_split(torch.arange(D)[:, None], 1).flatten()
    assert torch.allclose(q_hf, q_meta[..., order], atol=1e-5)
    # ... so every attention score q . k is the same.
    assert torch.allclose(q_hf @ q_hf.transpose(-1, -2), q_meta @ q_meta.transpose(-1, -2), atol=1e-4)
    assert torch.equal(half_split_to_interleaved(w_hf, H), w_meta)


@FAST
@given(m=st.integers(0, 300), n=st.integers(0, 300), shift=st.integers(0, 300), seed=st.integers(0, 10**6))
def test_rope_scores_depend_only_on_the_offset(m, n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 1, 32, generator=g), torch.randn(1, 1, 1, 32, generator=g)

    def score(i, j):
        cq, sq = rope_cos_sin(torch.tensor([i]), 32)
        ck, sk = rope_cos_sin(torch.tensor([j]), 32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=2e-3)


def test_rope_changes_the_score_when_the_offset_changes():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    cos, sin = rope_cos_sin(torch.arange(10), 32)
    scores = [(apply_rope(q, cos[:1], sin[:1]) * apply_rope(k, cos[t:t + 1], sin[t:t + 1])).sum() for t in range(10)]
    assert len({round(s.item(), 4) for s in scores}) == 10


def test_rope_inv_freq_rejects_odd_dimensions():
    with pytest.raises(ValueError, match="rotary_dim=7 must be a positive even number"):
        rope_inv_freq(7)


# ---- SwiGLU ----------------------------------------------------------------------------------


def test_swiglu_matches_hugging_face_llama_mlp():
    config = HFLlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4)
    ref = hf_llama.LlamaMLP(config)
    ours = SwiGLU(16, 40)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 16)
    assert torch.equal(ours(x), ref(x))
    assert torch.allclose(ours(x), ours.down_proj(F.silu(ours.gate_proj(x)) * ours.up_proj(x)))


# ---- attention and masks ---------------------------------------------------------------------


def test_attention_mask_causal_and_windowed():
    pos = torch.arange(6)
    assert torch.equal(attention_mask(pos, pos), torch.ones(6, 6, dtype=torch.bool).tril())
    windowed = attention_mask(pos, pos, window=3)
    for i in range(6):
        for j in range(6):
            assert windowed[i, j] == (i - 3 < j <= i)
    # empty cache slots (position -1) are never visible, later slots neither
    mask = attention_mask(torch.tensor([2]), torch.tensor([-1, 0, 1, 2, 3]))
    assert mask.tolist() == [[False, True, True, True, False]]


def test_kv_head_of():
    assert [kv_head_of(h, 6, 3) for h in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [kv_head_of(h, 4, 4) for h in range(4)] == [0, 1, 2, 3]  # multi-head
    assert [kv_head_of(h, 4, 1) for h in range(4)] == [0, 0, 0, 0]  # multi-query
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        kv_head_of(0, 6, 4)


@FAST
@given(B=st.integers(1, 2), K=st.integers(1, 3), G=st.integers(1, 3), T=st.integers(1, 6),
       extra=st.integers(0, 4), D=st.sampled_from([2, 4, 8]), window=st.sampled_from([None, 1, 3]))
def test_grouped_query_attention_matches_sdpa_with_repeated_heads(B, K, G, T, extra, D, window):
    H, S = K * G, T + extra
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, S, D), torch.randn(B, K, S, D)
    mask = attention_mask(torch.arange(extra, S), torch.arange(S), window)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1),
                                         attn_mask=mask)
    assert torch.allclose(attention(q, k, v, mask), ref, atol=1e-5)


@pytest.mark.parametrize("attend", [attention, sdpa_attention])
def test_query_head_h_reads_kv_head_h_over_group_size(attend):
    """With 1 < K < H: change one KV head and exactly its query heads change."""
    torch.manual_seed(0)
    B, H, K, T, D = 1, 6, 2, 4, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, K, T, D), torch.randn(B, K, T, D)
    mask = attention_mask(torch.arange(T), torch.arange(T))
    before = attend(q, k, v, mask)
    v2 = v.clone()
    v2[:, 1] += 1.0
    after = attend(q, k, v2, mask)
    changed = [h for h in range(H) if not torch.allclose(before[:, h], after[:, h])]
    assert changed == [h for h in range(H) if kv_head_of(h, H, K) == 1] == [3, 4, 5]


@pytest.mark.parametrize("attend", [attention, sdpa_attention])
def test_attention_rejects_uneven_groups(attend):
    with pytest.raises(ValueError, match="6 query heads cannot share 4 key/value heads"):
        attend(torch.randn(1, 6, 2, 4), torch.randn(1, 4, 2, 4), torch.randn(1, 4, 2, 4),
               torch.ones(2, 2, dtype=torch.bool))


@FAST
@given(B=st.integers(1, 2), K=st.integers(1, 2), G=st.integers(1, 3), T=st.integers(1, 20),
       extra=st.integers(0, 12), D=st.sampled_from([8, 16, 32]), density=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
       seed=st.integers(0, 10**6))
def test_sdpa_attention_equals_the_explicit_attention_for_any_mask(B, K, G, T, extra, D, density, seed):
    """Any boolean mask, not only causal ones, as long as every query may see some key."""
    g = torch.Generator().manual_seed(seed)
    H, S = K * G, T + extra  # S > T: keys of earlier positions, as with a cache
    q, k, v = (torch.randn(B, H, T, D, generator=g), torch.randn(B, K, S, D, generator=g),
               torch.randn(B, K, S, D, generator=g))
    mask = torch.rand(T, S, generator=g) < density
    mask[torch.arange(T), torch.randint(0, S, (T,), generator=g)] = True  # at least one key per row
    out = sdpa_attention(q, k, v, mask)
    assert out.shape == (B, H, T, D)
    assert torch.allclose(out, attention(q, k, v, mask), atol=1e-5, rtol=0)


class StorageSizes(TorchDispatchMode):
    """Records the storage size in bytes of every tensor that each ATen operation returns.

    A view (``transpose``, ``expand``) shares the storage of its input; a copy has its own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.sizes += [t.untyped_storage().nbytes() for t in outs if isinstance(t, torch.Tensor)]
        return out


def test_grouped_query_attention_never_copies_the_keys_or_values_per_query_head():
    """One query per head and many keys: a copy of k or v for each of the G heads would be the
    largest tensor by far. Viewing q as (B, K, G, T, D) and letting matmul broadcast k as
    (B, K, 1, S, D) makes exactly that copy; the check below catches it."""
    B, K, G, T, S, D = 1, 2, 8, 1, 512, 64
    q, k, v = torch.randn(B, K * G, T, D), torch.randn(B, K, S, D), torch.randn(B, K, S, D)
    mask = attention_mask(torch.tensor([S - 1]), torch.arange(S))
    with StorageSizes() as seen:
        attention(q, k, v, mask)
    assert max(seen.sizes) <= k.nbytes  # nothing larger than the keys: views of k, small scores
    with StorageSizes() as broadcast:  # the check can fail: matmul broadcasting over the group copies
        torch.matmul(q.view(B, K, G, T, D), k.unsqueeze(2).transpose(-2, -1))
    assert max(broadcast.sizes) == G * k.nbytes


# ---- KV caches -------------------------------------------------------------------------------


def chunked(cache, q, k, v, chunks, window=None):
    """Feed a sequence through ``cache`` chunk by chunk; attention outputs, concatenated."""
    outs, start = [], 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        k_pos = cache.key_positions(pos)
        keys, values = cache.update(k[:, :, start:start + n], v[:, :, start:start + n], pos)
        outs.append(attention(q[:, :, start:start + n], keys, values, attention_mask(pos, k_pos, window)))
        start += n
    return torch.cat(outs, dim=2)


@FAST
@given(chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_kv_cache_chunks_give_the_full_attention(chunks, seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(chunks)
    q, k, v = (torch.randn(2, 4, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g),
               torch.randn(2, 2, T, 8, generator=g))
    full = attention(q, k, v, attention_mask(torch.arange(T), torch.arange(T)))
    cache = KVCache(2, 2, max_seq_len=T + 3, head_dim=8)
    assert torch.allclose(chunked(cache, q, k, v, chunks), full, atol=1e-5)
    assert cache.k.shape == (2, 2, T + 3, 8)  # allocated once, never grown


@FAST
@given(chunks=st.lists(st.integers(1, 9), min_size=1, max_size=6), window=st.integers(1, 5),
       seed=st.integers(0, 1000))
def test_rolling_cache_chunks_give_the_full_sliding_window_attention(chunks, window, seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(chunks)
    q, k, v = (torch.randn(1, 2, T, 4, generator=g), torch.randn(1, 1, T, 4, generator=g),
               torch.randn(1, 1, T, 4, generator=g))
    full = attention(q, k, v, attention_mask(torch.arange(T), torch.arange(T), window))
    cache = RollingKVCache(1, 1, window, head_dim=4)
    assert torch.allclose(chunked(cache, q, k, v, chunks, window), full, atol=1e-5)
    assert cache.k.shape == (1, 1, window, 4)
    # slot s holds position p with p % window == s: the last `window` positions
    filled = cache.slot_pos[cache.slot_pos >= 0]
    assert sorted(filled.tolist()) == list(range(max(0, T - window), T))
    assert all(p % window == s for s, p in enumerate(cache.slot_pos.tolist()) if p >= 0)


def test_kv_cache_bytes_for_published_models():
    assert kv_cache_bytes(32, 32, 128, seq_len=1) == 512 * 1024  # Llama-2-7B, 16-bit
    assert kv_cache_bytes(32, 8, 128, seq_len=4096) == 512 * 2**20  # Mistral 7B, its window
    assert kv_cache_bytes(2, 2, 4, seq_len=3, batch_size=5, bytes_per_value=4) == 2 * 2 * 2 * 4 * 3 * 5 * 4
