"""The lxc command-line tools as asyncio subprocesses, each under a timeout.

Every command names the driver's own LXCPATH (``-P``), so lxc finds each container's
config at ``<lxcpath>/<name>/config`` and ``lxc-freeze``/``lxc-unfreeze`` work by name.
With the ``netns`` setting every command runs in that named network namespace
(``/run/netns/NAME``, as ``ip netns`` makes them) through ``nsenter``: lxc's command
socket is abstract, so it lives in the network namespace of the container's monitor.
``lxc-start`` also needs ``/sys/class/net`` to show that namespace (lxc tells a Linux
bridge from an Open vSwitch one there), but not ``ip netns exec``'s fresh ``/sys``,
which hides the cgroup mounts under it: it runs in a private mount namespace where a
sysfs of the network namespace is bound over ``/sys/class/net`` and
``/sys/devices/virtual/net`` only (:data:`NETNS_SYSFS`, a fixed script: arguments
reach it as ``"$@"``, never pasted into it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from drivers.lxc.settings import LxcSettings
from virtbus.errors import OperationFailed, OperationTimeout

log = logging.getLogger(__name__)
NETNS_SYSFS = (
    'd=$(mktemp -d) && mount -t sysfs sysfs "$d" && mount --bind "$d/class/net" /sys/class/net'
    ' && mount --bind "$d/devices/virtual/net" /sys/devices/virtual/net && umount -l "$d"'
    ' && rmdir "$d" && exec "$@"'
)


class LxcError(OperationFailed):
    """An lxc command failed; ``stderr`` holds what it said, ``returncode`` its status."""

    def __init__(self, message: str, stderr: str = "", returncode: int | None = None) -> None:
        super().__init__(message)
        self.stderr = stderr
        self.returncode = returncode


@dataclass(frozen=True, slots=True)
class LxcRow:
    """One container as ``lxc-ls --fancy`` shows it."""

    name: str
    state: str  # RUNNING, STOPPED, FROZEN, STARTING, STOPPING, ABORTING, FREEZING, THAWED
    pid: int | None  # init's PID (in our PID namespace) while it runs


def parse_ls(text: str) -> dict[str, LxcRow]:
    """``lxc-ls -f -F NAME,STATE,PID``: a header, then one row per container."""
    rows: dict[str, LxcRow] = {}
    for line in text.splitlines()[1:]:
        tokens = line.split()
        if len(tokens) < 2:
            continue
        name, state = tokens[0], tokens[1].upper()
        pid = int(tokens[2]) if len(tokens) > 2 and tokens[2].isdigit() else None
        rows[name] = LxcRow(name, state, pid)
    return rows


class LxcTools:
    """Runs lxc-* on the driver's LXCPATH (see module docstring)."""

    def __init__(self, settings: LxcSettings) -> None:
        self._s = settings

    def argv(self, tool: str, *args: str) -> list[str]:
        prefix: list[str] = []
        if self._s.netns:
            prefix = ["nsenter", f"--net=/run/netns/{self._s.netns}"]
            if tool == "lxc-start":
                prefix += ["unshare", "--mount", "--propagation", "slave", "sh", "-c",
                           NETNS_SYSFS, "sh"]  # fmt: skip
        if tool == "lxc-start":
            # A container boots with every signal at its default, as on a real boot: an agent
            # started under nohup ignores SIGHUP, an ignored signal survives exec, and a shell
            # init cannot trap a signal ignored on entry, so its reboot signal went unheard.
            prefix = ["env", "--default-signal", *prefix]
        return [*prefix, self._s.tool(tool), "-P", str(self._s.lxcpath), *args]

    async def run(self, tool: str, *args: str, timeout: float | None = None) -> str:
        limit = self._s.command_timeout if timeout is None else timeout
        argv = self.argv(tool, *args)
        began = time.perf_counter()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise LxcError(f"cannot run {argv[0]}: {exc}") from exc
        try:
            async with asyncio.timeout(limit):
                out, err = await proc.communicate()
        except TimeoutError:
            await _kill(proc)
            raise OperationTimeout(f"{tool} {' '.join(args)} timed out after {limit} s") from None
        except asyncio.CancelledError:
            await _kill(proc)
            raise
        stderr = err.decode(errors="replace").strip()
        log.debug("%s %s: %.1f ms, status %s", tool, " ".join(args[:2]),
                  (time.perf_counter() - began) * 1000, proc.returncode)  # fmt: skip
        if proc.returncode != 0:
            last = stderr.splitlines()[-1] if stderr else f"exit status {proc.returncode}"
            raise LxcError(f"{tool} failed: {last}", stderr, proc.returncode)
        return out.decode(errors="replace")

    async def start(self, name: str, argv: list[str], pidfile: str) -> None:
        """``lxc-start -d``: returns once the container runs (or failed to start)."""
        await self.run("lxc-start", "-n", name, "-d", "-p", pidfile, "--", *argv)

    async def stop(self, name: str, *, kill: bool = False, reboot: bool = False) -> None:
        """``-k``: kill init and wait until stopped; else send the halt (or reboot) signal
        and return at once (``-W``)."""
        if kill:
            await self.run("lxc-stop", "-n", name, "-k")
        else:
            await self.run("lxc-stop", "-n", name, "-W", *(["-r"] if reboot else []))

    async def freeze(self, name: str) -> None:
        await self.run("lxc-freeze", "-n", name)

    async def unfreeze(self, name: str) -> None:
        await self.run("lxc-unfreeze", "-n", name)

    async def ls(self) -> dict[str, LxcRow]:
        """Every container of the LXCPATH with its state and init PID."""
        text = await self.run("lxc-ls", "-f", "-F", "NAME,STATE,PID", timeout=self._s.list_timeout)
        return parse_ls(text)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


async def probe_fstype(device: str, settings: LxcSettings) -> str:
    """The file system on a block device (``blkid``), for an lxc.mount.entry."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "blkid", "-o", "value", "-s", "TYPE", device,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as exc:
        raise LxcError(f"cannot run blkid: {exc}") from exc
    try:
        async with asyncio.timeout(settings.list_timeout):
            out, _err = await proc.communicate()
    except BaseException:
        await _kill(proc)
        raise
    fstype = out.decode(errors="replace").strip()
    if proc.returncode != 0 or not fstype:
        raise LxcError(f"no file system found on {device} (blkid)")
    return fstype
