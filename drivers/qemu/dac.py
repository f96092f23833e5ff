"""QEMU as an unprivileged user: libvirt's DAC security driver for the QEMU driver.

With the ``qemu_user`` setting (e.g. ``virtbus-qemu``, which deploy/setup-dev creates),
each QEMU is exec'd with that uid, its primary gid and its supplementary groups (as
libvirt's ``virCommandSetUID``: before QEMU runs a single instruction, so it never opens
anything as root). What it must open is handed to it by ownership, as libvirt's DAC driver
does: at launch (:class:`DacLabels`, a launch step) the files of the definition (disk
images and volumes, NVRAM, chardev files and logs, created empty if missing) and the
domain's own run dir are chowned to the user, the original owners first written to
``<run_dir>/<uuid>.dac.json`` and on the file itself (the ``trusted.virtbus.dac`` xattr,
with a count of holders: libvirt's remember_owner); when the run ends (or its launch
fails), also in an agent restarted meanwhile, each is given back to that owner by its last
holder (so a migration's destination on shared storage, which takes a disk over from the
source's QEMU, does not take the source's uid for its owner), or, on a filesystem without
trusted xattrs, unless someone changed it since. The agent's run dir becomes
``root:<gid>`` mode 1770 so QEMU can create its QMP socket and pidfile there but not
remove what is not its own.

A disk hot-plugged into a running domain is given the same way before QEMU opens it
(:meth:`DacLabels.acquire_disk`, as libvirt relabels a hot-plugged image), added to the
run's record, and given back at its detach (:meth:`DacLabels.release_disk`) unless the run
still uses the file, or by the end of the run.

Read-only firmware (loader, NVRAM template) and kernels are never chowned: they must be
readable by the user (a clear start error says which directory it cannot search).

With ``qemu_uid_range`` (e.g. ``200000-200999``) each domain's QEMU gets a uid of its own
from that range (:class:`UidPool`, kept in ``<state_dir>/qemu-uids.json`` from its first
start until it is undefined or migrated away), with the same number as its gid (a private
group: as a primary group a shared one would own, with its group bits, the files QEMU
creates) and the kvm group, or, with ``qemu_user`` set too, that user's groups as
supplementary ones (for host-wide files such as the migration TLS credentials). Its files are
chowned to ``uid:uid`` with their group and other bits cleared for the run (so one
guest's QEMU cannot open another's images even if they were 0644; the mode is given back
with the owner); a read-only or shareable disk, which several guests may use at once, is
never chowned: each domain's uid gets its own POSIX ACL entry on it (read, or read-write
when shareable; :mod:`drivers.qemu.acl`), taken off when that domain stops. The domain's
run dir ``<run_dir>/<uuid>/`` is its uid's, mode 0700, and holds its QMP socket, pidfile
and the sockets the agent names; the agent's run dir stays root's and unwritable to every
QEMU (one guest cannot squat another's socket names there).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.qemu import acl, confine
from virtbus.domain import DomainDefinition
from virtbus.domain.model import Element
from virtbus.errors import InvalidArgument, OperationFailed
from virtbus.store import atomic_write, replace_file

if TYPE_CHECKING:
    from drivers.qemu.launch import LaunchPlan

log = logging.getLogger(__name__)
SUFFIX = ".dac.json"
UIDS_FILE = "qemu-uids.json"
#: on each file given away: its owner before the first holder and how many hold it
REMEMBER = "trusted.virtbus.dac"


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
    kvm = kvm_groups()
    groups = groups if set(kvm) <= set(groups) else (*groups, *kvm)
    return QemuUser(name, pw.pw_uid, pw.pw_gid, groups)


def subprocess_identity(user: QemuUser | None, program: str) -> dict[str, Any]:
    """The ``create_subprocess_exec`` keywords that exec ``program`` as ``user`` (none for
    None): its uid, gid and groups are taken before the program runs a single instruction.
    OPERATION_FAILED on uvloop, whose subprocesses take no user/group."""
    if user is None:
        return {}
    if not isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
        raise OperationFailed(
            f"{program} cannot be started as its own user (drivers/qemu/dac.py) on uvloop: "
            "uvloop's subprocesses take no user/group; run the agent without --uvloop"
        )
    return {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}


def give_tree(path: Path, user: QemuUser) -> None:
    """``path`` (a helper's state: a directory and what is in it, or one file) becomes
    ``user``'s, for good (it is the domain's, removed at undefine), no group or other bits:
    the keys of one guest's TPM are read by its own uid only. Symlinks are not followed."""
    if not path.is_dir() or path.is_symlink():
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
        os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & ~0o077)
        return
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            entry = os.path.join(root, name)
            os.chown(entry, user.uid, user.gid, follow_symlinks=False)
            if not os.path.islink(entry):
                os.chmod(entry, stat.S_IMODE(os.lstat(entry).st_mode) & ~0o077)
    os.chown(path, user.uid, user.gid)
    os.chmod(path, 0o700)


