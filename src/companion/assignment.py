"""Graded assignments from chapters, with otter-grader.

Two commands::

    python -m companion.assignment make chapters/02_attention.ipynb --out assignments
    python -m companion.assignment grade assignments/02_attention SUBMISSIONS/ --out grades/

``make`` turns each exercise of a chapter into an otter-grader question and runs
``otter assign``, which writes ``assignments/<chapter>/student/`` (the notebook a class
receives: stubs, public tests, no solutions, no hidden tests) and
``assignments/<chapter>/autograder/`` (the solutions notebook, the hidden tests and
``autograder.zip``, the file Gradescope's otter autograder takes).

Each question has

- the chapter's own check cells as its public test (:func:`companion.grading.run_checks`),
  which the student can run with ``grader.check("<question>")``;
- the hidden tests of ``grading/<chapter>.py``: more inputs, edge cases, dtypes and
  shapes, and, where the exercise asks for the learner's own code, a run under
  :func:`companion.grading.forbidding` that fails if the learner's function calls the
  reference it is checked against.

``grade`` runs otter's own runner (``otter run``, no containers) on every notebook of a
folder, one process per submission, with a time limit per cell and per test
(:func:`companion.grading.install_time_limits`) and one for the whole submission, and
writes ``scores.csv`` (one row per student, one column per question),
``feedback.csv`` (why each question lost points) and each submission's
``results/<student>.json`` in Gradescope's results format.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Exercise",
    "GradedSubmission",
    "find_exercises",
    "grade",
    "hidden_tests",
    "make_assignment",
    "master_notebook",
]

ROOT = Path(__file__).resolve().parents[2]
HIDDEN_DIR = ROOT / "grading"
EXERCISE_TAG, SOLUTION_TAG = "exercise", "solution"
DEFAULT_POINTS = 2
DEFAULT_CELL_LIMIT = 300  # seconds: chapter 12 trains a model for minutes in one cell
DEFAULT_TEST_LIMIT = 30  # seconds: a hidden test takes well under one
LIMIT_ENV = "COMPANION_CELL_LIMIT"
TEST_LIMIT_ENV = "COMPANION_TEST_LIMIT"
REQUIREMENTS = """\
# What the autograder needs (on Gradescope; `otter run` uses the current environment).
torch
companion @ git+https://github.com/tfs-book/transformers-from-scratch
"""


@dataclass
class Exercise:
    """One exercise of a chapter, as found in its notebook."""

    number: int
    function: str  # the name the stub defines
    prompt_start: int  # index of the markdown cell that opens the exercise
    stub: int  # index of the exercise cell
    solution: int  # index of the solution cell
    checks: list[int] = field(default_factory=list)  # the check cells after the solution

    @property
    def question(self) -> str:
        return f"ex{self.number}_{self.function}"


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def find_exercises(notebook: dict) -> list[Exercise]:
    """The exercises of a chapter notebook, in order.

    An exercise is a cell tagged ``exercise`` that defines one function, the cell tagged
    ``solution`` right after it, and the code cells after that up to the next markdown
    cell, which must call ``check``. Anything else is a malformed chapter and raises.
    """
    cells = notebook["cells"]
    found = []
    for i, cell in enumerate(cells):
        if EXERCISE_TAG not in _tags(cell):
            continue
        names = re.findall(r"^(?:def|class) (\w+)", _source(cell), re.M)
        if len(names) != 1:
            raise ValueError(f"exercise cell {i} defines {names or 'nothing'}: it must define exactly one function")
        if i + 1 >= len(cells) or SOLUTION_TAG not in _tags(cells[i + 1]):
            raise ValueError(f"exercise cell {i} ({names[0]}) is not followed by a cell tagged {SOLUTION_TAG!r}")
        start = i
        while start > 0 and cells[start - 1]["cell_type"] == "markdown":
            start -= 1
            if re.search(r"^(### |\*\*)Exercise \d", _source(cells[start]), re.M):
                break
        else:
            raise ValueError(f"exercise cell {i} ({names[0]}) has no '### Exercise N' heading above it")
        checks = []
        j = i + 2
        while j < len(cells) and cells[j]["cell_type"] == "code":
            checks.append(j)
            j += 1
        if not any("check(" in _source(cells[c]) for c in checks):
            raise ValueError(f"exercise {names[0]}: no check(...) cell follows its solution")
        found.append(Exercise(len(found) + 1, names[0], start, i, i + 1, checks))
    return found


def hidden_tests(chapter: str, hidden_dir: Path = HIDDEN_DIR) -> dict[str, list[str]]:
    """Source of each hidden test in ``grading/<chapter>.py``, by question function name.

    The decorator line is dropped: what remains is a plain function that otter turns
    into a test case. A test must not depend on anything at the file's top level but
    its imports inside the body (checked here: a name the body reads that is not a
    parameter, an import of the body or a builtin is an error).
    """
    path = Path(hidden_dir) / f"{chapter}.py"
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, str(path))
    tests: dict[str, list[str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        marks = [d for d in node.decorator_list if isinstance(d, ast.Call)
                 and getattr(d.func, "id", None) == "hidden"]
        if len(marks) != 1 or not node.name.startswith("test_"):
            raise ValueError(f"{path}:{node.lineno}: {node.name} must be one @hidden('<exercise>') test_... function")
        question = ast.literal_eval(marks[0].args[0])
        bare = copy.deepcopy(node)
        bare.decorator_list = []
        _check_self_contained(bare, path)
        tests.setdefault(question, []).append(ast.unparse(bare))
    return tests


def _check_self_contained(fn: ast.FunctionDef, path: Path) -> None:
    import builtins

    known = set(dir(builtins)) | {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    for node in ast.walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            known |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            known.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.Lambda)) and node is not fn:
            args = node.args
            known |= {a.arg for a in args.args + args.kwonlyargs}
            if isinstance(node, ast.FunctionDef):
                known.add(node.name)
        elif isinstance(node, ast.ClassDef):
            known.add(node.name)
        elif isinstance(node, ast.arg):
            known.add(node.arg)
        elif isinstance(node, ast.comprehension):
            for target in ast.walk(node.target):
                if isinstance(target, ast.Name):
                    known.add(target.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            known.add(node.name)
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in known:
            raise ValueError(f"{path}: hidden test {fn.name} reads {node.id!r}, which it neither imports "
                             "nor takes as a parameter: each test is copied into the autograder on its own")


def _raw(text: str) -> dict:
    return {"cell_type": "raw", "metadata": {}, "source": text}


def _code(text: str) -> dict:
    return {"cell_type": "code", "metadata": {}, "source": text, "outputs": [], "execution_count": None}


def _answer_cell(stub: str, solution: str) -> str:
    """One cell that otter shows as ``stub`` to students and runs as ``solution``.

    Otter drops a ``# BEGIN SOLUTION NO PROMPT`` block from the student copy and keeps
    the lines between ``# BEGIN PROMPT`` and ``# END PROMPT``, which the solution copy
    holds inside a string it never uses.
    """
    quote = '"""' if '"""' not in stub else "'''"
    if quote in stub:
        raise ValueError("the exercise stub uses both kinds of triple quotes")
    return (f"# BEGIN SOLUTION NO PROMPT\n{solution.rstrip()}\n# END SOLUTION\n"
            f"{quote} # BEGIN PROMPT\n{stub.rstrip()}\n{quote} # END PROMPT\n")


def master_notebook(notebook: dict, chapter: str, *, points: int = DEFAULT_POINTS,
                    cell_limit: float = DEFAULT_CELL_LIMIT, test_limit: float = DEFAULT_TEST_LIMIT,
                    hidden: dict[str, list[str]] | None = None) -> dict:
    """The otter-assign master notebook of a chapter (a new dict; outputs cleared)."""
    exercises = find_exercises(notebook)
    if not exercises:
        raise ValueError(f"{chapter} has no exercises (cells tagged {EXERCISE_TAG!r})")
    hidden = hidden_tests(chapter) if hidden is None else hidden
    unknown = set(hidden) - {e.function for e in exercises}
    if unknown:
        raise ValueError(f"grading/{chapter}.py has tests for {sorted(unknown)}, which are not exercises of {chapter}")
    cells = notebook["cells"]
    config = {
        "name": chapter,
        "init_cell": True,
        "check_all_cell": False,
        "export_cell": False,
        "run_tests": True,
        "tests": {"files": False, "ok_format": False},
        "generate": {"pdf": False, "show_stdout": True,
                     "plugins": [{"companion.assignment.CellTimeLimit": {"cell_seconds": cell_limit,
                                                                          "test_seconds": test_limit}}]},
        "requirements": "requirements.txt",
        "overwrite_requirements": True,
    }
    import yaml

    out = [_raw("# ASSIGNMENT CONFIG\n" + yaml.safe_dump(config, sort_keys=False))]
    starts = {e.prompt_start: e for e in exercises}
    skip: set[int] = set()
    for i, cell in enumerate(cells):
        if i in skip:
            continue
        exercise = starts.get(i)
        if exercise is None:
            cell = copy.deepcopy(cell)
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
            out.append(cell)
            continue
        out.append(_raw(f"# BEGIN QUESTION\nname: {exercise.question}\npoints: {points}"))
        out.extend(copy.deepcopy(cells[k]) for k in range(exercise.prompt_start, exercise.stub))
        out.append(_raw("# BEGIN SOLUTION"))
        out.append(_code(_answer_cell(_source(cells[exercise.stub]), _source(cells[exercise.solution]))))
        out.append(_raw("# END SOLUTION"))
        checks = "\n\n".join(_source(cells[c]) for c in exercise.checks)
        public = (f"def test_the_chapters_check(env):\n"
                  f"    from companion.grading import run_checks\n"
                  f"    run_checks(env, {checks!r})\n")
        out.append(_raw("# BEGIN TESTS"))
        out.append(_code(public))
        for test in hidden.get(exercise.function, []):
            out.append(_code("# HIDDEN\n" + test))
        out.append(_raw("# END TESTS"))
        out.append(_raw("# END QUESTION"))
        skip |= set(range(exercise.prompt_start, exercise.solution + 1))
    metadata = {k: v for k, v in notebook.get("metadata", {}).items() if k in ("kernelspec", "language_info")}
    for n, cell in enumerate(out):
        cell["id"] = f"cell-{n}"
    return {"cells": out, "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}


def make_assignment(chapter_path: Path, out_dir: Path, *, points: int = DEFAULT_POINTS,
                    cell_limit: float = DEFAULT_CELL_LIMIT, test_limit: float = DEFAULT_TEST_LIMIT,
                    run_tests: bool = True, hidden_dir: Path = HIDDEN_DIR) -> Path:
    """Write ``out_dir/<chapter>/{master,student,autograder}/`` for one chapter notebook."""
    from otter.assign import main as otter_assign

    chapter_path = Path(chapter_path)
    if chapter_path.suffix != ".ipynb":
        raise ValueError(f"{chapter_path} is not a .ipynb notebook")
    chapter = chapter_path.stem
    notebook = json.loads(chapter_path.read_text(encoding="utf-8"))
    hidden = hidden_tests(chapter, hidden_dir)
    if not hidden:
        print(f"note: no hidden tests for {chapter} in {hidden_dir}: the questions have public tests only")
    master = master_notebook(notebook, chapter, points=points, cell_limit=cell_limit, test_limit=test_limit,
                             hidden=hidden)
    target = Path(out_dir) / chapter
    if target.exists():
        shutil.rmtree(target)
    (target / "master").mkdir(parents=True)
    master_path = target / "master" / f"{chapter}.ipynb"
    master_path.write_text(json.dumps(master, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (target / "master" / "requirements.txt").write_text(REQUIREMENTS, encoding="utf-8")
    otter_assign(str(master_path), str(target), no_pdfs=True, no_run_tests=not run_tests)
    zips = sorted((target / "autograder").glob(f"{chapter}-autograder_*.zip"))
    if len(zips) != 1:
        raise RuntimeError(f"otter assign wrote {len(zips)} autograder zips in {target / 'autograder'}")
    zips[0].rename(target / "autograder" / "autograder.zip")
    return target


# ----------------------------------------------------------------------------------- grading


try:  # the plugin is only needed where otter is installed (making and grading)
    from otter.plugins import AbstractOtterPlugin
except ImportError:  # pragma: no cover - otter-grader is in the "grading" extra
    AbstractOtterPlugin = object  # type: ignore[misc,assignment]


class CellTimeLimit(AbstractOtterPlugin):  # type: ignore[misc,valid-type]
    """Otter plugin: every cell of a submission, and every test, gets a time limit.

    Configured in the assignment as ``{"cell_seconds": 300, "test_seconds": 30}``; the
    environment variables ``COMPANION_CELL_LIMIT`` and ``COMPANION_TEST_LIMIT`` (set by
    ``grade --cell-limit/--test-limit``) override them.
    """

    def before_execution(self, submission):  # noqa: D102 - otter's event
        import nbformat

        config = self.plugin_config or {}
        cell_seconds = float(os.environ.get(LIMIT_ENV) or config.get("cell_seconds", DEFAULT_CELL_LIMIT))
        test_seconds = float(os.environ.get(TEST_LIMIT_ENV) or config.get("test_seconds", DEFAULT_TEST_LIMIT))
        cell = nbformat.v4.new_code_cell(
            "from companion.grading import install_time_limits\n"
            f"install_time_limits({cell_seconds!r}, {test_seconds!r})")
        submission.cells.insert(0, cell)
        return submission


@dataclass
class GradedSubmission:
    student: str
    scores: dict[str, float]  # question -> points earned
    possible: dict[str, float]  # question -> points possible
    reasons: dict[str, str]  # question -> why points were lost (absent when full marks)

    @property
    def total(self) -> float:
        return sum(self.scores.values())


def _questions(autograder: Path) -> dict[str, float]:
    """Question -> points, read from the autograder's tests."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.unpack_archive(str(autograder), tmp, "zip")
        points = {}
        for test in sorted(Path(tmp, "tests").glob("*.py")):
            match = re.search(r"^points = (.+)$", test.read_text(encoding="utf-8"), re.M)
            points[test.stem] = float(match.group(1)) if match else 0.0
    return points


