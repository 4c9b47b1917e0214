"""``GET /dashboard``: one self-contained page (no CDN, works offline) that polls ``/v1/metrics``.

Its inline script and style are allowed by hash in a Content-Security-Policy, so nothing else can
run on the page.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

PAGE = Path(__file__).resolve().parent.parent / "static" / "dashboard.html"


def _hash(body: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


@functools.cache
def _page() -> tuple[bytes, str]:
    html = PAGE.read_text()
    scripts = " ".join(_hash(m) for m in re.findall(r"<script>(.*?)</script>", html, re.S))
    styles = " ".join(_hash(m) for m in re.findall(r"<style>(.*?)</style>", html, re.S))
    csp = (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html.encode(), csp


async def page(request: Request) -> Response:
    body, csp = _page()
    return Response(body, media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"})