def kvm_groups() -> tuple[int, ...]:
    """/dev/kvm's group, when this host has one."""
    with contextlib.suppress(KeyError):
        return (grp.getgrnam("kvm").gr_gid,)
    return ()


def parse_range(text: str) -> tuple[int, int]:
    """``"MIN-MAX"`` of the qemu_uid_range setting; INVALID_ARG naming it otherwise."""
    lo, sep, hi = text.partition("-")
    try:
        first, last = int(lo), int(hi)
    except ValueError:
        first = last = -1
    if not sep or first < 1000 or last < first or last >= 2**31 - 1:
        raise InvalidArgument(
            f"QEMU driver option qemu_uid_range={text!r}: expected MIN-MAX, two uids with "
            "1000 <= MIN <= MAX < 2147483647 that no account of this host uses "
            "(e.g. 200000-200999)"
        )
    return first, last


class UidPool:
    """The per-domain uids of ``qemu_uid_range``: one per domain uuid, from its first start
    until :meth:`free` (undefine, migrated away), kept in one JSON file of the state dir so
    a restarted agent gives the same uid again and never hands it to a second domain."""

    def __init__(self, path: Path, first: int, last: int) -> None:
        self._path = path
        self.first, self.last = first, last
        self._uids: dict[str, int] | None = None
        self._lock = threading.Lock()  # launches allocate in worker threads, concurrently

    def _load(self) -> dict[str, int]:
        if self._uids is None:
            try:
                doc = json.loads(self._path.read_bytes())
                self._uids = {str(k): int(v) for k, v in dict(doc.get("uids", {})).items()}
            except FileNotFoundError:
                self._uids = {}
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                # losing the file could hand a running guest's uid to another: refuse
                raise OperationFailed(f"unreadable uid allocations {self._path}: {exc}") from exc
        return self._uids

    def _save(self) -> None:
        doc = {"range": f"{self.first}-{self.last}", "uids": self._load()}
        replace_file(self._path, json.dumps(doc, indent=1, sort_keys=True).encode())

    def get(self, uuid: str) -> int | None:
        with self._lock:
            return self._load().get(uuid)

    def allocate(self, uuid: str, domain: str) -> int:
        """``uuid``'s uid (a new one the first time); OPERATION_FAILED naming the setting
        when every uid of the range is taken."""
        with self._lock:
            return self._allocate(uuid, domain)

    def _allocate(self, uuid: str, domain: str) -> int:
        uids = self._load()
        if uuid in uids:
            return uids[uuid]
        taken = set(uids.values())
        for uid in range(self.first, self.last + 1):
            if uid in taken:
                continue
            try:
                pwd.getpwuid(uid)
                continue  # an account of this host: never QEMU's
            except KeyError:
                pass
            uids[uuid] = uid
            self._save()
            return uid
        raise OperationFailed(
            f"cannot start domain '{domain}': no free uid in QEMU driver option "
            f"qemu_uid_range={self.first}-{self.last} ({len(uids)} domains hold one): "
            "widen the range, or undefine a domain of this host"
        )

    def free(self, uuid: str) -> None:
        with self._lock:
            if self._load().pop(uuid, None) is not None:
                self._save()

    def prune(self, known: set[str]) -> None:
        """Free the uids of domains this host no longer has (lost at an agent's crash)."""
        with self._lock:
            uids = self._load()
            gone = [uuid for uuid in uids if uuid not in known]
            for uuid in gone:
                log.info("freeing uid %d of domain %s: no longer on this host",
                         uids.pop(uuid), uuid)  # fmt: skip
            if gone:
                self._save()


