"""Execute chapters in place: update each .ipynb from its .md, run it, save outputs.

    python tools/execute.py chapters/02_attention.md [more chapters ...]
    python tools/execute.py            # every chapter
    python tools/execute.py --time     # every chapter, timed, nothing written

The paired .md is the source; the .ipynb is rewritten from it (so the pair cannot
drift), executed top to bottom in a fresh kernel with the repository's settings, and
saved with its outputs. The .md is then re-synced so both carry the same text.

With ``--time`` each chapter runs from its .md in memory and nothing is written: the
table it prints is how long a reader waits for each chapter on this machine (the book
asks for under three minutes on a 2-core CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def cpu_capability() -> str:
    """The CPU kernels PyTorch picks here (default, avx2, avx512), as a kernel would see them."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"
    return subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                          text=True).stdout.strip()


def time_only(md: Path, timeout: int = 1200) -> float:
    """Seconds to execute the chapter ``md`` top to bottom in a fresh kernel; writes nothing."""
    import jupytext

    nb = jupytext.read(md)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(md.parent)}}).execute()
    return time.perf_counter() - start


def execute(md: Path, timeout: int = 1200) -> float:
    ipynb = md.with_suffix(".ipynb")
    jupytext = [sys.executable, "-m", "jupytext", "--quiet"]
    if ipynb.exists():
        subprocess.run([*jupytext, "--to", "ipynb", "--update", str(md)], check=True)
    else:
        subprocess.run([*jupytext, "--to", "ipynb", str(md)], check=True)
    nb = nbformat.read(ipynb, as_version=4)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    start = time.perf_counter()
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(md.parent)}},
    ).execute()
    seconds = time.perf_counter() - start
    # Which kernels produced these outputs: make test re-runs the chapters with others.
    nb.metadata["companion"] = {"cpu_capability": cpu_capability()}
    nbformat.write(nb, ipynb)
    subprocess.run([*jupytext, "--sync", str(ipynb)], check=True)
    return seconds


def main(argv: list[str]) -> None:
    # The same settings as the test suite (see conftest.py): one thread, fixed hash seed.
    os.environ["PYTHONHASHSEED"] = "0"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    timing = "--time" in argv
    argv = [a for a in argv if a != "--time"]
    paths = [Path(a) for a in argv] or sorted((ROOT / "chapters").glob("[0-9A-Z]*.md"))
    times = []
    for path in paths:
        md = path.with_suffix(".md")
        if not md.exists():
            raise SystemExit(f"{md} does not exist: every chapter is a .md/.ipynb pair")
        seconds = time_only(md) if timing else execute(md)
        times.append(seconds)
        print(f"{md}: {'ran' if timing else 'executed'} in {seconds:.1f} s", flush=True)
    if timing and len(paths) > 1:
        print(f"all {len(paths)} chapters: {sum(times):.1f} s; the slowest took {max(times):.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
