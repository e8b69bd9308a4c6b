"""Write student copies of chapters: solution cells removed, outputs cleared.

A chapter marks each solution cell with the tag ``solution``. The exercise stub above
it stays, so a student's copy runs top to bottom and each check cell says
"not implemented yet" until the student fills the stub in.

Command line::

    python -m companion.student chapters/02_attention.ipynb --out student/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["SOLUTION_TAG", "strip_solutions", "write_student_copy"]

SOLUTION_TAG = "solution"


def strip_solutions(notebook: dict) -> dict:
    """A copy of a notebook (as loaded JSON) without solution cells and without outputs."""
    if notebook.get("nbformat") != 4 or not isinstance(notebook.get("cells"), list):
        raise ValueError("not a version-4 Jupyter notebook: expected nbformat 4 and a list of cells")
    cells = []
    for cell in notebook["cells"]:
        if SOLUTION_TAG in cell.get("metadata", {}).get("tags", []):
            continue
        cell = json.loads(json.dumps(cell))
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    return {**notebook, "cells": cells}


def write_student_copy(src: Path, out_dir: Path) -> Path:
    """Write ``out_dir/<name>.ipynb``, the student copy of the notebook ``src``."""
    src, out_dir = Path(src), Path(out_dir)
    if src.suffix != ".ipynb":
        raise ValueError(f"{src} is not a .ipynb notebook")
    notebook = json.loads(src.read_text(encoding="utf-8"))
    student = strip_solutions(notebook)
    if len(student["cells"]) == len(notebook["cells"]):
        print(f"note: {src} has no cells tagged {SOLUTION_TAG!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / src.name
    dest.write_text(json.dumps(student, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help="chapter .ipynb files")
    parser.add_argument("--out", type=Path, default=Path("student"), help="output folder")
    args = parser.parse_args(argv)
    for nb in args.notebooks:
        removed = write_student_copy(nb, args.out)
        print(f"wrote {removed}")


if __name__ == "__main__":
    main()
