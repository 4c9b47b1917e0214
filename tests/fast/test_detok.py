"""Incremental detokenization and stop-string holdback (engine_proc/backends/detok.py)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from engine_proc.backends.detok import DetokStream, StopStringMatcher


def run(pieces: list[bytes], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """Feed every piece (until a stop); return the emitted chunks and whether a stop matched."""
    stream = DetokStream(stop)
    out: list[str] = []
    for piece in pieces:
        chunk = stream.feed(piece)
        out.append(chunk.text)
        if chunk.stopped:
            return out, True
    out.append(stream.flush())
    return out, False


def test_multibyte_character_split_across_tokens_is_emitted_once() -> None:
    emoji = "😀".encode()
    assert len(emoji) == 4
    out, stopped = run([b"hi ", emoji[:1], emoji[1:3], emoji[3:], b"!"])
    assert out == ["hi ", "", "", "😀", "!", ""]
    assert not stopped


def test_incomplete_utf8_at_end_becomes_replacement_character() -> None:
    out, _ = run([b"ok", "é".encode()[:1]])
    assert "".join(out) == "ok\ufffd"


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    out, stopped = run([b"Hello <", b"/st", b"op> after"], stop=("</stop>",))
    assert stopped
    assert out == ["Hello ", "", ""]


def test_stop_string_inside_one_token_cuts_the_text_before_it() -> None:
    out, stopped = run([b"one. END two"], stop=("END",))
    assert (out, stopped) == (["one. "], True)


def test_held_back_prefix_is_released_when_it_does_not_complete() -> None:
    out, stopped = run([b"a <", b"b", b"> <"], stop=("<end>",))
    assert not stopped
    assert out == ["a ", "<b", "> ", "<"]  # the final "<" comes out only in flush()


def test_earliest_stop_string_wins() -> None:
    out, stopped = run([b"xx beta alpha"], stop=("alpha", "beta"))
    assert (out, stopped) == (["xx "], True)


def test_after_a_stop_nothing_more_is_emitted() -> None:
    stream = DetokStream(("X",))
    assert stream.feed(b"aXb").text == "a"
    assert stream.feed(b"more").text == ""
    assert stream.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    out, stopped = run([b"abc"], stop=("",))
    assert (out, stopped) == (["abc", ""], False)


def test_holdback_is_the_longest_proper_prefix() -> None:
    m = StopStringMatcher(("abcd", "cx"))
    assert m.holdback("zzabc") == 3
    assert m.holdback("zzc") == 1
    assert m.holdback("zzabcd") == 0  # a whole stop string is find()'s job, not holdback's
    assert m.holdback("") == 0


# ---- property: the streaming result equals a naive re-scan of the whole text after each token --

ALPHABET = "ab <>/é😀"


@st.composite
def split_text(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    text = draw(st.text(alphabet=ALPHABET, max_size=40))
    data = text.encode()
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=len(data))))
    bounds = [0, *[c for c in cuts if c < len(data)], len(data)]
    return text, [data[i:j] for i, j in itertools.pairwise(bounds) if j > i]


def naive(pieces: list[bytes], stop: tuple[str, ...]) -> tuple[str, bool]:
    seen = b""
    for piece in pieces:
        seen += piece
        text = seen.decode("utf-8", errors="ignore")  # drops only an incomplete tail here
        hits = [i for i in (text.find(s) for s in stop if s) if i != -1]
        if hits:
            return text[: min(hits)], True
    return seen.decode("utf-8"), False


@given(
    split_text(),
    st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=3).map(tuple),
)
def test_streaming_matches_naive_rescan(
    case: tuple[str, list[bytes]], stop: tuple[str, ...]
) -> None:
    _, pieces = case
    out, stopped = run(pieces, stop)
    expected, expected_stopped = naive(pieces, stop)
    assert "".join(out) == expected
    assert stopped == expected_stopped
    for s in stop:
        assert s not in "".join(out)
