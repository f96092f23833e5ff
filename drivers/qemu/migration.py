"""Live migration over QMP: the command sequences of both sides and a job that follows one.

The driver's ``migrate_*`` methods (libvirt's v3 steps) are thin glue around this module:

- destination (``prepare``): QEMU is started with ``-S -incoming defer``; then
  :func:`configure` (the same capabilities as the source, ``multifd-channels``) and
  :func:`start_incoming` (``migrate-incoming`` on a TCP port free on the listen address,
  retried on another port if it was taken meanwhile);
- source (``perform``): :func:`configure` (capabilities, ``max-bandwidth``,
  ``downtime-limit``, ``multifd-channels``) and ``migrate``; a :class:`Job` then follows
  QEMU's ``MIGRATION`` / ``MIGRATION_PASS`` events, reads ``query-migrate`` on each of them
  (and every ``progress_interval`` while active), publishes ``migration`` events with the
  progress, and for postcopy sends ``migrate-start-postcopy`` once the first pass is done.

Every capability and parameter is set explicitly on every attempt, because QEMU keeps them
for the life of the process: a retried migration must not inherit the last one's choices.

Over TLS (``params.tls``, libvirt's ``--tls``): before :func:`configure`, :func:`tls_setup`
adds a ``tls-creds-x509`` object (:data:`TLS_ID`) from the host's certificate directory,
``endpoint=server`` on the destination (``verify-peer`` per the host's setting: the
source must show a certificate of the same CA), ``endpoint=client`` on the source, which
always checks the destination's certificate and its name (``tls-hostname``);
``tls-creds`` (and on the source ``tls-hostname``) then name it. The copy-storage NBD
server and client use the same object. :func:`tls_teardown` resets both parameters and
deletes the object: on the destination once the migration finished, on the source when
it is rolled back (a source that migrated quits), and before each new setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from virtbus.domain import DomainDefinition
from virtbus.errors import InvalidArgument, MigrateFailed, OperationInvalid, VirtbusError
from virtbus.protocol.migration import CopyPhase, MigrationParams, MigrationState, MigrationStatus

if TYPE_CHECKING:
    from drivers.qemu.copy_storage import Mirrors

log = logging.getLogger(__name__)

Role = Literal["source", "destination"]
Execute = Callable[..., Awaitable[Any]]  # Monitor.execute-like: (cmd, args=None, timeout=None)
Emit = Callable[[MigrationStatus], None]

QMP_EVENTS = frozenset({"MIGRATION", "MIGRATION_PASS"})
TERMINAL = frozenset({"completed", "failed", "cancelled"})
POSTCOPY = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
TLS_ID = "virtbus-migrate-tls"  # the tls-creds-x509 object of a migration over TLS
ACTIVE = frozenset(
    {"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug", *POSTCOPY}
)


@dataclass(frozen=True, slots=True)
class MigrationSettings:
    """Seconds unless named otherwise."""

    progress_interval: float = 0.5  # progress events while active (plus one per change)
    incoming_attempts: int = 5  # ports tried for migrate-incoming
    finish_wait: float = 30.0  # finish(True): wait for the incoming stream to complete
    cancel_wait: float = 10.0  # migrate_cancel until QEMU reports the end
    postcopy_after_passes: int = 1  # switch to postcopy once this many passes are done
    default_downtime_ms: int = 300  # QEMU's own default, restored when none is asked
    unlimited_bandwidth: int = 1 << 53  # bytes/s: libvirt's "no limit" (QEMU's is 128 MiB/s)
    mirror_poll: float = 0.5  # copy-storage: query-jobs for progress (and on each job event)
    mirror_end_wait: float = 60.0  # copy-storage: cancelled ready mirrors until they ended


# --- pure pieces ------------------------------------------------------------------------
def capability_list(params: MigrationParams, role: Role) -> list[dict[str, Any]]:
    """``migrate-set-capabilities`` argument; every capability we touch, on or off."""
    caps = {
        "events": True,  # MIGRATION / MIGRATION_PASS events
        "postcopy-ram": params.postcopy,  # both sides
        "multifd": params.parallel > 0,  # both sides
    }
    if role == "source":
        caps["auto-converge"] = params.auto_converge
        caps["return-path"] = params.postcopy  # postcopy needs the destination's page requests
        # copy-storage: stop at pre-switchover, where the mirrors are completed (libvirt)
        caps["pause-before-switchover"] = params.copy_storage
    return [{"capability": name, "state": state} for name, state in caps.items()]


def parameter_map(
    params: MigrationParams, role: Role, settings: MigrationSettings, tls_hostname: str = ""
) -> dict[str, Any]:
    """``migrate-set-parameters`` argument for one side; ``tls_hostname``: the source's
    name the destination's certificate must carry (with ``params.tls``)."""
    out: dict[str, Any] = {}
    if params.parallel > 0:
        out["multifd-channels"] = params.parallel
    out["tls-creds"] = TLS_ID if params.tls else ""  # "": plain (QEMU's own default)
    if role == "source":
        mib = params.bandwidth_mib_s
        out["max-bandwidth"] = mib * 1024 * 1024 if mib else settings.unlimited_bandwidth
        out["downtime-limit"] = params.max_downtime_ms or settings.default_downtime_ms
        out["tls-hostname"] = tls_hostname if params.tls else ""
    return out


