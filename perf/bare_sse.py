"""The ceiling for the front's streaming: a bare Granian + Starlette app that pushes given SSE
events as fast as it can, served the way ``axserving run`` serves (ASGI, uvloop, one worker).

``perf/front_cost.py --ceiling`` replays one of our own streams' events through it, so the two
servers send the same bytes and the ratio of their chunk rates is what our front costs over
Granian itself. Starlette's ``StreamingResponse`` with one ``send`` per event and nothing else:
no authentication, metrics, engine or ring.

    .venv/bin/python perf/bare_sse.py PORT EVENTS_FILE   # EVENTS_FILE: orjson list of event strings
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

EVENTS_ENV = "AXS_BARE_SSE_EVENTS"


def create_app() -> Starlette:
    events = [b"data: " + e.encode() + b"\n\n" for e in orjson.loads(Path(os.environ[EVENTS_ENV]).read_bytes())]

    async def stream(request: Request) -> StreamingResponse:
        await request.body()

        async def body() -> AsyncIterator[bytes]:
            for event in events:
                yield event

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", stream, methods=["POST"])])


def main() -> None:
    from granian.constants import Interfaces, Loops
    from granian.server import Server

    port, events = int(sys.argv[1]), sys.argv[2]
    os.environ[EVENTS_ENV] = str(Path(events).resolve())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    Server("bare_sse:create_app", address="127.0.0.1", port=port, interface=Interfaces.ASGI, loop=Loops.uvloop,
           workers=1, factory=True, log_access=False).serve()


if __name__ == "__main__":
    main()
