"""Byte-level byte-pair encoding (BPE), the tokenizer of GPT-2 and its successors.

Text becomes UTF-8 bytes, so the 256 byte values are the first 256 tokens and any
string can be encoded. Training repeatedly finds the most frequent adjacent pair of
tokens and merges it into a new token; encoding replays those merges, lowest rank
(earliest learned) first. Before any of that, a regular expression (the GPT-2 split
pattern) cuts text into pre-tokens, and merges never cross a pre-token's boundary.

>>> tok = BPETokenizer.train("low lower lowest " * 20, vocab_size=260)
>>> [tok.token_bytes(i) for i in range(256, 259)]
[b'lo', b'low', b' low']
>>> ids = tok.encode("lowest<|endoftext|>")
>>> ids, tok.decode(ids)
([257, 101, 115, 116, 259], 'lowest<|endoftext|>')

Two trainers give the same merges: :func:`train_bpe_naive` recounts every pair after
every merge (easy to read, slow); :func:`train_bpe` counts the pairs of each distinct
pre-token once and, after a merge, updates only the counts of the pre-tokens that
contained the merged pair.

This module is ``companion.tokenizers``; Hugging Face's package is the top-level
``tokenizers``, which :func:`train_huggingface` and :func:`to_huggingface` import
(absolute imports, so the two never shadow each other).
"""

from __future__ import annotations

import heapq
import json
import operator
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import regex  # the stdlib `re` has no \p{L} (letter) or \p{N} (number) classes

if TYPE_CHECKING:  # Hugging Face `tokenizers`, an optional dependency
    from tokenizers import Tokenizer

__all__ = [
    "ENDOFTEXT",
    "FILE_HEADER",
    "GPT2_SPLIT_PATTERN",
    "BPETokenizer",
    "best_pair",
    "bytes_to_unicode",
    "get_stats",
    "merge",
    "pretokenize",
    "split_special",
    "to_huggingface",
    "train_bpe",
    "train_bpe_naive",
    "train_huggingface",
]

Pair = tuple[int, int]

#: The pre-tokenization pattern of GPT-2 (Radford et al., 2019): English contractions,
#: runs of letters, runs of digits and runs of other symbols, each with at most one
#: leading space, and runs of whitespace (the last space of a run is left to the word
#: after it).
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)

#: GPT-2's document separator, the usual special token.
ENDOFTEXT = "<|endoftext|>"

#: First line of a saved tokenizer: the format's name and version.
FILE_HEADER = "companion-bpe v1"


# ---------------------------------------------------------------------------
# Pure helpers


def get_stats(ids: Sequence[int], counts: dict[Pair, int] | None = None, weight: int = 1) -> dict[Pair, int]:
    """Count each adjacent pair in ``ids``, adding ``weight`` per occurrence to ``counts``.

    >>> get_stats([1, 2, 3, 1, 2])
    {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    >>> get_stats([7, 7, 7])  # overlapping occurrences all count
    {(7, 7): 2}
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids: Sequence[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids``, left to right, by ``new_id``.

    >>> merge([1, 2, 3, 1, 2], (1, 2), 4)
    [4, 3, 4]
    >>> merge([7, 7, 7], (7, 7), 8)  # the leftmost of two overlapping occurrences wins
    [8, 7]
    """
    a, b = pair
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def best_pair(counts: dict[Pair, int]) -> Pair:
    """The most frequent pair; among equally frequent pairs, the smallest.

    The tie rule makes training independent of the order pairs were counted in, so
    every trainer in this module learns exactly the same merges.

    >>> best_pair({(5, 6): 3, (1, 9): 3, (0, 0): 2})
    (1, 9)
    """
    if not counts:
        raise ValueError("counts is empty: there is no pair to merge")
    return min(counts, key=lambda p: (-counts[p], p))


