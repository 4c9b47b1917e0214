"""Logging set-up from settings (see :mod:`engine_proc.logs`, shared with the engines): each
front record carries the id of the request being served (asgi-correlation-id's context)."""

from __future__ import annotations

from asgi_correlation_id import correlation_id

from axserving.config import LogSettings
from engine_proc.logs import configure


def setup_logging(settings: LogSettings) -> None:
    configure(settings.level.value, settings.format.value, "front", correlation_id.get)
