from collections.abc import Callable
from typing import Any

LAYOUT: tuple[int, int, int, int, int]
STATUS_COUNTERS: int
STATUS_FRAME: int
STATUS_SEQUENCE: int

def pop_all(
    ring: Any, buf: memoryview, data: memoryview, decode: Callable[[memoryview], Any], out: list[Any], limit: int, /
) -> int: ...
