"""Tests of companion.tokenizers: BPE helpers, training, encoding, files, and parity
with Hugging Face `tokenizers` (the oracle for splitting, encoding and compression)."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import companion.tokenizers as ct
from companion.data import load_tiny_shakespeare
from companion.tokenizers import (
    ENDOFTEXT,
    FILE_HEADER,
    BPETokenizer,
    get_stats,
    merge,
    pretokenize,
    to_huggingface,
    train_bpe,
    train_bpe_naive,
    train_huggingface,
)

hf_tokenizers = pytest.importorskip("tokenizers")

# Any Unicode text except lone surrogates (category Cs), which are not valid text and
# cannot be written as UTF-8; encode() rejects them with a ValueError (tested below).
unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@pytest.fixture(scope="module")
def shakespeare() -> tuple[str, str]:
    """(training text, held-out text): the first 90% and the last 10%."""
    text = load_tiny_shakespeare()
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


@pytest.fixture(scope="module")
def tok(shakespeare) -> BPETokenizer:
    train, _ = shakespeare
    return BPETokenizer.train(train[:100_000], vocab_size=600, special_tokens=[ENDOFTEXT, "<|pad|>"])


# ---------------------------------------------------------------------------
# our module, not Hugging Face's


def test_companion_module_does_not_shadow_huggingface():
    assert hf_tokenizers.__name__ == "tokenizers"
    assert Path(hf_tokenizers.__file__).parent != Path(ct.__file__).parent
    assert hasattr(hf_tokenizers, "Tokenizer") and not hasattr(ct, "Tokenizer")
    assert ct.__name__ == "companion.tokenizers"


def test_docstring_examples():
    result = doctest.testmod(ct, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 10 and result.failed == 0


# ---------------------------------------------------------------------------
# helpers


def test_get_stats_counts_overlaps_and_accumulates():
    assert get_stats([1, 2, 1, 2, 1]) == {(1, 2): 2, (2, 1): 2}
    assert get_stats([5, 5, 5, 5]) == {(5, 5): 3}
    counts = get_stats([1, 2])
    assert get_stats([1, 2, 3], counts, weight=10) == {(1, 2): 11, (2, 3): 10}
    assert get_stats([]) == {} and get_stats([7]) == {}


def test_merge_left_to_right():
    assert merge([1, 2, 1, 2, 3], (1, 2), 9) == [9, 9, 3]
    assert merge([5, 5, 5, 5, 5], (5, 5), 6) == [6, 6, 5]
    assert merge([1, 3, 2], (1, 2), 9) == [1, 3, 2]


def test_gpt2_pattern_splits():
    assert pretokenize("I'm here:  don't stop 42x!\n\nok") == [
        "I", "'m", " here", ":", " ", " don", "'t", " stop", " 42", "x", "!", "\n", "\n", "ok",
    ]


@settings(deadline=None)
@given(unicode_text)
def test_pretokens_cover_the_text(text):
    assert "".join(pretokenize(text)) == text


# ---------------------------------------------------------------------------
# training


def test_naive_and_incremental_agree_on_shakespeare(shakespeare):
    text = shakespeare[0][:10_000]
    merges = train_bpe(text, 30)
    assert merges == train_bpe_naive(text, 30)
    assert merges[:2] == [(32, 116), (104, 101)]  # ' t' (spaces lead words), then 'he'
    assert merges[4] == (256, 257)  # ' t' + 'he' = ' the'


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab c\n'é😀", max_size=80), st.integers(0, 30))
def test_naive_and_incremental_agree_on_any_text(text, n):
    assert train_bpe(text, n) == train_bpe_naive(text, n)


def test_training_stops_when_no_pair_is_left():
    merges = train_bpe("ab ab", 100)
    assert merges == [(97, 98), (32, 256)]
    assert BPETokenizer.train("ab ab", 1000).vocab_size == 256 + 2 + 1


def test_special_tokens_are_not_learned_from():
    text = (ENDOFTEXT + "xy") * 50
    tok = BPETokenizer.train(text, 300)
    learned = {tok.token_bytes(i) for i in range(256, 256 + len(tok.merges))}
    assert learned == {b"xy"}


def test_smaller_vocabulary_is_a_prefix(shakespeare):
    text = shakespeare[0][:30_000]
    big = BPETokenizer.train(text, 400)
    assert big.truncated(300).merges == BPETokenizer.train(text, 300).merges
    assert big.truncated(257).merges == []
    with pytest.raises(ValueError, match="vocab_size=401"):
        big.truncated(401)


def test_bad_vocab_size():
    with pytest.raises(ValueError, match=r"vocab_size=200 must be an int >= 256 \+ 1"):
        BPETokenizer.train("hello", 200)


# ---------------------------------------------------------------------------
# encoding and decoding


@settings(max_examples=200, deadline=None)
@given(unicode_text, unicode_text)
def test_round_trip_any_unicode(tok, a, b):
    for text in (a, a + ENDOFTEXT + b, a + "<|pad|>" + b + ENDOFTEXT):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, special=False)) == text


@pytest.fixture(scope="module")
def tok_hf(tok):
    return to_huggingface(tok)


@settings(max_examples=200, deadline=None)
@given(unicode_text)
def test_encoding_equals_huggingface_with_the_same_merges(tok, tok_hf, text):
    text = text + ENDOFTEXT + text
    assert tok.encode(text) == tok_hf.encode(text).ids


def test_encode_applies_merges_in_rank_order():
    # merge 0 is (b, c), merge 1 is (a, b): "abc" must become a + bc, not ab + c
    tok = BPETokenizer([(98, 99), (97, 98)], special_tokens=[])
    assert tok.encode("abc") == [97, 256]
    assert tok.encode("abab") == [257, 257]
    assert to_huggingface(tok).encode("abc").ids == [97, 256]


def test_special_tokens_are_never_split(tok):
    eot, pad = tok.special_tokens[ENDOFTEXT], tok.special_tokens["<|pad|>"]
    assert (eot, pad) == (598, 599) and tok.vocab_size == 600
    ids = tok.encode(f"Hello{ENDOFTEXT}<|pad|> world")
    assert ids == tok.encode("Hello") + [eot, pad] + tok.encode(" world")
    plain = tok.encode(ENDOFTEXT, special=False)
    assert eot not in plain and len(plain) > 1


def test_decode_unknown_id(tok):
    for bad in (600, -1, 10**6):
        with pytest.raises(ValueError, match=rf"unknown token id {bad}: .* ids 0\.\.599"):
            tok.decode([72, bad])


def test_decode_accepts_numpy_and_torch_integers(tok):
    np, torch = pytest.importorskip("numpy"), pytest.importorskip("torch")
    ids = tok.encode("Hello there")
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == "Hello there"
    with pytest.raises(ValueError, match="token id 1.5 is not an integer"):
        tok.decode([1.5])


def test_to_huggingface_refuses_duplicate_token_bytes():
    # (a b) c and a (b c) both stand for "abc"
    tok = BPETokenizer([(97, 98), (98, 99), (256, 99), (97, 257)], special_tokens=[])
    with pytest.raises(ValueError, match="two token ids stand for 'abc'"):
        to_huggingface(tok)


def test_decode_cut_through_a_character():
    tok = BPETokenizer()
    ids = tok.encode("é")
    assert ids == [0xC3, 0xA9]
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode_bytes(ids[:1]) == b"\xc3"


def test_lone_surrogate_is_rejected():
    with pytest.raises(ValueError, match="lone surrogate"):
        BPETokenizer().encode("ok \ud800 no")


def test_bad_merges_and_specials():
    with pytest.raises(ValueError, match=r"merge 1 is \(258, 1\), but id 258 is unknown"):
        BPETokenizer([(1, 2), (258, 1)])
    with pytest.raises(ValueError, match="merge 1 repeats merge 0"):
        BPETokenizer([(1, 2), (1, 2)])
    with pytest.raises(ValueError, match="has repeats"):
        BPETokenizer([], special_tokens=["<a>", "<a>"])
    with pytest.raises(ValueError, match="non-empty string"):
        BPETokenizer([], special_tokens=[""])


# ---------------------------------------------------------------------------
# save and load


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "tok.bpe")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == FILE_HEADER
    assert lines[2:5] == ["special 2", f'"{ENDOFTEXT}" 598', '"<|pad|>" 599']
    assert lines[5] == "merges 342"
    assert lines[6:8] == ["32 116  # ' ' + 't'", "104 101  # 'h' + 'e'"]
    back = BPETokenizer.load(path)
    assert back.merges == tok.merges
    assert back.special_tokens == tok.special_tokens
    assert back.pattern == tok.pattern
    text = "O Romeo, Romeo! wherefore art thou Romeo?" + ENDOFTEXT
    assert back.encode(text) == tok.encode(text)


def test_save_load_odd_tokens(tmp_path):
    tok = BPETokenizer.train("#' \"#' \"\\n\\n ##", 270, special_tokens=['<"#">'], pattern=r"\S+|\s+")
    back = BPETokenizer.load(tok.save(tmp_path / "odd.bpe"))
    assert (back.merges, back.special_tokens, back.pattern) == (tok.merges, tok.special_tokens, tok.pattern)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda L: ["companion-bpe v2"] + L[1:], r"line 1: expected 'companion-bpe v1', got 'companion-bpe v2'"),
        (lambda L: ["{}"] + L[1:], "not a companion BPE file"),
        (lambda L: L[:1] + ["pattern [1]"] + L[2:], "line 2: the pattern is not"),
        (lambda L: L[:1] + ['pattern "(unclosed"'] + L[2:], "line 2: the pattern is not"),
        (lambda L: L[:2] + ["special x"] + L[3:], "line 3: 'special' needs a count, got 'x'"),
        (lambda L: L[:3] + ["<|endoftext|> 258"] + L[4:], "line 4: expected"),
        (lambda L: L[:3] + ['"<|endoftext|>" 7'] + L[4:], "line 4: special token '<|endoftext|>' has id 7, expected 258"),
        (lambda L: L[:5] + ["97"] + L[6:], "line 6: expected two token ids"),
        (lambda L: L[:5] + ["97 x"] + L[6:], "line 6: expected two token ids"),
        (lambda L: L[:6] + ["256 300"] + L[7:], "line 7: merge 1 uses id 300, which is not defined"),
        (lambda L: L[:6] + ["97 98"], "line 7: merge 1 repeats merge 0"),
        (lambda L: L[:-1], "the file ends early"),
        (lambda L: L + ["1 2 3"], "unexpected text after the last merge"),
        (lambda L: L[:4] + ["merged 2"] + L[5:], "line 5: expected 'merges ...', got 'merged 2'"),
    ],
)
def test_load_rejects_bad_files(tmp_path, edit, message):
    good = BPETokenizer([(97, 98), (256, 99)]).save(tmp_path / "good.bpe")
    lines = good.read_text(encoding="utf-8").splitlines()
    assert lines[:6] == [FILE_HEADER, lines[1], "special 1", '"<|endoftext|>" 258', "merges 2", "97 98  # 'a' + 'b'"]
    bad = tmp_path / "bad.bpe"
    bad.write_text("\n".join(edit(lines)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        BPETokenizer.load(bad)


# ---------------------------------------------------------------------------
# against Hugging Face `tokenizers` on Tiny Shakespeare


def test_token_count_within_two_percent_of_huggingface(shakespeare):
    train, held_out = shakespeare
    train = train[:250_000]
    ours = BPETokenizer.train(train, vocab_size=768)
    theirs = train_huggingface(train, vocab_size=768)
    assert theirs.get_vocab_size() == ours.vocab_size == 768
    n_ours, n_theirs = len(ours.encode(held_out)), len(theirs.encode(held_out).ids)
    assert abs(n_ours / n_theirs - 1) < 0.02, (n_ours, n_theirs)
    assert n_ours < 0.5 * len(held_out.encode("utf-8"))  # and it does compress
    assert theirs.decode(theirs.encode(held_out).ids) == held_out == ours.decode(ours.encode(held_out))


def test_load_rejects_binary_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x80\x81 not text")
    with pytest.raises(ValueError, match="model.bin is not UTF-8 text"):
        BPETokenizer.load(path)
