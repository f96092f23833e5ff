"""The QEMU driver's files on disk: persistent definitions and per-run status.

- ``<state_dir>/domains/<uuid>.xml``: the persistent definition (survives restarts;
  ``undefine`` removes it).
- ``<run_dir>/<uuid>.status``: one JSON document per running QEMU (pid, QMP socket, the
  live XML, state and reason, the job in flight) from which a restarted agent
  reattaches, as libvirt's ``/run/libvirt/qemu/<name>.xml`` status files.

Both are replaced atomically (temp file, rename), so a reader sees the old or the new
file. Definitions are also fsynced (:func:`virtbus.store.atomic_write`): they must survive
the host. Status files are not: they describe processes that die with the host, the page
cache survives a killed agent, and an fsync costs 10-100 ms on the migration's hot path.
A file that does not parse anyway (a disk error, a human) is set aside with
:func:`virtbus.store.quarantine` and reported: never fatal, and never a reason to touch
the QEMU it describes.

It also finds QEMU processes that point into our run dir but that no status file
describes (left by a lost status file, or by another agent with the same run dir): they
are reported, never killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles.os
import msgspec

from virtbus.domain import DomainDefinition, parse_domain_xml
from virtbus.errors import OperationFailed, VirtbusError
from virtbus.protocol.events import DomainState
from virtbus.store import atomic_write, quarantine, read_many

log = logging.getLogger(__name__)

STATUS_SUFFIX = ".status"
STATUS_VERSION = 1


@dataclass(slots=True)
class RunStatus:
    """What a restarted agent needs to find and judge a running QEMU again."""

    uuid: str
    pid: int
    id: int
    qmp_socket: Path
    xml: str  # the live definition (runtime values written back)
    state: DomainState = DomainState.RUNNING
    reason: str = "unknown"
    logfile: Path | None = None
    pidfile: Path | None = None
    sockets: tuple[Path, ...] = ()
    job: dict[str, Any] | None = None  # the job in flight (e.g. a migration phase)
    companions: dict[str, Any] | None = None  # helpers, overlays (drivers/qemu/companions.py)
    extra: dict[str, Any] = field(default_factory=dict)  # keys of newer versions, kept

    def to_json(self) -> bytes:
        doc = {
            **self.extra,
            "version": STATUS_VERSION,
            "uuid": self.uuid,
            "pid": self.pid,
            "id": self.id,
            "qmp_socket": str(self.qmp_socket),
            "state": self.state.label,
            "reason": self.reason,
            "logfile": str(self.logfile) if self.logfile else None,
            "pidfile": str(self.pidfile) if self.pidfile else None,
            "sockets": [str(p) for p in self.sockets],
            "job": self.job,
            "companions": self.companions,
            "xml": self.xml,
        }
        # Written on every change of state (each suspend and resume): msgspec's encoder
        # takes ~25 us where json.dumps(indent=1) (its pure-Python encoder) took ~1 ms.
        return msgspec.json.encode(doc)

    @classmethod
    def from_json(cls, data: bytes) -> RunStatus:
        """Parse a status document; ValueError/KeyError/TypeError when it is not one."""
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        known = {"version", "uuid", "pid", "id", "qmp_socket", "state", "reason", "logfile",
                 "pidfile", "sockets", "job", "xml", "companions"}  # fmt: skip
        job = doc.get("job")
        companions = doc.get("companions")
        return cls(
            uuid=str(doc["uuid"]),
            pid=int(doc["pid"]),
            id=int(doc["id"]),
            qmp_socket=Path(str(doc["qmp_socket"])),
            xml=str(doc["xml"]),
            state=_state_from_label(str(doc.get("state", "running"))),
            reason=str(doc.get("reason", "unknown")),
            logfile=Path(doc["logfile"]) if doc.get("logfile") else None,
            pidfile=Path(doc["pidfile"]) if doc.get("pidfile") else None,
            sockets=tuple(Path(str(p)) for p in doc.get("sockets") or ()),
            job=dict(job) if isinstance(job, dict) else None,
            companions=dict(companions) if isinstance(companions, dict) else None,
            extra={k: v for k, v in doc.items() if k not in known},
        )


def _state_from_label(label: str) -> DomainState:
    for state in DomainState:
        if state.label == label:
            return state
    raise ValueError(f"unknown state {label!r}")


@dataclass(frozen=True, slots=True)
class UnknownQemu:
    """A QEMU running with our run dir that no status file accounts for."""

    pid: int
    uuid: str | None


class StateStore:
    """Definitions and status files of one driver (see module docstring)."""

    def __init__(self, state_dir: Path, run_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.run_dir = Path(run_dir)
        self.defs_dir = self.state_dir / "domains"

    async def prepare(self) -> None:
        await aiofiles.os.makedirs(self.defs_dir, exist_ok=True)
        await aiofiles.os.makedirs(self.run_dir, exist_ok=True)

    # --- definitions --------------------------------------------------------------------
    def definition_path(self, uuid: str) -> Path:
        return self.defs_dir / f"{uuid}.xml"

    async def load_definitions(self) -> list[DomainDefinition]:
        """Every valid definition; invalid files are quarantined (with a warning)."""
        found: list[DomainDefinition] = []
        entries = [
            entry
            for entry in sorted(await aiofiles.os.listdir(self.defs_dir))
            if entry.endswith(".xml") and not entry.startswith(".")
        ]
        datas = await read_many(self.defs_dir / entry for entry in entries)
        for entry, data in zip(entries, datas, strict=True):
            path = self.defs_dir / entry
            try:
                if isinstance(data, OSError):
                    raise data
                if data is None:
                    continue
                defn = parse_domain_xml(data.decode("utf-8"))
                if f"{defn.uuid}.xml" != entry:
                    raise ValueError(f"holds uuid {defn.uuid}, not the one its name says")
            except (OSError, UnicodeDecodeError, ValueError, VirtbusError) as exc:
                await quarantine(path, f"not a usable domain definition: {exc}")
                continue
            found.append(defn)
        return found

    async def save_definition(self, defn: DomainDefinition) -> None:
        await atomic_write(self.definition_path(defn.uuid), defn.to_xml().encode())

    async def remove_definition(self, uuid: str) -> None:
        await _remove(self.definition_path(uuid))

    # --- status files -------------------------------------------------------------------
    def status_path(self, uuid: str) -> Path:
        return self.run_dir / f"{uuid}{STATUS_SUFFIX}"

    async def status_uuids(self) -> list[str]:
        return sorted(
            entry[: -len(STATUS_SUFFIX)]
            for entry in await aiofiles.os.listdir(self.run_dir)
            if entry.endswith(STATUS_SUFFIX) and not entry.startswith(".")
        )

    async def read_statuses(self, uuids: list[str]) -> list[RunStatus | None]:
        """The status of each of ``uuids``: None when absent or corrupt (then it is
        quarantined). The files are read in one thread (one per domain at agent start)."""
        datas = await read_many(self.status_path(uuid) for uuid in uuids)
        return [
            await self._status_from(uuid, data) for uuid, data in zip(uuids, datas, strict=True)
        ]

    async def _status_from(self, uuid: str, data: bytes | OSError | None) -> RunStatus | None:
        path = self.status_path(uuid)
        if isinstance(data, OSError):
            await quarantine(path, f"unreadable status file: {data}")
            return None
        if data is None:
            return None
        try:
            status = RunStatus.from_json(data)
            if status.uuid != uuid:
                raise ValueError(f"holds uuid {status.uuid}")
        except (ValueError, KeyError, TypeError) as exc:
            await quarantine(path, f"not a usable status file: {exc}")
            return None
        return status

    async def write_status(self, status: RunStatus) -> None:
        await atomic_write(self.status_path(status.uuid), status.to_json(), fsync=False)

    async def remove_status(self, uuid: str) -> None:
        await _remove(self.status_path(uuid))

    # --- sockets ------------------------------------------------------------------------
    async def remove_own_sockets(self, paths: Iterable[Path]) -> None:
        """Remove stale sockets the agent placed in its own run dir or a domain's own dir
        in it (QMP, default chardev and VNC sockets). Anything else is left alone: a path
        outside the run dir (the XML chose it) or a file there that is not a socket
        (someone else's)."""
        for path in paths:
            if self.run_dir not in (path.parent, path.parent.parent):
                log.debug("not removing %s: outside the run dir %s", path, self.run_dir)
                continue
            try:
                info = await asyncio.to_thread(os.lstat, path)
            except FileNotFoundError:
                continue
            if not stat.S_ISSOCK(info.st_mode):
                log.warning("not removing %s: it is not a socket", path)
                continue
            await _remove(path)

    async def check_bind_paths(self, paths: Iterable[Path]) -> None:
        """OperationFailed when something exists where QEMU is to bind a socket the XML
        chose: QEMU unlinks whatever is at a listening path before binding, and the agent
        never removes a file it did not create."""
        for path in paths:
            try:
                info = await asyncio.to_thread(os.lstat, path)
            except FileNotFoundError:
                continue
            kind = "a socket" if stat.S_ISSOCK(info.st_mode) else "a file that is not a socket"
            raise OperationFailed(
                f"cannot bind a socket at {path}: {kind} already exists there, and virtbus "
                "never removes what it did not create (remove it, or choose another path)"
            )

    # --- processes nobody accounts for ---------------------------------------------------
    async def unknown_qemus(self, known_pids: set[int]) -> list[UnknownQemu]:
        """QEMU processes whose command line points into our run dir, not in ``known_pids``."""
        return await asyncio.to_thread(_scan_qemus, str(self.run_dir), known_pids)


def _scan_qemus(run_dir: str, known_pids: set[int]) -> list[UnknownQemu]:
    needle = run_dir.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in known_pids:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if b"qemu-system" not in args[0] or not any(needle in arg for arg in args):
            continue
        uuid = None
        for flag, value in itertools.pairwise(args):
            if flag == b"-uuid":
                uuid = value.decode(errors="replace")
        found.append(UnknownQemu(int(entry), uuid))
    return found


async def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        await aiofiles.os.remove(path)


async def remove_files(*paths: Path | None) -> None:
    """Remove what exists of ``paths`` (sockets, pidfiles of a finished QEMU)."""
    for path in paths:
        if path is not None:
            await _remove(path)
