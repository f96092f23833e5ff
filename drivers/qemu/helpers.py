"""Per-domain helper processes: swtpm for an emulated TPM, virtiofsd for a virtiofs share,
dbus-daemon for a D-Bus display. They start before QEMU (which connects to their sockets)
and stop after it; libvirt manages the same daemons the same way.

The command-line builder describes them (:class:`HelperSpec`, pure data); this module
runs them. The small interface the driver calls:

- :func:`start` — run each helper's setup, start it, wait until its socket exists; on any
  failure the ones already started are stopped again (nothing is left half-done);
- :func:`stop` — SIGTERM, then SIGKILL, bounded; removes the sockets;
- :class:`HelperProcess` — what a status file records, so a restarted agent can stop
  helpers of a QEMU it reattached to;
- :func:`watch` — a task that reports a helper dying under a running guest.

Helpers run in their own session (like QEMU) so they outlive an agent restart. Their
output goes to ``<run_dir>/<uuid>.<name>.log``.

A *confined* helper (swtpm) runs under the uid, gid and groups of the domain's QEMU when
QEMU runs unprivileged (``qemu_user``/``qemu_uid_range``, :mod:`drivers.qemu.dac`), as
libvirt runs swtpm as its ``swtpm_user``: its state becomes that uid's (for good: it is
the domain's, removed at undefine), its own log and passphrase file too, and it creates
its socket itself, so only that QEMU connects to it. Its setup (swtpm_setup) still runs
as root: it signs the EK certificate with the host's local CA key, which no guest's uid
may read; what it made is then given to the uid.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.qemu.dac import (
    QemuUser,
    check_reachable,
    give_tree,
    open_plain,
    subprocess_identity,
)
from virtbus.errors import OperationFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HelperSettings:
    ready_timeout: float = 10.0  # s until a helper's socket appears
    setup_timeout: float = 60.0  # s for a setup command (swtpm_setup creates keys)
    stop_wait: float = 2.0  # s after SIGTERM before SIGKILL
    poll: float = 0.02  # s between socket/exit checks (no inotify on every host)


@dataclass(frozen=True, slots=True)
class HelperSpec:
    """One helper a domain needs."""

    kind: str  # swtpm | virtiofsd | dbus-daemon
    name: str  # unique within the domain: tpm0, fs0, dbus
    argv: tuple[str, ...]
    socket: Path  # QEMU connects here; it exists once the helper is ready
    setup: tuple[tuple[str, ...], ...] = ()  # run first when ``state`` is empty
    incoming_setup: tuple[tuple[str, ...], ...] = ()  # instead, for an incoming migration
    state: Path | None = None  # persistent state (a TPM's keys); migrated through QEMU
    files: tuple[Path, ...] = ()  # other files it writes in run_dir (its own log; kept)
    #: (secret file, base64 as virtbus stores secrets; raw copy the helper reads): the
    #: raw copy exists only while the helper starts (swtpm's state passphrase)
    secrets: tuple[tuple[Path, Path], ...] = ()
    #: runs as the domain's QEMU user, not as root (see module docstring)
    confined: bool = False


@dataclass(frozen=True, slots=True)
class HelperProcess:
    kind: str
    name: str
    pid: int
    socket: Path
    logfile: Path

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "pid": self.pid,
                "socket": str(self.socket), "logfile": str(self.logfile)}  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> HelperProcess:
        return cls(str(doc["kind"]), str(doc["name"]), int(doc["pid"]), Path(doc["socket"]),
                   Path(doc["logfile"]))  # fmt: skip


@dataclass(slots=True)
class Running:
    """Helpers of one run, and their child handles while the agent is their parent."""

    processes: list[HelperProcess] = field(default_factory=list)
    children: dict[int, asyncio.subprocess.Process] = field(default_factory=dict)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _is_ours(hp: HelperProcess) -> bool:
    """The pid still runs this helper (its command line names its socket): a pid reused
    after an agent restart is never signalled."""
    if not _alive(hp.pid):
        return False
    try:
        cmdline = Path(f"/proc/{hp.pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(hp.socket).encode() in cmdline


async def _run_setup(cmd: tuple[str, ...], logfile: Path, settings: HelperSettings) -> None:
    fd = await asyncio.to_thread(_open_log, logfile, cmd)
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd,
        )  # fmt: skip
    except OSError as exc:
        raise OperationFailed(f"cannot run {cmd[0]}: {exc}") from exc
    finally:
        os.close(fd)
    try:
        async with asyncio.timeout(settings.setup_timeout):
            rc = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OperationFailed(f"{cmd[0]} did not finish in {settings.setup_timeout}s") from None
    if rc != 0:
        tail = await asyncio.to_thread(_tail, logfile)
        raise OperationFailed(f"{' '.join(cmd[:2])} failed (exit {rc}): {tail}")


def _open_log(logfile: Path, cmd: tuple[str, ...]) -> int:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    fd = open_plain(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.write(fd, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
    return fd


def _tail(logfile: Path, size: int = 600) -> str:
    try:
        data = logfile.read_bytes()[-size:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


def _write_secrets(pairs: tuple[tuple[Path, Path], ...]) -> None:
    for source, raw in pairs:
        try:
            value = base64.b64decode(source.read_bytes(), validate=True)
        except FileNotFoundError:
            raise OperationFailed(f"secret file {source} does not exist") from None
        except (OSError, binascii.Error) as exc:
            raise OperationFailed(f"cannot read secret {source} (base64): {exc}") from None
        raw.parent.mkdir(parents=True, exist_ok=True)
        fd = open_plain(raw, os.O_WRONLY | os.O_CREAT, 0o600)  # truncated once checked
        try:
            os.ftruncate(fd, 0)
            os.write(fd, value)
        finally:
            os.close(fd)


def _remove_secrets(pairs: tuple[tuple[Path, Path], ...]) -> None:
    for _source, raw in pairs:
        with contextlib.suppress(FileNotFoundError):
            raw.unlink()


def _give(spec: HelperSpec, user: QemuUser, uuid: str) -> None:
    """What a confined helper opens becomes ``user``'s: its state, its own log files
    (created empty when missing) and its passphrase copy; a directory above them that the
    user cannot search is a clear error (the helper would fail with a bare EACCES)."""
    if spec.state is not None:
        give_tree(spec.state, user)
        check_reachable(spec.state, user, uuid)
    for path in spec.files:
        _give_file(path, user)
    for _source, raw in spec.secrets:
        os.chown(raw, user.uid, user.gid)
    check_reachable(spec.socket, user, uuid)


def _give_file(path: Path, user: QemuUser) -> None:
    """``path`` (created empty when missing) becomes ``user``'s, through the file itself."""
    fd = open_plain(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchown(fd, user.uid, user.gid)
    finally:
        os.close(fd)


def _prepare_state(state: Path) -> bool:
    """Create the state dir; True when it was empty (setup must run)."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    return not any(state.iterdir())


async def start(specs: tuple[HelperSpec, ...], run_dir: Path, uuid: str, *,
                incoming: bool = False, settings: HelperSettings = HelperSettings(),
                user: QemuUser | None = None) -> Running:  # fmt: skip
    """Start every helper (see module docstring); all or none keep running. ``user``:
    who the domain's QEMU runs as (None: the agent's user), which confined helpers run as
    too."""
    running = Running()
    try:
        for spec in specs:
            logfile = run_dir / f"{uuid}.{spec.name}.log"
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(spec.socket.unlink)
            await asyncio.to_thread(_write_secrets, spec.secrets)
            try:
                as_user = user if spec.confined else None
                await _start_one(spec, running, logfile, incoming, settings, as_user, uuid)
            finally:
                await asyncio.to_thread(_remove_secrets, spec.secrets)
    except BaseException:
        await stop(running, settings)
        raise
    return running


async def _start_one(spec: HelperSpec, running: Running, logfile: Path, incoming: bool,
                     settings: HelperSettings, user: QemuUser | None,
                     uuid: str) -> None:  # fmt: skip
    setup = spec.incoming_setup if incoming else spec.setup
    if spec.state is not None:
        empty = await asyncio.to_thread(_prepare_state, spec.state)
        if empty or incoming:
            for cmd in setup:
                await _run_setup(cmd, logfile, settings)
    if user is not None:
        await asyncio.to_thread(_give, spec, user, uuid)
    identity = subprocess_identity(user, spec.kind)
    fd = await asyncio.to_thread(_open_log, logfile, spec.argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *spec.argv, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd,
            start_new_session=True, **identity,
        )  # fmt: skip
    except OSError as exc:
        raise OperationFailed(f"cannot start {spec.kind} ({spec.argv[0]}): {exc}") from exc
    finally:
        os.close(fd)
    running.children[proc.pid] = proc
    running.processes.append(HelperProcess(spec.kind, spec.name, proc.pid, spec.socket, logfile))
    await _wait_ready(spec, proc, logfile, settings)


async def _wait_ready(spec: HelperSpec, proc: asyncio.subprocess.Process, logfile: Path,
                      settings: HelperSettings) -> None:  # fmt: skip
    deadline = time.monotonic() + settings.ready_timeout
    while not await asyncio.to_thread(spec.socket.exists):
        if proc.returncode is not None:
            tail = await asyncio.to_thread(_tail, logfile)
            raise OperationFailed(
                f"{spec.kind} for {spec.name} exited (status {proc.returncode}) before it was "
                f"ready: {tail}"
            )
        if time.monotonic() > deadline:
            raise OperationFailed(
                f"{spec.kind} for {spec.name} did not create {spec.socket} within "
                f"{settings.ready_timeout}s"
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.poll):
                await proc.wait()


async def stop(running: Running, settings: HelperSettings = HelperSettings()) -> None:
    """Stop every helper of a run (bounded), reap our children, remove sockets."""
    for hp in reversed(running.processes):
        child = running.children.get(hp.pid)
        if child.returncode is None if child is not None else _is_ours(hp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(hp.pid, signal.SIGTERM)
            if not await _gone(hp.pid, child, settings.stop_wait, settings.poll):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(hp.pid, signal.SIGKILL)
                await _gone(hp.pid, child, settings.stop_wait, settings.poll)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(hp.socket.unlink)
    running.processes.clear()
    running.children.clear()


async def _gone(pid: int, child: asyncio.subprocess.Process | None, wait: float,
                poll: float) -> bool:  # fmt: skip
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if child is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll):
                    await child.wait()
            if child.returncode is not None:
                return True
        elif not _alive(pid):
            return True
        else:
            await asyncio.sleep(poll)
    return not _alive(pid)


async def watch(running: Running, domain: str, poll: float = 1.0) -> None:
    """Report (once each) a helper that dies while the guest runs; run as a named task."""
    reported: set[int] = set()
    while running.processes:
        for hp in list(running.processes):
            child = running.children.get(hp.pid)
            dead = child.returncode is not None if child is not None else not _is_ours(hp)
            if dead and hp.pid not in reported:
                reported.add(hp.pid)
                tail = await asyncio.to_thread(_tail, hp.logfile)
                log.error("domain %s: %s (%s, pid %d) exited while the guest runs: %s",
                          domain, hp.kind, hp.name, hp.pid, tail)  # fmt: skip
        await asyncio.sleep(poll)


def remove_state(spec: HelperSpec) -> None:
    """Forget a helper's persistent state (a TPM moved away with its guest)."""
    if spec.state is not None:
        shutil.rmtree(spec.state, ignore_errors=True)