def split_special(text: str, special_tokens: Iterable[str]) -> list[tuple[str, bool]]:
    """Cut ``text`` around special tokens: a list of (piece, is_special).

    Longer special tokens are matched first, so one that contains another wins.

    >>> split_special("a<|endoftext|>b", ["<|endoftext|>"])
    [('a', False), ('<|endoftext|>', True), ('b', False)]
    """
    specials = sorted(set(special_tokens), key=len, reverse=True)
    if not specials:
        return [(text, False)] if text else []
    pattern = regex.compile("|".join(regex.escape(s) for s in specials))
    pieces: list[tuple[str, bool]] = []
    start = 0
    for m in pattern.finditer(text):
        if m.start() > start:
            pieces.append((text[start : m.start()], False))
        pieces.append((m.group(), True))
        start = m.end()
    if start < len(text):
        pieces.append((text[start:], False))
    return pieces


def pretokenize(text: str, pattern: str = GPT2_SPLIT_PATTERN) -> list[str]:
    """Cut text into pre-tokens with the split pattern; merges never cross them.

    The GPT-2 pattern matches every character, so the pieces join back to ``text``.

    >>> pretokenize("Hello world, it's 2024!  ")
    ['Hello', ' world', ',', ' it', "'s", ' 2024', '!', '  ']
    """
    return regex.findall(pattern, text)


def _training_pretokens(text: str, pattern: str, special_tokens: Iterable[str]) -> list[str]:
    """Pre-tokens of ``text`` with special tokens cut out (they are never learned from)."""
    return [
        chunk
        for piece, is_special in split_special(text, special_tokens)
        if not is_special
        for chunk in pretokenize(piece, pattern)
    ]


def _utf8(chunk: str) -> bytes:
    try:
        return chunk.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = chunk[err.start : err.end]
        raise ValueError(
            f"cannot encode {bad!r} as UTF-8: a lone surrogate is not valid Unicode text"
        ) from None


# ---------------------------------------------------------------------------
# Training


def _check_num_merges(num_merges: int) -> None:
    if not isinstance(num_merges, int) or num_merges < 0:
        raise ValueError(f"num_merges={num_merges!r} must be a non-negative int")


def train_bpe_naive(
    text: str,
    num_merges: int,
    pattern: str = GPT2_SPLIT_PATTERN,
    special_tokens: Iterable[str] = (),
) -> list[Pair]:
    """Learn ``num_merges`` merges by recounting every pair before every merge.

    Merge ``k`` creates token ``256 + k``. Each step costs a pass over the whole corpus,
    which is why :func:`train_bpe` exists; both return the same list. Training stops
    early when no pair is left (every pre-token is a single token).

    >>> train_bpe_naive("aaab aaab", 2)  # 'aa', then 'ab' (ties go to the smaller pair)
    [(97, 97), (97, 98)]
    """
    _check_num_merges(num_merges)
    chunks = [list(_utf8(c)) for c in _training_pretokens(text, pattern, special_tokens)]
    merges: list[Pair] = []
    for k in range(num_merges):
        counts: dict[Pair, int] = {}
        for ids in chunks:
            get_stats(ids, counts)
        if not counts:
            break
        pair = best_pair(counts)
        chunks = [merge(ids, pair, 256 + k) for ids in chunks]
        merges.append(pair)
    return merges


def train_bpe(
    text: str,
    num_merges: int,
    pattern: str = GPT2_SPLIT_PATTERN,
    special_tokens: Iterable[str] = (),
) -> list[Pair]:
    """Learn ``num_merges`` merges with incremental pair counts; same result as the naive trainer.

    Three ideas make it fast:

    * **De-duplication.** Pre-tokens repeat (" the" thousands of times), so each distinct
      pre-token is stored once with its frequency, and its pairs count that many times.
    * **Incremental counts.** ``where[pair]`` lists the distinct pre-tokens holding a
      pair. A merge rewrites only those, subtracting their old pairs' counts and adding
      their new ones; all other counts stay valid.
    * **A heap of (-count, pair).** The best pair is popped instead of searched for;
      entries whose count has changed since they were pushed are skipped.

    >>> train_bpe("aaab aaab", 2) == train_bpe_naive("aaab aaab", 2)
    True
    """
    _check_num_merges(num_merges)
    freqs = Counter(_training_pretokens(text, pattern, special_tokens))
    words = [list(_utf8(w)) for w in freqs]  # distinct pre-tokens as token ids
    weights = list(freqs.values())  # how often each occurs in the corpus
    counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for i, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            counts[pair] += weights[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)

    merges: list[Pair] = []
    while len(merges) < num_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg_count:
            continue  # stale: this pair's count changed after the entry was pushed
        new_id = 256 + len(merges)
        merges.append(pair)
        changed: set[Pair] = set()
        for i in where.pop(pair):
            old = words[i]
            new = merge(old, pair, new_id)
            if len(new) == len(old):
                continue  # stale: an earlier merge already removed the pair here
            w = weights[i]
            for p in zip(old, old[1:]):
                counts[p] -= w
                changed.add(p)
            for p in zip(new, new[1:]):
                counts[p] += w
                changed.add(p)
                where[p].add(i)
            words[i] = new
        for p in changed:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                del counts[p]
    return merges


