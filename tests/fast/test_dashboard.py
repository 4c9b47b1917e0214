"""The dashboard in a real headless Chromium (issue 14): it loads with no console errors, shows
the loaded models, and its charts move after requests; the run saves a screenshot to
``tests/artifacts/dashboard.png``. A real server (Granian, an engine process on the fake backend)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import ConsoleMessage, sync_playwright

from tests.browser import ARTIFACTS, chromium
from tests.server import run_server


def _load(server_v1: str, headers: dict[str, str], stop: threading.Event) -> None:
    body = {"model": "default", "stream": True, "max_tokens": 64,
            "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(60))}]}
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            with client.stream("POST", f"{server_v1}/chat/completions", json=body, headers=headers) as r:
                for _ in r.iter_lines():
                    pass


def test_dashboard_in_headless_chromium(tmp_path: Path) -> None:
    browser_path = chromium()
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=20") as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            response = page.goto(server.url + "/dashboard")
            assert response is not None and response.status == 200
            assert "script-src 'sha256-" in response.headers["content-security-policy"]
            page.wait_for_selector('tr[data-model="default"]', timeout=10_000)
            row = page.inner_text('tr[data-model="default"]')
            assert "default" in row and "ready" in row and "fake" in row
            assert page.inner_text("#conn") == "live"

            assert float(page.get_attribute("#chart-throughput", "data-max") or 0) == 0
            stop = threading.Event()
            loaders = [threading.Thread(target=_load, args=(server.v1, server.headers(), stop)) for _ in range(2)]
            for t in loaders:
                t.start()
            try:
                end = time.monotonic() + 20
                while time.monotonic() < end:
                    if float(page.get_attribute("#chart-throughput", "data-max") or 0) > 0 and \
                            float(page.get_attribute("#chart-ttft", "data-max") or 0) > 0:
                        break
                    page.wait_for_timeout(250)
            finally:
                stop.set()
                for t in loaders:
                    t.join(30)
            assert float(page.get_attribute("#chart-throughput", "data-max") or 0) > 0
            assert float(page.get_attribute("#chart-ttft", "data-max") or 0) > 0
            assert int(page.get_attribute("#chart-throughput", "data-points") or 0) >= 1
            assert page.inner_text("#t-req") not in ("–", "0")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert not problems, problems
        finally:
            browser.close()
