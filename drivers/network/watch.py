"""Waiting on the kernel instead of polling: a process's exit through a pidfd (also for a
process that is not our child, such as a daemonized dnsmasq found after a restart), and
a file's changes through inotify (dnsmasq's lease file)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable
from pathlib import Path

_IN_MODIFY = 0x2
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


async def wait_exit(pid: int, timeout: float | None) -> bool:
    """True once ``pid`` has exited (a zombie counts as exited), False after ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, ready)
    try:
        async with asyncio.timeout(timeout):
            await done
        _reap(pid)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _reap(pid: int) -> None:
    """Reap ``pid`` if it is our child (dnsmasq's first process is; the daemon is not)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


class FileWatch:
    """Calls ``changed()`` in the loop whenever ``path`` is written or replaced."""

    def __init__(self, path: Path, changed: Callable[[], None]) -> None:
        self.path = path
        self._changed = changed
        self._fd = -1

    def start(self) -> None:
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
        if _libc.inotify_add_watch(fd, os.fsencode(self.path.parent), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {self.path.parent}")
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._ready)

    def _ready(self) -> None:
        name = os.fsencode(self.path.name)
        hit = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset + 16 <= len(data):
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                raw = data[offset + 16 : offset + 16 + length].rstrip(b"\0")
                hit = hit or raw == name
                offset += 16 + length
        if hit:
            self._changed()

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


class ExitWatch:
    """Calls ``exited()`` in the loop once ``pid`` exits (a pidfd; no polling)."""

    def __init__(self, pid: int, exited: Callable[[], None]) -> None:
        self.pid = pid
        self._exited = exited
        self._fd = -1

    def start(self) -> None:
        try:
            self._fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            asyncio.get_running_loop().call_soon(self._exited)
            return
        asyncio.get_running_loop().add_reader(self._fd, self._ready)

    def _ready(self) -> None:
        self.close()
        _reap(self.pid)
        self._exited()

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
