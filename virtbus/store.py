"""Files that must survive a crash: atomic replacement, quarantine, append-only record logs.

All I/O goes through aiofiles (a thread) so the event loop never waits on the disk.

- :func:`atomic_write`: temp file, fsync, rename, fsync of the directory — a reader sees
  the old file or the new one, never half of one.
- :func:`quarantine`: a corrupt file is renamed aside (``NAME.corrupt-<time>``) and
  reported, never deleted and never fatal.
- :class:`RecordLog`: msgpack records with a length prefix, appended in batches (group
  commit). A torn tail — the agent died mid-write — is cut off at load with a warning.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import msgpack

from virtbus.errors import ProtocolError
from virtbus.protocol.codec import DecodeLimits, decode_payload

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
RECORD_LIMITS = DecodeLimits(max_bytes=8 * 1024 * 1024, max_depth=32)


def replace_file(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (and with ``fsync``, durably): the one
    implementation of it, for code that already runs in a worker thread.

    Without ``fsync`` the replacement is still atomic for a crashed process (a reader sees
    the old file or the new one) but a lost host may lose it: for records that only need
    to survive the agent (status files, job records, volume metadata rebuilt by a refresh).
    """
    # a name of its own per write (mode 0600): two threads replacing the same file at
    # once must not share a temp file (one renamed the other's away: FileNotFoundError)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(name)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by its path (for code in a worker thread)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: Path) -> None:
    """Make a file someone else wrote (QEMU, through a descriptor we passed) durable: its
    data, then its directory entry. For code that already runs in a worker thread."""
    fsync_path(path)
    fsync_path(path.parent)


async def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """:func:`replace_file` off the event loop (one thread hop)."""
    await asyncio.to_thread(replace_file, path, data, fsync=fsync)


class SnapshotFile:
    """One file rewritten whole from in-memory state that several tasks change: writes go
    one at a time and each serialises the state when its turn comes, so an older snapshot
    never lands after a newer one (a plain ``atomic_write`` of data taken before the
    thread hop can)."""

    __slots__ = ("_fsync", "_lock", "path")

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path, self._fsync, self._lock = path, fsync, asyncio.Lock()

    async def write(self, render: Callable[[], bytes]) -> None:
        async with self._lock:
            await asyncio.to_thread(replace_file, self.path, render(), fsync=self._fsync)


async def read_bytes(path: Path) -> bytes | None:
    """The file's content, or None when it does not exist."""
    try:
        async with aiofiles.open(path, "rb") as fh:
            data: bytes = await fh.read()
    except FileNotFoundError:
        return None
    return data


def _read_or_error(path: Path) -> bytes | OSError | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc


async def read_many(paths: Iterable[Path]) -> list[bytes | OSError | None]:
    """Each file's content (None when it does not exist, the OSError when it cannot be
    read), all in one thread: an agent start reads a file per domain twice, and a thread
    round trip each (aiofiles: three) cost more than the reads."""
    todo = list(paths)
    return await asyncio.to_thread(lambda: [_read_or_error(path) for path in todo])


async def quarantine(path: Path, reason: str) -> Path | None:
    """Set a corrupt file aside (renamed, kept for a human) and say so."""
    target = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        await aiofiles.os.replace(path, target)
    except FileNotFoundError:
        return None
    log.warning("set aside corrupt %s as %s: %s", path, target.name, reason)
    return target


def encode_record(record: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(record, use_bin_type=True)
    return _LENGTH.pack(len(data)) + data


def decode_records(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Records in ``data`` and the length of the valid prefix (a torn tail is left out)."""
    records: list[dict[str, Any]] = []
    pos = 0
    while pos + _LENGTH.size <= len(data):
        (size,) = _LENGTH.unpack_from(data, pos)
        end = pos + _LENGTH.size + size
        if size > RECORD_LIMITS.max_bytes or end > len(data):
            break
        try:
            record = decode_payload(data[pos + _LENGTH.size : end], RECORD_LIMITS)
        except ProtocolError:
            break
        if not isinstance(record, dict):
            break
        records.append(record)
        pos = end
    return records, pos


class RecordLog:
    """An append-only file of msgpack maps; ``load`` first, then ``append``/``rewrite``.

    The file stays open (``O_APPEND``) and each batch is one ``os.write`` (plus ``fsync``
    when asked) in a worker thread: one thread hop per batch, whatever its size.
    """

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self._fsync = fsync
        self._fd: int | None = None
        self.records_on_disk = 0

    async def load(self) -> list[dict[str, Any]]:
        await aiofiles.os.makedirs(self.path.parent, exist_ok=True)
        data = await read_bytes(self.path)
        records, valid = decode_records(data or b"")
        if data and valid < len(data):
            log.warning(
                "%s: cut a torn or corrupt tail of %d bytes after %d records",
                self.path,
                len(data) - valid,
                len(records),
            )
            await self.rewrite(records)
        self.records_on_disk = len(records)
        return records

    def _write(self, data: bytes, fsync: bool) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        if fsync:
            os.fsync(self._fd)

    async def append(self, records: Iterable[dict[str, Any]], *, fsync: bool | None = None) -> None:
        """Append a batch; ``fsync`` overrides the log's default for this batch."""
        batch = [encode_record(r) for r in records]
        if batch:
            sync = self._fsync if fsync is None else fsync
            await asyncio.to_thread(self._write, b"".join(batch), sync)
            self.records_on_disk += len(batch)

    async def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the whole log (compaction) atomically."""
        await atomic_write(self.path, b"".join(encode_record(r) for r in records))
        self.close()  # the next append opens the new file
        self.records_on_disk = len(records)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
