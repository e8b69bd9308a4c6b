import numpy as np
import pytest
import torch

from companion.exercises import check, same


def ref_softmax(x):
    return torch.softmax(x, dim=-1)


CASES = [(torch.tensor([1.0, 2.0, 3.0]),), (torch.zeros(2, 4),)]


def test_passing_function(capsys):
    assert check(lambda x: x.exp() / x.exp().sum(-1, keepdim=True), ref_softmax, CASES, name="softmax")
    assert capsys.readouterr().out == "✅ softmax: all 2 checks passed.\n"


def test_wrong_values_name_the_case_and_index(capsys):
    assert not check(lambda x: x.exp(), ref_softmax, CASES, name="softmax")
    out = capsys.readouterr().out
    assert "case 1 of 2 failed" in out and "at index (2,)" in out
    assert "expected" in out and "got" in out and "shape (3,)" in out


def test_wrong_shape(capsys):
    assert not check(lambda x: x.sum(-1), ref_softmax, CASES)
    assert "expected shape (3,), got shape ()" in capsys.readouterr().out


def test_stub_reports_not_implemented(capsys):
    def stub(x):
        raise NotImplementedError

    assert not check(stub, ref_softmax, CASES, name="softmax")
    assert "not implemented yet" in capsys.readouterr().out


def test_learner_exception_is_reported_not_raised(capsys):
    assert not check(lambda x: x @ torch.ones(7), ref_softmax, CASES)
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
    ],
)
def test_same(got, expected, ok):
    assert (same(got, expected) is None) is ok
