"""The streaming endpoints' response: Server-Sent Events, one event per string the route yields.

Framing is sse-starlette's :class:`~sse_starlette.event.ServerSentEvent`. The response around it
is ours, and lean on purpose: every token of every stream goes through :meth:`__call__`'s loop,
and on a small machine the front's CPU comes out of the engine's. sse-starlette's
``EventSourceResponse`` opens an anyio cancel scope around every send and runs three helper
tasks per response; measured in-process on the fake backend, the front spent about 215 µs of
CPU per event with it and 125 µs with this class (``perf/front_cost.py`` measures it served).
Per response this keeps one task that watches for the client's disconnect and one that sends a
keep-alive comment when the stream has been idle for ``ping_s``; per event, only the framing
and the send.

The client going away is a normal end: the loop is cancelled, the event source is closed (so
its ``finally`` frees the engine's slot at once) and the response returns without an error.
Granian (ASGI spec 2.3) does not raise on a send to a closed connection, so the disconnect is
watched through ``receive`` for the whole response, idle or not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

from sse_starlette.event import ServerSentEvent
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("axserving.sse")

PING_S = 15.0
_SEP = "\n"


Event = str | tuple[str, str]  # data, or (event name, data) for APIs that name events (Anthropic's)


def frame(event: Event) -> bytes:
    if isinstance(event, tuple):
        return ServerSentEvent(data=event[1], event=event[0], sep=_SEP).encode()
    if "\n" not in event and "\r" not in event:
        # Every token's event: one line of JSON (orjson escapes line breaks). The same bytes as
        # ServerSentEvent's, without its buffer and regular expression per event.
        return b"data: " + event.encode() + b"\n\n"
    return ServerSentEvent(data=event, sep=_SEP).encode()


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncIterator[Event], headers: Mapping[str, str] | None = None, ping_s: float = PING_S
    ) -> None:
        self.events = events
        self.ping_s = ping_s
        self.status_code = 200
        self.background = None
        # As sse-starlette sends them: no caching, and no buffering in a proxy (nginx).
        self.init_headers({"Cache-Control": "no-store", "X-Accel-Buffering": "no", **(headers or {})})
        self._lock = asyncio.Lock()  # one sender at a time: the stream or the keep-alive
        self._last_send = 0.0
        self._closed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        assert me is not None
        gone = False

        async def watch_disconnect() -> None:
            nonlocal gone
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:
                log.exception("reading the client's disconnect failed; ending the stream")
            gone = True
            if not self._closed:  # after the last byte there is nothing left to stop
                me.cancel()

        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        self._last_send = loop.time()
        watcher = loop.create_task(watch_disconnect())
        pinger = loop.create_task(self._keepalive(send))
        try:
            lock = self._lock
            async for data in self.events:
                body = frame(data)
                async with lock:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                self._last_send = loop.time()
            async with lock:
                self._closed = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            me.uncancel()  # the client left: an ordinary end, not an error
        finally:
            self._closed = True
            watcher.cancel()
            pinger.cancel()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()  # its finally frees the engine's slot now, not at garbage collection

    async def _keepalive(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        ping = ServerSentEvent(comment="ping", sep=_SEP).encode()
        while True:
            await asyncio.sleep(max(self._last_send + self.ping_s - loop.time(), 0.0))
            if loop.time() - self._last_send < self.ping_s:
                continue
            async with self._lock:
                if self._closed:
                    return
                await send({"type": "http.response.body", "body": ping, "more_body": True})
            self._last_send = loop.time()
