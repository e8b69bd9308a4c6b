"""Every chapter: paired with its .md, executed, in the table of contents, shaped as the plan says."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import sync_links  # noqa: E402

NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))
MARKDOWN = sorted((ROOT / "chapters").glob("*.md"))
ids = [p.stem for p in NOTEBOOKS]


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part.get("chapters", [])]
    return files


def test_there_are_chapters():
    assert NOTEBOOKS, "chapters/ has no notebooks"


def test_every_notebook_has_its_markdown_twin():
    assert [p.stem for p in NOTEBOOKS] == [p.stem for p in MARKDOWN]
    for p in NOTEBOOKS:
        assert re.fullmatch(r"(\d\d|[A-Z])_[a-z0-9_]+", p.stem), f"{p.name} is not NN_slug.ipynb"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=ids)
def test_pair_has_not_drifted(nb_path, tmp_path):
    """Rebuild the .ipynb from the .md in a temporary copy; the cells must be the same."""
    md = nb_path.with_suffix(".md")
    rebuilt = tmp_path / nb_path.name
    subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--to", "ipynb", "--output",
                    str(rebuilt), str(md)], check=True)
    want = [(c["cell_type"], source(c).strip(), sorted(tags(c))) for c in load(rebuilt)["cells"]]
    have = [(c["cell_type"], source(c).strip(), sorted(tags(c))) for c in load(nb_path)["cells"]]
    assert len(have) == len(want), f"{nb_path.name}: {len(have)} cells, its .md gives {len(want)}"
    for i, (h, w) in enumerate(zip(have, want)):
        assert h == w, f"{nb_path.name}: cell {i} differs from {md.name}; run make execute"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=ids)
def test_executed_top_to_bottom_in_one_run(nb_path):
    nb = load(nb_path)
    counts = [c["execution_count"] for c in nb["cells"] if c["cell_type"] == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{nb_path.name} was not executed in order"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code" and "raises-exception" not in tags(cell):
            errors = [o for o in cell["outputs"] if o["output_type"] == "error"]
            assert not errors, f"{nb_path.name}: cell {i} raised {errors[0]['ename']}"


def test_every_chapter_is_in_the_toc_and_every_toc_entry_exists():
    files = toc_files()
    for nb in NOTEBOOKS:
        assert f"chapters/{nb.stem}" in files, f"{nb.name} is missing from _toc.yml"
    for f in files:
        assert list(ROOT.glob(f + ".*")), f"_toc.yml lists {f}, which does not exist"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=ids)
def test_chapter_shape(nb_path):
    cells = load(nb_path)["cells"]
    head = source(cells[0])
    number = nb_path.stem.split("_")[0].lstrip("0")
    assert re.match(rf"# {number}\. \S", head), f"{nb_path.name} must open with '# {number}. Title'"
    url, branch = sync_links.repository()
    links = sync_links.expected_links(url, branch, nb_path.stem)
    assert f"]({links['colab']})" in head, "the Colab badge must point at this chapter's .ipynb"
    assert f"]({links['kaggle']})" in head, "the Kaggle badge must point at this chapter's .ipynb"
    assert "What you need" in head and "Learning goals" in head
    markdown = "\n".join(source(c) for c in cells if c["cell_type"] == "markdown")
    assert re.search(r"^## Summary", markdown, re.M), "a chapter ends with ## Summary"
    assert re.search(r"^## What comes next", markdown, re.M)
    setup = [c for c in cells if "setup" in tags(c)]
    assert len(setup) == 1 and setup[0] is next(c for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=ids)
def test_exercises_check_themselves_and_hide_solutions(nb_path):
    cells = load(nb_path)["cells"]
    solutions = [i for i, c in enumerate(cells) if "solution" in tags(c)]
    assert len(solutions) >= 3, f"{nb_path.name} has {len(solutions)} exercises; at least 3"
    for i in solutions:
        assert "hide-input" in tags(cells[i]), f"solution cell {i} is not hidden on the site"
        stubs = [j for j in range(i) if "exercise" in tags(cells[j])]
        assert stubs, f"solution cell {i} has no exercise stub before it"
        assert "NotImplementedError" in source(cells[stubs[-1]])
        later = "\n".join(source(c) for c in cells[i + 1:i + 4])
        assert "check(" in later, f"solution cell {i} is not followed by a check cell"


def _run_setup_cell(code, env, modules=()):
    """Execute a setup cell in a subprocess with subprocess.run recorded, not run."""
    probe = (
        "import subprocess, sys, types\n"
        "calls = []\n"
        "subprocess.run = lambda *a, **k: calls.append(a[0])\n"
        + "".join(f"sys.modules[{m!r}] = types.ModuleType({m!r})\n" for m in modules)
        + code + "\nprint(repr(calls))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=ids)
def test_setup_cell_installs_only_on_colab_and_kaggle(nb_path):
    setup = next(source(c) for c in load(nb_path)["cells"] if "setup" in tags(c))
    url, branch = sync_links.repository()
    base = {"PATH": "/usr/bin:/bin"}
    assert _run_setup_cell(setup, base) == []  # locally and in CI: nothing
    for env, modules in [({**base, "KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, ("google.colab",)),
                         (base, ("google.colab",))]:
        calls = _run_setup_cell(setup, env, modules)
        assert len(calls) == 1 and calls[0][1:4] == ["-m", "pip", "install"]
        assert f"git+{url}@{branch}" in " ".join(calls[0])
    kaggle_first = setup.index("KAGGLE_KERNEL_RUN_TYPE") < setup.index("google.colab")
    assert kaggle_first, "Kaggle must be detected before Colab"


def test_links_are_in_sync_with_config():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "sync_links.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_sync_rewrites_every_link_from_one_line():
    text = (ROOT / "chapters" / "02_attention.md").read_text(encoding="utf-8")
    new = sync_links.rewrite(text, "https://github.com/someone/fork", "dev", "02_attention")
    assert "https://colab.research.google.com/github/someone/fork/blob/dev/chapters/02_attention.ipynb" in new
    assert "https://kaggle.com/kernels/welcome?src=https://github.com/someone/fork/blob/dev/chapters/02_attention.ipynb" in new
    assert 'REPO_URL = "https://github.com/someone/fork"' in new and 'BRANCH = "dev"' in new
    old_url, _ = sync_links.repository()
    assert old_url not in new
