"""One persistent QMP connection per running domain, with bounded commands and events.

qemu.qmp's default ``events`` listener keeps every event (and its history) forever when
nobody drains it, so :class:`_Client` routes events straight from qemu.qmp's reader task
into the domain's :class:`EventQueue` instead: bounded, and in the order QEMU sent them.
Loss of the connection is noticed by a named watcher task and put in the same queue
*after* every event read before it, so the driver never sees EOF before the ``SHUTDOWN``
that explains it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate
from qemu.qmp.message import Message

from drivers.qemu.settings import QemuSettings
from virtbus.aio import log_task_failure
from virtbus.errors import OperationFailed, OperationInvalid, OperationTimeout

log = logging.getLogger(__name__)

# Phrases of QMP GenericErrors that mean "wrong state for this command" (libvirt's
# OPERATION_INVALID) rather than a failure.
_WRONG_STATE = ("is required", "not running", "already", "not allowed", "in progress",
                "is not active", "has not been activated")  # fmt: skip


@dataclass(frozen=True, slots=True)
class QmpEvent:
    name: str
    data: dict[str, Any]
    timestamp: float


@dataclass(frozen=True, slots=True)
class MonitorLost:
    """The connection of ``monitor`` went away (only the current monitor's loss counts)."""

    monitor: Monitor


@dataclass(frozen=True, slots=True)
class Kick:
    """Wake the domain's event loop (e.g. destroy() saw the process go while disconnected)."""


QueueItem = QmpEvent | MonitorLost | Kick


@dataclass(slots=True)
class EventQueue:
    """Bounded per-domain queue: QMP events beyond ``limit`` are dropped (and counted)."""

    limit: int
    dropped: int = 0
    _queue: asyncio.Queue[QueueItem] = field(default_factory=asyncio.Queue)

    def put_event(self, event: QmpEvent) -> None:
        if self._queue.qsize() >= self.limit:
            self.dropped += 1
            log.warning("QMP event queue full: dropped %s", event.name)
            return
        self._queue.put_nowait(event)

    def put_control(self, item: MonitorLost | Kick) -> None:
        self._queue.put_nowait(item)  # control items are never dropped (at most a few)

    async def get(self) -> QueueItem:
        return await self._queue.get()

    async def get_within(self, timeout: float) -> QueueItem | None:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None


class _Client(QMPClient):
    """A QMPClient whose events go to one callback, never to the unbounded default listener."""

    def __init__(self, name: str, on_event: Callable[[Message], None]) -> None:
        super().__init__(name)
        self._on_event = on_event

    async def _event_dispatch(self, msg: Message) -> None:
        self._on_event(msg)

    # qemu.qmp formats every message as indented JSON for a debug line even when debug
    # logging is off: about 30% of the agent's CPU in a stats pass. Format only when on.
    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", msg)
        return msg


def _to_event(msg: Message) -> QmpEvent:
    stamp = msg.get("timestamp")
    if not isinstance(stamp, dict):
        stamp = {}
    ts = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    data = msg.get("data") or {}
    return QmpEvent(str(msg["event"]), dict(data) if isinstance(data, dict) else {}, ts)


class Monitor:
    """The QMP connection of one domain (see module docstring)."""

    def __init__(self, name: str, socket: Path, settings: QemuSettings, queue: EventQueue):
        self.name = name
        self.socket = socket
        self._settings = settings
        self._queue = queue
        self._client = _Client(f"qmp-{name}", lambda msg: queue.put_event(_to_event(msg)))
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    async def connect(self, timeout: float, alive: Callable[[], bool], poll: float) -> None:
        """Connect, retrying while the socket is not there yet (bounded by ``timeout``).

        ``alive`` says whether the QEMU is still there: a dead QEMU fails at once.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OperationTimeout(f"QMP socket {self.socket} did not answer in {timeout}s")
            if not self.socket.exists():  # connect() would log an ERROR per attempt
                if not alive():
                    raise OperationFailed("QEMU exited before creating its monitor socket")
                await asyncio.sleep(poll)
                continue
            try:
                await asyncio.wait_for(self._client.connect(str(self.socket)), remaining)
                break
            except (QMPError, OSError, TimeoutError) as exc:  # ConnectError, StateError, ...
                await self._disconnect()  # a cut-short attempt leaves the client mid-connect
                if not alive():
                    raise OperationFailed(
                        f"QEMU exited before its monitor answered ({exc})"
                    ) from exc
                await asyncio.sleep(poll)
        self._watcher = asyncio.create_task(self._watch(), name=f"qmp-watch-{self.name}")
        self._watcher.add_done_callback(log_task_failure)

    async def _watch(self) -> None:
        """Wait for the session to end, then report it through the event queue."""
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        if not self._closing:
            self._queue.put_control(MonitorLost(self))
        await self._disconnect()

    async def _disconnect(self) -> None:
        try:
            await self._client.disconnect()
        except (QMPError, EOFError, OSError) as exc:  # expected after quit / a dead QEMU
            log.debug("qmp %s disconnect: %r", self.name, exc)

    async def execute(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """One QMP command, bounded by ``timeout`` (default ``qmp_timeout``).

        Errors become virtbus errors: no reply -> OperationTimeout, a QMP error ->
        OperationInvalid (wrong state) or OperationFailed, a lost connection ->
        OperationFailed.
        """
        if not self.connected:
            raise OperationFailed(f"monitor of '{self.name}' is not connected")
        limit = self._settings.qmp_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):  # no extra task per command, unlike wait_for
                return await self._client.execute(cmd, args)
        except TimeoutError:
            raise OperationTimeout(f"QMP {cmd} on '{self.name}' got no reply in {limit}s") from None
        except ExecuteError as exc:
            text = str(exc)  # the QMP error's desc
            if any(phrase in text for phrase in _WRONG_STATE):
                raise OperationInvalid(f"{cmd} on '{self.name}': {text}") from None
            raise OperationFailed(f"{cmd} on '{self.name}': {text}") from None
        except (ExecInterruptedError, QMPError, EOFError, OSError) as exc:
            raise OperationFailed(f"{cmd} on '{self.name}': monitor lost ({exc!r})") from None

    async def pass_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file descriptor under ``name`` (SCM_RIGHTS, then ``getfd``):
        QEMU runs sandboxed (no exec, maybe another uid), so the agent opens its files."""
        if not self.connected:
            raise OperationFailed(f"monitor of '{self.name}' is not connected")
        try:
            try:
                self._client.send_fd_scm(fd)
            except AttributeError:  # uvloop: its transport's socket has no asyncio _sock
                writer = self._client._writer
                if writer is None:
                    raise QMPError("not connected") from None
                send_fd(writer.transport, fd)
        except (QMPError, OSError) as exc:
            raise OperationFailed(f"cannot pass a file to '{self.name}': {exc}") from None
        await self.execute("getfd", {"fdname": name})

    async def close(self) -> None:
        """Disconnect without reporting a loss (QEMU keeps running)."""
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait([self._watcher])
        await self._disconnect()


def send_fd(transport: asyncio.BaseTransport, fd: int) -> None:
    """``fd`` to the peer of a UNIX stream transport (SCM_RIGHTS with one byte, as qemu.qmp's
    send_fd_scm), on any event loop: through a duplicate of the transport's descriptor,
    since uvloop's transport socket cannot send (asyncio's is reached through ``_sock``)."""
    conn = transport.get_extra_info("socket")
    if conn is None or conn.family != socket.AF_UNIX:
        raise QMPError("Sending file descriptors requires a UNIX socket.")
    with socket.socket(fileno=os.dup(conn.fileno())) as dup:
        dup.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("@i", fd))])
