"""What one QEMU run needs around it on the host, set up before QEMU starts and taken
down after it ends — libvirt's "external devices" and prepare-host steps.

The command-line builder only describes these (:class:`drivers.qemu.argv.QemuLaunch`);
this module acts on them. Its interface is three calls the driver's start, incoming
migration and exit paths make, and one for forgetting a domain:

- :func:`prepare` (before QEMU is spawned): the secret files and host devices the
  command line names must exist (a clear error instead of QEMU's), a missing NVRAM is
  copied from its template, transient disks get their overlays, the directories QEMU
  writes into exist, and the helper processes (swtpm, virtiofsd, vhost-user-gpu,
  dbus-daemon) run. On any failure what was already set up is undone.
- :func:`started` (QEMU is up and still paused, QMP connected): CPU pinning, NIC links
  that start down, display passwords, interface up-scripts.
- :func:`release` (QEMU is gone, or start failed): helpers stopped, overlays deleted,
  interface down-scripts run. Idempotent.
- :func:`forget` (the domain is undefined here, or migrated away): its persistent helper
  state (a TPM's keys) is removed, as libvirt removes it.

:class:`Companions` is what a status file records (``to_json``), so an agent restarted
under a running guest still stops its helpers and deletes its overlays when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.qemu import cputune
from drivers.qemu import helpers as hp
from virtbus.errors import OperationFailed

if TYPE_CHECKING:
    from drivers.qemu.argv import QemuLaunch
    from drivers.qemu.argv_common import ArgvSettings
    from drivers.qemu.argv_net import IfScript
    from drivers.qemu.dac import QemuUser

log = logging.getLogger(__name__)
Execute = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class CompanionSettings:
    qemu_img: str = "qemu-img"
    command_timeout: float = 30.0  # s for qemu-img and an interface script
    helpers: hp.HelperSettings = field(default_factory=hp.HelperSettings)


@dataclass(slots=True)
class Companions:
    """What one run set up besides QEMU (see module docstring)."""

    helpers: hp.Running = field(default_factory=hp.Running)
    overlays: tuple[Path, ...] = ()
    down_scripts: tuple[tuple[str, str], ...] = ()  # (script, interface name)
    released: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "helpers": [p.to_json() for p in self.helpers.processes],
            "overlays": [str(p) for p in self.overlays],
            "down_scripts": [list(s) for s in self.down_scripts],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> Companions:
        doc = doc or {}
        return cls(
            hp.Running([hp.HelperProcess.from_json(p) for p in doc.get("helpers", [])]),
            tuple(Path(p) for p in doc.get("overlays", [])),
            tuple((str(s[0]), str(s[1])) for s in doc.get("down_scripts", [])),
        )


async def prepare(launch: QemuLaunch, run_dir: Path, uuid: str, *, incoming: bool = False,
                  settings: CompanionSettings = CompanionSettings(),
                  user: QemuUser | None = None) -> Companions:  # fmt: skip
    """Everything QEMU needs before it is spawned (see module docstring); ``user``: who
    QEMU runs as, which its confined helpers (swtpm) run as too."""
    await asyncio.to_thread(_check_host, launch)
    comp = Companions(down_scripts=tuple((s.path, s.ifname) for s in launch.net_scripts if s.down))
    try:
        await asyncio.to_thread(_directories, launch)
        if launch.nvram is not None:
            await asyncio.to_thread(_nvram, *launch.nvram)
        for overlay in launch.overlays:
            await _create_overlay(overlay.path, overlay.backing, overlay.backing_format, settings)
            comp.overlays = (*comp.overlays, overlay.path)
        comp.helpers = await hp.start(launch.helpers, run_dir, uuid, incoming=incoming,
                                      settings=settings.helpers, user=user)  # fmt: skip
    except BaseException:
        await release(comp, settings, scripts=False)
        raise
    return comp


def _check_host(launch: QemuLaunch) -> None:
    for secret in launch.secrets:
        if not secret.path.exists():
            raise OperationFailed(
                f"secret '{secret.usage}' has no value on this host: {secret.path} is missing"
                " (it holds the secret's value, base64, as virsh secret-set-value takes it)"
            )
    for dev in launch.host_devices:
        if not os.path.exists(dev):
            raise OperationFailed(f"host device {dev} does not exist on this host")


def _directories(launch: QemuLaunch) -> None:
    for path in launch.directories:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)


def _nvram(path: str, template: str | None) -> None:
    """A UEFI guest's variable store: copied from its template the first time."""
    nvram = Path(path)
    if nvram.exists():
        return
    if not template:
        raise OperationFailed(
            f"NVRAM file {nvram} does not exist and no template names what to create it from"
        )
    nvram.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = nvram.with_name(nvram.name + ".tmp")
    try:
        shutil.copyfile(template, tmp)
        tmp.chmod(0o600)
        tmp.rename(nvram)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OperationFailed(f"cannot create NVRAM {nvram} from {template}: {exc}") from exc


