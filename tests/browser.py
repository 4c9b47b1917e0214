"""A real headless Chromium for the tests: Debian's ``chromium`` package, installed here when it is
missing (apt, as root or through sudo), driven by Playwright's protocol client, so no browser is
downloaded from a hub."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def _find() -> str | None:
    override = os.environ.get("AXS_TEST_CHROMIUM")
    if override:
        return override
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium() -> str:
    """The browser's path, installing Debian's package first if there is none."""
    found = _find()
    if found:
        return found
    if not shutil.which("apt-get"):
        raise RuntimeError("no Chromium here and no apt-get to install it; set AXS_TEST_CHROMIUM to a browser")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run([*sudo, *step], env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(step)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    found = _find()
    if not found:
        raise RuntimeError("apt-get installed chromium but no browser binary was found on PATH")
    return found
