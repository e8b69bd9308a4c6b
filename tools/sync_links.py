"""Write the repository address from _config.yml into every chapter.

    python tools/sync_links.py          # rewrite badges and install cells
    python tools/sync_links.py --check  # list chapters that are out of date; exit 1 if any

The public address lives in one place, ``repository.url`` (and ``branch``) in
``_config.yml``. Each chapter's Open-in-Colab and Open-in-Kaggle badges point at that
chapter's .ipynb on that branch, and its setup cell installs the companion package from
that repository. Both the .md and the .ipynb of each pair are rewritten.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def repository() -> tuple[str, str]:
    """(url without trailing slash, branch) from _config.yml."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    repo = config["repository"]
    url = repo["url"].rstrip("/")
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"repository.url={url!r} in _config.yml is not https://github.com/OWNER/NAME")
    return url, repo.get("branch", "main")


def expected_links(url: str, branch: str, chapter: str) -> dict[str, str]:
    """The Colab, Kaggle and GitHub addresses of ``chapter`` (e.g. '02_attention')."""
    blob = f"{url}/blob/{branch}/chapters/{chapter}.ipynb"
    return {
        "github": blob,
        "colab": "https://colab.research.google.com/github/" + blob.removeprefix("https://github.com/"),
        "kaggle": "https://kaggle.com/kernels/welcome?src=" + blob,
    }


def rewrite(text: str, url: str, branch: str, chapter: str) -> str:
    links = expected_links(url, branch, chapter)
    text = re.sub(r"https://colab\.research\.google\.com/github/[^)\s\"']+\.ipynb", links["colab"], text)
    text = re.sub(r"https://kaggle\.com/kernels/welcome\?src=[^)\s\"']+\.ipynb", links["kaggle"], text)
    text = re.sub(r'REPO_URL = "[^"]*"', f'REPO_URL = "{url}"', text)
    text = re.sub(r'BRANCH = "[^"]*"', f'BRANCH = "{branch}"', text)
    return text


def sync(check: bool) -> list[Path]:
    url, branch = repository()
    stale = []
    for path in sorted((ROOT / "chapters").glob("*.md")) + sorted((ROOT / "chapters").glob("*.ipynb")):
        chapter = path.stem
        old = path.read_text(encoding="utf-8")
        if path.suffix == ".md":
            new = rewrite(old, url, branch, chapter)
        else:
            nb, changed = json.loads(old), False
            for cell in nb["cells"]:
                src = cell["source"]
                text = "".join(src) if isinstance(src, list) else src
                updated = rewrite(text, url, branch, chapter)
                if updated != text:
                    cell["source"] = updated.splitlines(keepends=True) if isinstance(src, list) else updated
                    changed = True
            new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n" if changed else old
        if new != old:
            stale.append(path)
            if not check:
                path.write_text(new, encoding="utf-8")
    return stale


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = sync(check)
    for path in stale:
        print(f"{'out of date' if check else 'updated'}: {path.relative_to(ROOT)}")
    return 1 if (check and stale) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
