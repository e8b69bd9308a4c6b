"""The repository's promises: two commands, pinned CPU torch, dependency lists that agree."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_environment_yml_lists_what_pyproject_lists():
    project = pyproject()["project"]
    declared = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared |= set(extra)
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {p for p in pip if not p.startswith("-e")}
    assert listed == declared, (
        f"only in pyproject: {sorted(declared - listed)}; only in environment.yml: {sorted(listed - declared)}")
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.replace("python", "") == project["requires-python"]


def test_torch_is_a_range_in_the_package_and_pinned_in_the_install_step():
    deps = pyproject()["project"]["dependencies"]
    torch = next(d for d in deps if d.startswith("torch"))
    assert ">=" in torch and "==" not in torch
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^TORCH_VERSION\s*\?=\s*2\.13\.0$", makefile, re.M)
    assert '"torch==$(TORCH_VERSION)"' in makefile


def test_jupyter_book_is_pinned_to_the_1x_line():
    book = pyproject()["project"]["optional-dependencies"]["book"]
    assert "jupyter-book==1.0.4.post1" in book


def test_readme_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands[-2:] == ["make book", "make test"], commands


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = [l.strip() for l in ci.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert "make test" in lines
    assert len(lines) <= 4, "CI calls the README's test command and nothing else of substance"


def test_test_target_runs_nbval_strictly_on_every_chapter():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "--nbval " in makefile and "--nbval-lax" not in makefile
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "tests chapters" in test_recipe and "$(NBVAL)" in test_recipe


def test_repository_url_is_set_in_one_place():
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    url = config["repository"]["url"]
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    for path in ["pyproject.toml", "README.md", "Makefile", "environment.yml"]:
        assert url not in (ROOT / path).read_text(encoding="utf-8"), f"{path} repeats repository.url"
