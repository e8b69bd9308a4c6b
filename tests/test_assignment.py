"""Graded assignments: chapters into otter-grader assignments, and grading a class.

The end-to-end test makes chapter 2's assignment, writes five submissions (the solutions,
the untouched student copy, one answer wrong, one function that never returns plus a cell
that never ends, one function that raises plus a cell that raises), grades them with
otter's runner and reads the CSV.
"""

from __future__ import annotations

import csv
import json
import re
import signal
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("otter")

from companion import assignment as asg  # noqa: E402
from companion.grading import (  # noqa: E402
    ForbiddenCall,
    TimeLimitExceeded,
    expect_same,
    forbidding,
    hidden,
    run_checks,
    time_limit,
)

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _src(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


# ------------------------------------------------------------------ the helpers in the kernel


def test_forbidding_catches_the_module_route_and_an_alias_and_restores_both():
    alias = torch.softmax
    scope = {"torch": torch, "mine": alias}
    exec("def f(x):\n    return mine(x, -1)\ndef g(x):\n    return torch.softmax(x, -1)\n", scope)
    x = torch.randn(3)
    for fn, name in ((scope["f"], "f"), (scope["g"], "g")):
        with forbidding(fn, "torch.softmax"):
            with pytest.raises(ForbiddenCall, match=rf"{name} calls torch.softmax"):
                fn(x)
    assert torch.softmax is alias and scope["mine"] is alias
    assert torch.allclose(scope["f"](x), torch.softmax(x, -1))
    with forbidding(scope["f"], "torch.Tensor.softmax"):
        with pytest.raises(ForbiddenCall):
            x.softmax(-1)
    assert torch.allclose(x.softmax(-1), scope["f"](x))


def test_forbidding_catches_the_reference_itself_and_a_notebook_function():
    import functools

    with pytest.raises(ForbiddenCall, match="is torch.softmax itself"):
        with forbidding(torch.softmax, "torch.softmax"):
            pass
    with pytest.raises(ForbiddenCall, match="itself"):
        with forbidding(functools.partial(torch.softmax, dim=-1), "torch.softmax"):
            pass
    scope = {}
    exec("def helper(x):\n    return x + 1\ndef f(x):\n    return helper(x)\n", scope)
    with forbidding(scope["f"], "helper", "not_defined_here"):
        with pytest.raises(ForbiddenCall, match="f calls helper"):
            scope["f"](1)
    assert scope["f"](1) == 2


def test_forbidding_sees_the_reference_run_by_any_route():
    import functools

    from companion import attention

    scope = {"torch": torch, "attention": attention, "functools": functools}
    exec("def by_default(s, _f=torch.softmax):\n    return _f(s, -1)\n"
         "def by_partial(x, _f=functools.partial(attention.split_heads, num_heads=2)):\n    return _f(x)\n"
         "def own(s):\n    e = (s - s.max(-1, keepdim=True).values).exp()\n    return e / e.sum(-1, keepdim=True)\n",
         scope)
    with pytest.raises(ForbiddenCall, match="by_default runs torch.softmax"):
        with forbidding(scope["by_default"], "torch.softmax"):
            scope["by_default"](torch.randn(3))
    with pytest.raises(ForbiddenCall, match="by_partial runs companion.attention.split_heads"):
        with forbidding(scope["by_partial"], "companion.attention.split_heads"):
            scope["by_partial"](torch.randn(1, 3, 4))
    with forbidding(scope["own"], "torch.softmax", "torch.Tensor.softmax"):
        got = scope["own"](torch.randn(3))
    assert torch.allclose(got.sum(), torch.tensor(1.0))
    assert sys.getprofile() is None


def test_a_loop_that_swallows_exceptions_is_still_stopped():
    start = time.monotonic()
    with pytest.raises(TimeLimitExceeded):
        with time_limit(0.2):
            while True:
                try:
                    time.sleep(0.01)
                except Exception:
                    pass
    assert time.monotonic() - start < 5


def test_forbidding_rejects_names_it_cannot_find():
    with pytest.raises(ValueError, match="at least one"):
        with forbidding(len):
            pass
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        with forbidding(len, "no_such_module_xyz.f"):
            pass


def test_time_limit_interrupts_python_and_restores_the_alarm():
    previous = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(TimeLimitExceeded, match="0.2 s"):
        with time_limit(0.2):
            while True:
                pass
    assert time.monotonic() - start < 5
    assert signal.getsignal(signal.SIGALRM) is previous
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with time_limit(5):
        assert sum(range(10)) == 45
    with pytest.raises(ValueError, match="positive"):
        with time_limit(0):
            pass


def test_run_checks_passes_fails_with_the_verdict_and_refuses_a_cell_without_check():
    from companion.exercises import check

    env = {"check": check, "square": lambda x: x * x, "wrong": lambda x: x + x}
    run_checks(env, "check(square, lambda x: x ** 2, [(3,)], name='square')")
    with pytest.raises(AssertionError, match=r"square: case 1 of 1 failed: expected 9, got 6"):
        run_checks(env, "check(wrong, lambda x: x ** 2, [(3,)], name='square')")
    with pytest.raises(AssertionError, match="no time"):
        run_checks(env, "x = 1")
    assert env["check"] is check and "x" not in env


def test_expect_same_names_the_case_and_checks_dtype():
    expect_same(torch.ones(2), torch.ones(2), "ones")
    with pytest.raises(AssertionError, match=r"halves: expected dtype torch.float64"):
        expect_same(torch.ones(2), torch.ones(2, dtype=torch.float64), "halves")
    with pytest.raises(AssertionError, match=r"shape: expected shape \(3,\)"):
        expect_same(torch.ones(2), torch.ones(3), "shape")


def test_hidden_marks_only_test_functions_of_an_exercise():
    with pytest.raises(ValueError, match="function name"):
        hidden("not a name")
    with pytest.raises(ValueError, match="must start with 'test_'"):
        hidden("f")(lambda: None)


# ------------------------------------------------------------------ chapters into assignments


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_exercise_is_found_with_its_checks_and_hidden_tests(path):
    nb = _load(path)
    exercises = asg.find_exercises(nb)
    stubs = [c for c in nb["cells"] if "exercise" in c["metadata"].get("tags", [])]
    assert len(exercises) == len(stubs) >= 3
    hidden_tests = asg.hidden_tests(path.stem)
    for e in exercises:
        assert any("check(" in _src(nb["cells"][c]) for c in e.checks)
        assert len(hidden_tests.get(e.function, [])) >= 2, f"{path.stem}: {e.function} needs hidden tests"
    assert set(hidden_tests) <= {e.function for e in exercises}


def test_a_hidden_test_that_reads_a_name_from_its_file_is_refused(tmp_path):
    (tmp_path / "ch.py").write_text(
        "from companion.grading import hidden\nLIMIT = 3\n\n"
        "@hidden('f')\ndef test_f(f):\n    assert f(1) < LIMIT\n", encoding="utf-8")
    with pytest.raises(ValueError, match="reads 'LIMIT'"):
        asg.hidden_tests("ch", tmp_path)
    (tmp_path / "ch.py").write_text(
        "from companion.grading import hidden\n\n"
        "@hidden('f')\ndef test_f(f):\n    import math\n    assert [math.floor(v) for v in (f(1),)] == [1]\n",
        encoding="utf-8")
    assert asg.hidden_tests("ch", tmp_path) == {"f": ["def test_f(f):\n    import math\n    "
                                                      "assert [math.floor(v) for v in (f(1),)] == [1]"]}


def test_a_chapter_without_exercises_or_with_tests_for_no_exercise_is_refused():
    nb = _load(ROOT / "chapters" / "02_attention.ipynb")
    bare = {**nb, "cells": [c for c in nb["cells"] if "exercise" not in c["metadata"].get("tags", [])
                            and "solution" not in c["metadata"].get("tags", [])]}
    with pytest.raises(ValueError, match="has no exercises"):
        asg.master_notebook(bare, "02_attention", hidden={})
    with pytest.raises(ValueError, match=r"\['nonexistent'\]"):
        asg.master_notebook(nb, "02_attention", hidden={"nonexistent": ["def test_x(): pass"]})


def _solution_lines(nb: dict) -> list[str]:
    """Lines of the solutions that no other cell of the chapter has (what must not leak)."""
    cells = nb["cells"]
    elsewhere = {line.strip() for c in cells if "solution" not in c["metadata"].get("tags", [])
                 for line in _src(c).splitlines()}
    return [line.strip() for c in cells if "solution" in c["metadata"].get("tags", [])
            for line in _src(c).splitlines()
            if line.strip() and line.strip() not in elsewhere and not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def every_assignment(tmp_path_factory):
    out = tmp_path_factory.mktemp("assignments")
    return {p.stem: asg.make_assignment(p, out, run_tests=False) for p in CHAPTERS}


@pytest.mark.slow
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_converts_and_no_solution_or_hidden_test_reaches_the_student(path, every_assignment):
    target = every_assignment[path.stem]
    nb = _load(path)
    student_files = [f for f in (target / "student").rglob("*") if f.is_file()]
    assert [f.name for f in student_files] == [path.name]
    student_text = "\n".join(f.read_text(encoding="utf-8") for f in student_files)
    student_nb = json.loads(student_text)
    student_sources = "\n".join(_src(c) for c in student_nb["cells"])
    student_lines = {line.strip() for line in student_sources.splitlines()}
    leaked = [line for line in _solution_lines(nb) if line in student_lines]
    assert not leaked, f"solution lines in the student copy: {leaked[:3]}"
    for stub in (c for c in nb["cells"] if "exercise" in c["metadata"].get("tags", [])):
        assert _src(stub).strip() in student_sources
    hidden_tests = asg.hidden_tests(path.stem)
    names = [re.match(r"def (\w+)", t).group(1) for tests in hidden_tests.values() for t in tests]
    assert names and not [n for n in names if n in student_text]
    exercises = asg.find_exercises(nb)
    with zipfile.ZipFile(target / "autograder" / "autograder.zip") as z:
        tests = {Path(n).stem: z.read(n).decode() for n in z.namelist() if n.startswith("tests/")}
        config = json.loads(z.read("otter_config.json"))
    assert sorted(tests) == sorted(e.question for e in exercises)
    for e in exercises:
        cases = tests[e.question].count("@test_case(")
        assert cases == 1 + len(hidden_tests[e.function])
        assert tests[e.question].count("hidden=True") == len(hidden_tests[e.function])
    assert config["plugins"] == [{"companion.assignment.CellTimeLimit": {
        "cell_seconds": asg.DEFAULT_CELL_LIMIT, "test_seconds": asg.DEFAULT_TEST_LIMIT}}]


# ------------------------------------------------------------------ grading a class, end to end


def _fill(student: dict, answers: dict[str, str], extra_cells: list[tuple[int, str]] = ()) -> dict:
    """A submission: the student copy with the answer cells replaced by ``answers``."""
    nb = json.loads(json.dumps(student))
    for cell in nb["cells"]:
        if "otter_answer_cell" in cell["metadata"].get("tags", []) and cell["cell_type"] == "code":
            name = re.search(r"^def (\w+)", _src(cell), re.M).group(1)
            if name in answers:
                cell["source"] = answers[name]
    for index, source in extra_cells:
        nb["cells"].insert(index, {"cell_type": "code", "metadata": {}, "source": source,
                                   "outputs": [], "execution_count": None, "id": f"extra-{index}"})
    return nb


@pytest.mark.slow
def test_grading_chapter_2_end_to_end(tmp_path):
    chapter = ROOT / "chapters" / "02_attention.ipynb"
    target = asg.make_assignment(chapter, tmp_path / "assignments", run_tests=False)
    student = _load(target / "student" / "02_attention.ipynb")
    nb = _load(chapter)
    solutions = {}
    for i, cell in enumerate(nb["cells"]):
        if "solution" in cell["metadata"].get("tags", []):
            solutions[re.search(r"^def (\w+)", _src(cell), re.M).group(1)] = _src(cell)
    assert sorted(solutions) == ["advance", "alibi_bias", "padded_weights", "stable_softmax"]
    first_code = next(i for i, c in enumerate(student["cells"]) if c["cell_type"] == "code") + 1
    submitted = tmp_path / "submitted"
    submitted.mkdir()
    wrong_alibi = ("def alibi_bias(T, num_heads):\n"
                   "    slopes = 2.0 ** (-8.0 * torch.arange(1, num_heads + 1) / num_heads)\n"
                   "    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]\n"
                   "    return -slopes[:, None, None] * distance  # no -inf above the diagonal: wrong\n")
    endless = ("def advance(pe, k):\n    while True:\n        try:\n            pass\n"
               "        except Exception:  # swallows what it can\n            pass\n")
    raising = "def padded_weights(scores, lengths):\n    raise RuntimeError('my bug')\n"
    submissions = {
        "full": _fill(student, solutions),
        "untouched": student,
        "wrong": _fill(student, {**solutions, "alibi_bias": wrong_alibi}),
        "endless": _fill(student, {**solutions, "advance": endless},
                         [(first_code, "while True:\n    pass")]),
        "crash": _fill(student, {**solutions, "padded_weights": raising},
                       [(first_code, "raise ValueError('a cell that fails')")]),
    }
    for name, sub in submissions.items():
        (submitted / f"{name}.ipynb").write_text(json.dumps(sub), encoding="utf-8")
    start = time.monotonic()
    graded = asg.grade(target, submitted, tmp_path / "grades", cell_limit=15, test_limit=10, timeout=900, jobs=2)
    elapsed = time.monotonic() - start
    with open(tmp_path / "grades" / "scores.csv", encoding="utf-8") as f:
        rows = {row["student"]: row for row in csv.DictReader(f)}
    with open(tmp_path / "grades" / "feedback.csv", encoding="utf-8") as f:
        feedback = {(row["student"], row["question"]): row["reason"] for row in csv.DictReader(f)}
    print((tmp_path / "grades" / "scores.csv").read_text(encoding="utf-8"))
    print((tmp_path / "grades" / "feedback.csv").read_text(encoding="utf-8"))
    print(f"graded 5 submissions in {elapsed:.0f} s")
    questions = ["ex1_stable_softmax", "ex2_padded_weights", "ex3_alibi_bias", "ex4_advance"]
    assert list(rows) == ["crash", "endless", "full", "untouched", "wrong"]
    assert [rows["full"][q] for q in questions] == ["2", "2", "2", "2"] and rows["full"]["total"] == "8"
    assert [rows["untouched"][q] for q in questions] == ["0", "0", "0", "0"]
    assert [rows["wrong"][q] for q in questions] == ["2", "2", "0", "2"] and rows["wrong"]["total"] == "6"
    assert [rows["endless"][q] for q in questions] == ["2", "2", "2", "0"]
    assert [rows["crash"][q] for q in questions] == ["2", "0", "2", "2"]
    assert all(row["possible"] == "8" for row in rows.values())
    assert "time limit of 10 s" in feedback[("endless", "ex4_advance")]
    assert "RuntimeError: my bug" in feedback[("crash", "ex2_padded_weights")]
    assert "values differ: at index (0, 0, 1) expected -inf, got 0.0625" in feedback[("wrong", "ex3_alibi_bias")]
    assert "not implemented yet" in feedback[("untouched", "ex1_stable_softmax")]
    assert not [k for k in feedback if k[0] == "full"]
    for name in submissions:
        results = _load(tmp_path / "grades" / "results" / f"{name}.json")
        assert {t["name"] for t in results["tests"]} >= set(questions)
    assert sorted(g.student for g in graded) == sorted(submissions)


@pytest.mark.slow
def test_a_submission_past_its_whole_time_limit_is_graded_zero_with_the_reason(tmp_path):
    chapter = ROOT / "chapters" / "03_message_passing.ipynb"
    target = asg.make_assignment(chapter, tmp_path / "assignments", run_tests=False)
    student = _load(target / "student" / f"{chapter.stem}.ipynb")
    submitted = tmp_path / "submitted"
    submitted.mkdir()
    (submitted / "slow.ipynb").write_text(json.dumps(_fill(student, {}, [(1, "import time\ntime.sleep(600)")])),
                                          encoding="utf-8")
    start = time.monotonic()
    [graded] = asg.grade(target, submitted, tmp_path / "grades", cell_limit=600, timeout=20)
    assert time.monotonic() - start < 120
    assert graded.total == 0 and set(graded.reasons) == set(graded.possible)
    assert all("stopped after 20 s" in r for r in graded.reasons.values())
    with open(tmp_path / "grades" / "scores.csv", encoding="utf-8") as f:
        [row] = list(csv.DictReader(f))
    assert row["student"] == "slow" and row["total"] == "0"


def test_grade_skips_files_that_are_not_notebooks_and_says_so(tmp_path, capsys):
    (tmp_path / "autograder").mkdir()
    (tmp_path / "autograder" / "autograder.zip").write_bytes(b"")
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "ada.zip").write_bytes(b"")
    (subs / "._ada.ipynb").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="no .ipynb submissions"):
        asg.grade(tmp_path, subs, tmp_path / "out")
    out = capsys.readouterr().out
    assert f"not graded: {subs / 'ada.zip'} is not a .ipynb file" in out and "._ada" not in out


def test_grade_refuses_a_missing_autograder_or_an_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="make assignment"):
        asg.grade(tmp_path, tmp_path, tmp_path / "out")
    (tmp_path / "autograder").mkdir()
    (tmp_path / "autograder" / "autograder.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no .ipynb submissions"):
        asg.grade(tmp_path, tmp_path, tmp_path / "out")
