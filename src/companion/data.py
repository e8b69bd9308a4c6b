"""Data sets the chapters train on, found locally or downloaded and verified.

Tiny Shakespeare (about 1.1 MB of plays) is looked for, in this order:

1. the folder named by the environment variable ``COMPANION_DATA``;
2. a ``shared/data`` folder beside the repository (what CI uses): the current folder,
   this package's folder and each of their parents are searched for ``shared/data``;
3. the download cache, ``$COMPANION_CACHE`` or else ``$XDG_CACHE_HOME/companion``
   or else ``~/.cache/companion``.

If none has it, it is downloaded from its public source into the cache (on Colab and
Kaggle this is what happens) and its SHA-256 is checked before it is kept.

The second half of the module turns a token array into training batches
(:class:`RandomWindows`, :func:`get_batch`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RandomWindows",
    "TINY_SHAKESPEARE",
    "DataFile",
    "cache_dir",
    "sha256_of",
    "download",
    "fetch",
    "find_file",
    "get_batch",
    "load_tiny_shakespeare",
    "tiny_shakespeare_path",
    "train_val_split",
    "windows_at",
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


def find_file(item: DataFile, search: list[Path] | None = None) -> Path | None:
    """The first local copy of ``item`` in ``search`` (default: the search path), or None.

    A local copy whose SHA-256 differs from the expected one is an error, not a miss:
    training on a silently different corpus would change every number in the book.
    """
    for folder in _search_dirs() if search is None else search:
        path = Path(folder) / item.name
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


def fetch(
    item: DataFile,
    download_if_missing: bool = True,
    url: str | None = None,
    search: list[Path] | None = None,
) -> Path:
    """Path to a verified local copy of ``item``, downloading it into the cache if allowed.

    ``url`` overrides the item's public address (a mirror); ``search`` overrides the
    folders looked in (the download cache is always looked in last).
    """
    folders = _search_dirs() if search is None else [*search, cache_dir()]
    found = find_file(item, folders)
    if found is not None:
        return found
    if not download_if_missing:
        raise FileNotFoundError(
            f"{item.name} was not found in {[str(d) for d in folders]}; "
            "set COMPANION_DATA to the folder that holds it"
        )
    return download(url or item.url, cache_dir() / item.name, item.sha256)


def tiny_shakespeare_path(download_if_missing: bool = True, url: str | None = None) -> Path:
    """Path to a verified copy of Tiny Shakespeare, downloading it if allowed."""
    return fetch(TINY_SHAKESPEARE, download_if_missing, url)


def load_tiny_shakespeare(download_if_missing: bool = True) -> str:
    """The whole Tiny Shakespeare text (1,115,394 characters)."""
    return tiny_shakespeare_path(download_if_missing).read_text(encoding="utf-8")


# ---- batches of random windows ---------------------------------------------------------
#
# A language model trains on windows of ``T + 1`` consecutive tokens: the first ``T`` are
# the input, the last ``T`` (shifted by one) the targets. Batch number ``step`` is a pure
# function of ``(seed, step)``, so the loader's whole state is two integers: a run that is
# stopped and resumed draws exactly the batches an uninterrupted run would have drawn.


def _as_token_tensor(tokens, context_length: int) -> Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be a 1-D array of ids, got shape {tuple(tokens.shape)} {tokens.dtype}")
    if not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length={context_length!r} must be a positive int")
    if tokens.numel() < context_length + 1:
        raise ValueError(
            f"{tokens.numel()} tokens are too few for one window: context_length={context_length} "
            f"needs at least {context_length + 1}"
        )
    return tokens.long()


def train_val_split(tokens, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """Split a token array into its first ``1 - val_fraction`` (train) and the rest (val).

    A contiguous split, not a shuffled one: held-out text must be text the model never
    saw, and random windows of a shuffled split would overlap the training windows.

    >>> train, val = train_val_split(torch.arange(10), 0.2)
    >>> train.tolist(), val.tolist()
    ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1)")
    tokens = torch.as_tensor(tokens)
    n_train = int(round(len(tokens) * (1.0 - val_fraction)))
    return tokens[:n_train], tokens[n_train:]


def windows_at(tokens: Tensor, starts: Tensor, context_length: int) -> tuple[Tensor, Tensor]:
    """Inputs and targets for windows starting at ``starts`` ``(B,)``: two ``(B, T)`` tensors.

    >>> x, y = windows_at(torch.arange(10), torch.tensor([0, 5]), 3)
    >>> x.tolist(), y.tolist()
    ([[0, 1, 2], [5, 6, 7]], [[1, 2, 3], [6, 7, 8]])
    """
    offsets = torch.arange(context_length + 1, device=tokens.device)  # (T + 1,)
    window = tokens[starts.to(tokens.device)[:, None] + offsets]  # (B, T + 1)
    return window[:, :-1], window[:, 1:]


def get_batch(
    tokens,
    batch_size: int,
    context_length: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A batch of ``batch_size`` random windows: inputs ``x`` and targets ``y``, both ``(B, T)``.

    ``y[b, t]`` is the token after ``x[b, t]``. Starts are uniform over every position
    that leaves room for ``T + 1`` tokens.
    """
    tokens = _as_token_tensor(tokens, context_length)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    starts = torch.randint(len(tokens) - context_length, (batch_size,), generator=generator)
    return windows_at(tokens, starts, context_length)


class RandomWindows:
    """Endless, resumable batches of random windows from a token array.

    ``batch(step)`` depends only on ``(seed, step)``; iterating yields batch ``self.step``
    and advances it. ``state_dict()`` is ``{"seed": ..., "step": ...}`` (JSON-ready).

    >>> loader = RandomWindows(torch.arange(100), batch_size=2, context_length=4, seed=0)
    >>> x, y = next(loader)
    >>> x.shape, bool((y == x + 1).all()), loader.step
    (torch.Size([2, 4]), True, 1)
    >>> bool(torch.equal(loader.batch(0)[0], x))
    True
    """

    def __init__(
        self,
        tokens,
        batch_size: int,
        context_length: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        self.tokens = _as_token_tensor(tokens, context_length)
        if device is not None:
            self.tokens = self.tokens.to(device)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative int")
        self.batch_size, self.context_length = batch_size, context_length
        self.seed, self.step = seed, 0

    def starts(self, step: int) -> Tensor:
        """Start positions ``(B,)`` of batch number ``step``."""
        rng = np.random.default_rng([self.seed, step])  # an independent stream per (seed, step)
        high = len(self.tokens) - self.context_length
        return torch.from_numpy(rng.integers(0, high, size=self.batch_size))

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Batch number ``step``: inputs and targets, both ``(B, T)``."""
        return windows_at(self.tokens, self.starts(step), self.context_length)

    def __iter__(self) -> "RandomWindows":
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if set(state) != {"seed", "step"}:
            raise ValueError(f"a RandomWindows state has keys seed and step, got {sorted(state)}")
        self.seed, self.step = int(state["seed"]), int(state["step"])
