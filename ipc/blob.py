"""Blob segments: a record too large for the ring (over a quarter of it) travels in a
shared-memory segment of its own; the ring carries only a :class:`~ipc.records.Blob` reference.

The writer creates the segment (``O_CREX``, owner pid in the name, pages reserved), fills it and
keeps the name until the reader is done; the reader maps it and decodes straight from the
mapping (no copy into the process heap before decoding). Who unlinks: the writer, once it knows
the reader has read it, or when the connection closes; the start-up sweep catches the rest.
"""

from __future__ import annotations

import mmap
import os
import secrets
from collections.abc import Callable
from typing import TypeVar

import posix_ipc

from ipc.ring import NAME_PREFIX, RingError

T = TypeVar("T")


def write_blob(payload: bytes) -> tuple[str, int]:
    """A new segment holding ``payload``; returns its name and nonce."""
    name = f"/{NAME_PREFIX}{os.getpid()}.{secrets.token_hex(6)}.blob"
    nonce = secrets.randbits(63)
    size = len(payload) + 8
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(shm.fd, 0, size)
        with mmap.mmap(shm.fd, size) as mm:
            mm[:8] = nonce.to_bytes(8, "little")
            mm[8:] = payload
    except BaseException:
        unlink_blob(name)
        raise
    finally:
        shm.close_fd()
    return name, nonce


def read_blob(name: str, nonce: int, size: int, decode: Callable[[memoryview], T]) -> T:
    """Decode the blob's payload in place. Raises :class:`RingError` if it is missing or stale."""
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError as e:
        raise RingError(f"blob {name} does not exist") from e
    try:
        if shm.size != size + 8:
            raise RingError(f"blob {name}: size {shm.size} does not match {size + 8}")
        mm = mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ)
    finally:
        shm.close_fd()
    try:
        view = memoryview(mm)
        try:
            if int.from_bytes(view[:8], "little") != nonce:
                raise RingError(f"blob {name}: stale (nonce mismatch)")
            payload = view[8:]
            try:
                return decode(payload)
            finally:
                payload.release()
        finally:
            view.release()
    finally:
        mm.close()


def blob_exists(name: str) -> bool:
    try:
        posix_ipc.SharedMemory(name).close_fd()
    except posix_ipc.ExistentialError:
        return False
    return True


def unlink_blob(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass
