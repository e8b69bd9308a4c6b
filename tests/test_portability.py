"""What the chapters print must come out the same on every machine.

nbval compares every output of every chapter. The rule (CONTRIBUTING.md, ``companion.varies``)
is that a compared output holds on every CPU and GPU; what floating-point summation order
can move is marked ``# varies: <why>`` and bounded by an executed ``within(...)``; what only
describes the machine is marked ``# machine: <what>``. These tests check the rule where a
rule can be checked.
"""

import re

import nbval.plugin
import pytest

from companion.varies import MARKERS, OutOfBand, close, exemption, max_abs_difference, within
from test_notebooks import NOTEBOOKS, ROOT, ids, load, source

VERDICT = re.compile(r"^.+ in \[[^\]]+\]: True$", re.M)
# A raw float in scientific notation below 1e-3 (2.4e-07), unless it is a stated tolerance
# (< 1e-05, <= 1e-6, tol=1e-5, atol 1e-5).
TINY_SCI = re.compile(r"(?<![\w.])(?P<num>[-+]?\d+(?:\.\d+)?[eE]-0*(?P<exp>\d+))")
TOLERANCE_BEFORE = re.compile(r"(<=?|≤|tol\w*\s*=?|within|below|under)\s*$")
DIFFERENCE = re.compile(r"differ|diff\b|gap|error|\|", re.I)
# A raw decimal below 1e-3 with a significant digit (0.00042), which rounding cannot hold still.
TINY_DEC = re.compile(r"(?<![\w.])[-+]?0\.000\d*[1-9]")