def tls_hostname(params: MigrationParams, uri: str, destination: str | None = None) -> str:
    """The name the destination's certificate must carry: ``tls_destination`` if asked,
    else the destination host's name, else the URI's host (libvirt's default)."""
    return params.tls_destination or destination or parse_tcp_uri(uri)[0]


def tls_object(role: Role, cert_dir: str, verify: bool) -> dict[str, Any]:
    """``object-add`` argument of the side's credentials: the source (client) always
    checks the destination's certificate; ``verify``: the destination checks the source's."""
    return {
        "qom-type": "tls-creds-x509", "id": TLS_ID, "dir": cert_dir,
        "endpoint": "server" if role == "destination" else "client",
        "verify-peer": verify if role == "destination" else True,
    }  # fmt: skip


#: the files of tls-creds-x509's directory each side loads (if present: the optional ones)
TLS_FILES = {"destination": ("ca-cert.pem", "server-cert.pem", "server-key.pem"),
             "source": ("ca-cert.pem", "client-cert.pem", "client-key.pem")}  # fmt: skip
TLS_OPTIONAL = ("ca-crl.pem", "dh-params.pem")


def tls_copy(source: Path, role: Role, dest: Path, uid: int, gid: int) -> None:
    """The side's credential files copied into ``dest`` (made 0700), owned by ``uid``:``gid``
    and 0600: for a QEMU of an unprivileged user, which cannot read the host's keys. A
    file QEMU requires but the directory lacks is left out: QEMU's error names it."""
    dest.mkdir(mode=0o700, exist_ok=True)
    os.chown(dest, uid, gid)
    for name in (*TLS_FILES[role], *TLS_OPTIONAL):
        try:
            data = (source / name).read_bytes()
        except FileNotFoundError:
            continue
        fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            os.fchown(fh.fileno(), uid, gid)
            fh.write(data)


async def tls_setup(
    execute: Execute, role: Role, cert_dir: str, verify: bool, shown: str | None = None
) -> None:
    """The side's ``tls-creds-x509`` object (one an earlier attempt left is replaced);
    MigrateFailed naming the directory (``shown``: the one the files came from) when QEMU
    cannot load it."""
    await tls_teardown(execute)
    try:
        await execute("object-add", tls_object(role, cert_dir, verify))
    except VirtbusError as exc:
        raise MigrateFailed(
            f"cannot load the migration TLS credentials from {shown or cert_dir} (ca-cert.pem,"
            f" {'server' if role == 'destination' else 'client'}-cert.pem and -key.pem): {exc}"
        ) from exc


async def tls_teardown(execute: Execute) -> None:
    """Back to plain: ``tls-creds``/``tls-hostname`` reset, the object deleted. What fails
    is only logged (there may be no object; the QEMU may be on its way out)."""
    try:
        await execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
    except VirtbusError as exc:
        log.info("migrate-set-parameters tls-creds='': %s", exc)
    try:
        await execute("object-del", {"id": TLS_ID})
    except VirtbusError as exc:
        log.debug("object-del %s: %s", TLS_ID, exc)


def tcp_uri(host: str, port: int) -> str:
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def parse_tcp_uri(uri: str) -> tuple[str, int]:
    """``tcp:HOST:PORT`` (HOST may be ``[v6]``) -> (host, port); InvalidArgument otherwise."""
    scheme, _, rest = uri.partition(":")
    host, _, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if scheme != "tcp" or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"unsupported migration URI {uri!r} (expected tcp:HOST:PORT)")
    return host, int(port)


