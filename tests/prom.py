"""Prometheus text, parsed for tests that compare scrapes."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Series:
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def delta(before: Series, after: Series, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def served(before: Series, after: Series, model: str) -> float:
    """Responses counted for ``model`` between two scrapes."""
    return sum(v - before.get(k, 0.0) for k, v in after.items()
               if k[0] == "axs_requests_total" and ("model", model) in k[1])


def settled(scrape: Callable[[], Series], before: Series, count: int, model: str = "default",
            timeout: float = 10.0) -> Series:
    """A scrape once ``count`` more responses for ``model`` have been counted: a streamed
    response is counted when its handler returns, a moment after the client has read [DONE]."""
    end = time.monotonic() + timeout
    while True:
        after = scrape()
        if served(before, after, model) >= count or time.monotonic() > end:
            return after
        time.sleep(0.02)
