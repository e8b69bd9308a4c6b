"""Hidden tests for chapter 8's exercises (Llama 2)."""

from companion.grading import hidden


@hidden("to_interleaved")
def test_to_interleaved_row_orders(to_interleaved):
    import torch
    from companion.grading import expect_same
    cases = [
        (4, 1, [0, 2, 1, 3], "one head, D = 4"),
        (6, 1, [0, 3, 1, 4, 2, 5], "one head, D = 6 (three pairs)"),
        (8, 2, [0, 2, 1, 3, 4, 6, 5, 7], "two heads of D = 4: rows stay in their head"),
        (6, 3, [0, 1, 2, 3, 4, 5], "three heads of D = 2: one pair each, nothing moves"),
    ]
    for rows, heads, order, case in cases:
        w = torch.arange(float(rows))[:, None] * torch.ones(1, 3)  # row r holds r in every column
        expected = torch.tensor(order, dtype=torch.float)[:, None] * torch.ones(1, 3)
        expect_same(to_interleaved(w, heads), expected, f"{case}: rows {list(range(rows))}")


@hidden("to_interleaved")
def test_to_interleaved_inverts_the_conversion(to_interleaved):
    import torch
    from companion.grading import expect_same
    from companion.layers import interleaved_to_half_split
    gen = torch.Generator().manual_seed(88)
    for heads, D, C in [(1, 8, 5), (4, 16, 64), (8, 4, 12), (2, 128, 3)]:
        meta = torch.randn(heads * D, C, generator=gen)
        expect_same(to_interleaved(interleaved_to_half_split(meta, heads), heads), meta,
                    f"Meta's weight ({heads * D}, {C}) with {heads} heads, converted and converted back")
    bias = torch.randn(3 * 10, generator=gen)
    expect_same(to_interleaved(interleaved_to_half_split(bias, 3), 3), bias,
                "a 1-D bias of 3 heads of 10, converted and converted back")


@hidden("to_interleaved")
def test_to_interleaved_gives_meta_scores(to_interleaved):
    import torch
    from companion.grading import expect_same
    from companion.layers import apply_rope, apply_rope_interleaved, rope_cos_sin
    gen = torch.Generator().manual_seed(89)
    H, D, C, T = 3, 8, 24, 7
    w_hf = torch.randn(H * D, C, generator=gen)
    x = torch.randn(1, T, C, generator=gen)
    pos = torch.arange(T)

    def heads(y):
        return y.view(1, T, H, D).transpose(1, 2)  # (1, H, T, D)

    q_hf = apply_rope(heads(x @ w_hf.T), *rope_cos_sin(pos, D))
    q_meta = apply_rope_interleaved(heads(x @ to_interleaved(w_hf, H).T), pos)
    expect_same(q_meta @ q_meta.transpose(-1, -2), q_hf @ q_hf.transpose(-1, -2),
                "attention scores of Meta's rotary code on your weight vs Hugging Face's on the original",
                atol=1e-4)


@hidden("to_interleaved")
def test_to_interleaved_dtypes_and_shapes(to_interleaved):
    import torch
    from companion.grading import expect_same
    from companion.layers import half_split_to_interleaved
    gen = torch.Generator().manual_seed(90)
    for w, heads, case in [
        (torch.randn(2 * 6, 4, generator=gen).to(torch.bfloat16), 2, "bfloat16 (12, 4), 2 heads"),
        (torch.randn(4 * 4, 3, generator=gen, dtype=torch.float64), 4, "float64 (16, 3), 4 heads"),
        (torch.randint(0, 100, (2 * 8, 2, 3), generator=gen), 2, "int64 (16, 2, 3): two trailing dimensions"),
    ]:
        expect_same(to_interleaved(w, heads), half_split_to_interleaved(w, heads), case)


@hidden("to_interleaved")
def test_to_interleaved_own_code(to_interleaved):
    import torch
    from companion.grading import expect_same, forbidding
    w = torch.arange(8.0)[:, None]
    with forbidding(to_interleaved, "companion.layers.half_split_to_interleaved",
                    "companion.layers.interleaved_to_half_split"):
        got = to_interleaved(w, 1)
    expect_same(got, torch.tensor([0.0, 4, 1, 5, 2, 6, 3, 7])[:, None],
                "one head of D = 8, without companion's conversions")


@hidden("rerotate")
def test_rerotate_against_rotation_from_scratch(rerotate):
    import torch
    from companion.grading import expect_same
    from companion.layers import apply_rope, rope_cos_sin
    gen = torch.Generator().manual_seed(91)
    for shift, positions, D, base in [(1, [0], 2, 10000.0), (5, [0, 1, 2, 3], 16, 10000.0),
                                      (-100, [100, 150, 199], 64, 10000.0), (37, [3, 1, 4, 1, 5], 8, 500.0),
                                      (-3, [3, 4], 128, 1e6)]:
        k = torch.randn(2, 3, len(positions), D, generator=gen)
        pos = torch.tensor(positions)
        rotated = apply_rope(k, *rope_cos_sin(pos, D, base))
        expected = apply_rope(k, *rope_cos_sin(pos + shift, D, base))
        expect_same(rerotate(rotated, shift, base), expected,
                    f"D = {D}, base {base:g}, keys at positions {positions} moved by {shift}", atol=5e-4)


