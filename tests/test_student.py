import json
import subprocess
import sys
from pathlib import Path

import pytest

from companion.student import strip_solutions, write_student_copy

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9]*.ipynb"))


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def _toy_notebook():
    def code(src, tags=()):
        return {"cell_type": "code", "metadata": {"tags": list(tags)}, "source": src,
                "outputs": [{"output_type": "stream", "name": "stdout", "text": "x"}],
                "execution_count": 3}

    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "markdown", "metadata": {}, "source": "# Exercise"},
        code("def f(x):\n    raise NotImplementedError", ["exercise"]),
        code("def f(x):\n    return 2 * x", ["solution", "hide-input"]),
        code("check(f, ...)"),
    ]}


def test_strip_solutions_removes_solutions_and_outputs():
    student = strip_solutions(_toy_notebook())
    sources = [c["source"] for c in student["cells"]]
    assert sources == ["# Exercise", "def f(x):\n    raise NotImplementedError", "check(f, ...)"]
    assert all(c["outputs"] == [] and c["execution_count"] is None
               for c in student["cells"] if c["cell_type"] == "code")


def test_not_a_notebook():
    with pytest.raises(ValueError, match="nbformat 4"):
        strip_solutions({"cells": []})


def test_command_line_writes_student_copies(tmp_path):
    if not CHAPTERS:
        pytest.skip("no chapters yet")
    out = tmp_path / "student"
    subprocess.run([sys.executable, "-m", "companion.student", *map(str, CHAPTERS), "--out", str(out)],
                   check=True, capture_output=True)
    for chapter in CHAPTERS:
        original = json.loads(chapter.read_text(encoding="utf-8"))
        copy = json.loads((out / chapter.name).read_text(encoding="utf-8"))
        n_solutions = sum("solution" in _tags(c) for c in original["cells"])
        assert len(copy["cells"]) == len(original["cells"]) - n_solutions
        assert not any("solution" in _tags(c) for c in copy["cells"])
        assert sum("exercise" in _tags(c) for c in copy["cells"]) == sum(
            "exercise" in _tags(c) for c in original["cells"])


def test_student_copy_runs_and_reports_not_implemented(tmp_path):
    """A student copy executes top to bottom; its checks say 'not implemented yet'."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    notebook = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "import torch\nfrom companion.exercises import check"},
        {"cell_type": "code", "metadata": {"tags": ["exercise"]}, "outputs": [], "execution_count": None,
         "source": "def double(x):\n    raise NotImplementedError"},
        {"cell_type": "code", "metadata": {"tags": ["solution", "hide-input"]}, "outputs": [],
         "execution_count": None, "source": "def double(x):\n    return 2 * x"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "check(double, lambda x: x + x, [(torch.ones(2),)], name='double')"},
    ]}
    for i, cell in enumerate(notebook["cells"]):
        cell["id"] = f"cell-{i}"
    src = tmp_path / "toy.ipynb"
    src.write_text(json.dumps(notebook))
    dest = write_student_copy(src, tmp_path / "student")
    nb = nbformat.read(dest, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    assert "not implemented yet" in nb.cells[-1].outputs[0]["text"]
    full = nbformat.read(src, as_version=4)
    nbclient.NotebookClient(full, timeout=120, kernel_name="python3").execute()
    assert "the check passed" in full.cells[-1].outputs[0]["text"]
