"""Saved state of QEMU domains: save, restore, managed save (libvirt's qemu_saveimage.c).

A save pauses the guest, migrates it into a file (``migrate`` to ``fd:``, a descriptor the
agent opened and passed over QMP: QEMU runs sandboxed, without exec; at unlimited
bandwidth, followed by its ``MIGRATION`` events) and stops the QEMU:
``stopped(saved)``, state ``shutoff(saved)``. A restore starts QEMU with ``-incoming
defer``, feeds it the file (``migrate-incoming`` from ``fd:``, past the header) and resumes
it: ``started(restored)`` (then ``suspended(restored)`` when it stays paused).

The file is virtbus' own (libvirt's header is not kept): a magic line, the length of a
JSON header (the domain XML, whether it ran, the machine type), the header, then QEMU's
migration stream. A file that is not one, truncated, or made for another machine type is
a clear OPERATION_FAILED / INVALID_ARG, and the file is never removed by a failed restore.
A managed save is such a file in the state dir (``save/<uuid>.save``): ``start`` resumes
from it and removes it once the guest runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from drivers.qemu import events as ev
from drivers.qemu.domain import Domain, Run
from drivers.qemu.launch import Launcher
from drivers.qemu.registry import DomainRegistry
from drivers.qemu.settings import QemuSettings
from drivers.qemu.state import StateStore
from virtbus.domain import DomainDefinition, parse_domain_xml
from virtbus.errors import (
    InvalidArgument,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol.events import DomainState
from virtbus.store import sync_file

S = DomainState
MAGIC = b"VirtbusQemuSave1\n"
_LEN = struct.Struct(">I")
MAX_HEADER = 4 << 20
_DONE = frozenset({"completed", "failed", "cancelled"})
UNLIMITED = 1 << 53  # bytes/s: libvirt's "no limit" for a save
_EVENTS = {"capabilities": [{"capability": "events", "state": True}]}  # MIGRATION events


@dataclass(frozen=True, slots=True)
class SaveHeader:
    xml: str
    running: bool
    machine: str
    offset: int  # where QEMU's stream starts in the file


def write_header(path: Path, defn: DomainDefinition, running: bool) -> None:
    body = json.dumps({"xml": defn.to_xml(), "running": running,
                       "machine": defn.os.machine or ""}).encode()  # fmt: skip
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, MAGIC + _LEN.pack(len(body)) + body)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_header(path: Path) -> SaveHeader:
    """The header of a save file; INVALID_ARG for what is not one (or is cut short)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(MAGIC))
            if magic != MAGIC:
                raise InvalidArgument(f"'{path}' is not a virtbus save file")
            raw = fh.read(_LEN.size)
            if len(raw) != _LEN.size:
                raise InvalidArgument(f"save file '{path}' is truncated (in its header)")
            (size,) = _LEN.unpack(raw)
            if size > MAX_HEADER:
                raise InvalidArgument(f"save file '{path}' has a corrupt header")
            body = fh.read(size)
            if len(body) != size:
                raise InvalidArgument(f"save file '{path}' is truncated (in its header)")
            stream = fh.read(1)
    except OSError as exc:
        raise InvalidArgument(f"cannot read save file '{path}': {exc.strerror}") from None
    try:
        data = json.loads(body)
        header = SaveHeader(str(data["xml"]), bool(data["running"]), str(data["machine"]),
                            len(MAGIC) + _LEN.size + size)  # fmt: skip
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument(f"save file '{path}' has a corrupt header") from None
    if not stream:
        raise InvalidArgument(f"save file '{path}' is truncated: it holds no guest state")
    return header


