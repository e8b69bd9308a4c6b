"""Hidden tests for chapter 6's exercises."""

from companion.grading import hidden


@hidden("recover_merges")
def test_recover_merges_ambiguous_splits(recover_merges):
    from companion.grading import expect_same
    merges = [(97, 97), (256, 256), (257, 97), (256, 97)]  # aa, aaaa, aaaaa, aaa
    tokens = [b"aa", b"aaaa", b"aaaaa", b"aaa"]
    expect_same(recover_merges(tokens), merges,
                "tokens aa, aaaa, aaaaa, aaa: aaaa is aa + aa (not a + aaa), aaaaa is aaaa + a")
    expect_same(recover_merges([b"ab", b"abab", b" abab", b"abababab", b" ababa"]),
                [(97, 98), (256, 256), (32, 257), (257, 257), (258, 97)],
                "tokens ab, abab, ' abab', abababab, ' ababa': ' ababa' is ' abab' + a")


@hidden("recover_merges")
def test_recover_merges_empty_and_bytes_of_characters(recover_merges):
    from companion.grading import expect_same
    expect_same(recover_merges([]), [], "no tokens beyond the 256 bytes: no merges")
    tokens = ["é".encode("utf-8"), "日".encode("utf-8")[:2], "日".encode("utf-8"), " 日".encode("utf-8")]
    expect_same(recover_merges(tokens), [(195, 169), (230, 151), (257, 165), (32, 258)],
                "tokens é, the first two bytes of 日, 日, ' 日': merges inside UTF-8 characters")


@hidden("recover_merges")
def test_recover_merges_trained_vocabularies(recover_merges, tok):
    from companion.grading import expect_same
    from companion.tokenizers import BPETokenizer, train_bpe
    text = "Здравствуй, мир! naïve café 1234 1234 " * 3 + "the cat sat on the mat, the hat " * 4
    for merges, case in [(train_bpe(text, 60), "60 merges trained on Cyrillic, accented and English text"),
                         (tok.merges, "all 3,839 merges of the chapter's tokenizer")]:
        table = BPETokenizer(merges, special_tokens=[])
        tokens = [table.token_bytes(256 + k) for k in range(len(merges))]
        expect_same(recover_merges(tokens), list(merges), case)


@hidden("stream_decode")
def test_stream_decode_bytes_one_at_a_time(stream_decode):
    from companion.grading import expect_same
    vocab = {i: bytes([i]) for i in range(256)}
    ids = list("🐍!".encode("utf-8"))
    expect_same(stream_decode(ids, vocab), ["", "", "", "🐍", "!"],
                "the four bytes of 🐍 one id at a time, then '!': the emoji comes with its last byte")
    expect_same(stream_decode([240, 159], vocab), ["", "\ufffd"],
                "two of the four bytes of an emoji, then the end: one replacement character at the end")
    expect_same(stream_decode([104, 195], vocab), ["h", "\ufffd"],
                "'h' then the first byte of é, then the end")


@hidden("stream_decode")
def test_stream_decode_empty_and_straddling(stream_decode):
    from companion.grading import expect_same
    vocab = {i: bytes([i]) for i in range(256)}
    expect_same(stream_decode([], vocab), [], "no ids: no strings")
    vocab[256] = b"\xa9\xe6\x97"  # the end of é and the start of 日
    vocab[257] = b"\xa5 ok"  # the end of 日 and more
    expect_same(stream_decode([195, 256, 257], vocab), ["", "é", "日 ok"],
                "tokens that end one character and start the next")
    expect_same(stream_decode([195, 256], vocab), ["", "é\ufffd"],
                "é completed by a token that starts 日, then the end: é and one replacement character")


@hidden("stream_decode")
def test_stream_decode_real_tokenizer(stream_decode, tok):
    import codecs

    from companion.grading import expect_same
    vocab = {i: tok.token_bytes(i) for i in range(tok.vocab_size)}
    text = "ROMEO: naïve café, 日本語のテキスト 🐍🔥 x² ≠ ∞\n"
    ids = tok.encode(text)
    decoder = codecs.getincrementaldecoder("utf-8")()
    expected = [decoder.decode(vocab[i]) for i in ids]
    got = stream_decode(ids, vocab)
    expect_same(got, expected, f"the chapter's tokenizer on {text!r} ({len(ids)} ids)")
    if "".join(got) != text:
        raise AssertionError("the strings joined do not give the text back")


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
