"""companion.data, batches: random windows, shifted targets, resumable state, the split."""

import numpy as np
import pytest
import torch

from companion.data import RandomWindows, get_batch, train_val_split, windows_at


def test_targets_are_inputs_shifted_by_one():
    tokens = torch.arange(1000) * 3  # distinct values: a window's first value gives its start
    x, y = get_batch(tokens, 16, 20, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 20) and x.dtype == torch.long
    for row_x, row_y in zip(x, y):
        start = int(row_x[0]) // 3
        assert torch.equal(row_x, tokens[start:start + 20])
        assert torch.equal(row_y, tokens[start + 1:start + 21])


def test_every_start_position_is_reachable_and_none_runs_off_the_end():
    tokens = torch.arange(12)
    loader = RandomWindows(tokens, batch_size=64, context_length=4, seed=3)
    seen = torch.cat([loader.starts(s) for s in range(20)])
    assert set(seen.tolist()) == set(range(8))  # 12 - (4 + 1) + 1 starts
    x, y = loader.batch(0)
    assert int(y.max()) <= 11


def test_get_batch_is_uniform_over_starts():
    tokens = torch.arange(10)
    x, _ = get_batch(tokens, 40_000, 4, torch.Generator().manual_seed(0))
    counts = torch.bincount(x[:, 0], minlength=6).float()
    assert counts.shape == (6,)
    assert ((counts / 40_000 - 1 / 6).abs() < 0.01).all()


def test_a_batch_depends_only_on_seed_and_step():
    tokens = torch.arange(10_000)
    a = RandomWindows(tokens, 8, 16, seed=5)
    b = RandomWindows(tokens, 8, 16, seed=5)
    first = [next(a) for _ in range(4)]
    assert torch.equal(b.batch(3)[0], first[3][0])  # random access
    assert not torch.equal(first[0][0], first[1][0])
    c = RandomWindows(tokens, 8, 16, seed=6)
    assert not torch.equal(c.batch(0)[0], first[0][0])


def test_state_round_trip_resumes_the_same_stream():
    tokens = torch.arange(10_000)
    a = RandomWindows(tokens, 4, 8, seed=1)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    assert state == {"seed": 1, "step": 3}
    rest = [next(a)[0] for _ in range(3)]
    b = RandomWindows(tokens, 4, 8, seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(next(b)[0], r) for r in rest)
    with pytest.raises(ValueError, match="seed and step"):
        b.load_state_dict({"step": 1})


def test_windows_at_known_values():
    x, y = windows_at(torch.arange(10), torch.tensor([0, 6]), 3)
    assert x.tolist() == [[0, 1, 2], [6, 7, 8]] and y.tolist() == [[1, 2, 3], [7, 8, 9]]


def test_numpy_tokens_are_accepted():
    x, y = RandomWindows(np.arange(50, dtype=np.uint16), 2, 5).batch(0)
    assert x.dtype == torch.long and torch.equal(y, x + 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tokens=torch.arange(5), batch_size=2, context_length=5), "too few"),
    (dict(tokens=torch.arange(50), batch_size=0, context_length=5), "batch_size=0"),
    (dict(tokens=torch.arange(50), batch_size=2, context_length=0), "context_length=0"),
    (dict(tokens=torch.rand(50), batch_size=2, context_length=5), "1-D array of ids"),
    (dict(tokens=torch.arange(50).view(5, 10), batch_size=2, context_length=5), "1-D array"),
])
def test_bad_inputs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomWindows(**kwargs)
    with pytest.raises(ValueError, match=match):
        get_batch(**kwargs)


def test_train_val_split_is_contiguous_and_complete():
    tokens = torch.arange(1001)
    train, val = train_val_split(tokens, 0.1)
    assert len(train) == 901 and len(val) == 100
    assert torch.equal(torch.cat([train, val]), tokens)
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        train_val_split(tokens, 1.5)
