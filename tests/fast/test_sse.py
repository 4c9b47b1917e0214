"""The SSE response (framing, end, keep-alive, the client leaving) and the request stream's
deadline, driven in-process as an ASGI server would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from axserving.engine.stream import RequestStream
from axserving.errors import RequestTimeout
from axserving.sse import EventStreamResponse
from ipc.records import Delta


class Client:
    """The ASGI server's side: records what is sent, and hangs up on demand."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.hang_up = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_frames_every_event_and_ends_the_body() -> None:
    async def events() -> AsyncIterator[str]:
        yield '{"a":1}'
        yield "[DONE]"

    async def main() -> Client:
        client = Client()
        await EventStreamResponse(events(), headers={"X-Test": "1"})(SCOPE, client.receive, client.send)
        return client

    client = run(main())
    start = client.sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-store" and headers[b"x-test"] == b"1"
    assert client.body() == b'data: {"a":1}\n\ndata: [DONE]\n\n'
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


@pytest.mark.parametrize("event", ['{"a":"\\u00e9"}', "[DONE]", "", "two\nlines", "cr\r\nlf", ("message_start", "{}")])
def test_framing_is_sse_starlettes(event: str | tuple[str, str]) -> None:
    """One-line events take a short path: the bytes must be what ServerSentEvent writes."""
    from sse_starlette.event import ServerSentEvent

    from axserving.sse import frame

    data, name = (event[1], event[0]) if isinstance(event, tuple) else (event, None)
    assert frame(event) == ServerSentEvent(data=data, event=name, sep="\n").encode()


def test_an_idle_stream_gets_keepalive_comments() -> None:
    async def events() -> AsyncIterator[str]:
        yield "1"
        await asyncio.sleep(0.35)
        yield "2"

    async def main() -> Client:
        client = Client()
        await EventStreamResponse(events(), ping_s=0.1)(SCOPE, client.receive, client.send)
        return client

    body = run(main()).body()
    assert body.startswith(b"data: 1\n\n") and body.endswith(b"data: 2\n\n")
    assert 2 <= body.count(b": ping\n\n") <= 4


@pytest.mark.parametrize("idle", [True, False], ids=["waiting-for-output", "streaming"])
def test_the_client_leaving_closes_the_source_at_once(idle: bool) -> None:
    closed = asyncio.Event()

    async def events() -> AsyncIterator[str]:
        try:
            while True:
                await asyncio.sleep(3600 if idle else 0.001)
                yield "x"
        finally:
            closed.set()

    async def main() -> Client:
        client = Client()
        response = asyncio.ensure_future(EventStreamResponse(events())(SCOPE, client.receive, client.send))
        await asyncio.sleep(0.05)
        client.hang_up.set()
        await asyncio.wait_for(response, 2)  # returns: an ordinary end, not an error
        assert closed.is_set()
        return client

    client = run(main())
    assert not any(m.get("more_body") is False for m in client.sent)  # nothing sent after the hang-up


def test_a_failing_source_still_closes_and_raises() -> None:
    async def events() -> AsyncIterator[str]:
        yield "1"
        raise ValueError("boom")

    async def main() -> None:
        client = Client()
        await EventStreamResponse(events())(SCOPE, client.receive, client.send)

    with pytest.raises(ValueError, match="boom"):
        run(main())


def _delta(rid: int, text: str, finish: str | None = None) -> Delta:
    return Delta(rid=rid, text=text, n_tokens=1, finish_reason=finish, prompt_tokens=3, completion_tokens=1)


def test_request_stream_deadline_aborts_the_engine_after_the_text_so_far() -> None:
    aborted: list[int] = []

    async def main() -> tuple[str, BaseException | None]:
        stream = RequestStream(7, aborted.append, deadline=time.monotonic() + 0.1)
        stream.push(_delta(7, "partial"))
        got = (await stream.next()).text  # type: ignore[union-attr]
        try:
            await stream.next()
        except RequestTimeout as e:
            return got, e
        return got, None

    text, error = run(main())
    assert text == "partial" and isinstance(error, RequestTimeout)
    assert aborted == [7]


def test_request_stream_that_finishes_in_time_is_not_aborted() -> None:
    aborted: list[int] = []

    async def main() -> list[str]:
        stream = RequestStream(8, aborted.append, deadline=time.monotonic() + 0.05)
        stream.push(_delta(8, "all", "stop"))
        await asyncio.sleep(0.1)  # past the deadline, finished before it
        out = []
        while (chunk := await stream.next()) is not None:
            out.append(chunk.text)
        return out

    assert run(main()) == ["all"]
    assert aborted == []
