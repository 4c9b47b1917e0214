"""A measuring client for one streaming request: a bare socket that only timestamps what it
receives, and parses the HTTP/1.1 chunked SSE response after the stream has ended.

Why not an HTTP library: on a 2-core machine the client shares the CPUs with the server's
engine, and a library's per-event work (h11 is pure Python; httpx plus ``iter_lines`` cost
~0.3 ms of CPU per event here) would be charged to the server being measured. Here the client
spends one ``recv`` and one clock read per arrival while the stream runs.
"""

from __future__ import annotations

import bisect
import itertools
import socket
import time
from typing import Any

import orjson


def sse_events(arrivals: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """The ``data:`` payloads of a chunked HTTP/1.1 SSE response, each with the time its last
    byte arrived, from what a socket received (``(time, bytes)`` per ``recv``)."""
    raw = b"".join(data for _, data in arrivals)
    ends = list(itertools.accumulate(len(data) for _, data in arrivals))
    head, sep, _ = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if not sep or status.split(b" ")[1:2] != [b"200"]:
        raise RuntimeError(f"not a 200 response: {raw[:500]!r}")
    if b"transfer-encoding: chunked" not in head.lower():
        raise RuntimeError(f"not a chunked response: {head!r}")
    pos = len(head) + 4
    body = bytearray()
    offsets: list[int] = []  # end of each HTTP chunk in the body
    times: list[float] = []  # when that chunk's last byte arrived
    while True:
        line_end = raw.index(b"\r\n", pos)
        size = int(raw[pos:line_end].split(b";")[0], 16)
        if size == 0:
            break
        start = line_end + 2
        body += raw[start : start + size]
        offsets.append(len(body))
        times.append(arrivals[bisect.bisect_left(ends, start + size)][0])
        pos = start + size + 2
    out = []
    end = 0
    for event in bytes(body).split(b"\n\n"):
        end += len(event) + 2
        if event.startswith(b"data: "):
            out.append((times[bisect.bisect_left(offsets, end - 2)], event[6:]))
    return out


def http_request(url: str, key: str | None, body: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[str, int, bytes]:
    """The host, port and bytes of an HTTP/1.1 POST of ``body`` as JSON that closes the connection."""
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    payload = orjson.dumps(body)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    return host, int(port or 80), request


def stream_chat(url: str, key: str | None, body: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[float, list[tuple[float, bytes]]]:
    """POST ``body`` to ``url`` + ``path`` and read the whole stream; returns the time the
    request was sent (``time.perf_counter``) and the ``data:`` payloads with their arrival times."""
    host, port, request = http_request(url, key, body, path)
    arrivals: list[tuple[float, bytes]] = []
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        sock.sendall(request)
        recv, clock, append = sock.recv, time.perf_counter, arrivals.append
        while data := recv(1 << 16):
            append((clock(), data))
    return t0, sse_events(arrivals)
