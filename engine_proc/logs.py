"""Log set-up shared by the front and the engines: plain text, or one JSON object per line
(python-json-logger), each record carrying the request id it concerns (``-`` when none)."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


class RequestIdDefault(logging.Filter):
    """Every record has ``request_id``: the one a log call passed (``extra``), else the
    front's current request's (``current``), else ``-``."""

    def __init__(self, current: object = None) -> None:
        super().__init__()
        self._current = current  # a callable returning the current request id, or None

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            current = self._current() if callable(self._current) else None
            record.request_id = current or "-"
        return True


def configure(level: str, fmt: str, component: str, current_request: object = None) -> None:
    """Root logging to stderr: ``fmt`` is ``text`` or ``json``; ``component`` names the process
    (``front``, ``engine:MODEL``)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(process)d %(request_id)s %(message)s",
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger", "process": "pid",
                           "message": "msg"},
            static_fields={"component": component},
            datefmt="%Y-%m-%dT%H:%M:%S",
        ))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s {component}[%(process)d] %(name)s req=%(request_id)s %(message)s"))
    handler.addFilter(RequestIdDefault(current_request))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
