"""QEMU processes: launch (outliving the agent), identity checks, CPU time, bounded kill.

QEMU is started directly (not with ``-daemonize``, which does not survive ``-sandbox``
here) in a new session with stdin on /dev/null and stdout/stderr appended to the
domain's log, so it keeps running when the agent exits. While the agent is its parent it
keeps the :class:`asyncio.subprocess.Process` so the child is reaped (no zombies); a QEMU
found again after an agent restart is followed by PID (with a cmdline check, so a reused
PID is never mistaken for it).

Reads of ``/proc`` are synchronous on purpose: procfs is served from memory and never
waits on a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles

from drivers.qemu.dac import QemuUser, open_plain, subprocess_identity
from drivers.qemu.settings import QemuSettings
from virtbus.errors import OperationFailed

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the ``comm`` field (which may contain spaces).

    Read with os.open/os.read, not a text file object: every dominfo reads it, and the
    Path/TextIOWrapper layers cost more than the read itself."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.read(fd, 4096)  # one line, well under a page
        finally:
            os.close(fd)
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].decode("ascii", "replace").split()


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def is_domain_process(pid: int, uuid: str) -> bool:
    """The PID is alive and is the QEMU of this domain (its cmdline names the uuid)."""
    return pid_alive(pid) and any(uuid in arg for arg in read_cmdline(pid))


def cpu_time_ns(pid: int) -> tuple[int, int]:
    """(user, system) CPU time of the process in ns; (0, 0) when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0, 0
    # after comm: state(0) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime(11) stime(12)
    tick_ns = 1_000_000_000 // _CLK_TCK
    return int(fields[11]) * tick_ns, int(fields[12]) * tick_ns


@dataclass(slots=True)
class QemuProcess:
    """One running QEMU. ``proc`` is set while the agent is its parent."""

    pid: int
    uuid: str
    proc: asyncio.subprocess.Process | None = None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None and pid_alive(self.pid)
        return is_domain_process(self.pid, self.uuid)

    async def wait_exit(self, timeout: float, poll: float) -> bool:
        """Wait (bounded) for the process to be gone; True when it is."""
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll)
        return True

    def signal(self, sig: signal.Signals) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    async def kill(self, settings: QemuSettings) -> bool:
        """SIGTERM, wait, SIGKILL, wait (all bounded); True when the process is gone."""
        for sig, wait in (
            (signal.SIGTERM, settings.sigterm_wait),
            (signal.SIGKILL, settings.sigkill_wait),
        ):
            if not self.alive():
                break
            self.signal(sig)
            if await self.wait_exit(wait, settings.exit_poll):
                return True
        return not self.alive()


async def log_tail(path: Path, limit: int) -> str:
    """The last ``limit`` bytes of a log, for error messages."""
    try:
        async with aiofiles.open(path, "rb") as fh:
            size = (await fh.seek(0, os.SEEK_END)) or 0
            await fh.seek(max(0, size - limit))
            data: bytes = await fh.read()
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


async def spawn(
    argv: list[str], *, uuid: str, logfile: Path, pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None, cpus: frozenset[int] | None = None,
    user: QemuUser | None = None, cgroup: Path | None = None,
) -> QemuProcess:  # fmt: skip
    """Start QEMU detached from the agent's session; output appended to ``logfile``.

    ``pass_fds`` are inherited under the same numbers (a launch step's tap or socket fds);
    ``env`` adds to the agent's environment (a guest clock's TZ); ``cpus`` is the CPU set
    QEMU starts on, so every thread it creates inherits it (libvirt's emulatorpin);
    ``user``: QEMU is exec'd with that uid, gid and groups (drivers/qemu/dac.py);
    ``cgroup``: the ``cgroup.procs`` of the devices group it joins before exec
    (drivers/qemu/cgroup.py). Python drops the identity before it runs ``preexec_fn``, so
    with a group the child joins it first and then drops the identity itself, as Python
    would (groups, gid, uid): QEMU's first instruction runs confined.
    """
    stamp = f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n"
    fd = await asyncio.to_thread(_open_log, logfile, stamp)
    pin = functools.partial(os.sched_setaffinity, 0, cpus) if cpus else None
    identity: dict[str, Any] = {}
    if cgroup is not None:
        pin = functools.partial(_confined_child, cpus, str(cgroup), user)
    elif user is not None:
        try:
            identity = subprocess_identity(user, "QEMU")
        except OperationFailed:
            os.close(fd)
            raise
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
            env={**os.environ, **env} if env else None,
            preexec_fn=pin,
            **identity,  # only when set: uvloop refuses these keywords even as None
        )
    except OSError as exc:
        raise OperationFailed(f"cannot execute {argv[0]}: {exc}") from exc
    except subprocess.SubprocessError as exc:  # the child's preexec step failed
        raise OperationFailed(
            f"cannot execute {argv[0]}: joining the devices cgroup {cgroup} or dropping to "
            f"the QEMU user failed in the child ({exc})"
        ) from exc
    finally:
        os.close(fd)
    return QemuProcess(pid=proc.pid, uuid=uuid, proc=proc)


def _confined_child(cpus: frozenset[int] | None, procs: str, user: QemuUser | None) -> None:
    """In the forked child, before exec: pin, join the devices cgroup (still root), then
    take the QEMU user's groups, gid and uid (the order of Python's own ``user=``)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)
    if user is not None:
        os.setgroups(list(user.groups))
        os.setregid(user.gid, user.gid)
        os.setreuid(user.uid, user.uid)


def _open_log(logfile: Path, stamp: str) -> int:
    """Open the log for appending (the fd QEMU inherits) and mark where this run starts."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    fd = open_plain(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.write(fd, stamp.encode())
    return fd


async def read_pidfile(pidfile: Path) -> int | None:
    try:
        async with aiofiles.open(pidfile) as fh:
            return int((await fh.read()).strip())
    except (OSError, ValueError):
        return None
