"""perf/sse_client.py: the measuring client's after-the-fact parse of a chunked SSE response."""

from __future__ import annotations

import pytest

from perf.sse_client import sse_events

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def test_events_get_the_arrival_time_of_their_last_byte() -> None:
    one, two, done = chunk(b"data: {\"a\":1}\n\n"), chunk(b"data: {\"b\":2}\n\n"), chunk(b"data: [DONE]\n\n")
    raw = HEAD + one + two + done + b"0\r\n\r\n"
    cut1 = len(HEAD) + len(one) - 6  # inside the first event
    cut2 = len(HEAD) + len(one) + len(two) + 3  # just after the second event's chunk
    arrivals = [(1.0, raw[:cut1]), (2.0, raw[cut1:cut2]), (3.0, raw[cut2:])]
    assert sse_events(arrivals) == [(2.0, b'{"a":1}'), (2.0, b'{"b":2}'), (3.0, b"[DONE]")]


def test_an_event_split_across_http_chunks_is_joined() -> None:
    raw = HEAD + chunk(b"data: {\"a\"") + chunk(b":1}\n\n: ping\n\n") + b"0\r\n\r\n"
    assert sse_events([(5.0, raw)]) == [(5.0, b'{"a":1}')]


def test_an_error_status_is_reported() -> None:
    raw = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}"
    with pytest.raises(RuntimeError, match="not a 200"):
        sse_events([(1.0, raw)])