def free_port(address: str) -> int:
    """A TCP port free right now on ``address`` (QEMU binds it a moment later)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def status_from_query(reply: Any) -> MigrationStatus:
    """``query-migrate``'s reply -> MigrationStatus (libvirt's job info fields)."""
    data = reply if isinstance(reply, dict) else {}
    ram = data.get("ram") if isinstance(data.get("ram"), dict) else {}
    assert isinstance(ram, dict)
    downtime = data.get("downtime")
    total_time = data.get("total-time")
    if isinstance(downtime, int) and isinstance(total_time, int) and downtime > total_time:
        downtime = None  # QEMU 7.2 reports a timestamp here after postcopy: not a duration
    return MigrationStatus(
        status=MigrationState.parse(data.get("status", "none")),
        transferred=int(ram.get("transferred", 0)),
        remaining=int(ram.get("remaining", 0)),
        total=int(ram.get("total", 0)),
        passes=int(ram.get("dirty-sync-count", 0)),
        downtime_ms=int(downtime) if isinstance(downtime, int) else None,
        total_time_ms=int(total_time) if isinstance(total_time, int) else None,
        error=str(data["error-desc"]) if data.get("error-desc") else None,
    )


# --- QMP sequences ----------------------------------------------------------------------
async def configure(
    execute: Execute, params: MigrationParams, role: Role, settings: MigrationSettings,
    tls_hostname: str = "",
) -> None:  # fmt: skip
    """Capabilities then parameters (QEMU checks multifd-channels against the caps); with
    ``params.tls`` the side's credentials must be there already (:func:`tls_setup`)."""
    await execute("migrate-set-capabilities", {"capabilities": capability_list(params, role)})
    values = parameter_map(params, role, settings, tls_hostname)
    if values:
        await execute("migrate-set-parameters", values)


async def start_incoming(
    execute: Execute, params: MigrationParams, settings: MigrationSettings
) -> str:
    """``migrate-incoming`` on a free port of ``params.listen_address``; the URI to send to."""
    address = params.listen
    last: Exception | None = None
    for _attempt in range(settings.incoming_attempts):
        uri = tcp_uri(address, free_port(address))
        try:
            await execute("migrate-incoming", {"uri": uri})
            return uri
        except VirtbusError as exc:  # the port was taken between our probe and QEMU's bind
            if "in use" not in str(exc).lower():
                raise MigrateFailed(f"migrate-incoming on {uri}: {exc}") from exc
            last = exc
    raise MigrateFailed(f"no free port for the incoming migration on {address}: {last}")


