"""Incremental detokenisation with the real default tokenizer: streaming, stop strings, UTF-8."""

from __future__ import annotations

import random

import pytest
from freelunch.engine.detokenizer import IncrementalText
from tiny_models import default_tokenizer

TEXTS = [
    "Hello world. The answer is 42 and more",
    "I love 🍕 and 🎉🎉! 中文字符测试，你好世界。",
    "naïve café — “quotes” and ‘more’ … done",
    "def f(x):\n    return x ** 2  # squares\n\n\nprint(f(3))\t tab",
    "Emoji with joiners: 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 end",
    "日本語のテキストと한국어 텍스트 and Ελληνικά, русский.",
    "   leading spaces and trailing spaces   ",
]


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _stream(tok, ids, stop=(), include_stop=False):
    """Feed ids one at a time as the engine does; returns (chunks, number of tokens fed, detok)."""
    d = IncrementalText(tok, list(stop), include_stop)
    chunks = []
    n = 0
    for i, t in enumerate(ids):
        d.add(t)
        n = i + 1
        last = d.stopped or n == len(ids)
        chunks.append(d.flush(final=last))
        if d.stopped:
            break
    return chunks, n, d


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decode(tok, text):
    ids = tok.encode(text)
    chunks, n, d = _stream(tok, ids)
    assert n == len(ids)
    assert "".join(chunks) == _decode(tok, ids) == text
    assert not d.stopped


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decode_with_unmatched_stops(tok, text):
    """Stop strings that never complete only delay text; nothing is lost or duplicated."""
    ids = tok.encode(text)
    stops = ["a ZZZ", " tXq", "😀😀", "\n\n\n\n\n"]
    chunks, _n, d = _stream(tok, ids, stops)
    assert "".join(chunks) == text
    assert not d.stopped


def test_multibyte_characters_never_stream_as_replacement_char(tok):
    text = "🍕🎉 中文字符测试，你好世界。 👩‍👩‍👧‍👦 🇫🇷 ok"
    ids = tok.encode(text)
    # the test only means something if some tokens are partial characters on their own
    assert sum("\ufffd" in _decode(tok, [i]) for i in ids) >= 4
    chunks, _, _ = _stream(tok, ids)
    assert all("\ufffd" not in c for c in chunks), chunks
    assert "".join(chunks) == text
    # partial characters are held, not dropped: several chunks are empty while bytes accumulate
    assert "" in chunks


def test_stop_string_spanning_tokens_is_cut(tok):
    text = "Hello world. The answer is 42 and more text after it"
    ids = tok.encode(text)
    stop = "answer is 4"
    # the stop string starts inside one token and ends inside another
    assert not any(stop in _decode(tok, [i]) for i in ids)
    chunks, n, d = _stream(tok, ids, [stop])
    assert d.stopped
    assert "".join(chunks) == "Hello world. The "
    # it stopped at the token that completed the stop string, not later
    assert stop in _decode(tok, ids[:n]) and stop not in _decode(tok, ids[: n - 1])

    chunks, n2, d = _stream(tok, ids, [stop], include_stop=True)
    assert d.stopped and n2 == n
    assert "".join(chunks) == "Hello world. The answer is 4"


def test_earliest_of_several_stop_strings_wins(tok):
    text = "alpha beta gamma delta epsilon"
    ids = tok.encode(text)
    chunks, _, d = _stream(tok, ids, ["delta", "a gam", "beta gamma delta"])
    assert d.stopped
    # "a gam" completes first (and "beta gamma delta" starts earlier but completes later)
    assert "".join(chunks) == "alpha bet"


def test_stop_string_found_across_a_multibyte_character(tok):
    text = "Say 你好世界 now and then"
    ids = tok.encode(text)
    chunks, _, d = _stream(tok, ids, ["好世"])
    assert d.stopped and "".join(chunks) == "Say 你"
    chunks, _, d = _stream(tok, ids, ["好世"], include_stop=True)
    assert "".join(chunks) == "Say 你好世"


def _assert_no_leak(tok, text, stops, include_stop=False):
    ids = tok.encode(text)
    # reference: generation stops at the first token after which some stop string is in the text;
    # the output is cut at the earliest occurrence among the stop strings present then
    expected = text
    for k in range(1, len(ids) + 1):
        seen = _decode(tok, ids[:k])
        hits = [(i, s) for s in stops if (i := seen.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            expected = seen[: i + (len(s) if include_stop else 0)]
            break
    d = IncrementalText(tok, list(stops), include_stop)
    released = ""
    for k, t in enumerate(ids):
        d.add(t)
        released += d.flush(final=d.stopped or k == len(ids) - 1)
        # every streamed prefix is a prefix of the final answer: nothing later cut is ever sent
        assert expected.startswith(released), (released, expected)
        if d.stopped:
            break
    assert released == expected
    return ids


def test_stop_prefix_is_held_back_until_resolved(tok):
    text = "We say STO, then ST, then STOP! and more"
    ids = _assert_no_leak(tok, text, ["STOP!"])
    # partial matches (" STO", " ST") were held and later released once they could not be the stop
    d = IncrementalText(tok, ["STOP!"])
    released = []
    for t in ids:
        d.add(t)
        released.append(d.flush(final=False))
        if d.text.endswith("STO"):
            assert not "".join(released).endswith("STO")
        if d.stopped:
            break
    assert "".join(released) + d.flush(final=True) == "We say STO, then ST, then "


@pytest.mark.parametrize(
    "text,stops",
    [
        ("The cat sat on the mat and the cat ran", ["the cat"]),
        ("aaaaab aab", ["aab"]),
        ("abcabcabd tail", ["abcabd"]),
        ("one\ntwo\n\nthree", ["\n\n"]),
        ("count 1 2 3 4 5 6 7 8 9 10", [" 10", "9 1", "xyz"]),
        ("no match anywhere in this one", ["match anywhere in that"]),
        ("emoji 🍕🍕 pizza", ["🍕🍕 p"]),
    ],
)
@pytest.mark.parametrize("include_stop", [False, True])
def test_no_stop_prefix_leaks(tok, text, stops, include_stop):
    _assert_no_leak(tok, text, stops, include_stop)


def test_random_texts_stream_consistently(tok):
    """Fuzz: random mixes of words, symbols and multi-byte pieces, random stop strings taken from the text."""
    rng = random.Random(7)
    pieces = [
        "the",
        " cat",
        "é",
        "中",
        "文",
        "🍕",
        "!",
        " ",
        "\n",
        "ab",
        "ST",
        "OP",
        "42",
        "—",
        "👍🏽",
        "ß",
        "x",
    ]
    for _ in range(150):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
        stops = []
        for _ in range(rng.randint(0, 2)):
            a = rng.randrange(len(text))
            stops.append(text[a : a + rng.randint(1, 6)])
        if rng.random() < 0.3:
            stops.append("never-there")
        _assert_no_leak(tok, text, stops, include_stop=rng.random() < 0.5)
        chunks, _, _ = _stream(tok, tok.encode(text), stops)
        assert all("\ufffd" not in c for c in chunks)