# ---------------------------------------------------------------------------
# The tokenizer


class BPETokenizer:
    """A byte-level BPE tokenizer: merges, a split pattern and special tokens.

    Token ids: ``0..255`` are the bytes, ``256 + k`` is merge ``k``, and the special
    tokens come last, in the order given. ``vocab_size`` counts all three.

    Args:
        merges: pairs of token ids, in the order they were learned (their rank).
        special_tokens: strings that are always one token and never split or merged.
        pattern: the pre-tokenization regular expression (``regex`` syntax).
    """

    def __init__(
        self,
        merges: Sequence[Pair] = (),
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        pattern: str = GPT2_SPLIT_PATTERN,
    ) -> None:
        self.merges: list[Pair] = []
        self._vocab: list[bytes] = [bytes([b]) for b in range(256)]
        self._ranks: dict[Pair, int] = {}
        for k, pair in enumerate(merges):
            pair = tuple(pair)
            if len(pair) != 2 or not all(isinstance(i, int) for i in pair):
                raise ValueError(f"merge {k} is {pair!r}: a merge is a pair of token ids")
            a, b = pair
            for i in (a, b):
                if not 0 <= i < 256 + k:
                    raise ValueError(
                        f"merge {k} is {pair!r}, but id {i} is unknown at that point "
                        f"(ids 0..{256 + k - 1} exist before merge {k})"
                    )
            if pair in self._ranks:
                raise ValueError(f"merge {k} repeats merge {self._ranks[pair]}: {pair!r}")
            self._ranks[pair] = k
            self.merges.append(pair)
            self._vocab.append(self._vocab[a] + self._vocab[b])

        specials = list(special_tokens)
        for s in specials:
            if not isinstance(s, str) or not s:
                raise ValueError(f"special token {s!r} must be a non-empty string")
        if len(set(specials)) != len(specials):
            raise ValueError(f"special_tokens={specials!r} has repeats")
        self.special_tokens: dict[str, int] = {
            s: len(self._vocab) + i for i, s in enumerate(specials)
        }
        self._special_ids = {i: s for s, i in self.special_tokens.items()}
        self.pattern = pattern
        self._regex = regex.compile(pattern)
        self._cache: dict[str, list[int]] = {}

    # -- training -----------------------------------------------------------

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        pattern: str = GPT2_SPLIT_PATTERN,
        naive: bool = False,
    ) -> BPETokenizer:
        """Learn a tokenizer of ``vocab_size`` tokens (bytes + merges + special tokens).

        Fewer merges are learned if the text runs out of pairs first.
        """
        specials = list(special_tokens)
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
            raise ValueError(
                f"vocab_size={vocab_size!r} must be an int >= 256 + {len(specials)} "
                "(the bytes and the special tokens)"
            )
        trainer = train_bpe_naive if naive else train_bpe
        merges = trainer(text, vocab_size - 256 - len(specials), pattern, specials)
        return cls(merges, specials, pattern)

    # -- vocabulary ---------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids: 256 bytes + merges + special tokens."""
        return len(self._vocab) + len(self.special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token's UTF-8 text).

        Any integer works, including NumPy and 0-d PyTorch integers.
        """
        try:
            i = operator.index(token_id)
        except TypeError:
            raise ValueError(f"token id {token_id!r} is not an integer") from None
        if 0 <= i < len(self._vocab):
            return self._vocab[i]
        if i in self._special_ids:
            return self._special_ids[i].encode("utf-8")
        raise ValueError(f"unknown token id {i}: this tokenizer has ids 0..{self.vocab_size - 1}")

    def truncated(self, vocab_size: int) -> BPETokenizer:
        """The tokenizer that training with a smaller ``vocab_size`` would have learned.

        Training is greedy, so a smaller vocabulary keeps the first merges of a larger one.
        """
        n_merges = vocab_size - 256 - len(self.special_tokens)
        if not 0 <= n_merges <= len(self.merges):
            raise ValueError(
                f"vocab_size={vocab_size} must lie in "
                f"{256 + len(self.special_tokens)}..{self.vocab_size}"
            )
        return BPETokenizer(self.merges[:n_merges], list(self.special_tokens), self.pattern)

    # -- encoding and decoding ----------------------------------------------

    def _encode_chunk(self, data: bytes) -> list[int]:
        ids = list(data)
        ranks = self._ranks
        while len(ids) >= 2:
            # the adjacent pair learned earliest; pairs never learned rank last
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, len(ranks)))
            rank = ranks.get(pair)
            if rank is None:
                break
            ids = merge(ids, pair, 256 + rank)
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` ignoring special tokens (their text is split like any other)."""
        out: list[int] = []
        cache = self._cache
        for chunk in self._regex.findall(text):
            ids = cache.get(chunk)
            if ids is None:
                ids = self._encode_chunk(_utf8(chunk))
                if len(cache) < 200_000:  # bounded: pre-tokens of a big corpus are many
                    cache[chunk] = ids
            out.extend(ids)
        return out

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; each special token in it becomes its single id.

        With ``special=False``, special tokens are encoded as ordinary text.
        Raises ValueError for a lone surrogate (not valid Unicode text).
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if not special or not self.special_tokens:
            return self.encode_ordinary(text)
        out: list[int] = []
        for piece, is_special in split_special(text, self.special_tokens):
            if is_special:
                out.append(self.special_tokens[piece])
            else:
                out.extend(self.encode_ordinary(piece))
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes ``ids`` stand for; ValueError naming any unknown id."""
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``. A cut through a multi-byte character decodes as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- save and load ------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as readable text and return the path.

        The format (version 1)::

            companion-bpe v1
            pattern "<the split pattern as a JSON string>"
            special <count>
            "<|endoftext|>" <id>          one line per special token
            merges <count>
            <a> <b>  # 'x' + 'y'          one line per merge; token 256 + line index
        """
        def show(i: int) -> str:
            return repr(self._vocab[i])[1:]  # b'th' -> 'th'

        lines = [FILE_HEADER, f"pattern {json.dumps(self.pattern)}"]
        lines.append(f"special {len(self.special_tokens)}")
        lines += [f"{json.dumps(s)} {i}" for s, i in self.special_tokens.items()]
        lines.append(f"merges {len(self.merges)}")
        lines += [f"{a} {b}  # {show(a)} + {show(b)}" for a, b in self.merges]
        path = Path(path)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a file written by :meth:`save`; a ValueError names the file and the bad line."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text, so not a tokenizer file") from None
        n_read = 0

        def bad(msg: str) -> ValueError:
            return ValueError(f"{path}, line {n_read}: {msg}")

        def read() -> str:
            nonlocal n_read
            if n_read == len(lines):
                raise ValueError(f"{path}: the file ends early, after line {n_read}")
            n_read += 1
            return lines[n_read - 1]

        def read_section(name: str) -> str:
            line = read()
            key, _, value = line.partition(" ")
            if key != name:
                raise bad(f"expected '{name} ...', got {line!r}")
            return value

        def read_count(name: str) -> int:
            value = read_section(name)
            if not value.isdigit():
                raise bad(f"'{name}' needs a count, got {value!r}")
            return int(value)

        header = read()
        if header != FILE_HEADER:
            raise bad(
                f"expected {FILE_HEADER!r}, got {header[:40]!r}: "
                "not a companion BPE file, or a version this code cannot read"
            )

        try:
            pattern = json.loads(read_section("pattern"))
            regex.compile(pattern)
        except (ValueError, TypeError, regex.error) as err:
            raise bad(f"the pattern is not a JSON string holding a regular expression ({err})") from None

        specials: list[tuple[str, int, int]] = []  # (token, id, line)
        for _ in range(read_count("special")):
            line = read()
            text, _, number = line.rpartition(" ")
            try:
                token = json.loads(text)
            except ValueError:
                token = None
            if not isinstance(token, str) or not number.isdigit():
                raise bad(f"expected '\"<token>\" <id>', got {line!r}")
            specials.append((token, int(number), n_read))

        merges: dict[Pair, int] = {}  # pair -> rank
        for k in range(read_count("merges")):
            line = read()
            fields = line.split("#", 1)[0].split()  # what follows '#' is for readers
            if len(fields) != 2 or not all(f.isdigit() for f in fields):
                raise bad(f"expected two token ids 'a b', got {line!r}")
            pair = (int(fields[0]), int(fields[1]))
            for i in pair:
                if i >= 256 + k:
                    raise bad(f"merge {k} uses id {i}, which is not defined before it (ids 0..{255 + k} are)")
            if pair in merges:
                raise bad(f"merge {k} repeats merge {merges[pair]}: {pair}")
            merges[pair] = k
        rest = [line for line in lines[n_read:] if line.strip()]
        if rest:
            n_read += 1
            raise bad(f"unexpected text after the last merge: {rest[0][:40]!r}")

        for rank, (token, i, line_no) in enumerate(specials):
            expected = 256 + len(merges) + rank
            if i != expected:
                n_read = line_no
                raise bad(f"special token {token!r} has id {i}, expected {expected} "
                          "(special tokens follow the merges, in order)")
        return cls(list(merges), [token for token, _, _ in specials], pattern)

    def __repr__(self) -> str:
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={list(self.special_tokens)})"
        )


