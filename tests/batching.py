"""What the slow tier's batching tests share: prompts on distinct topics (so one request's text
can never pass for another's), and helpers to serve several at once and compare replies."""

from __future__ import annotations

from collections.abc import Sequence

from engine_proc.backends.base import Backend
from ipc.records import Delta, Submit

PROMPTS = (
    "Write a short poem about the moon.",
    "List three facts about elephants.",
    "Explain what a computer keyboard is.",
    "Describe a busy market in the morning.",
)


def run(b: Backend, requests: list[Submit], max_steps: int = 5000) -> dict[int, list[Delta]]:
    """Submit all, step until all finish; return each request's deltas."""
    for r in requests:
        b.submit(r)
    out: dict[int, list[Delta]] = {r.rid: [] for r in requests}
    for _ in range(max_steps):
        if not b.has_work():
            break
        for d in b.step():
            out.setdefault(d.rid, []).append(d)
    assert not b.has_work()
    for rid, deltas in out.items():
        assert deltas and deltas[-1].finish_reason is not None, f"request {rid} did not finish"
    return out


def text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def agree(a: Sequence[object], b: Sequence[object]) -> int:
    """Items (characters, or token ids) two replies share before they first differ."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