@hidden("rerotate")
def test_rerotate_direction_and_identity(rerotate):
    import math
    import torch
    from companion.grading import expect_same
    k = torch.tensor([[[[1.0, 0.0]]]])  # one pair (1, 0), as rotated at position 0
    expect_same(rerotate(k, 1, 10000.0), torch.tensor([[[[math.cos(1.0), math.sin(1.0)]]]]),
                "the pair (1, 0) moved by +1 position turns by +1 radian (to (cos 1, sin 1))")
    expect_same(rerotate(k, -1, 10000.0), torch.tensor([[[[math.cos(1.0), -math.sin(1.0)]]]]),
                "the pair (1, 0) moved by -1 position turns by -1 radian")
    gen = torch.Generator().manual_seed(92)
    x = torch.randn(1, 2, 4, 32, generator=gen)
    expect_same(rerotate(x, 0, 10000.0), x, "shift 0 leaves the keys as they are")
    expect_same(rerotate(rerotate(x, 9, 10000.0), -9, 10000.0), x, "moved by 9, then by -9: back where they were",
                atol=1e-5)


@hidden("rerotate")
def test_rerotate_keeps_float64_and_scores(rerotate):
    import torch
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(93)
    k = torch.randn(1, 2, 5, 16, generator=gen, dtype=torch.float64)
    got = rerotate(k, 4, 10000.0)
    if isinstance(got, torch.Tensor) and got.dtype != torch.float64:
        raise AssertionError(f"float64 keys came back as {got.dtype}")
    q = torch.randn(1, 2, 5, 16, generator=gen, dtype=torch.float64)
    expect_same(rerotate(q, 4, 10000.0) @ got.transpose(-1, -2), q @ k.transpose(-1, -2),
                "queries and keys moved by the same shift: every score stays the same", atol=1e-5)


@hidden("read_tensor")
def test_read_tensor_every_dtype(read_tensor):
    import tempfile
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from companion.grading import expect_same
    gen = torch.Generator().manual_seed(94)
    tensors = {
        "f64": torch.randn(3, 2, generator=gen, dtype=torch.float64),
        "f32": torch.randn(2, 3, 4, generator=gen),
        "f16": torch.randn(5, generator=gen).half(),
        "bf16": torch.randn(3, 3, generator=gen).to(torch.bfloat16),
        "i64": torch.tensor([[2**40, -7], [0, 1]]),
        "i32": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        "u8": torch.tensor([[0, 128, 255]], dtype=torch.uint8),
        "bool": torch.tensor([[True], [False], [True]]),
    }
    path = Path(tempfile.mkdtemp()) / "all.safetensors"
    save_file(tensors, path)
    for name, expected in tensors.items():
        expect_same(read_tensor(path, name), expected, f"tensor {name!r} of shape {list(expected.shape)}")


@hidden("read_tensor")
def test_read_tensor_no_dimensions_empty_and_missing(read_tensor):
    import tempfile
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from companion.grading import expect_same
    path = Path(tempfile.mkdtemp()) / "edge.safetensors"
    save_file({"scalar": torch.tensor(-1.5), "empty": torch.zeros(0), "flat": torch.zeros(2, 0, 3),
               "w": torch.ones(2)}, path, metadata={"format": "pt"})
    for name, expected, case in [("scalar", torch.tensor(-1.5), "shape []: a tensor without dimensions"),
                                 ("empty", torch.zeros(0), "shape [0]: no bytes at all"),
                                 ("flat", torch.zeros(2, 0, 3), "shape [2, 0, 3]: no bytes, three dimensions")]:
        try:
            got = read_tensor(path, name)
        except NotImplementedError:
            raise
        except Exception as err:
            raise AssertionError(f"{case}: read_tensor raised {type(err).__name__}: {err}") from None
        expect_same(got, expected, case)
    for missing in ("v", "__metadata__"):
        try:
            read_tensor(path, missing)
        except KeyError as err:
            if missing not in str(err):
                raise AssertionError(f"the KeyError for {missing!r} does not name it: {err}") from None
        except NotImplementedError:
            raise
        except Exception as err:
            raise AssertionError(f"asking for {missing!r}: expected a KeyError, got {type(err).__name__}: {err}") from None
        else:
            raise AssertionError(f"asking for {missing!r}, which is not a tensor of the file: expected a KeyError")


@hidden("read_tensor")
def test_read_tensor_header_order_is_not_data_order(read_tensor):
    import json
    import tempfile
    from pathlib import Path
    import torch
    from companion.grading import expect_same
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([[7, 8]], dtype=torch.int64)
    data = b.numpy().tobytes() + a.numpy().tobytes()  # b first in the data, a first in the header
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [16, 28]},
              "b": {"dtype": "I64", "shape": [1, 2], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces
    path = Path(tempfile.mkdtemp()) / "by_hand.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    expect_same(read_tensor(path, "a"), a, "a file written by hand: 'a' is first in the header, last in the data")
    expect_same(read_tensor(path, "b"), b, "a file written by hand: 'b' is second in the header, first in the data")


@hidden("read_tensor")
def test_read_tensor_own_code(read_tensor):
    import tempfile
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from companion.grading import expect_same, forbidding
    path = Path(tempfile.mkdtemp()) / "own.safetensors"
    w = torch.arange(6.0).view(2, 3).to(torch.bfloat16)
    save_file({"w": w, "v": torch.ones(4)}, path)
    with forbidding(read_tensor, "safetensors.torch.load_file", "safetensors.torch.load", "safetensors.safe_open",
                    "companion.checkpoint.SafetensorsFile.tensor", "companion.checkpoint.SafetensorsFile.__init__"):
        got = read_tensor(path, "w")
    expect_same(got, w, "a bfloat16 tensor, without safetensors' or companion's readers")
