"""One bench request: send it, read the reply (SSE or JSON), and classify what came back.

Timings follow vLLM's serving bench: TTFT is send → first chunk with content; ITL the gaps
between content chunks; TPOT (end − TTFT) / (output tokens − 1); e2e send → end of the reply.
Output tokens come from ``usage`` when the server reports it, else from the count of content
chunks (``tokens_from`` says which).

A 200 is not a success by itself: a reply with no content is ``empty``, and a stream that ends
without ``[DONE]`` or without a finish_reason, or (with ``ignore_eos``) before ``max_tokens``, is
``truncated``. Only ``ok`` requests count towards latencies and throughput.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

_DETAIL_CHARS = 200


class Kind(enum.StrEnum):
    ok = "ok"
    http_error = "http_error"  # a status other than 200
    transport_error = "transport_error"  # no response at all (refused, reset, timed out)
    error_frame = "error_frame"  # 200, then an {"error": ...} event in the stream
    bad_reply = "bad_reply"  # 200 with a body that is not the expected JSON
    empty = "empty"  # 200 with no content
    truncated = "truncated"  # content, but no [DONE] / no finish_reason / short of max_tokens


@dataclass(slots=True)
class Outcome:
    index: int
    kind: Kind
    e2e: float
    http_status: int | None = None
    detail: str = ""
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    tokens_from: str = "none"  # "usage", "chunks" or "none"
    chunks: int = 0
    finish_reason: str | None = None
    group: str = ""  # the workload's kind of request ("long" for long-prompts' long ones)
    text: str = ""  # the reply's content, when the call keeps it (a conversation's next turn needs it)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True, slots=True)
class Call:
    """What :func:`send` needs to know about the workload."""

    url: str
    headers: dict[str, str]
    chat: bool
    stream: bool
    max_tokens: int
    ignore_eos: bool
    keep_text: bool = False


def _snippet(data: bytes | str) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text.strip().replace("\n", " ")[:_DETAIL_CHARS]


async def send(client: httpx.AsyncClient, call: Call, index: int, body: dict[str, Any]) -> Outcome:
    """Send one request and return its classified :class:`Outcome` (never raises for the
    server's faults: every failure is an outcome)."""
    payload = orjson.dumps(body)
    if body.get("max_tokens", call.max_tokens) != call.max_tokens:
        call = dataclasses.replace(call, max_tokens=body["max_tokens"])  # judged by its own limit
    for attempt in range(2):
        t0 = time.perf_counter()
        try:
            if call.stream:
                return await _stream(client, call, index, payload, t0)
            return await _whole(client, call, index, payload, t0)
        except httpx.RemoteProtocolError as e:
            # A kept-alive connection the server had closed (llama-server closes one after a few
            # requests): nothing was sent back, so send again once on a new connection, as
            # clients do (the openai SDK retries connection errors), rather than count the
            # server's connection policy as a failed request.
            if attempt == 0 and "without sending a response" in str(e):
                continue
            return Outcome(index, Kind.transport_error, time.perf_counter() - t0, detail=f"{type(e).__name__}: {e}")
        except httpx.HTTPError as e:
            return Outcome(index, Kind.transport_error, time.perf_counter() - t0, detail=f"{type(e).__name__}: {e}")
    raise AssertionError("unreachable")


async def _whole(client: httpx.AsyncClient, call: Call, index: int, payload: bytes, t0: float) -> Outcome:
    r = await client.post(call.url, content=payload, headers=call.headers)
    end = time.perf_counter()
    out = Outcome(index, Kind.ok, end - t0, http_status=r.status_code)
    if r.status_code != 200:
        out.kind, out.detail = Kind.http_error, _snippet(r.content)
        return out
    try:
        obj = orjson.loads(r.content)
        choice = obj["choices"][0]
        text = choice["message"].get("content") if call.chat else choice.get("text")
        if call.keep_text and isinstance(text, str):
            out.text = text
        out.finish_reason = choice.get("finish_reason")
        usage = obj.get("usage") or {}
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        out.kind, out.detail = Kind.bad_reply, _snippet(r.content)
        return out
    if isinstance(usage.get("completion_tokens"), int):
        out.output_tokens, out.tokens_from = usage["completion_tokens"], "usage"
    out.chunks = 1 if text else 0
    _classify(out, call, done=True)
    return out


async def _stream(client: httpx.AsyncClient, call: Call, index: int, payload: bytes, t0: float) -> Outcome:
    out = Outcome(index, Kind.ok, 0.0)
    done = False
    usage_tokens: int | None = None
    last = t0
    parts: list[str] = []
    async with client.stream("POST", call.url, content=payload, headers=call.headers) as r:
        out.http_status = r.status_code
        if r.status_code != 200:
            out.kind, out.detail = Kind.http_error, _snippet(await r.aread())
            out.e2e = time.perf_counter() - t0
            return out
        buf = b""
        try:
            async for data in r.aiter_bytes():
                # One timestamp per network read: events that arrive together are one delivery.
                now = time.perf_counter()
                buf += data
                if b"\n" not in data:
                    continue
                lines = buf.split(b"\n")
                buf = lines.pop()
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments (keep-alive pings), event: lines
                    data_field = line[5:].strip()
                    if data_field == b"[DONE]":
                        done = True
                        continue
                    try:
                        event = orjson.loads(data_field)
                    except orjson.JSONDecodeError:
                        out.kind, out.detail = Kind.bad_reply, _snippet(data_field)
                        continue
                    if not isinstance(event, dict):
                        out.kind, out.detail = Kind.bad_reply, _snippet(data_field)
                        continue
                    if "error" in event:
                        out.kind, out.detail = Kind.error_frame, _snippet(orjson.dumps(event["error"]))
                        continue
                    usage = event.get("usage")
                    if usage and isinstance(usage.get("completion_tokens"), int):
                        usage_tokens = usage["completion_tokens"]
                    choices = event.get("choices")
                    if not choices:
                        continue
                    choice = choices[0]
                    text = (choice.get("delta") or {}).get("content") if call.chat else choice.get("text")
                    if text:
                        if out.ttft is None:
                            out.ttft = now - t0
                        else:
                            out.itl.append(now - last)
                        last = now
                        out.chunks += 1
                        if call.keep_text:
                            parts.append(text)
                    if choice.get("finish_reason"):
                        out.finish_reason = choice["finish_reason"]
        except httpx.HTTPError as e:
            # The connection broke after a 200: what came so far decides empty vs truncated.
            out.detail = f"{type(e).__name__}: {e}"
    out.e2e = time.perf_counter() - t0
    out.text = "".join(parts)
    if usage_tokens is not None:
        out.output_tokens, out.tokens_from = usage_tokens, "usage"
    else:
        out.output_tokens, out.tokens_from = out.chunks, "chunks"
    if out.kind is Kind.ok:
        _classify(out, call, done)
    return out


def _classify(out: Outcome, call: Call, done: bool) -> None:
    """Set ``out.kind`` to empty/truncated when a 200 reply did not deliver the workload."""
    reason = ""
    if out.chunks == 0:
        out.kind = Kind.empty
        reason = "no content"
    elif not done:
        out.kind, reason = Kind.truncated, "stream ended without [DONE]"
    elif out.finish_reason is None:
        out.kind, reason = Kind.truncated, "no finish_reason"
    elif call.ignore_eos and (
        out.finish_reason != "length" or (out.tokens_from == "usage" and out.output_tokens < call.max_tokens)
    ):
        out.kind = Kind.truncated
        reason = f"ignore_eos asked, got {out.output_tokens}/{call.max_tokens} tokens, finish_reason={out.finish_reason}"
    if reason:
        out.detail = f"{reason}; {out.detail}" if out.detail else reason