class QemuSaves:
    """save/restore/managedsave of the QEMU driver (see module docstring)."""

    def __init__(self, registry: DomainRegistry, launcher: Launcher, store: StateStore,
                 settings: QemuSettings, save_dir: Path) -> None:  # fmt: skip
        self._registry = registry
        self._launcher = launcher
        self._store = store
        self._settings = settings
        self._dir = save_dir

    def managed_path(self, uuid: str) -> Path:
        return self._dir / f"{uuid}.save"

    def has_managed(self, uuid: str) -> bool:
        return self.managed_path(uuid).exists()

    # --- save -----------------------------------------------------------------------
    async def save(self, ref: str, file: Path, running: bool, paused: bool) -> None:
        dom = self._registry.get(ref)
        if not file.is_absolute():
            raise InvalidArgument(f"save file '{file}' must be an absolute path")
        if not await asyncio.to_thread(file.parent.is_dir):
            raise InvalidArgument(f"cannot save to '{file}': no directory {file.parent}")
        run = dom.require(S.RUNNING, S.PAUSED, verb="save")
        await self._launcher.confine_file(run.live, str(file), "save file")
        was_running = dom.state == S.RUNNING
        keep_running = (was_running or running) and not paused
        run.pending.add(ev.Pending.SAVE)
        try:
            if was_running:
                await dom.execute(run, "stop")
                await dom.wait(run, lambda: dom.state == S.PAUSED, "save")
            await self.write_image(dom, run, file, keep_running, "save")
        except BaseException:
            run.pending.discard(ev.Pending.SAVE)
            if dom.run is run and was_running and dom.state == S.PAUSED:
                await dom.execute(run, "cont")  # as libvirt: a failed save resumes the guest
                await dom.wait(run, lambda: dom.state == S.RUNNING, "save")
            raise
        run.pending |= {ev.Pending.DESTROY, ev.Pending.SAVED}  # its exit: stopped(saved)
        await dom.stop_process(run)
        await dom.wait_ended(run)

    async def write_image(self, dom: Domain, run: Run, file: Path, running: bool,
                          what: str) -> None:  # fmt: skip
        """Write the paused guest's state into ``file`` (confined by the caller): the
        header (the live definition, ``running`` for a restore), then QEMU's migration
        stream. QEMU stays paused; ``file`` is removed when this fails. Used by save and
        by external snapshots with memory, so that ``restore`` loads what either wrote."""
        try:
            await asyncio.to_thread(write_header, file, run.live, running)
            await dom.execute(run, "migrate-set-capabilities", _EVENTS)
            await dom.execute(run, "migrate-set-parameters", {"max-bandwidth": UNLIMITED})
            run.migration_state = None
            await _pass_file(dom, run, file, os.O_WRONLY | os.O_APPEND, 0, "virtbus-save")
            await dom.execute(run, "migrate", {"uri": "fd:virtbus-save"})
            await self._wait_stream(dom, run, what)
            # On disk before a save's QEMU goes or a snapshot is recorded (as libvirt's
            # iohelper's fdatasync): a host lost after "saved" must not find a save file
            # whose stream is cut short.
            await asyncio.to_thread(sync_file, file)
        except BaseException:
            if dom.run is run and run.migration_state not in _DONE:
                with contextlib.suppress(VirtbusError):  # a timed-out stream (--live) stops
                    await dom.execute(run, "migrate_cancel")
            await asyncio.to_thread(file.unlink, missing_ok=True)
            raise

    async def _wait_stream(self, dom: Domain, run: Run, what: str) -> None:
        """Until QEMU's MIGRATION event says the stream ended; its error raised."""
        try:
            await dom.wait(run, lambda: run.migration_state in _DONE, what,
                           timeout=self._settings.snapshot_timeout)  # fmt: skip
        except OperationTimeout:
            raise OperationTimeout(
                f"{what} of '{dom.defn.name}' did not finish in {self._settings.snapshot_timeout}s"
            ) from None
        if dom.run is not run:
            raise OperationFailed(f"QEMU of '{dom.defn.name}' exited during the {what}")
        if run.migration_state != "completed":
            detail = ""
            try:
                info = await dom.execute(run, "query-migrate")
                detail = f": {info.get('error-desc', '')}" if isinstance(info, dict) else ""
            except VirtbusError:
                pass
            raise OperationFailed(
                f"{what} of '{dom.defn.name}' ended {run.migration_state}{detail}"
            )

    # --- restore ---------------------------------------------------------------------
    async def restore(self, file: Path, running: bool, paused: bool) -> Domain:
        """Restore a save file into its domain (defined from the file when this host does
        not know it); the file is kept whatever happens."""
        if not file.is_absolute():
            raise InvalidArgument(f"save file '{file}' must be an absolute path")
        header = await asyncio.to_thread(read_header, file)
        defn = parse_domain_xml(header.xml)
        await self._launcher.confine_file(defn, str(file), "save file")
        dom = self._registry.by_uuid(defn.uuid)
        if dom is None:
            self._registry.check_free(defn)
            await self._launcher.complete(defn)
            await self._store.save_definition(defn)
            dom = self._registry.add(defn)
            dom.emit("defined", "added")
        elif dom.run is not None or dom.state != S.SHUTOFF:
            raise OperationInvalid(f"domain '{dom.defn.name}' is already active")
        if dom.defn.os.machine and header.machine and dom.defn.os.machine != header.machine:
            raise InvalidArgument(
                f"save file '{file}' was made for machine type {header.machine}; domain"
                f" '{dom.defn.name}' now has {dom.defn.os.machine}"
            )
        start_paused = paused or (not header.running and not running)
        await self._start_from(dom, parse_domain_xml(header.xml), file, header, start_paused)
        return dom

    async def _start_from(self, dom: Domain, live: DomainDefinition, file: Path,
                          header: SaveHeader, start_paused: bool) -> None:  # fmt: skip
        name = dom.defn.name

        def failure(detail: str) -> OperationFailed:
            return OperationFailed(
                f"cannot restore domain '{name}' from '{file}' (the file is kept): {detail}"
            )

        async with self._launcher.launch(
            dom, live, pending=ev.Pending.START, reason="restored", incoming="defer",
            failure=failure,
        ) as launched:  # fmt: skip
            run = launched.run
            run.pending.add(ev.Pending.RESTORE)
            try:
                await dom.execute(run, "migrate-set-capabilities", _EVENTS)
                run.migration_state = None
                await _pass_file(dom, run, file, os.O_RDONLY, header.offset, "virtbus-restore")
                await dom.execute(run, "migrate-incoming", {"uri": "fd:virtbus-restore"})
                await self._wait_stream(dom, run, "restore")
                await dom.come_up(run, start_paused, "restored", "restore", paused_reason="unknown")
            finally:
                run.pending.discard(ev.Pending.RESTORE)
            await dom.save_status(run)

    # --- managed save ------------------------------------------------------------------
    async def managed_save(self, ref: str, running: bool, paused: bool) -> None:
        dom = self._registry.get(ref)
        self._dir.mkdir(parents=True, exist_ok=True)
        await self.save(ref, self.managed_path(dom.defn.uuid), running, paused)

    async def managed_remove(self, ref: str) -> None:
        dom = self._registry.get(ref)
        path = self.managed_path(dom.defn.uuid)
        if not path.exists():
            raise OperationInvalid(f"domain '{dom.defn.name}' has no managed save image")
        path.unlink()

    async def start_managed(self, dom: Domain, paused: bool) -> bool:
        """``start`` of a domain with a managed save: restore it, then drop the file
        (kept when the restore fails). False when there is none."""
        path = self.managed_path(dom.defn.uuid)
        if not path.exists():
            return False
        header = await asyncio.to_thread(read_header, path)
        await self._start_from(dom, parse_domain_xml(header.xml), path, header,
                               paused or not header.running)  # fmt: skip
        path.unlink(missing_ok=True)
        return True


async def _pass_file(dom: Domain, run: Run, path: Path, flags: int, offset: int, name: str) -> None:
    """Open ``path`` here (the agent's permissions, confined above) at ``offset`` and hand
    the descriptor to QEMU: its sandbox forbids exec: migration and maybe the file."""
    fd = await asyncio.to_thread(os.open, path, flags | os.O_CLOEXEC)
    try:
        if offset:
            os.lseek(fd, offset, os.SEEK_SET)
        if run.monitor is None:
            raise OperationFailed(f"the monitor of '{dom.defn.name}' is reconnecting")
        await run.monitor.pass_fd(fd, name)
    finally:
        os.close(fd)
