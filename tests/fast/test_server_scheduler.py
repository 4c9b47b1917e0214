"""The front's scheduler through the real `axserving run` on the fake backend: caps enforced
before the engine, the wait bounded apart from the request, each overload policy's exact counts,
Retry-After on every refusal, priorities from the body or the header."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.prom import parse
from tests.server import Server, run_server

WORDS = " ".join(f"w{i}" for i in range(100))


def post(server: Server, content: str = WORDS, **extra: object) -> httpx.Response:
    headers = {**server.headers(), **extra.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.post(server.v1 + "/chat/completions", headers=headers, timeout=60,
                      json={"messages": [{"role": "user", "content": content}], **extra})


def test_max_wait_bounds_only_the_wait(tmp_path: Path) -> None:
    """Defect 1: max_wait_ms was the deadline of the whole request (cut at 1 s with a 504)."""
    env = {"AXS_SCHED_MAX_WAIT_MS": "1000", "AXS_REQUEST_TIMEOUT_SECS": "60"}
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=20", env=env) as server:
        started = time.monotonic()
        r = post(server)  # 100 steps of 20 ms: 2 s, twice max_wait_ms
        assert r.status_code == 200, r.text
        assert time.monotonic() - started > 1.5 and r.json()["usage"]["completion_tokens"] == 100


def test_max_inflight_is_enforced_before_the_engine(tmp_path: Path) -> None:
    """Defect 2: with max_inflight 4, all 12 requests entered the engine."""
    env = {"AXS_SCHED_MAX_INFLIGHT": "4"}
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=10", env=env) as server:
        most_running, most_waiting = 0, 0
        done = threading.Event()

        def watch() -> None:
            nonlocal most_running, most_waiting
            while not done.is_set():
                status = server.status()
                most_running = max(most_running, status["models"][0]["engine"]["inflight"])
                most_waiting = max(most_waiting, status["scheduler"]["waiting"])
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(12) as pool:
                results = list(pool.map(lambda _: post(server, " ".join(["x"] * 60)), range(12)))
        finally:
            done.set()
            watcher.join()
        assert [r.status_code for r in results] == [200] * 12
        assert most_running == 4 and most_waiting >= 6, (most_running, most_waiting)
        metrics = httpx.get(server.url + "/metrics").text
        assert "axs_scheduler_queue_depth 0.0" in metrics and "axs_scheduler_inflight_count 0.0" in metrics


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("queue", {200: 4, 429: 4}), ("reject", {200: 2, 429: 6}), ("shed_oldest", {200: 4, 503: 4})],
)
def test_overload_policies_exact_counts(tmp_path: Path, policy: str, expected: dict[int, int]) -> None:
    env = {"AXS_SCHED_MAX_INFLIGHT": "2", "AXS_SCHED_MAX_QUEUE": "2", "AXS_OVERLOAD_POLICY": policy}
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=10", env=env) as server:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = []
            for _ in range(8):
                futures.append(pool.submit(post, server))
                time.sleep(0.05)  # in order: the first two run (1 s each), the rest arrive behind
            results = [f.result() for f in futures]
        counts: dict[int, int] = {}
        for r in results:
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
            if r.status_code != 200:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] in (None, "shed")
        assert counts == expected
        assert all(r.json()["usage"]["completion_tokens"] == 100 for r in results if r.status_code == 200)
        # Each refusal is counted once as a response and once by its reason.
        scrape = parse(httpx.get(server.url + "/metrics").text)
        for status, n in expected.items():
            labels = {"model": "default", "endpoint": "/v1/chat/completions", "status": str(status)}
            assert scrape[("axs_requests_total", frozenset(labels.items()))] == n, status
        reason = {"queue": "queue_full", "reject": "queue_full", "shed_oldest": "shed"}[policy]
        assert scrape[("axs_request_rejections_total", frozenset({("reason", reason)}))] == 8 - expected[200]


def test_a_wait_that_runs_out_is_a_503_with_retry_after(tmp_path: Path) -> None:
    env = {"AXS_SCHED_MAX_INFLIGHT": "1", "AXS_SCHED_MAX_WAIT_MS": "300"}
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=10", env=env) as server:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, server)
            time.sleep(0.1)
            second = post(server)
            assert first.result().status_code == 200
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert second.json()["error"]["code"] == "queue_timeout"


def test_priority_from_the_body_or_the_header(tmp_path: Path) -> None:
    env = {"AXS_SCHED_MAX_INFLIGHT": "1"}
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=10", env=env) as server:
        finished: list[str] = []

        def tagged(tag: str, **kw: object) -> None:
            assert post(server, " ".join(["y"] * 20), **kw).status_code == 200
            finished.append(tag)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            running = pool.submit(post, server)  # holds the only slot for 1 s
            time.sleep(0.2)
            low = pool.submit(tagged, "background", priority="background")
            time.sleep(0.1)
            normal = pool.submit(tagged, "normal")
            time.sleep(0.1)
            high = pool.submit(tagged, "critical", headers={"X-Priority": "critical"})
            for f in (running, low, normal, high):
                f.result()
        assert finished == ["critical", "normal", "background"]
        r = post(server, "x", priority="urgent")
        assert r.status_code == 422 and r.json()["error"]["param"] == "priority"
        r = post(server, "x", headers={"X-Priority": "soon"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "X-Priority"
