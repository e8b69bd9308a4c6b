import numpy as np
import pytest
import torch

from companion.exercises import check, passes, same


def ref_softmax(x):
    return torch.softmax(x, dim=-1)


CASES = [(torch.tensor([1.0, 2.0, 3.0]),), (torch.zeros(2, 4),)]


def test_passing_function(capsys):
    assert passes(lambda x: x.exp() / x.exp().sum(-1, keepdim=True), ref_softmax, CASES, name="softmax")
    assert capsys.readouterr().out == "✅ softmax: all 2 checks passed.\n"


def test_check_prints_the_verdict_and_returns_nothing(capsys):
    # A check is the last line of its cell: a returned bool would show as a stray `True`.
    assert check(lambda x: x.exp() / x.exp().sum(-1, keepdim=True), ref_softmax, CASES, name="softmax") is None
    assert capsys.readouterr().out == "✅ softmax: all 2 checks passed.\n"
    assert check(lambda x: x.exp(), ref_softmax, CASES, name="softmax") is None
    assert "❌ softmax: case 1 of 2 failed" in capsys.readouterr().out


def test_wrong_values_name_the_case_and_index(capsys):
    assert not passes(lambda x: x.exp(), ref_softmax, CASES, name="softmax")
    out = capsys.readouterr().out
    assert "case 1 of 2 failed" in out and "at index (2,)" in out
    assert "expected" in out and "got" in out and "shape (3,)" in out


def test_wrong_shape(capsys):
    assert not passes(lambda x: x.sum(-1), ref_softmax, CASES)
    assert "expected shape (3,), got shape ()" in capsys.readouterr().out


def test_wrong_dtype_with_right_values(capsys):
    mask = lambda n: torch.ones(n, n, dtype=torch.bool).tril()  # noqa: E731
    assert not passes(lambda n: torch.ones(n, n).tril(), mask, [(3,)], name="mask")
    assert "case 1 of 1 failed: expected dtype torch.bool, got dtype torch.float32" in capsys.readouterr().out


def test_stub_reports_not_implemented(capsys):
    def stub(x):
        raise NotImplementedError

    assert not passes(stub, ref_softmax, CASES, name="softmax")
    assert "not implemented yet" in capsys.readouterr().out


def test_learner_exception_is_reported_not_raised(capsys):
    assert not passes(lambda x: x @ torch.ones(7), ref_softmax, CASES)
    assert "raised RuntimeError" in capsys.readouterr().out


def test_the_reference_is_not_trusted_blindly():
    with pytest.raises(ValueError, match="cases is empty"):
        check(ref_softmax, ref_softmax, [])


@pytest.mark.parametrize(
    "got, expected, ok",
    [
        (1.0, 1.0 + 1e-9, True),
        (1.0, 1.1, False),
        ([1, 2], [1, 2], True),
        ([1, 2], [1, 3], False),
        (np.array([1.0, 2.0]), torch.tensor([1.0, 2.0], dtype=torch.float64), True),
        ("abc", "abd", False),
        (torch.tensor([float("nan")]), torch.tensor([float("nan")]), True),
        (3, torch.tensor(3), False),
        (torch.ones(2), torch.ones(2, dtype=torch.float64), False),
        (np.array([1.0, 2.0], dtype=np.float32), torch.tensor([1.0, 2.0], dtype=torch.float64), False),
        ([torch.ones(2)], [torch.ones(2, dtype=torch.bool)], False),
    ],
)
def test_same(got, expected, ok):
    assert (same(got, expected) is None) is ok