def compared_text(cell):
    """The text nbval compares for a cell: stdout and text/plain results (not stderr, not images)."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream" and out["name"] == "stdout":
            parts.append("".join(out["text"]))
        elif out["output_type"] in ("execute_result", "display_data"):
            data = out["data"]
            if "text/plain" in data and not any(k.startswith("image/") for k in data):
                parts.append("".join(data["text/plain"]))
    return "".join(parts)


def code_cells(nb_path):
    return [c for c in load(nb_path)["cells"] if c["cell_type"] == "code"]


# ---- the helper --------------------------------------------------------------------------

def test_within_passes_inside_and_prints_the_verdict(capsys):
    assert within(1.95, 1.90, 2.00, "validation loss") is None  # no stray output at a cell's end
    assert capsys.readouterr().out == "validation loss in [1.9, 2.0]: True\n"


@pytest.mark.parametrize("value", [1.89, 2.01, float("nan"), float("inf")])
def test_within_raises_outside_naming_value_and_band(value):
    with pytest.raises(OutOfBand, match=r"validation loss = .* outside the stated band \[1.9, 2.0\]"):
        within(value, 1.9, 2.0, "validation loss")


def test_within_takes_tensors_and_numpy_scalars_but_not_several_values():
    import numpy as np
    import torch

    within(torch.tensor(0.5), 0, 1, "p", quiet=True)
    within(np.float32(0.5), 0, 1, "p", quiet=True)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        within(torch.tensor([0.5, 0.6]), 0, 1, "p")
    with pytest.raises(TypeError, match="expected a number, got str"):
        within("0.5", 0, 1, "p")
    with pytest.raises(ValueError, match="is empty"):
        within(0.5, 1, 0, "p")


def test_close_prints_a_verdict_not_the_difference(capsys):
    import torch

    a = torch.tensor([1.0, 2.0, 3.0])
    close(a, a + 3e-7, 1e-5)
    close(a, a + 1e-3, 1e-5, "max |ours - torch|")
    close(a, a * float("nan"), 1e-5)
    out = capsys.readouterr().out
    assert out == ("max |difference| < 1e-05: True\nmax |ours - torch| < 1e-05: False\n"
                   "max |difference| < 1e-05: False\n")
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(1, 3\)"):
        max_abs_difference(a, a[None])


def test_markers_are_recognised_only_on_the_first_line_and_with_a_reason():
    assert exemption("# varies: losses after training\nprint(x)") == "varies"
    assert exemption("\n# machine: tokens/s\nprint(x)") == "machine"
    assert exemption("print(x)  # varies: no") is None
    assert exemption("x = 1\n# varies: too late") is None
    assert exemption("# varies:\nprint(x)") is None, "a marker must say why"


def test_nbval_does_not_compare_marked_cells_and_compares_the_rest():
    """conftest.py teaches nbval the markers; without it these outputs would be compared."""
    marked = dict(nbval.plugin.find_comment_markers("# varies: a sample\nprint(sample)"))
    plain = dict(nbval.plugin.find_comment_markers("print(sample)"))
    assert marked.get("check") is False
    assert "check" not in plain


# ---- the chapters --------------------------------------------------------------------------

@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=ids)
def test_one_mechanism_for_exemptions(nb_path):
    """No nbval comment markers or tags: only the book's own two markers exempt a cell."""
    for i, cell in enumerate(load(nb_path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        text = source(cell)
        assert "NBVAL_" not in text and "PYTEST_VALIDATE" not in text, (
            f"{nb_path.name}: cell {i} uses an nbval marker; use '# varies:' or '# machine:'")
        tags = cell.get("metadata", {}).get("tags", [])
        assert not [t for t in tags if t.startswith("nbval")], (
            f"{nb_path.name}: cell {i} has an nbval tag {tags}; use '# varies:' or '# machine:'")


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=ids)
def test_every_varying_cell_is_followed_by_an_executed_band_check(nb_path):
    cells = code_cells(nb_path)
    for i, cell in enumerate(cells):
        if exemption(source(cell)) != "varies":
            continue
        here = "within(" in source(cell) and VERDICT.search(compared_text(cell))
        following = cells[i + 1] if i + 1 < len(cells) else None
        after = (following is not None and not exemption(source(following))
                 and "within(" in source(following) and VERDICT.search(compared_text(following)))
        assert here or after, (
            f"{nb_path.name}: the '# varies:' cell {source(cell).splitlines()[0]!r} is not followed "
            "by a compared cell whose within(...) printed its verdict")


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=ids)
def test_no_compared_output_prints_a_raw_float_difference_below_1e_3(nb_path):
    """A difference of 3.6e-07 on one CPU is 2.4e-07 on another: print a verdict instead.

    Checked on every compared line that reports a difference, gap or error (configs and
    schedules print small constants such as eps=1e-05, which are facts, not differences).
    """
    for cell in code_cells(nb_path):
        if exemption(source(cell)):
            continue
        for line in compared_text(cell).splitlines():
            if not DIFFERENCE.search(line) or VERDICT.fullmatch(line):
                continue
            for m in TINY_SCI.finditer(line):
                if int(m["exp"]) < 4 or float(m["num"]) == 0 or TOLERANCE_BEFORE.search(line[:m.start()]):
                    continue
                raise AssertionError(
                    f"{nb_path.name}: a compared output prints the difference {m['num']} raw; print a "
                    f"verdict with companion.varies.close, or mark the cell '# varies:'\n{line}")
            tiny = TINY_DEC.search(line)
            assert not tiny, (f"{nb_path.name}: a compared output prints the difference {tiny.group()} "
                              f"raw; print a verdict or a band instead\n{line}")


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=ids)
def test_executed_on_kernels_the_second_pass_does_not_use(nb_path):
    """make test re-runs the chapters with ATEN_CPU_CAPABILITY=default; they must have been
    executed with other kernels, or that second pass would prove nothing."""
    meta = load(nb_path)["metadata"].get("companion", {})
    assert meta.get("cpu_capability"), f"{nb_path.name} does not record its kernels; run make execute"
    assert meta["cpu_capability"] != "default", (
        f"{nb_path.name} was executed with ATEN_CPU_CAPABILITY=default, which the second pass "
        "of make test also uses; execute it with the machine's own kernels")


def test_sanitiser_blanks_no_numbers():
    """tests/nbval_sanitize.cfg may hide memory addresses, not numbers the book computes."""
    cfg = (ROOT / "tests" / "nbval_sanitize.cfg").read_text(encoding="utf-8")
    regexes = re.findall(r"^regex:\s*(.+)$", cfg, re.M)
    for regex in regexes:
        for number in ["1.95", "12", "3.6e-07", "0.5 s", "12 ms", "97%"]:
            assert not re.search(regex, number), f"the sanitiser regex {regex!r} blanks {number!r}"


def test_markers_documented_where_contributors_look():
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    for marker in MARKERS:
        assert marker in text, f"CONTRIBUTING.md does not explain {marker!r}"
    assert "within(" in text and "close(" in text


def test_make_test_runs_the_chapters_again_on_other_kernels():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "test-other-kernels" in test_recipe, "make test must run the second pass"
    other = re.search(r"^OTHER_KERNELS\s*=\s*(.+)$", makefile, re.M).group(1).split()
    settings = dict(s.split("=", 1) for s in other)
    assert settings.get("ATEN_CPU_CAPABILITY") == "default"
    assert settings.get("MKL_ENABLE_INSTRUCTIONS") == "SSE4_2"
    assert settings.get("OPENBLAS_CORETYPE"), "numpy's BLAS (chapters 4 and 5) needs another core type too"
    second = re.search(r"^test-other-kernels:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "$(OTHER_KERNELS)" in second and "$(NBVAL)" in second and second.rstrip().endswith("chapters")