def _first_failure(output: str) -> str:
    """Which test case failed first, and its error, from otter's output for a question.

    Test case 1 of every question is the chapter's own check; the others are hidden.
    """
    blocks = re.split(r"^\s*\w+ - (\d+) result:\s*$", output, flags=re.M)
    for number, block in zip(blocks[1::2], blocks[2::2]):
        if "❌" not in block:
            continue
        lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
        first = next((k for k, line in enumerate(lines) if re.match(r"[A-Za-z_][\w.]*: ", line)), len(lines) - 1)
        which = "the chapter's check" if number == "1" else f"hidden test {int(number) - 1}"
        return f"{which}: {' '.join(lines[first:])}"[:400]
    return re.sub(r"\s+", " ", output).strip()[:400]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; elsewhere, none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    """Kill ``pid``, its process group and every descendant (the kernel has its own session)."""
    for child in _descendants(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def grade_one(submission: Path, autograder: Path, questions: dict[str, float], *, cell_limit: float | None,
              test_limit: float | None, timeout: float) -> tuple[GradedSubmission, dict | None]:
    """Grade one notebook with ``otter run`` in its own process; never raises.

    ``questions`` maps each question to its points (read once from the autograder). Returns the grade and otter's results (Gradescope's format), None when otter could
    not produce them (the submission ran past ``timeout`` or the kernel died).
    """
    student = submission.stem
    zero = {q: 0.0 for q in questions}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MPLBACKEND": "Agg"}
        if cell_limit is not None:  # else the limits the assignment was made with
            env[LIMIT_ENV] = str(cell_limit)
        if test_limit is not None:
            env[TEST_LIMIT_ENV] = str(test_limit)
        cmd = [sys.executable, "-m", "otter", "run", "-a", str(autograder), "-o", tmp, "--no-logo",
               str(submission)]
        with open(Path(tmp) / "log.txt", "w+", encoding="utf-8") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                proc.wait()
                reason = f"grading stopped after {timeout:g} s (the submission's time limit)"
                return GradedSubmission(student, zero, questions, {q: reason for q in questions}), None
            log_file.seek(0)
            log = log_file.read()
        results_path = Path(tmp) / "results.json"
        if proc.returncode != 0 or not results_path.exists():
            tail = " ".join(log.strip().splitlines()[-3:])[-300:]
            reason = f"the autograder could not run the submission (exit {proc.returncode}): {tail}"
            return GradedSubmission(student, zero, questions, {q: reason for q in questions}), None
        try:
            results = json.loads(results_path.read_text(encoding="utf-8"))
        except ValueError as err:
            reason = f"the autograder wrote unreadable results: {err}"
            return GradedSubmission(student, zero, questions, {q: reason for q in questions}), None
    scores, reasons = dict(zero), {}
    names = {test.get("name", "").split(" - ")[0].strip() for test in results.get("tests", [])}
    if not names & set(questions):  # otter ran, but its grading cell failed ("Autograder Failed")
        text = " ".join(str(t.get("output", "")) for t in results.get("tests", []))
        reason = "the autograder failed on this submission: " + re.sub(r"\s+", " ", text).strip()[:300]
        return GradedSubmission(student, zero, questions, {q: reason for q in questions}), results
    for test in results.get("tests", []):
        name = test.get("name", "")
        question = name.split(" - ")[0].strip()
        if question not in questions:
            continue
        scores[question] = float(test.get("score", 0.0))
        if scores[question] < float(test.get("max_score", questions[question])):
            reasons[question] = _first_failure(test.get("output", ""))
    results["student"] = student
    return GradedSubmission(student, scores, questions, reasons), results


def grade(assignment: Path, submissions: Path, out_dir: Path, *, cell_limit: float | None = None,
          test_limit: float | None = None, timeout: float = 1800, jobs: int = 1) -> list[GradedSubmission]:
    """Grade every ``*.ipynb`` in ``submissions``; write scores.csv, feedback.csv, results/."""
    assignment, submissions, out_dir = Path(assignment), Path(submissions), Path(out_dir)
    autograder = assignment / "autograder" / "autograder.zip"
    if not autograder.exists():
        raise FileNotFoundError(f"{autograder} not found: run `make assignment` for this chapter first")
    if not submissions.is_dir():
        raise FileNotFoundError(f"{submissions} is not a folder of submitted notebooks")
    entries = sorted(p for p in submissions.iterdir() if not p.name.startswith("."))
    notebooks = [p for p in entries if p.is_file() and p.suffix == ".ipynb"]
    for other in sorted(set(entries) - set(notebooks)):
        print(f"not graded: {other} is not a .ipynb file (one notebook per student, named after them)")
    if not notebooks:
        raise FileNotFoundError(f"no .ipynb submissions in {submissions}")
    limits = [x for x in (cell_limit, test_limit) if x is not None] + [timeout]
    if min(limits) <= 0:
        raise ValueError(f"time limits must be positive: cell_limit={cell_limit}, test_limit={test_limit}, "
                         f"timeout={timeout}")
    questions = _questions(autograder)

    def run(path: Path):
        return grade_one(path, autograder, questions, cell_limit=cell_limit, test_limit=test_limit, timeout=timeout)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        graded = list(pool.map(run, notebooks))
    if (out_dir / "results").exists():  # no stale results of an earlier run
        shutil.rmtree(out_dir / "results")
    (out_dir / "results").mkdir(parents=True)
    with open(out_dir / "scores.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", *questions, "total", "possible"])
        for g, _ in graded:
            writer.writerow([g.student, *(f"{g.scores[q]:g}" for q in questions), f"{g.total:g}",
                             f"{sum(questions.values()):g}"])
    with open(out_dir / "feedback.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "question", "score", "possible", "reason"])
        for g, _ in graded:
            for q in questions:
                if q in g.reasons:
                    writer.writerow([g.student, q, f"{g.scores[q]:g}", f"{questions[q]:g}", g.reasons[q]])
    for g, results in graded:
        if results is not None:
            (out_dir / "results" / f"{g.student}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return [g for g, _ in graded]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m companion.assignment", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="turn chapters into otter-grader assignments")
    make.add_argument("chapters", nargs="+", type=Path, help="chapter .ipynb files")
    make.add_argument("--out", type=Path, default=Path("assignments"))
    make.add_argument("--points", type=int, default=DEFAULT_POINTS, help="points per exercise")
    make.add_argument("--cell-limit", type=float, default=DEFAULT_CELL_LIMIT, help="seconds per cell")
    make.add_argument("--test-limit", type=float, default=DEFAULT_TEST_LIMIT, help="seconds per test")
    make.add_argument("--hidden-dir", type=Path, default=HIDDEN_DIR,
                      help="folder of <chapter>.py hidden tests (default: the repository's grading/)")
    make.add_argument("--no-run-tests", action="store_true",
                      help="do not run the tests on the solutions (otter assign runs them by default)")
    g = sub.add_parser("grade", help="grade a folder of submitted notebooks")
    g.add_argument("assignment", type=Path, help="the folder `make` wrote, e.g. assignments/02_attention")
    g.add_argument("submissions", type=Path, help="a folder of .ipynb files, one per student")
    g.add_argument("--out", type=Path, default=None, help="output folder (default grades/<chapter>)")
    g.add_argument("--cell-limit", type=float, default=None,
                   help="seconds per cell (default: the assignment's, 300 unless made otherwise)")
    g.add_argument("--test-limit", type=float, default=None,
                   help="seconds per test (default: the assignment's, 30 unless made otherwise)")
    g.add_argument("--timeout", type=float, default=1800, help="seconds per submission in all")
    g.add_argument("--jobs", type=int, default=1, help="submissions graded at once")
    args = parser.parse_args(argv)
    if args.command == "make":
        for chapter in args.chapters:
            target = make_assignment(chapter, args.out, points=args.points, cell_limit=args.cell_limit,
                                     test_limit=args.test_limit, run_tests=not args.no_run_tests,
                                     hidden_dir=args.hidden_dir)
            print(f"wrote {target}/student and {target}/autograder")
    else:
        out = args.out or Path("grades") / args.assignment.resolve().name
        graded = grade(args.assignment, args.submissions, out, cell_limit=args.cell_limit,
                       test_limit=args.test_limit, timeout=args.timeout, jobs=args.jobs)
        print(f"graded {len(graded)} submissions: {out / 'scores.csv'}, {out / 'feedback.csv'}")


if __name__ == "__main__":
    main()
