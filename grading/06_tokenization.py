"""Hidden tests for chapter 6's exercises."""

from companion.grading import hidden


@hidden("expand")
def test_expand_nested_merges(expand):
    from companion.grading import expect_same
    # 256 = "hi", 257 = "hi!", 258 = "a" + "hi", 259 = "ahi" + "hi!"
    merges = [(104, 105), (256, 33), (97, 256), (258, 257)]
    expect_same(expand([259, 32, 257, 104, 258], merges), list(b"ahihi! hi!hahi"),
                "ids [259, 32, 257, 104, 258]: merges of merges, on both halves, mixed with bytes")
    expect_same(expand([258], merges), list(b"ahi"),
                "id 258 = (97, 256): the first half comes first")


@hidden("expand")
def test_expand_empty_and_plain_bytes(expand):
    from companion.grading import expect_same
    merges = [(0, 255), (256, 256)]
    expect_same(expand([], merges), [], "no ids: no bytes")
    expect_same(expand([0, 255, 65], merges), [0, 255, 65], "ids all below 256: the bytes themselves")
    expect_same(expand([257], merges), [0, 255, 0, 255], "one id, 257 = (256, 256) with 256 = (0, 255)")
    expect_same(expand([7], []), [7], "one byte and no merges")


@hidden("expand")
def test_expand_deep_chain(expand):
    from companion.grading import expect_same
    # 256 = "ab", and each next token appends one letter to the previous one: 200 levels deep
    merges = [(97, 98)] + [(256 + k - 1, 97 + k % 26) for k in range(1, 200)]
    table = {i: bytes([i]) for i in range(256)}
    for k, (a, b) in enumerate(merges):
        table[256 + k] = table[a] + table[b]
    ids = [455, 300, 10, 256]
    expect_same(expand(ids, merges), list(b"".join(table[i] for i in ids)),
                "a chain of 200 merges, each built on the one before")


@hidden("expand")
def test_expand_own_code(expand, tok):
    from companion.grading import expect_same, forbidding
    text = "naïve café, 日本語! ROMEO: wherefore art thou 1234?"
    ids = tok.encode(text)
    with forbidding(expand, "companion.tokenizers.BPETokenizer.decode_bytes",
                    "companion.tokenizers.BPETokenizer.decode", "companion.tokenizers.BPETokenizer.token_bytes"):
        got = expand(ids, tok.merges)
    expect_same(got, list(text.encode("utf-8")),
                "the chapter's tokenizer on non-ASCII text, without BPETokenizer's decode")


@hidden("pair_counts")
def test_pair_counts_overlaps_and_shared_pairs(pair_counts):
    from companion.grading import expect_same
    # "aaaa" has (a, a) three times; "aab" adds one more (a, a); every pair counts its word's frequency
    expect_same(pair_counts({"aaaa": 2, "ba": 3, "aab": 1}), {(97, 97): 7, (98, 97): 3, (97, 98): 1},
                "{'aaaa': 2, 'ba': 3, 'aab': 1}: overlapping pairs, one pair shared by two words")


@hidden("pair_counts")
def test_pair_counts_utf8_bytes(pair_counts):
    from companion.grading import expect_same
    words = {"日本": 2, " naïve": 3, "é": 4}
    expected = {}
    for word, n in words.items():
        b = word.encode("utf-8")
        for i in range(len(b) - 1):
            expected[(b[i], b[i + 1])] = expected.get((b[i], b[i + 1]), 0) + n
    expect_same(pair_counts(words), expected,
                "{'日本': 2, ' naïve': 3, 'é': 4}: pairs of UTF-8 bytes, not of characters")


@hidden("pair_counts")
def test_pair_counts_no_pairs(pair_counts):
    from companion.grading import expect_same
    expect_same(pair_counts({}), {}, "no pre-tokens")
    expect_same(pair_counts({"a": 5, "!": 2, " ": 9}), {}, "only one-byte pre-tokens: no pairs")


@hidden("pair_counts")
def test_pair_counts_corpus_written_out(pair_counts, train_text):
    from collections import Counter

    import regex
    from companion.grading import expect_same
    from companion.tokenizers import GPT2_SPLIT_PATTERN
    pieces = regex.findall(GPT2_SPLIT_PATTERN, train_text[40_000:46_000])
    expected = {}
    for piece in pieces:  # every occurrence, repeats written out
        b = piece.encode("utf-8")
        for pair in zip(b, b[1:]):
            expected[pair] = expected.get(pair, 0) + 1
    expect_same(pair_counts(Counter(pieces)), expected,
                "the pre-tokens of train_text[40000:46000]: equal to counting every occurrence")


@hidden("split_digits")
def test_split_digits_groups_from_the_left(split_digits):
    from companion.grading import expect_same
    cases = {
        "12345678901": ["123", "456", "789", "01"],
        "7": ["7"],
        "x 1234": ["x", " ", "123", "4"],
        " 99": [" ", "99"],
        "1000000": ["100", "000", "0"],
    }
    for text, expected in cases.items():
        expect_same(split_digits(text), expected, f"split_digits({text!r})")


@hidden("split_digits")
def test_split_digits_next_to_other_pieces(split_digits):
    from companion.grading import expect_same
    cases = {
        "": [],
        "abc123def": ["abc", "123", "def"],
        "$1234.50": ["$", "123", "4", ".", "50"],
        "line 1\n2345": ["line", " ", "1", "\n", "234", "5"],
        "ACT 3, SCENE 12:": ["ACT", " ", "3", ",", " SCENE", " ", "12", ":"],
    }
    for text, expected in cases.items():
        expect_same(split_digits(text), expected, f"split_digits({text!r})")


@hidden("split_digits")
def test_split_digits_other_text_unchanged(split_digits, train_text):
    import regex
    from companion.grading import expect_same
    from companion.tokenizers import GPT2_SPLIT_PATTERN
    for start in (0, 30_000):
        passage = train_text[start:start + 1500]
        expect_same(split_digits(passage), regex.findall(GPT2_SPLIT_PATTERN, passage),
                    f"train_text[{start}:{start + 1500}] (no digits): the GPT-2 pre-tokens, unchanged")
    mixed = "I'll  pay 20 ducats,\n\tand 1601 more!  \n¿Qué? 3.14159 — naïve 42x\n"
    pieces = split_digits(mixed)
    if "".join(pieces) != mixed:
        raise AssertionError(f"split_digits({mixed!r}): the pieces do not join back to the text: {pieces!r}")
    for piece in pieces:
        if any(ch.isdigit() for ch in piece) and not (piece.isdigit() and len(piece) <= 3):
            raise AssertionError(f"split_digits({mixed!r}): piece {piece!r} is not a group of 1 to 3 digits")


@hidden("split_digits")
def test_split_digits_unicode_digits(split_digits):
    from companion.grading import expect_same
    text = "room ٣٤٥٦ or ４５６７"
    expect_same(split_digits(text), ["room", " ", "٣٤٥", "٦", " or", " ", "４５６", "７"],
                f"split_digits({text!r}): Arabic-Indic and full-width digits are digits too")