def shared_paths(defn: DomainDefinition, volumes: dict[int, str]) -> dict[str, int]:
    """The paths of ``defn``'s read-only (perm 4) and shareable (perm 6) disks, which other
    guests may use at the same time: given by ACL, never by chown, with per-domain uids."""
    out: dict[str, int] = {}
    for disk in defn.disks:
        el, index = disk.element, disk.index
        if el.find("shareable") is not None:
            perm = 6
        elif el.find("readonly") is not None:
            perm = 4
        else:
            continue
        paths = [hp.path for hp in confine.host_paths(el) if hp.kind == confine.Kind.FILE]
        if index in volumes:
            paths.append(volumes[index])
        for path in paths:
            out[path] = max(out.get(path, 0), perm)
    return out


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
    """The launch step that gives a domain's files to the QEMU user (module docstring):
    one ``user_name`` for every domain, or a uid of its own per domain from ``uid_range``
    (allocations kept under ``state_dir``); both empty, QEMU runs as the agent's user."""

    def __init__(self, user_name: str, run_dir: Path, *, uid_range: str = "",
                 state_dir: Path | None = None) -> None:  # fmt: skip
        self._name = user_name
        self._run_dir = run_dir
        self._user: QemuUser | None = None
        self.pool: UidPool | None = None
        self._locks: dict[str, asyncio.Lock] = {}  # per domain, see _lock
        if uid_range:
            first, last = parse_range(uid_range)
            self.pool = UidPool(Path(state_dir or run_dir) / UIDS_FILE, first, last)

    @property
    def per_domain(self) -> bool:
        """Each domain runs under a uid of its own (qemu_uid_range)."""
        return self.pool is not None

    def user(self, uuid: str) -> QemuUser | None:
        """Who QEMU of domain ``uuid`` runs as (the shared user, looked up once, or its own
        uid, allocated at its launch), or None when QEMU runs as the agent's user.

        A per-domain uid has its own number as gid, and, when ``qemu_user`` is set too,
        that user's groups as supplementary ones: host-wide files every QEMU reads (the
        migration TLS credentials) can be given to that group, while a domain's own files
        are ``uid:uid`` with no group bits, so sharing it opens no guest's files to another."""
        shared = self._shared_user()
        if self.pool is not None:
            uid = self.pool.get(uuid)
            if uid is None:
                raise OperationFailed(f"domain {uuid} has no uid of qemu_uid_range yet")
            groups = (shared.gid, *shared.groups) if shared is not None else kvm_groups()
            return QemuUser(f"uid {uid}", uid, uid, groups)
        return shared

    def _shared_user(self) -> QemuUser | None:
        if not self._name:
            return None
        if self._user is None:
            self._user = lookup(self._name)
        return self._user

    def forget(self, uuid: str) -> None:
        """The domain left this host (undefined, migrated away): its uid is free again."""
        if self.pool is not None:
            self.pool.free(uuid)
        lock = self._locks.get(uuid)
        if lock is not None and not lock.locked():
            del self._locks[uuid]

    def _lock(self, uuid: str) -> asyncio.Lock:
        """One record operation at a time per domain: a run's end (its QEMU exiting)
        gives back everything while a hot-plug may be giving one more file; in turns, the
        end sees the hot-plug's file in the record, or the hot-plug finds no run."""
        return self._locks.setdefault(uuid, asyncio.Lock())

    def prune(self, known: set[str]) -> None:
        """Free the uids of domains this host does not have (at open)."""
        if self.pool is not None:
            self.pool.prune(known)

    def _plain(self, path: str) -> bool:
        """Whether ``path`` is in a directory a QEMU may write (the agent's run dir, the
        domain's own dir in it): labelled only as a plain file (:func:`_open_target`)."""
        run = os.path.realpath(self._run_dir)
        parent = os.path.realpath(os.path.dirname(path))
        return parent == run or parent.startswith(run.rstrip("/") + "/")

    def _record(self, uuid: str) -> Path:
        return self._run_dir / f"{uuid}{SUFFIX}"

    async def acquire(self, plan: LaunchPlan) -> None:
        async with self._lock(plan.live.uuid):
            await self._acquire(plan)

    async def _acquire(self, plan: LaunchPlan) -> None:
        live = plan.live
        if self.pool is not None:
            await asyncio.to_thread(self.pool.allocate, live.uuid, live.name)
        user = self.user(live.uuid)
        if user is None:
            return
        volumes = {i: v.path for i, v in (plan.volumes or {}).items() if v.kind != "network"}
        wanted = label_paths(live, volumes)
        shared = shared_paths(live, volumes) if self.per_domain else {}
        own = confine.own_dir(self._run_dir, live.uuid)
        await asyncio.to_thread(self._prepare_dirs, user, own)
        originals: list[list[object]] = []
        record = self._record(live.uuid)
        try:
            for path, create in [(str(own), False), *wanted]:
                if path in shared:
                    continue
                entry = await asyncio.to_thread(_original, path, create, user, self._plain(path))
                if entry is not None:
                    originals.append(entry)
        except BaseException:
            for entry in originals:  # no record yet: count this launch out again
                await asyncio.to_thread(_forget_holder, str(entry[0]), entry, user.uid,
                                        self._plain(str(entry[0])))  # fmt: skip
            raise
        doc = {"user": user.name, "uid": user.uid, "files": originals,
               "acl": [[path, perm] for path, perm in sorted(shared.items())]}  # fmt: skip
        await atomic_write(record, json.dumps(doc).encode())
        for entry in originals:
            await asyncio.to_thread(_chown, str(entry[0]), user, self.per_domain,
                                        self._plain(str(entry[0])))  # fmt: skip
        for path, perm in shared.items():
            await asyncio.to_thread(_grant, path, user, perm, live.name)
        # then every file QEMU opens must be reachable (a failed launch gives them back)
        readable = [hp.path for hp in confine.host_paths(live.root)
                    if hp.kind in (confine.Kind.FILE, confine.Kind.FIRMWARE)]  # fmt: skip
        for path in sorted({*readable, *(p for p, _ in wanted), str(own)}):
            await asyncio.to_thread(check_reachable, Path(path), user, live.name)

    async def acquire_disk(self, live: DomainDefinition, el: Element, volume: str | None,
                           ) -> list[str]:  # fmt: skip
        async with self._lock(live.uuid):
            return await self._acquire_disk(live, el, volume)

    async def _acquire_disk(self, live: DomainDefinition, el: Element, volume: str | None,
                            ) -> list[str]:  # fmt: skip
        """A disk hot-plugged into a running domain (``el``, its volume's path): its files
        are given to the domain's QEMU user as a launch gives them (libvirt relabels a
        hot-plugged image too), recorded in the run's record, so that its detach (or the
        end of the run, also in a restarted agent) gives them back. A file the run holds
        already (another disk of it) is left as it is. Returns the paths given."""
        user = self.user(live.uuid)
        if user is None:
            return []
        paths = [hp.path for hp in confine.host_paths(el) if hp.kind == confine.Kind.FILE]
        if volume:
            paths.append(volume)
        perm = 0  # chowned; a disk other guests may share: an ACL entry (shared_paths)
        if el.find("shareable") is not None:
            perm = 6
        elif el.find("readonly") is not None:
            perm = 4
        record = self._record(live.uuid)
        doc = await asyncio.to_thread(_load_record, record, user)
        held = {str(e[0]) for e in doc["files"]} | {str(p) for p, _ in doc["acl"]}
        files: list[list[object]] = []
        acls: list[str] = []
        try:
            for path in dict.fromkeys(paths):
                if path in held:
                    continue
                if perm and self.per_domain:
                    acls.append(path)
                    continue
                entry = await asyncio.to_thread(_original, path, False, user, self._plain(path))
                if entry is not None:
                    files.append(entry)
            doc["files"] += files
            doc["acl"] += [[path, perm] for path in acls]
            await atomic_write(record, json.dumps(doc).encode())
        except BaseException:  # no record of them: count this hot-plug out again
            for entry in files:
                await asyncio.to_thread(_forget_holder, str(entry[0]), entry, user.uid,
                                        self._plain(str(entry[0])))  # fmt: skip
            raise
        given = [str(e[0]) for e in files] + acls
        # recorded first (a crash from here on is given back at the end of the run); a
        # chown, an ACL or a reach that fails gives back now what this hot-plug took
        try:
            for entry in files:
                await asyncio.to_thread(_chown, str(entry[0]), user, self.per_domain,
                                        self._plain(str(entry[0])))  # fmt: skip
            for path in acls:
                await asyncio.to_thread(_grant, path, user, perm, live.name)
            for path in given:
                await asyncio.to_thread(check_reachable, Path(path), user, live.name)
        except BaseException:
            await self._release_disk(live.uuid, given)
            raise
        return given

    async def release_disk(self, uuid: str, paths: list[str]) -> None:
        async with self._lock(uuid):
            await self._release_disk(uuid, paths)

    async def _release_disk(self, uuid: str, paths: list[str]) -> None:
        """Give ``paths`` (what :meth:`acquire_disk` gave for a disk now detached, less
        what the run still uses) back, and take them out of the run's record."""
        record = self._record(uuid)
        if not paths:
            return
        try:
            doc = json.loads(await asyncio.to_thread(record.read_bytes))
        except (OSError, ValueError) as exc:
            log.warning("domain %s: unreadable %s: %s", uuid, record, exc)
            return
        uid, gone = int(doc.get("uid", -1)), set(paths)
        files = [e for e in doc.get("files", []) if str(e[0]) in gone]
        acls = [a for a in doc.get("acl", []) if str(a[0]) in gone]
        # given back first, then out of the record: a release cut short (its command's
        # timeout, the agent stopping) leaves the rest to the end of the run, as release
        # does, instead of owned by a uid nothing would ever take it back from
        for entry in files:
            await asyncio.to_thread(_restore, str(entry[0]), uid, list(entry),
                                        self._plain(str(entry[0])))  # fmt: skip
        for path, _perm in acls:
            await asyncio.to_thread(_revoke, str(path), uid)
        doc["files"] = [e for e in doc.get("files", []) if str(e[0]) not in gone]
        doc["acl"] = [a for a in doc.get("acl", []) if str(a[0]) not in gone]
        await atomic_write(record, json.dumps(doc).encode())

    def _prepare_dirs(self, user: QemuUser, own: Path) -> None:
        """The agent's run dir and the domain's own dir (which exists afterwards).

        One shared user: QEMU creates its QMP socket and pidfile in the agent's run dir,
        made ``root:<gid>`` 1770 (sticky: it cannot remove what it does not own). Per-domain
        uids: they are in the domain's own dir, and the agent's run dir is root's alone
        (searchable, writable by no QEMU)."""
        if self.per_domain:
            info = os.stat(self._run_dir)
            if info.st_gid != 0 or info.st_mode & 0o022 or info.st_mode & stat.S_ISVTX:
                os.chown(self._run_dir, 0, 0)  # left by an earlier qemu_user
            os.chmod(self._run_dir, 0o755)
        else:
            os.chown(self._run_dir, 0, user.gid)
            os.chmod(self._run_dir, 0o1770)
        own.mkdir(mode=0o700, exist_ok=True)

    async def release(self, uuid: str) -> None:
        async with self._lock(uuid):
            await self._release(uuid)

    async def _release(self, uuid: str) -> None:
        record = self._record(uuid)
        try:
            doc = json.loads(await asyncio.to_thread(record.read_bytes))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("domain %s: unreadable %s: %s", uuid, record, exc)
            return
        uid = int(doc.get("uid", -1))
        for entry in doc.get("files", []):
            await asyncio.to_thread(_restore, str(entry[0]), uid, list(entry),
                                        self._plain(str(entry[0])))  # fmt: skip
        for path, _perm in doc.get("acl", []):
            await asyncio.to_thread(_revoke, str(path), uid)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(record.unlink)