# --- a migration in progress ------------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One migration of one domain, on one side (see module docstring).

    ``feed`` is called by the domain's event task with each MIGRATION/MIGRATION_PASS event;
    on the source, :meth:`follow` (a task of its own) turns them into progress.
    """

    role: Role
    params: MigrationParams
    settings: MigrationSettings = field(default_factory=MigrationSettings)
    status: MigrationStatus = field(
        default_factory=lambda: MigrationStatus(status=MigrationState.SETUP)
    )
    postcopy_started: bool = False
    defn: DomainDefinition | None = None  # destination: the definition to own after finish
    new_domain: bool = False  # destination: no definition of it existed here before
    finished: bool = False  # destination: finish(True) done (the domain is ours for good)
    mirrors: Mirrors | None = None  # source of a copy-storage migration: the disk mirrors
    nbd_targets: list[str] = field(default_factory=list)  # destination: disks it serves
    cancel_requested: bool = False  # source: cancel while the disks are mirrored
    _wake: asyncio.Event = field(default_factory=asyncio.Event)  # for follow() only
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)  # wait_status()
    _transitions: list[MigrationState] = field(
        default_factory=list
    )  # statuses from events, not yet emitted

    @property
    def active(self) -> bool:
        return not self._done.is_set()

    @property
    def in_postcopy(self) -> bool:
        return self.postcopy_started or self.status.status in POSTCOPY

    def feed(self, name: str, data: dict[str, Any]) -> None:
        """A QMP event: note what it says at once (a query-migrate follows in ``follow``)."""
        status = MigrationState.lookup(data.get("status")) if name == "MIGRATION" else None
        if status is not None:
            self.status.status = status
            self._transitions.append(status)
            if self.status.status in POSTCOPY:
                self.postcopy_started = True
        elif name == "MIGRATION_PASS" and isinstance(data.get("pass"), int):
            self.status.passes = max(self.status.passes, int(data["pass"]))
        if self.role == "destination" and self.status.status in TERMINAL:
            self._done.set()
        self._wake.set()
        self._changed()

    def _changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def end(self, status: MigrationState, error: str | None = None) -> None:
        """Mark the job over from outside (the QEMU exited, the task was cancelled)."""
        if self._done.is_set():
            return
        self.status.status = status
        self.status.error = self.status.error or error
        self._done.set()
        self._wake.set()
        self._changed()

    async def wait_done(self, timeout: float) -> bool:
        """True once the job reached a terminal status within ``timeout``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), timeout)
        return self._done.is_set()

    async def wait_status(self, ready: Callable[[MigrationStatus], bool], timeout: float) -> bool:
        """Wait (bounded) until ``ready(status)`` holds or the job ended."""
        deadline = time.monotonic() + timeout
        while not ready(self.status) and not self._done.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, left)
        return ready(self.status)

    def _decorate(self, status: MigrationStatus) -> MigrationStatus:
        """A copy-storage status says which phase it is in, and the disks' bytes."""
        if self.mirrors is not None:
            status.phase = CopyPhase.MEMORY if self.mirrors.ready else CopyPhase.DISK
            status.disk_transferred = self.mirrors.transferred
            status.disk_total = self.mirrors.total
        return status

    def current(self) -> MigrationStatus:
        return self._decorate(self.status)

    async def copy_then_follow(self, execute: Execute, emit: Emit, uri: str) -> None:
        """Source of a copy-storage migration: wait for the mirrors (phase ``disk``,
        status ``setup``), then ``migrate`` and follow it (phase ``memory``)."""
        mirrors = self.mirrors
        assert mirrors is not None
        started = False
        try:
            last = 0.0

            def progress() -> None:
                nonlocal last
                self._decorate(self.status)
                self._changed()
                now = time.monotonic()
                if now - last >= self.settings.progress_interval:
                    last = now
                    emit(self.status)

            ready = await mirrors.wait_ready(execute, progress, lambda: self.cancel_requested)
            if not ready:
                await mirrors.abort(execute)
                self.end(MigrationState.CANCELLED, "cancelled while copying the disks")
                emit(self.current())
                return
            emit(self.current())
            await execute("migrate", {"uri": uri})
            started = True
        except VirtbusError as exc:
            await mirrors.abort(execute)
            self.end(MigrationState.FAILED, f"{exc}")
            emit(self.current())
            return
        finally:
            if not started and not self._done.is_set():  # cancelled from outside
                self.end(MigrationState.FAILED, "the disk copy was interrupted")
        await self.follow(execute, emit)

    async def _switchover(self, execute: Execute) -> MigrationStatus | None:
        """At ``pre-switchover``: complete the mirrors, then let QEMU switch over; on a
        failure cancel the migration (the guest resumes at the source at confirm) and
        return its failed status."""
        assert self.mirrors is not None
        try:
            await self.mirrors.finish(execute, self.settings.mirror_end_wait)
            await execute("migrate-continue", {"state": "pre-switchover"})
            return None
        except VirtbusError as exc:
            log.warning("copy-storage switchover failed: %s", exc)
            with contextlib.suppress(VirtbusError):
                await execute("migrate_cancel")
            await self.mirrors.abort(execute)
            failed = msgspec.structs.replace(self.status, status=MigrationState.FAILED)
            failed.error = str(exc)
            return failed

    def _should_switch(self) -> bool:
        return (
            self.params.postcopy
            and not self.postcopy_started
            and self.status.status == "active"
            and self.status.passes > self.settings.postcopy_after_passes
        )

    async def follow(self, execute: Execute, emit: Emit) -> None:
        """Source: follow progress until QEMU reports the end; emits ``migration`` events."""
        last: tuple[str, int] | None = None
        last_emit = 0.0
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.progress_interval)
                self._wake.clear()
                if self._done.is_set():
                    break
                try:
                    fresh = status_from_query(await execute("query-migrate"))
                except VirtbusError as exc:
                    log.debug("query-migrate: %s", exc)
                    continue  # the monitor may be reconnecting; the driver ends us if QEMU died
                if fresh.status == "none":
                    continue
                fresh.passes = max(fresh.passes, self.status.passes)
                for passed in self._transitions:  # brief states (postcopy-active) a query missed
                    # Never an end state: an event may announce it before a query that was
                    # already answered ("active") is read; the next query reports it.
                    if passed not in (fresh.status, last[0] if last else None, *TERMINAL):
                        emit(msgspec.structs.replace(self.status, status=passed))
                self._transitions.clear()
                if fresh.status in POSTCOPY:
                    self.postcopy_started = True
                if self.mirrors is not None:
                    if fresh.status == MigrationState.PRE_SWITCHOVER and not self.mirrors.done:
                        fresh = await self._switchover(execute) or fresh
                    elif fresh.status in TERMINAL and fresh.status != "completed":
                        await self.mirrors.abort(execute)
                    self._decorate(fresh)
                self.status = fresh
                self._changed()
                if self._should_switch():
                    await self._start_postcopy(execute)
                key = (fresh.status, fresh.passes)
                now = time.monotonic()
                if key != last or now - last_emit >= self.settings.progress_interval:
                    last, last_emit = key, now
                    emit(self.status)
                if fresh.status in TERMINAL:
                    self._done.set()
                    self._changed()
                    break
        finally:
            if not self._done.is_set():
                self.end(MigrationState.FAILED, "migration job ended without a result from QEMU")
                emit(self.status)

    async def _start_postcopy(self, execute: Execute) -> None:
        self.postcopy_started = True
        try:
            await execute("migrate-start-postcopy")
        except (OperationInvalid, VirtbusError) as exc:  # e.g. already completing
            log.info("migrate-start-postcopy: %s", exc)
