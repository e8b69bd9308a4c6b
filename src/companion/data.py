"""Data sets the chapters train on, found locally or downloaded and verified.

Tiny Shakespeare (about 1.1 MB of plays) is looked for, in this order:

1. the folder named by the environment variable ``COMPANION_DATA``;
2. a ``shared/data`` folder beside the repository (what CI uses): the current folder,
   this package's folder and each of their parents are searched for ``shared/data``;
3. the download cache, ``$COMPANION_CACHE`` or else ``$XDG_CACHE_HOME/companion``
   or else ``~/.cache/companion``.

If none has it, it is downloaded from its public source into the cache (on Colab and
Kaggle this is what happens) and its SHA-256 is checked before it is kept.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

__all__ = [
    "TINY_SHAKESPEARE",
    "DataFile",
    "cache_dir",
    "download",
    "find_file",
    "load_tiny_shakespeare",
    "tiny_shakespeare_path",
]


class DataFile:
    """A named file with its public address and the SHA-256 it must have."""

    def __init__(self, name: str, url: str, sha256: str) -> None:
        self.name, self.url, self.sha256 = name, url, sha256

    def __repr__(self) -> str:
        return f"DataFile({self.name!r})"


TINY_SHAKESPEARE = DataFile(
    name="tinyshakespeare.txt",
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """The folder downloads are kept in (created on first use)."""
    if os.environ.get("COMPANION_CACHE"):
        return Path(os.environ["COMPANION_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "companion"


def _search_dirs() -> list[Path]:
    dirs: list[Path] = []
    if os.environ.get("COMPANION_DATA"):
        dirs.append(Path(os.environ["COMPANION_DATA"]))
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            dirs.append(folder / "shared" / "data")
    dirs.append(cache_dir())
    return list(dict.fromkeys(dirs))  # keep order, drop repeats


def find_file(item: DataFile) -> Path | None:
    """The first local copy of ``item`` on the search path, or None.

    A local copy whose SHA-256 differs from the expected one is an error, not a miss:
    training on a silently different corpus would change every number in the book.
    """
    for folder in _search_dirs():
        path = folder / item.name
        if path.is_file():
            got = sha256_of(path)
            if got != item.sha256:
                raise ValueError(
                    f"{path} has SHA-256 {got}, expected {item.sha256}: "
                    "the file is corrupt or a different version; delete it to re-download"
                )
            return path
    return None


def download(url: str, dest: Path, sha256: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` and keep it only if its SHA-256 is ``sha256``.

    The bytes go to a temporary file in the destination folder and are moved into place
    only after the check, so an interrupted or corrupted download never leaves a bad
    file where the next run would find it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        got = digest.hexdigest()
        if got != sha256:
            raise ValueError(
                f"download of {url} has SHA-256 {got}, expected {sha256}: "
                "the file is corrupt or has changed at its source; nothing was kept"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def tiny_shakespeare_path(download_if_missing: bool = True, url: str | None = None) -> Path:
    """Path to a verified copy of Tiny Shakespeare, downloading it if allowed."""
    found = find_file(TINY_SHAKESPEARE)
    if found is not None:
        return found
    if not download_if_missing:
        raise FileNotFoundError(
            f"{TINY_SHAKESPEARE.name} was not found in {[str(d) for d in _search_dirs()]}; "
            "set COMPANION_DATA to the folder that holds it"
        )
    dest = cache_dir() / TINY_SHAKESPEARE.name
    return download(url or TINY_SHAKESPEARE.url, dest, TINY_SHAKESPEARE.sha256)


def load_tiny_shakespeare(download_if_missing: bool = True) -> str:
    """The whole Tiny Shakespeare text (1,115,394 characters)."""
    return tiny_shakespeare_path(download_if_missing).read_text(encoding="utf-8")
