"""The front's scheduler in-process: caps, the bounded queue and its wait, each overload policy's
exact 429/503 counts, priority order with aging, fairness between clients, and AIMD."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from axserving.config import OverloadPolicy, SchedulerSettings
from axserving.errors import RateLimited, ServiceUnavailable, UnprocessableRequest
from axserving.scheduler import Priority, Scheduler

T = TypeVar("T")


def run(body: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(body())  # type: ignore[arg-type]


async def hold(s: Scheduler, model: str, release: asyncio.Event, order: list[Any], tag: Any = None,
               cap: int = 100, priority: Priority = Priority.normal, client: str = "") -> str:
    try:
        async with s.admit(model, cap, priority, client):
            order.append(tag)
            await release.wait()
        return "ok"
    except RateLimited:
        return "429"
    except ServiceUnavailable as e:
        return f"503:{e.code}"


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_global_and_per_model_caps_are_enforced() -> None:
    async def body() -> None:
        s = Scheduler(SchedulerSettings(max_inflight=3, max_queue=10))
        gate, order = asyncio.Event(), []
        tasks = [asyncio.ensure_future(hold(s, "a", gate, order, i, cap=2)) for i in range(3)]
        tasks += [asyncio.ensure_future(hold(s, "b", gate, order, 10 + i, cap=2)) for i in range(3)]
        await settle()
        assert s.inflight == 3 and s.per_model == {"a": 2, "b": 1} and s.queued() == 3
        gate.set()
        assert await asyncio.gather(*tasks) == ["ok"] * 6
        assert s.inflight == 0 and s.per_model == {} and s.queued() == 0

    run(body)


def test_max_wait_bounds_only_the_wait() -> None:
    async def body() -> None:
        s = Scheduler(SchedulerSettings(max_inflight=1, max_wait_ms=100))
        long_gate, order = asyncio.Event(), []
        first = asyncio.ensure_future(hold(s, "m", long_gate, order, "first"))
        await settle()
        assert await hold(s, "m", asyncio.Event(), order) == "503:queue_timeout"
        assert s.timed_out == 1
        await asyncio.sleep(0.3)  # the running request outlives max_wait_ms by far
        long_gate.set()
        assert await first == "ok"

    run(body)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # 2 run, 2 wait, 4 more arrive.
        (OverloadPolicy.queue, {"ok": 4, "429": 4}),
        (OverloadPolicy.reject, {"ok": 2, "429": 6}),
        (OverloadPolicy.shed_oldest, {"ok": 4, "503:shed": 4}),
    ],
)
def test_overload_policies_exact_counts(policy: OverloadPolicy, expected: dict[str, int]) -> None:
    async def body() -> dict[str, int]:
        s = Scheduler(SchedulerSettings(max_inflight=2, max_queue=2, overload_policy=policy))
        gate, order = asyncio.Event(), []
        tasks = []
        for i in range(8):
            tasks.append(asyncio.ensure_future(hold(s, "m", gate, order, i)))
            await settle()
        gate.set()
        results = await asyncio.gather(*tasks)
        counts: dict[str, int] = {}
        for r in results:
            counts[r] = counts.get(r, 0) + 1
        if policy is OverloadPolicy.shed_oldest:
            assert order == [0, 1, 6, 7]  # the newest two waited last, the older waiters were shed
        assert s.inflight == 0 and not s.waiting
        return counts

    assert run(body) == expected


def test_priority_order_and_aging() -> None:
    async def body() -> None:
        s = Scheduler(SchedulerSettings(max_inflight=1, aging_ms=100_000))
        gate, order = asyncio.Event(), []
        running = asyncio.ensure_future(hold(s, "m", gate, order, "running"))
        await settle()
        tasks = [asyncio.ensure_future(hold(s, "m", gate, order, p.name, priority=p))
                 for p in (Priority.background, Priority.low, Priority.normal, Priority.critical, Priority.high)]
        await settle()
        gate.set()
        await asyncio.gather(running, *tasks)
        assert order == ["running", "critical", "high", "normal", "low", "background"]

    run(body)


def test_aging_lets_a_low_class_overtake_newer_high_ones() -> None:
    async def body() -> None:
        s = Scheduler(SchedulerSettings(max_inflight=1, aging_ms=50))
        order: list[Any] = []
        gates = [asyncio.Event() for _ in range(8)]
        running = asyncio.ensure_future(hold(s, "m", gates[0], order, "running"))
        await settle()
        old_low = asyncio.ensure_future(hold(s, "m", gates[1], order, "background", priority=Priority.background))
        await asyncio.sleep(0.3)  # background has waited 6 classes' worth: it now outranks critical
        fresh = [asyncio.ensure_future(hold(s, "m", gates[2 + i], order, f"high{i}", priority=Priority.high))
                 for i in range(3)]
        await settle()
        for g in gates:
            g.set()
        await asyncio.gather(running, old_low, *fresh)
        assert order[:2] == ["running", "background"]

    run(body)


def test_a_freed_slot_goes_to_another_client_first() -> None:
    async def body() -> None:
        s = Scheduler(SchedulerSettings(max_inflight=1))
        order: list[Any] = []
        gate = asyncio.Event()
        running = asyncio.ensure_future(hold(s, "m", gate, order, "a0", client="a"))
        await settle()
        # Client a queues five requests before b queues two: b is still served every other turn.
        tasks = [asyncio.ensure_future(hold(s, "m", gate, order, f"a{i}", client="a")) for i in range(1, 6)]
        await settle()
        tasks += [asyncio.ensure_future(hold(s, "m", gate, order, f"b{i}", client="b")) for i in range(2)]
        await settle()
        gate.set()
        await asyncio.gather(running, *tasks)
        assert order == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]

    run(body)


def test_a_waiter_that_leaves_frees_its_place() -> None:
    async def body() -> None:
        s = Scheduler(SchedulerSettings(max_inflight=1, max_queue=1))
        gate, order = asyncio.Event(), []
        running = asyncio.ensure_future(hold(s, "m", gate, order, "run"))
        await settle()
        leaver = asyncio.ensure_future(hold(s, "m", gate, order, "leaver"))
        await settle()
        leaver.cancel()
        await settle()
        assert s.queued() == 0
        assert await asyncio.wait_for(asyncio.gather(asyncio.ensure_future(
            hold(s, "m", gate, order, "next")), _set_later(gate)), 2) == ["ok", None]
        await running
        assert s.inflight == 0 and order == ["run", "next"]

    run(body)


async def _set_later(gate: asyncio.Event) -> None:
    await asyncio.sleep(0.05)
    gate.set()


def test_aimd_moves_the_limit() -> None:
    async def body() -> None:
        t = [0.0]
        s = Scheduler(SchedulerSettings(max_inflight=16, target_p99_ms=100), clock=lambda: t[0])
        for _ in range(50):  # slow: e2e 200 ms
            async with s.admit("m", 100):
                t[0] += 0.2
        assert s.limit == 14  # 16 x 7/8
        for _ in range(100):  # fast: e2e 10 ms
            async with s.admit("m", 100):
                t[0] += 0.01
        assert s.limit == 16  # +1 per window, never above max_inflight
        for _ in range(50 * 20):
            async with s.admit("m", 100):
                t[0] += 1
        assert s.limit == 2  # never under the floor

    run(body)


def test_priority_names() -> None:
    assert Priority.parse(None) is Priority.normal and Priority.parse(" HIGH ") is Priority.high
    with pytest.raises(UnprocessableRequest, match="critical, high, normal, low, background"):
        Priority.parse("urgent")
