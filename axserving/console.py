"""``axserving status`` and ``axserving top``: a server's figures in the terminal, read from its
``GET /v1/metrics`` (open, so no key is needed); ``top`` redraws them in place, htop-style."""

from __future__ import annotations

import time
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

BARS = "▁▂▃▄▅▆▇█"
STATE_STYLE = {"ready": "green", "loading": "yellow", "restarting": "yellow", "unloading": "yellow",
               "failed": "red", "unresponsive": "red"}


class Unreachable(Exception):
    pass


def fetch(url: str, timeout: float = 5.0) -> dict[str, Any]:
    try:
        r = httpx.get(url.rstrip("/") + "/v1/metrics", timeout=timeout)
    except httpx.HTTPError as e:
        raise Unreachable(f"cannot reach {url}: {e}") from e
    if r.status_code != 200:
        raise Unreachable(f"{url}/v1/metrics answered {r.status_code}: {r.text[:200]}")
    return r.json()  # type: ignore[no-any-return]


def _ms(us: float) -> str:
    return "–" if not us else f"{us / 1000:.1f}" if us < 10_000 else f"{us / 1000:.0f}"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return "–" if not n else f"{size:.0f} {unit}" if unit in ("B", "KiB") else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def sparkline(values: list[float], width: int = 40) -> str:
    values = values[-width:]
    top = max(values, default=0)
    if top <= 0:
        return BARS[0] * len(values)
    return "".join(BARS[min(len(BARS) - 1, int(v / top * (len(BARS) - 1)))] for v in values)


def render(url: str, m: dict[str, Any]) -> Group:
    s, lat = m["scheduler"], m["latency"]
    timeline = m.get("timeline", [])
    tps = [p["generation_tps"] for p in timeline]
    head = Text.assemble(
        ("axserving ", "bold"), (f"v{m['version']} ", "dim"), (url, "cyan"),
        f"  up {m['uptime_secs'] // 60} min · {len(m['models'])} model(s) · in flight {s['inflight_count']} · "
        f"queued {s['queue_depth']} · limit {s['limit']} · rejected {s['rejected_requests']} · "
        f"memory {_bytes(m['rss_bytes'] + m['engines_rss_bytes'])}",
    )
    tput = Text.assemble(
        ("tokens/s ", "bold"), (f"{tps[-1] if tps else 0:8.1f}  ", "cyan"), (sparkline(tps), "cyan"),
        (f"  ({len(timeline) * m.get('tick_secs', 2):.0f}s)", "dim"),
    )
    models = Table(title="models", title_justify="left", expand=True, header_style="bold")
    for col in ("model", "state", "backend", "run", "wait", "batch", "KV", "TTFT p50/p95 ms", "TPOT p50 ms",
                "req (5m)", "restarts", "RSS"):
        models.add_column(col, justify="left" if col in ("model", "state", "backend") else "right")
    for x in m["models"]:
        ml = x["latency"]
        models.add_row(
            x["id"], Text(x["state"], style=STATE_STYLE.get(x["state"], "")), x["backend"], str(x["running"]),
            str(x["waiting"]), f"{x['running']}/{x['max_batch']}", f"{100 * x['kv_cache_usage']:.0f}%",
            f"{_ms(ml['ttft_us']['p50'])} / {_ms(ml['ttft_us']['p95'])}", _ms(ml["tpot_us"]["p50"]),
            str(ml["requests"]), Text(str(x["restarts"]), style="red" if x["restarts"] else ""), _bytes(x["rss_bytes"]),
        )
    latency = Table(title=f"latency, last {lat['window_secs'] / 60:.0f} min (ms)", title_justify="left",
                    header_style="bold")
    for col in ("", "count", "p50", "p95", "p99"):
        latency.add_column(col, justify="left" if not col else "right")
    for key, name in (("ttft_us", "TTFT"), ("tpot_us", "TPOT"), ("itl_us", "ITL"), ("e2e_us", "e2e"),
                      ("queue_wait_us", "queue")):
        q = lat[key]
        latency.add_row(name, str(q["count"]), _ms(q["p50"]), _ms(q["p95"]), _ms(q["p99"]))
    parts: list[Any] = [head, tput, models, latency]
    if m.get("events"):
        events = Table(title="recent events", title_justify="left", header_style="bold")
        for col in ("time", "action", "target", "outcome"):
            events.add_column(col)
        for e in m["events"][-5:]:
            events.add_row(time.strftime("%H:%M:%S", time.localtime(e["ts"])), e["action"], e["target"],
                           Text(e["outcome"], style="" if e["outcome"] == "ok" else "red"))
        parts.append(events)
    return Group(*parts)


def status(url: str, console: Console | None = None) -> None:
    (console or Console()).print(render(url, fetch(url)))


def top(url: str, interval: float = 1.0, count: int = 0, console: Console | None = None) -> None:
    """Redraw every ``interval`` seconds until interrupted (or ``count`` times). A server that
    stops answering is shown as such, and picked up again when it comes back."""
    console = console or Console()
    shown = 0
    with Live(Text("connecting…"), console=console, screen=count == 0, auto_refresh=False) as live:
        while True:
            try:
                live.update(render(url, fetch(url, timeout=interval * 2 + 1)), refresh=True)
            except Unreachable as e:
                live.update(Text(f"{e} (retrying)", style="red"), refresh=True)
            shown += 1
            if count and shown >= count:
                return
            time.sleep(interval)
