"""QEMU as an unprivileged user: libvirt's DAC security driver for the QEMU driver.

With the ``qemu_user`` setting (e.g. ``virtbus-qemu``, which deploy/setup-dev creates),
each QEMU is exec'd with that uid, its primary gid and its supplementary groups (as
libvirt's ``virCommandSetUID``: before QEMU runs a single instruction, so it never opens
anything as root). What it must open is handed to it by ownership, as libvirt's DAC driver
does: at launch (:class:`DacLabels`, a launch step) the files of the definition (disk
images and volumes, NVRAM, chardev files and logs, created empty if missing) and the
domain's own run dir are chowned to the user, the original owners first written to
``<run_dir>/<uuid>.dac.json``; when the run ends (or its launch fails), also in an agent
restarted meanwhile, each is given back to its original owner unless someone changed it
since. The agent's run dir becomes ``root:<gid>`` mode 1770 so QEMU can create its QMP
socket and pidfile there but not remove what is not its own.

Read-only firmware (loader, NVRAM template) and kernels are never chowned: they must be
readable by the user (a clear start error says which directory it cannot search).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from drivers.qemu import confine
from virtbus.domain import DomainDefinition
from virtbus.errors import OperationFailed
from virtbus.store import atomic_write

if TYPE_CHECKING:
    from drivers.qemu.launch import LaunchPlan

log = logging.getLogger(__name__)
SUFFIX = ".dac.json"


@dataclass(frozen=True, slots=True)
class QemuUser:
    """The account QEMU runs as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary (kvm, for /dev/kvm)


def lookup(name: str) -> QemuUser:
    """The user ``name`` of this host; OPERATION_FAILED naming the fix when missing."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise OperationFailed(
            f"QEMU is to run as user '{name}' (QEMU driver option qemu_user), which does not "
            "exist on this host: create it (deploy/setup-dev does: useradd --system "
            f"{name}) or unset qemu_user"
        ) from None
    groups = tuple(g for g in os.getgrouplist(name, pw.pw_gid) if g != pw.pw_gid)
    with contextlib.suppress(KeyError):  # /dev/kvm's group, when this host has one
        kvm = grp.getgrnam("kvm").gr_gid
        groups = groups if kvm in groups else (*groups, kvm)
    return QemuUser(name, pw.pw_uid, pw.pw_gid, groups)


def label_paths(defn: DomainDefinition, volumes: dict[int, str]) -> list[tuple[str, bool]]:
    """(path, create) of what QEMU opens for ``defn`` and must own: files and NVRAM the
    XML names (chardev outputs are created when missing), and the volumes' paths."""
    out: list[tuple[str, bool]] = []
    for hp in confine.host_paths(defn.root):
        if hp.kind not in (confine.Kind.FILE, confine.Kind.NVRAM):
            continue
        if hp.what.startswith(("<os><kernel", "<os><initrd", "<os><dtb")):
            continue  # read-only boot files: readable by the user, never given away
        output = hp.what.endswith(("source", "log")) and hp.what.startswith(
            ("<serial", "<console", "<channel", "<parallel")
        )
        out.append((hp.path, output))
    out += [(path, False) for path in volumes.values()]
    return out


class DacLabels:
    """The launch step that gives a domain's files to the QEMU user (module docstring)."""

    def __init__(self, user_name: str, run_dir: Path) -> None:
        self._name = user_name
        self._run_dir = run_dir
        self._user: QemuUser | None = None

    def user(self) -> QemuUser | None:
        """The QEMU user (looked up once), or None when QEMU runs as the agent's user."""
        if not self._name:
            return None
        if self._user is None:
            self._user = lookup(self._name)
        return self._user

    def _record(self, uuid: str) -> Path:
        return self._run_dir / f"{uuid}{SUFFIX}"

    async def acquire(self, plan: LaunchPlan) -> None:
        user = self.user()
        if user is None:
            return
        live = plan.live
        volumes = {i: v.path for i, v in (plan.volumes or {}).items() if v.kind != "network"}
        wanted = label_paths(live, volumes)
        own = confine.own_dir(self._run_dir, live.uuid)
        await asyncio.to_thread(self._prepare_dirs, user, own)
        originals: list[list[object]] = []
        record = self._record(live.uuid)
        for path, create in [(str(own), False), *wanted]:
            entry = await asyncio.to_thread(_original, path, create)
            if entry is not None:
                originals.append(entry)
        await atomic_write(record, json.dumps({"user": user.name, "uid": user.uid,
                                               "files": originals}).encode())  # fmt: skip
        for entry in originals:
            await asyncio.to_thread(_chown, str(entry[0]), user)
        # then every file QEMU opens must be reachable (a failed launch gives them back)
        readable = [hp.path for hp in confine.host_paths(live.root)
                    if hp.kind in (confine.Kind.FILE, confine.Kind.FIRMWARE)]  # fmt: skip
        for path in sorted({*readable, *(p for p, _ in wanted), str(own)}):
            await asyncio.to_thread(check_reachable, Path(path), user, live.name)

    def _prepare_dirs(self, user: QemuUser, own: Path) -> None:
        """The agent's run dir: QEMU creates its QMP socket and pidfile there (sticky: it
        cannot remove what it does not own); the domain's own dir exists."""
        os.chown(self._run_dir, 0, user.gid)
        os.chmod(self._run_dir, 0o1770)
        own.mkdir(mode=0o700, exist_ok=True)

    async def release(self, uuid: str) -> None:
        record = self._record(uuid)
        try:
            doc = json.loads(await asyncio.to_thread(record.read_bytes))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("domain %s: unreadable %s: %s", uuid, record, exc)
            return
        uid = int(doc.get("uid", -1))
        for path, owner, group, *_ in doc.get("files", []):
            await asyncio.to_thread(_restore, str(path), uid, int(owner), int(group))
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(record.unlink)


def _original(path: str, create: bool) -> list[object] | None:
    """[path, uid, gid] now (a chardev output created empty first); None if absent."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if not create:
            return None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        info = os.stat(path)
    return [path, info.st_uid, info.st_gid]


def _chown(path: str, user: QemuUser) -> None:
    os.chown(path, user.uid, user.gid)


def _restore(path: str, uid: int, owner: int, group: int) -> None:
    """Give ``path`` back, unless it is gone or no longer the QEMU user's."""
    try:
        if os.stat(path).st_uid != uid:
            return  # changed since the launch: not ours to undo
        os.chown(path, owner, group)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot restore the owner of %s: %s", path, exc)


def check_reachable(path: Path, user: QemuUser, domain: str) -> None:
    """OPERATION_FAILED naming the first directory above ``path`` the user cannot search
    (QEMU would fail with a bare "Permission denied")."""
    for parent in reversed(path.parents):
        try:
            info = os.stat(parent)
        except FileNotFoundError:
            return
        if info.st_uid == user.uid:
            ok = info.st_mode & stat.S_IXUSR
        elif info.st_gid == user.gid or info.st_gid in user.groups:
            ok = info.st_mode & stat.S_IXGRP
        else:
            ok = info.st_mode & stat.S_IXOTH
        if not ok:
            raise OperationFailed(
                f"domain '{domain}': QEMU runs as '{user.name}' (uid {user.uid}), which "
                f"cannot reach '{path}': directory '{parent}' is not searchable by it"
            )
