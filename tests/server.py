"""Start the real ``axserving run`` (real Granian, real engine processes) for a test, and stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from ipc.ring import pid_alive

AXSERVING = [sys.executable, "-m", "axserving.cli"]
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shm_names() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("axs.")}
    except FileNotFoundError:
        return set()


def leaked(before: set[str], owners: set[int] = frozenset()) -> set[str]:  # type: ignore[assignment]
    """Ring names created since ``before`` that are ours to answer for: owned by this process,
    by one of ``owners``, or by a process that is gone. (Names of other live processes on the
    machine, such as a benchmark running beside the tests, are not.)"""
    out = set()
    for name in shm_names() - before:
        try:
            pid = int(name.split(".")[1])
        except (IndexError, ValueError):
            out.add(name)
            continue
        if pid == os.getpid() or pid in owners or not pid_alive(pid):
            out.add(name)
    return out


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    api_key: str | None

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict:  # type: ignore[type-arg]
        return httpx.get(self.url + "/health", timeout=5).json()

    def group_pids(self) -> set[int]:
        return {int(m.split()[0]) for m in _group_members(self.proc.pid)}

    def status(self) -> dict:  # type: ignore[type-arg]
        """``/v1/admin/status`` (authenticated): each model's engine, with its pid and errors."""
        return httpx.get(self.v1 + "/admin/status", headers=self.headers(), timeout=5).json()

    def engine(self, model: str | None = None) -> dict:  # type: ignore[type-arg]
        models = self.status()["models"]
        found = models[0] if model is None else next(m for m in models if m["id"] == model)
        return found["engine"]  # type: ignore[no-any-return]

    def engine_pid(self, model: str | None = None) -> int | None:
        return self.engine(model)["pid"]  # type: ignore[no-any-return]

    def wait_listening(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                httpx.get(self.url + "/livez", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError(f"server not listening after {timeout}s:\n{self.log()}")

    def wait_ready(self, timeout: float, previous_pid: int | None = None) -> int:
        """Wait until the engine is ready (and, if given, is not ``previous_pid``); its pid."""
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                last = self.engine()
                if last["state"] == "ready" and last["pid"] not in (None, previous_pid):
                    return int(last["pid"])
            except (httpx.HTTPError, KeyError, IndexError, ValueError, StopIteration):
                pass
            time.sleep(0.05)
        raise AssertionError(f"engine not ready after {timeout}s (last health {last}):\n{self.log()}")


@contextmanager
def run_server(
    tmp_path: Path,
    *args: str,
    api_key: str | None = "test-key",
    env: dict[str, str] | None = None,
    ready_timeout: float = 60,
    wait_ready: bool = True,
    cwd: Path = REPO,
) -> Iterator[Server]:
    """``cwd`` is the checkout to serve (``python -m axserving.cli`` imports from it): another
    revision's worktree for a side-by-side measurement."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AXS_")}
    full_env.update({"AXS_ALLOW_NO_AUTH": "false", "PYTHONUNBUFFERED": "1"})
    if api_key:
        full_env["AXS_API_KEY"] = api_key
    else:
        full_env["AXS_ALLOW_NO_AUTH"] = "true"
    if "AXS_TEST_MODEL_CACHE" in os.environ:
        full_env["AXS_MODEL_CACHE"] = os.environ["AXS_TEST_MODEL_CACHE"]
    full_env.update(env or {})
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*AXSERVING, "run", "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, api_key)
    try:
        if wait_ready:
            server.wait_ready(ready_timeout)
        else:
            server.wait_listening(ready_timeout)
        yield server
    finally:
        stop(server)


def stop(server: Server, timeout: float = 20) -> int:
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            raise AssertionError(f"server did not stop on SIGTERM within {timeout}s:\n{server.log()}") from None
    # Nothing the server started may outlive it (allow a moment for the last exits).
    deadline = time.monotonic() + 5
    while (left := _group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"processes of the server's group outlived it: {left}\n{server.log()}")
    return proc.returncode


def _group_members(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True).stdout
    members = []
    for line in out.splitlines():
        pid, group, stat, args = line.split(None, 3)
        if int(group) == pgid and not stat.startswith("Z"):
            members.append(f"{pid} {stat} {args[:100]}")
    return members


def run_smollm(tmp: Path, model: Path, backend: str = "llama_cpp") -> contextlib.AbstractContextManager[Server]:
    """The slow tier's usual server: the packaged SmolLM2, 2 threads, a 2048-token context, on
    ``backend`` (``mlx``: ``model`` is the converted directory)."""
    return run_server(
        tmp, "--model", str(model), "--backend", backend, "--threads", "2", "--ctx-size", "2048", ready_timeout=180,
    )


#: The real backends the slow tier's server tests run on (a module's ``server`` fixture takes
#: them as its params: every test of the module runs on each).
BACKENDS = ["llama_cpp", "mlx"]


def smollm_on(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(backend, model) for a fixture parametrized over :data:`BACKENDS`: the packaged GGUF for
    llama.cpp, its MLX conversion (the session's ``mlx_model``) for MLX."""
    backend = str(request.param)
    return backend, request.getfixturevalue("mlx_model" if backend == "mlx" else "default_model")


def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)
