"""``axserving status``, ``axserving top`` and ``axserving generate`` (issue 14), as a user runs
them: the real command against a real server (fake backend), and one generation through a real
engine process."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx

from tests.server import AXSERVING, REPO, free_port, run_server


def axserving(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXS_")}
    env["COLUMNS"] = "160"
    return subprocess.run([*AXSERVING, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_status_and_top_show_the_servers_models_and_figures(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake") as s:
        httpx.post(f"{s.v1}/chat/completions", headers=s.headers(),
                   json={"messages": [{"role": "user", "content": "one two three"}]}, timeout=10)
        done = axserving("status", "--url", s.url)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert "default" in out and "ready" in out and "fake" in out
        assert "TTFT" in out and "tokens/s" in out and "queued 0" in out
        top = axserving("top", "--url", s.url, "--count", "2", "--interval", "0.2")
        assert top.returncode == 0, top.stderr
        assert "default" in top.stdout and "ready" in top.stdout


def test_status_of_no_server_is_a_clear_error() -> None:
    done = axserving("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "cannot reach" in done.stderr and "Traceback" not in done.stderr


def test_generate_streams_one_answer_through_an_engine_process() -> None:
    done = axserving("generate", "--backend", "fake", "-m", "fake://echo", "-p", "alpha beta gamma", "-n", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "alpha beta gamma"
    assert "TTFT" in done.stderr and "3 tokens" in done.stderr and "finish stop" in done.stderr
    bad = axserving("generate", "--backend", "fake", "-m", "fake://echo", "-p", "x", "-n", "0")
    assert bad.returncode == 2 and "-n/--max-tokens" in bad.stderr
    missing = axserving("generate", "-m", "/nonexistent/model.gguf", "-p", "x")
    assert missing.returncode == 2 and "--model" in missing.stderr and "Traceback" not in missing.stderr
