"""The real `axserving run` (Granian, spawned engine process, shared-memory rings) on the fake
backend: streaming through the openai client, engine crash mid-stream, shutdown, auth refusal."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from ipc.ring import pid_alive
from tests.server import AXSERVING, REPO, leaked, run_server, shm_names, stop


def client(server) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=30)


def test_stream_and_non_stream_over_real_server(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake") as server:
        oai = client(server)
        r = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "red green blue"}])
        assert r.choices[0].message.content == "red green blue "
        assert r.choices[0].finish_reason == "stop" and r.usage and r.usage.completion_tokens == 3
        chunks = list(
            oai.chat.completions.create(
                model="default", stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": " ".join(f"w{i}" for i in range(50))}],
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "".join(f"w{i} " for i in range(50))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 50


def test_engine_sigkill_mid_stream(tmp_path: Path) -> None:
    """The stream ends with an error frame, the API keeps answering, the engine comes back."""
    before = shm_names()
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=20") as server:
        oai = client(server)
        pid = server.engine_pid()
        assert pid
        stream = oai.chat.completions.create(
            model="default", stream=True,
            messages=[{"role": "user", "content": " ".join(["tok"] * 500)}],
        )
        got = []
        with pytest.raises(openai.APIError) as info:
            for chunk in stream:
                got.append(chunk)
                if len(got) == 5:
                    os.kill(pid, signal.SIGKILL)
        assert "engine" in str(info.value.message).lower()
        assert 5 <= len(got) < 100
        # The API never went away, and health says what is going on.
        assert httpx.get(server.url + "/livez").status_code == 200
        new_pid = server.wait_ready(20, previous_pid=pid)
        assert new_pid != pid
        h = server.health()
        assert h["models"][0]["restarts"] == 1 and h["status"] == "ok"
        r = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "after crash"}])
        assert r.choices[0].message.content == "after crash "
        assert leaked(before, server.group_pids()) == set()
        metrics = httpx.get(server.url + "/metrics").text
        assert 'axs_engine_restarts_total{model="default"} 1.0' in metrics


def test_engine_crash_non_streaming_is_503(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake") as server:
        r = httpx.post(
            server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
            json={"model": "default", "messages": [{"role": "user", "content": "x [[crash]] y z"}]},
        )
        assert r.status_code == 503, r.text
        e = r.json()["error"]
        assert e["type"] == "engine_unavailable" and e["code"] == "engine_unavailable"
        assert r.headers["retry-after"] == "1"  # defect 8: every 503 says when to come back
        server.wait_ready(20)
        r = httpx.post(
            server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
            json={"model": "default", "messages": [{"role": "user", "content": "fine"}]},
        )
        assert r.status_code == 200


def test_raw_sse_error_frame_then_done(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake") as server:
        with httpx.stream(
            "POST", server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
            json={"model": "default", "stream": True, "messages": [{"role": "user", "content": "a [[crash]] b c"}]},
        ) as r:
            assert r.status_code == 200
            frames = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert frames[-1] == "[DONE]"
        assert '"engine_unavailable"' in frames[-2]


def test_client_disconnect_aborts_generation(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=10") as server:
        with httpx.stream(
            "POST", server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
            json={"model": "default", "stream": True, "messages": [{"role": "user", "content": " ".join(["z"] * 2000)}]},
        ) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    break
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status = httpx.get(server.v1 + "/admin/status", headers=server.headers()).json()
            if status["inflight"] == 0:
                break
            time.sleep(0.05)
        assert status["inflight"] == 0
        metrics = httpx.get(server.url + "/metrics").text
        assert 'status="499"' in metrics


def test_client_leaving_an_idle_stream_is_seen_at_once(tmp_path: Path) -> None:
    """Granian does not fail a send to a closed connection, so a stream waiting for its next
    token must notice the client leaving by itself, not at the next token (2 s away here)."""
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=2000") as server:
        with httpx.stream(
            "POST", server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
            json={"model": "default", "stream": True, "messages": [{"role": "user", "content": "a b c d e"}]},
        ) as r:
            for line in r.iter_lines():
                if '"content":"a' in line:
                    break
        left = time.monotonic()
        while httpx.get(server.v1 + "/admin/status", headers=server.headers()).json()["inflight"] != 0:
            assert time.monotonic() - left < 1.0, "the stream kept waiting for a client that had left"
            time.sleep(0.02)
        assert 'status="499"' in httpx.get(server.url + "/metrics").text


def test_sigterm_and_sigint_leave_nothing(tmp_path: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        before = shm_names()
        with run_server(tmp_path, "--backend", "fake") as server:
            engine = server.engine_pid()
            server.proc.send_signal(sig)
            assert server.proc.wait(20) == 0, server.log()
            assert stop(server) == 0
        assert engine is not None
        with pytest.raises(ProcessLookupError):
            os.kill(engine, 0)
        assert leaked(before) == set(), server.log()


def test_refuses_to_start_without_auth(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXS_")}
    r = subprocess.run([*AXSERVING, "run", "--backend", "fake"], env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "AXS_API_KEY" in r.stderr and "AXS_ALLOW_NO_AUTH" in r.stderr


def test_bad_config_value_names_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXS_")}
    env.update(AXS_ALLOW_NO_AUTH="true", AXS_SCHED_MAX_INFLIGHT="zero")
    r = subprocess.run([*AXSERVING, "run", "--backend", "fake"], env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "scheduler.max_inflight" in r.stderr and "'zero'" in r.stderr and "AXS_SCHED_MAX_INFLIGHT" in r.stderr


def test_refuses_a_port_another_server_listens_on(tmp_path: Path) -> None:
    """Granian binds with SO_REUSEPORT: without the check, a second server would silently share the first's port."""
    with run_server(tmp_path, "--backend", "fake") as server:
        port = server.url.rsplit(":", 1)[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AXS_")}
        env["AXS_ALLOW_NO_AUTH"] = "true"
        r = subprocess.run(
            [*AXSERVING, "run", "--backend", "fake", "--port", port], env=env, cwd=REPO,
            capture_output=True, text=True, timeout=30,
        )
        assert r.returncode == 2 and f"127.0.0.1:{port}" in r.stderr and "--port" in r.stderr, r.stderr
        assert httpx.get(server.v1 + "/models", headers=server.headers()).status_code == 200


def test_no_auth_mode_serves(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake", api_key=None) as server:
        r = httpx.get(server.v1 + "/models")
        assert r.status_code == 200


def test_missing_model_file_is_clear(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXS_")}
    env["AXS_ALLOW_NO_AUTH"] = "true"
    r = subprocess.run(
        [*AXSERVING, "run", "--model", str(tmp_path / "none.gguf")], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2 and "no such file" in r.stderr


def test_non_streaming_disconnect_aborts(tmp_path: Path) -> None:
    """A client that hangs up on a non-streaming request frees the engine at once."""
    import socket

    import orjson

    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=10") as server:
        body = orjson.dumps({"model": "default", "messages": [{"role": "user", "content": " ".join(["z"] * 3000)}]})
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            time.sleep(0.5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if httpx.get(server.v1 + "/admin/status", headers=server.headers()).json()["inflight"] == 0:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the abandoned request kept running")
        assert 'status="499"' in httpx.get(server.url + "/metrics").text


def test_request_timeout(tmp_path: Path) -> None:
    env = {"AXS_REQUEST_TIMEOUT_SECS": "1"}
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=20", env=env) as server:
        long = " ".join(["w"] * 500)
        r = httpx.post(server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
                       json={"model": "default", "messages": [{"role": "user", "content": long}]})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
                          json={"model": "default", "stream": True,
                                "messages": [{"role": "user", "content": long}]}) as resp:
            frames = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert frames[-1] == "[DONE]" and '"timeout"' in frames[-2]
        assert httpx.get(server.v1 + "/admin/status", headers=server.headers()).json()["inflight"] == 0


def test_engine_that_cannot_load_ends_failed(tmp_path: Path) -> None:
    env = {"AXS_ENGINE_MAX_RESTARTS": "2"}
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "fail_load=1", env=env,
                    wait_ready=False) as server:
        deadline = time.monotonic() + 20
        while server.engine()["state"] != "failed":
            assert time.monotonic() < deadline, server.health()
            time.sleep(0.1)
        h = server.health()
        assert h["status"] == "degraded" and h["ready"] is False and h["models"][0]["state"] == "failed"
        assert "model load failed" in server.engine()["last_error"]
        assert server.engine()["restarts"] == 2
        assert httpx.get(server.url + "/readyz").status_code == 503
        r = httpx.post(server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
                       json={"model": "default", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"
        assert 1 <= int(r.headers["retry-after"]) <= 10  # when the open circuit tries again


def test_engine_runs_niced(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake", env={"AXS_ENGINE_NICE": "7"}) as server:
        pid = server.engine_pid()
        assert pid is not None
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 7


def test_hung_engine_is_detected_killed_and_restarted(tmp_path: Path) -> None:
    """SIGSTOP stands for an engine stuck in a native call: the heartbeat goes stale."""
    before = shm_names()
    env = {"AXS_ENGINE_HEARTBEAT_TIMEOUT_SECS": "1"}
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=20", env=env) as server:
        oai = client(server)
        pid = server.engine_pid()
        assert pid
        stream = oai.chat.completions.create(
            model="default", stream=True, messages=[{"role": "user", "content": " ".join(["tok"] * 500)}],
        )
        got = 0
        stopped_at = None
        with pytest.raises(openai.APIError) as info:
            for _ in stream:
                got += 1
                if got == 3:
                    os.kill(pid, signal.SIGSTOP)
                    stopped_at = time.monotonic()
        assert stopped_at is not None
        detected_after = time.monotonic() - stopped_at
        assert "hung" in str(info.value.message)
        assert detected_after < 1 + 1.0 + 1.0, detected_after  # limit + check interval + slack
        server.wait_ready(20, previous_pid=pid)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert "hung" in server.engine()["last_error"]
        r = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "alive again"}])
        assert r.choices[0].message.content == "alive again "
        assert leaked(before, server.group_pids()) == set()


def test_idle_engine_is_not_mistaken_for_hung(tmp_path: Path) -> None:
    env = {"AXS_ENGINE_HEARTBEAT_TIMEOUT_SECS": "1"}
    with run_server(tmp_path, "--backend", "fake", env=env) as server:
        pid = server.engine_pid()
        time.sleep(3)
        assert server.engine_pid() == pid
        assert server.engine()["restarts"] == 0


def test_engine_stats_reach_status_and_metrics(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=10") as server:
        oai = client(server)
        stream = oai.chat.completions.create(
            model="default", stream=True, messages=[{"role": "user", "content": " ".join(["s"] * 300)}],
        )
        seen_running = False
        for i, _ in enumerate(stream):
            if i % 20 == 0:
                engine = httpx.get(server.v1 + "/admin/status", headers=server.headers()).json()["models"][0]["engine"]
                seen_running |= engine["running"] == 1 and engine["inflight"] == 1
        assert seen_running
        time.sleep(1.2)
        engine = server.engine()
        assert engine["running"] == 0 and engine["steps"] >= 300 and engine["tokens"] >= 300
        assert 'axs_engine_running_sequences{model="default"} 0.0' in httpx.get(server.url + "/metrics").text


def test_a_client_leaving_mid_body_is_a_quiet_end(tmp_path: Path) -> None:
    """Issue 11 defect 9: each aborted upload was an unhandled ERROR with a traceback, twice."""
    import socket

    with run_server(tmp_path, "--backend", "fake") as server:
        port = int(server.url.rsplit(":", 1)[1])
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {server.api_key}\r\nContent-Length: 5000\r\n\r\n".encode()
                    + b'{"messages": [{"role": "user", "content": "'
                )
                time.sleep(0.1)
        time.sleep(0.5)
        r = httpx.post(server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
                       json={"messages": [{"role": "user", "content": "still fine"}]})
        assert r.status_code == 200
        log = server.log()
        assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_a_killed_main_process_takes_its_worker_and_engines_along(tmp_path: Path) -> None:
    """Issue 11 defect 6: SIGKILL of Granian's main process left the worker serving the port."""
    before = shm_names()
    with run_server(tmp_path, "--backend", "fake") as server:
        engine = server.engine_pid()
        worker = server.status()["pid"]
        assert engine and worker != server.proc.pid
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(5)
        deadline = time.monotonic() + 15
        while pid_alive(worker) or pid_alive(engine):
            assert time.monotonic() < deadline, "the worker or the engine outlived the main process"
            time.sleep(0.05)
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url + "/livez", timeout=1)
    assert leaked(before) == set()


def test_a_poison_request_is_refused_after_two_crashes_and_the_model_stays_up(tmp_path: Path) -> None:
    """Issue 11 defect 5: six crashing prompts left the model failed for good."""
    env = {"AXS_ENGINE_MAX_RESTARTS": "2"}
    with run_server(tmp_path, "--backend", "fake", env=env) as server:
        def ask(text: str) -> httpx.Response:
            return httpx.post(server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
                              json={"messages": [{"role": "user", "content": text}]})

        codes = []
        for _ in range(6):
            codes.append(ask("x [[crash]] y").status_code)
            server.wait_ready(20)
        assert codes == [503, 503, 422, 422, 422, 422], codes
        r = ask("x [[crash]] y")
        assert r.json()["error"]["code"] == "request_crashed_engine"
        assert ask("an innocent request").status_code == 200
        assert server.health()["models"][0]["state"] == "ready"  # never "failed"
        assert ask("x [[crash]] z").status_code == 503  # another request is its own


def test_an_open_circuit_half_opens_after_its_cool_down(tmp_path: Path) -> None:
    fault = tmp_path / "fault"
    fault.write_text("the model file is being copied")
    env = {"AXS_ENGINE_MAX_RESTARTS": "1"}
    with run_server(tmp_path, "--backend", "fake", "--config", str(_cooldown_config(tmp_path, 1.0)),
                    "--backend-option", f"fail_load_while={fault}", env=env, wait_ready=False) as server:
        deadline = time.monotonic() + 20
        while server.health()["models"][0]["state"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(server.v1 + "/chat/completions", headers=server.headers(), timeout=30,
                       json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        fault.unlink()  # the fault clears: the next trial start succeeds
        server.wait_ready(20)
        assert server.health()["models"][0]["state"] == "ready"


def _cooldown_config(tmp_path: Path, secs: float) -> Path:
    path = tmp_path / "cooldown.yaml"
    path.write_text(f"engine: {{circuit_cooldown_secs: {secs}}}\n")
    return path


def _stream_words(server, words: int, out: list[str]) -> None:  # type: ignore[no-untyped-def]
    """The stream's data frames into ``out``; "(cut)" last if the connection was cut."""
    try:
        with httpx.stream("POST", server.v1 + "/chat/completions", headers=server.headers(), timeout=60,
                          json={"stream": True, "messages": [{"role": "user", "content": "w " * words}]}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(line[6:])
    except httpx.HTTPError:
        out.append("(cut)")


def test_sigterm_lets_a_stream_finish_and_refuses_new_work(tmp_path: Path) -> None:
    import threading

    before = shm_names()
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=10") as server:
        frames: list[str] = []
        t = threading.Thread(target=_stream_words, args=(server, 150, frames))  # 1.5 s
        t.start()
        time.sleep(0.4)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert httpx.get(server.url + "/readyz").status_code == 503  # at once
        r = httpx.post(server.v1 + "/chat/completions", headers=server.headers(), timeout=10,
                       json={"messages": [{"role": "user", "content": "late"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        t.join(30)
        assert server.proc.wait(20) == 0, server.log()
        assert frames[-1] == "[DONE]" and "error" not in frames[-2]  # it finished normally
        text = "".join(orjson.loads(f)["choices"][0]["delta"].get("content") or "" for f in frames[:-1])
        assert text == "w " * 150
    assert leaked(before) == set()


def test_sigterm_drain_is_bounded_and_a_second_signal_forces(tmp_path: Path) -> None:
    import threading

    before = shm_names()
    env = {"AXS_DRAIN_TIMEOUT_SECS": "1"}
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=10", env=env) as server:
        frames: list[str] = []
        t = threading.Thread(target=_stream_words, args=(server, 2000, frames))  # 20 s
        t.start()
        time.sleep(0.4)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0, server.log()
        took = time.monotonic() - sent
        t.join(10)
        assert 1.0 <= took < 5.0, took  # the drain timeout, not the stream's 20 s
        assert frames[-1] == "[DONE]" and "engine_unavailable" in frames[-2]
    assert leaked(before) == set()
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=10") as server:
        frames = []
        t = threading.Thread(target=_stream_words, args=(server, 2000, frames))
        t.start()
        time.sleep(0.4)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(10)
        assert time.monotonic() - sent < 3.0  # at once, not after the 30 s drain
        t.join(10)
    assert leaked(before) == set()


def test_half_sent_bodies_time_out(tmp_path: Path) -> None:
    """Issue 11 defect 7: 900 half-sent bodies were held for 75 s."""
    import socket

    with run_server(tmp_path, "--backend", "fake", env={"AXS_BODY_TIMEOUT_SECS": "1"}) as server:
        port = int(server.url.rsplit(":", 1)[1])
        socks = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {server.api_key}\r\nContent-Length: 500\r\n\r\n".encode() + b'{"mess'
            )
            socks.append(sock)
        started = time.monotonic()
        replies = []
        for sock in socks:
            sock.settimeout(5)
            replies.append(sock.recv(4096))
            sock.close()
        assert time.monotonic() - started < 3
        assert all(r.startswith(b"HTTP/1.1 408") and b"body_timeout" in r for r in replies), replies[:2]
        assert server.status()["inflight"] == 0


def test_slow_headers_and_idle_connections_are_closed(tmp_path: Path) -> None:
    import socket

    with run_server(tmp_path, "--backend", "fake", env={"AXS_HEADER_TIMEOUT_SECS": "1"}) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow, \
                socket.create_connection(("127.0.0.1", port)) as idle:  # fmt: skip
            slow.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
            idle.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            idle.settimeout(5)
            assert idle.recv(4096).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            for sock in (slow, idle):
                sock.settimeout(5)
                while sock.recv(4096):  # the server closes it: recv returns b""
                    pass
            assert time.monotonic() - started < 4
