"""A character-level tokenizer: one id per distinct character of a training text.

The smallest tokenizer there is, and the one the GPT chapter trains on Tiny Shakespeare
with (65 characters). Ids follow the sorted order of the characters.

>>> tok = CharTokenizer.from_text("hello")
>>> tok.vocab_size, tok.encode("hole"), tok.decode([3, 2, 1])
(4, [1, 3, 2, 0], 'olh')
"""

from __future__ import annotations

from typing import Iterable

__all__ = ["CharTokenizer"]


class CharTokenizer:
    """Maps characters to ids and back. Build it with :meth:`from_text`."""

    def __init__(self, chars: Iterable[str]) -> None:
        self.itos: list[str] = list(chars)
        if any(len(c) != 1 for c in self.itos) or len(set(self.itos)) != len(self.itos):
            raise ValueError("chars must be distinct single characters")
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The tokenizer whose vocabulary is the sorted set of characters in ``text``."""
        if not text:
            raise ValueError("text is empty: a character vocabulary needs at least one character")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text``; an unknown character is a ValueError."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a sequence of ids (a list, or a 1-D tensor)."""
        return "".join(self.itos[int(i)] for i in ids)