async def _run(argv: list[str], settings: CompanionSettings, what: str) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    except OSError as exc:
        raise OperationFailed(f"{what}: cannot run {argv[0]}: {exc}") from exc
    try:
        async with asyncio.timeout(settings.command_timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OperationFailed(f"{what}: {argv[0]} took over {settings.command_timeout}s") from None
    if proc.returncode != 0:
        text = out.decode(errors="replace").strip()[-400:]
        raise OperationFailed(f"{what}: {argv[0]} failed (exit {proc.returncode}): {text}")


async def _create_overlay(path: Path, backing: str, fmt: str,
                          settings: CompanionSettings) -> None:  # fmt: skip
    """A transient disk's overlay; one left by a crash is stale and made again."""
    with contextlib.suppress(FileNotFoundError):
        await asyncio.to_thread(path.unlink)
    await _run([settings.qemu_img, "create", "-q", "-f", "qcow2", "-F", fmt, "-b", backing,
                str(path)], settings, f"transient disk overlay {path}")  # fmt: skip


async def started(comp: Companions, launch: QemuLaunch, pid: int, execute: Execute,
                  settings: CompanionSettings = CompanionSettings()) -> None:  # fmt: skip
    """Apply what needs the running (still paused) QEMU (see module docstring)."""
    await cputune.apply(launch.cpu_tuning, pid, execute)
    for nic in launch.links_down:
        await execute("set_link", {"name": nic, "up": False})
    for pw in launch.passwords:
        args: dict[str, Any] = {"protocol": pw.protocol, "password": pw.password}
        if pw.connected is not None and pw.protocol == "spice":
            args["connected"] = pw.connected
        await execute("set_password", args)
        if pw.valid_to is not None:
            await execute("expire_password", {"protocol": pw.protocol,
                                              "time": _expiry(pw.valid_to)})  # fmt: skip
    for script in _up(launch.net_scripts):
        await _run([script.path, script.ifname], settings, f"interface script for {script.ifname}")


def _up(scripts: Iterable[IfScript]) -> list[IfScript]:
    return [s for s in scripts if not s.down]


def _expiry(valid_to: str) -> str:
    """libvirt's passwdValidTo (UTC, ISO 8601) as QMP's absolute seconds since the epoch."""
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(valid_to)
    except ValueError:
        raise OperationFailed(f"invalid passwdValidTo '{valid_to}'") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return str(int(when.timestamp()))


async def release(comp: Companions, settings: CompanionSettings = CompanionSettings(), *,
                  scripts: bool = True) -> None:  # fmt: skip
    """Undo :func:`prepare` and :func:`started` after QEMU is gone (never raises)."""
    if comp.released:
        return
    comp.released = True
    try:
        await hp.stop(comp.helpers, settings.helpers)
    except OSError as exc:
        log.error("cannot stop helpers: %s", exc)
    for path in comp.overlays:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(path.unlink)
    if scripts:
        for script, ifname in comp.down_scripts:
            try:
                await _run([script, ifname], settings, f"interface down-script for {ifname}")
            except OperationFailed as exc:
                log.warning("%s", exc)


async def watch(comp: Companions, domain: str) -> None:
    """Log a helper that dies under the running guest (run as the domain's named task)."""
    await hp.watch(comp.helpers, domain)


def forget(settings: ArgvSettings, uuid: str) -> None:
    """Remove a domain's persistent helper state kept under virtbus' own directories."""
    shutil.rmtree(settings.swtpm_state_dir / uuid, ignore_errors=True)


def disown_logs(run_dir: Path, uuid: str) -> None:
    """A gone domain's helper logs (``<run_dir>/<uuid>.<dev>-swtpm.log``), which its QEMU's
    uid owned, become the agent's (its uid, group and mode 0640).

    Through the file itself, never its name: with one shared ``qemu_user`` the run dir is
    the QEMU group's (1770) and the log the QEMU user's, which may have put a link (or a
    hard link, a FIFO) in its place; a chown and chmod by name would have been the agent's
    (root's) on whatever it points to. Anything but a plain file of one link is left."""
    for log_file in run_dir.glob(f"{uuid}.*-swtpm.log"):
        try:
            fd = os.open(log_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:  # a symlink (ELOOP), or gone meanwhile
            log.warning("%s not taken back: %s", log_file, exc)
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                log.warning("%s not taken back: not a plain file of one link", log_file)
                continue
            os.fchown(fd, os.getuid(), os.getgid())
            os.fchmod(fd, 0o640)
        except OSError as exc:
            log.warning("cannot take back %s: %s", log_file, exc)
        finally:
            os.close(fd)
