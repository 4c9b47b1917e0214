"""Request ids and log lines (issue 14): ``X-Request-ID`` echoed or made on every response, and
one request followed from its response header into a front log line and an engine log line, in
text and in JSON logs, on a real server (fake backend, real engine process)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.server import run_server

BODY = {"messages": [{"role": "user", "content": "one two"}]}


def _wait_for(server_log: callable, needle: str, timeout: float = 5.0) -> str:  # type: ignore[valid-type]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = server_log()
        if needle in text:
            return text
        time.sleep(0.05)
    return server_log()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_request_id_is_followed_into_front_and_engine_logs(tmp_path: Path, fmt: str) -> None:
    env = {"AXS_LOG": "debug", "AXS_LOG_FORMAT": fmt}
    with run_server(tmp_path, "--backend", "fake", env=env) as s:
        r = httpx.post(f"{s.v1}/chat/completions", json=BODY, headers={**s.headers(), "X-Request-ID": "trace-abc-123"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-abc-123"
        for name in ("x-content-type-options", "x-frame-options", "referrer-policy"):
            assert name in r.headers
        made = httpx.get(f"{s.v1}/models", headers=s.headers())
        assert len(made.headers["x-request-id"]) == 32  # none sent: a new one
        bad = httpx.get(f"{s.url}/health", headers={"X-Request-ID": "two words; and <html>"})
        assert len(bad.headers["x-request-id"]) == 32  # an unsafe id is replaced by a new one
        text = _wait_for(s.log, "chat default 200")
    lines = [line for line in text.splitlines() if "trace-abc-123" in line]
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        assert {r["request_id"] for r in records} == {"trace-abc-123"}
        components = {r["component"] for r in records}
    else:
        components = {line.split()[3].split("[")[0] for line in lines}
    assert "front" in components and "engine:default" in components, lines
    assert any("chat default 200" in line for line in lines)  # the front's line for the request