# ---------------------------------------------------------------------------
# Hugging Face `tokenizers`, the reference implementation


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, used by byte-level vocabularies.

    Printable bytes map to themselves; the others (controls, space, ...) are shifted to
    code points from 256 up, so every token is a visible string in a vocabulary file.

    >>> m = bytes_to_unicode(); m[ord("a")], m[ord(" ")], len(set(m.values()))
    ('a', 'Ġ', 256)
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _hf_pipeline(tokenizer: Tokenizer, pattern: str) -> Tokenizer:
    from tokenizers import Regex, decoders, pre_tokenizers

    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_huggingface(
    text: str,
    vocab_size: int,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    pattern: str = GPT2_SPLIT_PATTERN,
) -> Tokenizer:
    """Train Hugging Face's byte-level BPE with the same pattern, alphabet and vocabulary size.

    Needs the ``tokenizers`` package (``pip install tokenizers``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = _hf_pipeline(Tokenizer(models.BPE()), pattern)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)  # one piece: no extra splits
    return tokenizer


def to_huggingface(tok: BPETokenizer) -> Tokenizer:
    """The same tokenizer as a Hugging Face ``Tokenizer``, with the same token ids."""
    from tokenizers import AddedToken, Tokenizer, models

    chars = bytes_to_unicode()
    names = ["".join(chars[b] for b in tok.token_bytes(i)) for i in range(256 + len(tok.merges))]
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) < len(names):  # two merges built the same bytes, e.g. (ab)c and a(bc)
        twice = next(n for i, n in enumerate(names) if vocab[n] != i)
        raise ValueError(f"two token ids stand for {twice!r}: a Hugging Face vocabulary needs distinct strings")
    merges = [(names[a], names[b]) for a, b in tok.merges]
    hf = _hf_pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges)), tok.pattern)
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.special_tokens])
    return hf
