"""``axserving generate``: one generation from the command line, through the same supervised
engine process a server runs, streamed to the terminal with its timings at the end. A quick
check of a model without starting a server."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from axserving.app import engine_processes
from axserving.config import Settings
from axserving.models.spec import ModelSpec
from axserving.protocol import RequestSampling
from ipc.records import ChatMessage, Submit


@dataclass(frozen=True)
class Timings:
    load_s: float
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    finish_reason: str | None

    @property
    def decode_tps(self) -> float:
        decode = self.total_s - self.ttft_s
        return (self.completion_tokens - 1) / decode if self.completion_tokens > 1 and decode > 0 else 0.0

    def describe(self) -> str:
        return (
            f"load {self.load_s:.2f}s · prompt {self.prompt_tokens} tokens · TTFT {self.ttft_s * 1000:.0f} ms · "
            f"{self.completion_tokens} tokens in {self.total_s:.2f}s · decode {self.decode_tps:.1f} tok/s · "
            f"finish {self.finish_reason}"
        )


async def generate(
    settings: Settings,
    spec: ModelSpec,
    prompt: str,
    sampling: RequestSampling,
    raw: bool = False,
    out: TextIO = sys.stdout,
) -> Timings:
    """Start the model's engine, run one request, stream its text to ``out``, stop the engine."""
    client = engine_processes(settings)(spec, lambda *_: None)
    started = time.monotonic()
    client.start()
    try:
        await client.started()
        loaded = time.monotonic()
        params = sampling.resolve(spec.sampling, settings.scheduler.default_max_tokens)
        if raw:
            def build(rid: int) -> Submit:
                return Submit(rid=rid, params=params, prompt=prompt)
        else:
            message = ChatMessage(role="user", content=prompt)

            def build(rid: int) -> Submit:
                return Submit(rid=rid, params=params, messages=(message,))

        timeout = settings.scheduler.request_timeout_secs
        sent = time.monotonic()
        stream = await client.submit(build, sent + timeout, sent + timeout)
        prompt_tokens = completion = 0
        finish = None
        first: float | None = None
        while (chunk := await stream.next()) is not None:
            if first is None and chunk.n_tokens:
                first = time.monotonic()
            out.write(chunk.text)
            out.flush()
            prompt_tokens = chunk.prompt_tokens or prompt_tokens
            completion = chunk.completion_tokens
            finish = chunk.finish_reason or finish
        end = time.monotonic()
        return Timings(loaded - started, prompt_tokens, completion, (first or end) - sent, end - sent, finish)
    finally:
        await client.stop()


def sampling_of(max_tokens: int, temperature: float | None, seed: int | None, stop: list[str]) -> RequestSampling:
    return dataclasses.replace(
        RequestSampling.unset(), max_tokens=max_tokens, temperature=temperature, seed=seed, stop=tuple(stop)
    )


def run(settings: Settings, spec: ModelSpec, prompt: str, sampling: RequestSampling, raw: bool) -> Timings:
    return asyncio.run(generate(settings, spec, prompt, sampling, raw))