def _load_record(record: Path, user: QemuUser) -> dict[str, Any]:
    """The run's record (what it gave, to give back), or a new one for ``user``."""
    try:
        doc: dict[str, Any] = json.loads(record.read_bytes())
    except FileNotFoundError:
        return {"user": user.name, "uid": user.uid, "files": [], "acl": []}
    except ValueError as exc:
        raise OperationFailed(f"unreadable {record}: {exc}") from exc
    doc.setdefault("files", [])
    doc.setdefault("acl", [])
    return doc


def _grant(path: str, user: QemuUser, perm: int, domain: str) -> None:
    """An ACL entry of ``user`` on a file other guests may share (shared_paths)."""
    try:
        acl.add_user(path, user.uid, perm)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OperationFailed(
            f"domain '{domain}': cannot give its QEMU (uid {user.uid}) access to the shared "
            f"disk '{path}' by a POSIX ACL ({exc.strerror}): per-domain uids (qemu_uid_range) "
            "need ACLs on the filesystems of read-only and shareable disks"
        ) from exc


def _revoke(path: str, uid: int) -> None:
    try:
        acl.remove_user(path, uid)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot remove the ACL entry of uid %d from %s: %s", uid, path, exc)


def _open_target(path: str, *, create: bool = False, plain: bool = False) -> int:
    """The file to label as an fd, through which every change goes (never its name
    again: a QEMU that swaps the name for a link meanwhile changes nothing). ``plain``: a
    file of a directory a QEMU may write (the run dir: a domain's own dir, the shared
    user's 1770 one) is opened without following a link, and must be a plain file of one
    link (a QEMU could have put a link to another guest's image there, or to a host file,
    for the agent, root, to give away). Elsewhere (a pool's, an allowed dir's: root's
    directories) links are followed, as libvirt labels a link's target. FileNotFoundError
    when it is absent (and not ``create``)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    if not plain:
        return os.open(path, flags, 0o600)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symlink
        raise OperationFailed(
            f"{path} is not a plain file ({exc.strerror}): a QEMU may have put a link there;"
            " remove it and start again"
        ) from None
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):  # the domain's own dir (a link was refused above)
        return fd
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise OperationFailed(
            f"{path} is not a plain file of one link: a QEMU may have put it there; remove "
            "it and start again"
        )
    return fd


def _original(path: str, create: bool, user: QemuUser, plain: bool = False,
              ) -> list[object] | None:  # fmt: skip
    """[path, uid, gid, mode, remembered] of the owner before the first holder (a chardev
    output created empty first); None if absent. ``remembered``: counted in the file's
    :data:`REMEMBER` xattr (libvirt's remember_owner), so that a file another domain or
    another host's QEMU holds already (a migration's destination on shared storage) gets
    its real owner back when its last holder stops, not the uid the first one gave it; the
    holders are listed too, so one stopping gives the file to the one before it (a failed
    migration's destination gives the disk back to the source's QEMU). ``plain``: see
    :func:`_open_target`."""
    try:
        fd = _open_target(path, create=create, plain=plain)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        now: dict[str, Any] = {"uid": info.st_uid, "gid": info.st_gid, "mode": mode,
                               "refs": 0, "holders": []}  # fmt: skip
        try:
            doc = _remembered(fd) or now
            doc["refs"] += 1
            doc["holders"].append([user.uid, user.gid])
            os.setxattr(fd, REMEMBER, json.dumps(doc).encode())
        except OSError as exc:  # no trusted xattrs there (NFS, a FUSE): the owner now is it
            log.debug("cannot remember the owner of %s in an xattr: %s", path, exc)
            return [path, info.st_uid, info.st_gid, mode, False]
        return [path, int(doc["uid"]), int(doc["gid"]), int(doc["mode"]), True]
    finally:
        os.close(fd)


def _remembered(target: str | int) -> dict[str, Any] | None:
    """The owner before the first holder and their count, from the file (a path or an fd;
    None: none)."""
    try:
        doc = json.loads(os.getxattr(target, REMEMBER))
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise
    except ValueError:
        return None  # not ours to read: counted afresh from the owner now
    try:
        out: dict[str, Any] = {k: int(doc[k]) for k in ("uid", "gid", "mode", "refs")}
        out["holders"] = [[int(u), int(g)] for u, g in doc.get("holders", [])]
    except (KeyError, TypeError, ValueError):
        return None
    return out


def _forget_holder(path: str, entry: list[Any], uid: int, plain: bool = False) -> bool:
    """Holder ``uid`` less on ``path``; True when it was the last (or nobody counted).
    Otherwise a file it still owns goes to the holder before it."""
    if len(entry) < 5 or not entry[4]:
        return True
    try:
        fd = _open_target(path, plain=plain)
    except FileNotFoundError:
        return False
    try:
        return _forget_holder_of(fd, path, uid)
    finally:
        os.close(fd)


def _forget_holder_of(fd: int, path: str, uid: int) -> bool:
    try:
        doc = _remembered(fd)
        if doc is None:
            return True
        doc["refs"] -= 1
        holders = doc["holders"]
        mine = [i for i, (u, _) in enumerate(holders) if u == uid]
        if mine:
            del holders[mine[-1]]
        if doc["refs"] > 0:
            os.setxattr(fd, REMEMBER, json.dumps(doc).encode())
            if holders and os.fstat(fd).st_uid == uid:
                os.fchown(fd, holders[-1][0], holders[-1][1])
            return False
        os.removexattr(fd, REMEMBER)
    except OSError as exc:
        log.warning("cannot count a holder of %s out: %s", path, exc)
    return True


def _chown(path: str, user: QemuUser, private: bool, plain: bool = False) -> None:
    """``path`` becomes the user's; ``private`` (a per-domain uid): the owner's alone too,
    so no other guest's uid opens it whatever its mode was."""
    fd = _open_target(path, plain=plain)
    try:
        os.fchown(fd, user.uid, user.gid)
        if private:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o077:
                os.fchmod(fd, mode & ~0o077)
    finally:
        os.close(fd)


