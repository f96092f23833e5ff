"""liblxc's monitor FIFO, read continuously: the driver's persistent event connection.

Every container's monitor process writes its state changes (``struct lxc_msg``: a type,
the container's name, a value) to ``<rundir>/lxc/<lxcpath>/monitor-fifo`` when someone
reads it. ``lxc-monitord`` is that reader for ``lxc-monitor``; this driver reads it
itself, so no helper process is started (lxc-monitord would be reparented to PID 1) and
the exit message carries init's raw wait status (``lxc-monitor`` prints only
``WEXITSTATUS``, 0 for a killed init).

The reader opens the FIFO read-write (it never sees EOF), takes the write lock that
lxc-monitord takes (so a second reader cannot steal messages), and checks every
``monitor_check`` seconds that the path still names its FIFO. When the FIFO is gone
or replaced it is created and opened again with capped, jittered backoff; every
(re)connect calls ``on_connected``, which reconciles with ``lxc-ls`` what happened
while nobody listened.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from virtbus.aio import backoff_delays
from virtbus.errors import VirtbusError
from virtbus.settings import Backoff

log = logging.getLogger(__name__)


class LxcState(StrEnum):
    """lxc_state_t, in its order (the value of a state message is the index)."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    ABORTING = "ABORTING"
    FREEZING = "FREEZING"
    FROZEN = "FROZEN"
    THAWED = "THAWED"


LXC_STATES = tuple(LxcState)
MESSAGE = struct.Struct("=i256si")  # struct lxc_msg: int type; char name[NAME_MAX+1]; int value
MSG_STATE, MSG_PRIORITY, MSG_EXIT_CODE = 0, 1, 2
_READ_SIZE = MESSAGE.size * 64


@dataclass(frozen=True, slots=True)
class MonitorMessage:
    """A state change, or (``exit_status``) init's raw wait status just before it stops."""

    name: str
    state: LxcState | None = None
    exit_status: int | None = None


def decode(buffer: bytearray) -> list[MonitorMessage]:
    """The whole messages at the start of ``buffer`` (consumed); unknown types are skipped."""
    out: list[MonitorMessage] = []
    usable = len(buffer) - len(buffer) % MESSAGE.size
    for offset in range(0, usable, MESSAGE.size):
        kind, raw_name, value = MESSAGE.unpack_from(buffer, offset)
        name = raw_name.split(b"\0", 1)[0].decode(errors="replace")
        if kind == MSG_STATE and 0 <= value < len(LXC_STATES):
            out.append(MonitorMessage(name, state=LXC_STATES[value]))
        elif kind == MSG_EXIT_CODE:
            out.append(MonitorMessage(name, exit_status=value))
    del buffer[:usable]
    return out


def encode(message: MonitorMessage) -> bytes:
    """The bytes liblxc writes for ``message`` (tests feed the FIFO with these)."""
    if message.state is not None:
        kind, value = MSG_STATE, LXC_STATES.index(message.state)
    else:
        kind, value = MSG_EXIT_CODE, message.exit_status or 0
    return MESSAGE.pack(kind, message.name.encode(), value)


class MonitorFifo:
    """Follows the monitor FIFO for ever (see module docstring); run it as a task."""

    def __init__(
        self,
        path: Path,
        on_message: Callable[[MonitorMessage], None],
        on_connected: Callable[[], Awaitable[None]],
        *,
        check_interval: float,
        reopen: Backoff,
    ) -> None:
        self.path = path
        self._on_message = on_message
        self._on_connected = on_connected
        self._check = check_interval
        self._reopen = reopen
        self._buffer = bytearray()
        self._lost = asyncio.Event()
        self.connected = False
        self.connects = 0  # how many times it (re)connected

    async def run(self) -> None:
        delays = backoff_delays(self._reopen)
        while True:
            try:
                fd = await asyncio.to_thread(self._open)
            except OSError as exc:
                delay = next(delays)
                log.warning("lxc monitor FIFO %s: %s; retrying in %.2f s", self.path, exc, delay)
                await asyncio.sleep(delay)
                continue
            delays = backoff_delays(self._reopen)
            try:
                await self._follow(fd)
            except asyncio.CancelledError:
                await asyncio.to_thread(self._unlink, fd)  # stopping: writers see ENOENT
                raise
            finally:
                self.connected = False
                asyncio.get_running_loop().remove_reader(fd)
                os.close(fd)
            log.warning("lxc monitor FIFO %s was removed or replaced: opening it again", self.path)

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileExistsError):
            os.mkfifo(self.path, 0o600)
        fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise OSError(f"{self.path} is not a FIFO")
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # lxc-monitord's lock
        except OSError:
            os.close(fd)
            raise
        return fd

    async def _follow(self, fd: int) -> None:
        self._lost.clear()
        self._buffer.clear()
        asyncio.get_running_loop().add_reader(fd, self._readable, fd)
        self.connected = True
        self.connects += 1
        try:
            await self._on_connected()
        except VirtbusError as exc:  # the next tick reconciles again
            log.warning("lxc: reconcile after connecting the monitor failed: %s", exc)
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check):
                    await self._lost.wait()
            if not await asyncio.to_thread(self._still_ours, fd):
                return

    def _unlink(self, fd: int) -> None:
        if self._still_ours(fd):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
                self.path.parent.rmdir()  # made for this FIFO; kept if lxc put more there

    def _still_ours(self, fd: int) -> bool:
        try:
            here, ours = os.stat(self.path), os.fstat(fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)

    def _readable(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("lxc monitor FIFO read failed: %s", exc)
            self._lost.set()
            return
        self._buffer += data
        for message in decode(self._buffer):
            try:
                self._on_message(message)
            except Exception:  # a bug in one message's handling must not stop the reader
                log.exception("lxc: handling monitor message %r failed", message)
