"""``axserving bench regression-check``: a bench result held against a saved baseline, for CI.

Both are the JSON that ``bench serve --json`` writes. For the server under test (the first
target) at every level and group the baseline has, each metric is compared: output throughput
may not fall, and TTFT p50/p95, ITL p99 and E2E p50 may not rise, by more than the tolerance;
a level that failed requests the baseline did not is a regression whatever its speed, and so is
a level the current run lacks. The verdict is a table and an exit status (1: regressed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

# (name, how to read it from a level, higher is better)
METRICS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("out tok/s", ("output_throughput",), True),
    ("TTFT p50", ("ttft", "p50"), False),
    ("TTFT p95", ("ttft", "p95"), False),
    ("ITL p99", ("itl", "p99"), False),
    ("E2E p50", ("e2e", "p50"), False),
)


@dataclass(frozen=True)
class Check:
    level: str
    metric: str
    baseline: float | None
    current: float | None
    change: float | None  # current / baseline - 1
    regressed: bool


def _get(level: Mapping[str, Any], path: Sequence[str]) -> float | None:
    value: Any = level
    for key in path:
        if not isinstance(value, Mapping) or value.get(key) is None:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def _levels(result: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The first target's levels, by label ("8", "8 long")."""
    targets = result.get("config", {}).get("targets") or []
    name = targets[0]["name"] if targets else None
    out = {}
    for level in result.get("levels", []):
        if name is None or level.get("target") == name:
            group = level.get("group") or ""
            out[f"{level['concurrency']} {group}".strip()] = level
    return out


def _failed(level: Mapping[str, Any]) -> int:
    return int(level.get("errors", 0)) + int(level.get("empty", 0)) + int(level.get("truncated", 0))


def compare(baseline: Mapping[str, Any], current: Mapping[str, Any], tolerance: float) -> list[Check]:
    """Every check of ``current`` against ``baseline`` (see the module's doc)."""
    base, cur = _levels(baseline), _levels(current)
    checks = []
    for label, b in base.items():
        c = cur.get(label)
        if c is None:
            checks.append(Check(label, "level present", 1.0, None, None, True))
            continue
        checks.append(Check(label, "failed requests", _failed(b), _failed(c), None, _failed(c) > _failed(b)))
        for name, path, higher_better in METRICS:
            bv, cv = _get(b, path), _get(c, path)
            if bv is None or cv is None or bv == 0:
                checks.append(Check(label, name, bv, cv, None, bv is not None and cv is None))
                continue
            change = cv / bv - 1
            worse = -change if higher_better else change
            checks.append(Check(label, name, bv, cv, change, worse > tolerance))
    return checks


def render(checks: Sequence[Check], tolerance: float) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    rows = [["level", "metric", "baseline", "current", "change", "verdict"]]
    for c in checks:
        change = "-" if c.change is None else f"{c.change * 100:+.1f}%"
        rows.append([c.level, c.metric, f(c.baseline), f(c.current), change, "REGRESSED" if c.regressed else "ok"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    bad = sum(c.regressed for c in checks)
    verdict = f"{bad} regression(s) beyond {tolerance * 100:.0f}%" if bad else f"no regression beyond {tolerance * 100:.0f}%"
    return "\n".join([*lines, "", verdict])


def check_files(baseline_path: str, current: Mapping[str, Any], tolerance: float) -> tuple[str, bool]:
    """The report and whether anything regressed, ``current`` against the baseline file."""
    with open(baseline_path, "rb") as f:
        baseline = orjson.loads(f.read())
    checks = compare(baseline, current, tolerance)
    return render(checks, tolerance), any(c.regressed for c in checks)