def _restore(path: str, uid: int, entry: list[Any], plain: bool = False) -> None:
    """Give ``path`` back to its owner before the first holder (and its mode): when the
    last holder stops if the owner is remembered on the file, else unless it is no longer
    the QEMU user's (changed since the launch: not ours to undo)."""
    owner, group = int(entry[1]), int(entry[2])
    mode = int(entry[3]) if len(entry) > 3 else None
    try:
        fd = _open_target(path, plain=plain)
    except FileNotFoundError:
        return
    except (OSError, OperationFailed) as exc:
        log.warning("cannot restore the owner of %s: %s", path, exc)
        return
    try:
        counted = len(entry) >= 5 and bool(entry[4])
        if counted and not _forget_holder_of(fd, path, uid):
            return  # another domain (another host's, a migration's) holds it still
        if not counted and os.fstat(fd).st_uid != uid:
            return
        os.fchown(fd, owner, group)
        if mode is not None:
            os.fchmod(fd, mode)
    except OSError as exc:
        log.warning("cannot restore the owner of %s: %s", path, exc)
    finally:
        os.close(fd)


def open_plain(path: Path, flags: int, mode: int) -> int:
    """``os.open`` of a file of the run dir, never through a link: with one shared
    ``qemu_user`` the run dir is the QEMU group's (1770) and a file kept from an earlier run
    (a helper's log) the QEMU user's, and any QEMU may have put a link (or a hard link, a
    FIFO) in its place or ahead of it (a domain's QEMU log before its first start); the
    agent (root) would have written, created or given away the file it points to.
    OPERATION_FAILED for anything but a plain file of one link."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:  # ELOOP: a symlink; ENXIO: a FIFO
        raise OperationFailed(
            f"{path} is not a plain file ({exc.strerror}): remove it and start again"
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise OperationFailed(f"{path} is not a plain file of one link: remove it and start again")
    return fd


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
