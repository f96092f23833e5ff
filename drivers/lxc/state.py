"""The LXC driver's files: one directory per container under the driver's LXCPATH.

``<lxcpath>/<name>/``:

- ``domain.xml``: the persistent definition (durable: fsync, rename);
- ``config``: the lxc config generated at each start (what ``lxc-* -P`` reads);
- ``run.json``: the run status (state, reason, what the driver asked for, the live
  definition), from which a restarted agent reattaches; atomic but not fsynced: it
  describes processes that die with the host;
- ``autostart``: present when the container starts with the agent (once per boot);
- ``console.log``, ``lxc.log``, ``monitor.pid``: lxc's own.

A file that does not parse is set aside with :func:`virtbus.store.quarantine`, never
fatal to the agent or to the container it describes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles.os

from drivers.lxc.events import Intent
from virtbus.protocol.events import DomainState
from virtbus.store import atomic_write, read_bytes

STATUS_VERSION = 1


@dataclass(slots=True)
class RunStatus:
    uuid: str
    state: DomainState
    reason: str
    intents: tuple[Intent, ...] = ()
    live_xml: str | None = None  # while active: the definition it runs with
    init_pid: int | None = None
    init_started: int | None = None  # /proc/<pid>/stat start time: same process?
    oom_kills: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of newer versions, kept

    def to_json(self) -> bytes:
        return json.dumps(
            {
                **self.extra,
                "version": STATUS_VERSION,
                "uuid": self.uuid,
                "state": self.state.label,
                "reason": self.reason,
                "intents": [i.value for i in self.intents],
                "init_pid": self.init_pid,
                "init_started": self.init_started,
                "oom_kills": self.oom_kills,
                "live_xml": self.live_xml,
            },
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RunStatus:
        """ValueError/KeyError/TypeError when it is not a status document."""
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        labels = {s.label: s for s in DomainState}
        known = {"version", "uuid", "state", "reason", "intents", "init_pid", "init_started",
                 "oom_kills", "live_xml"}  # fmt: skip
        return cls(
            uuid=str(doc["uuid"]),
            state=labels[str(doc["state"])],
            reason=str(doc.get("reason", "unknown")),
            intents=tuple(Intent(i) for i in doc.get("intents") or ()),
            live_xml=str(doc["live_xml"]) if doc.get("live_xml") else None,
            init_pid=int(doc["init_pid"]) if doc.get("init_pid") else None,
            init_started=int(doc["init_started"]) if doc.get("init_started") else None,
            oom_kills=int(doc["oom_kills"]) if doc.get("oom_kills") is not None else None,
            extra={k: v for k, v in doc.items() if k not in known},
        )


class ContainerFiles:
    """Paths of one container's directory (see module docstring)."""

    def __init__(self, lxcpath: Path, name: str) -> None:
        self.dir = lxcpath / name

    @property
    def definition(self) -> Path:
        return self.dir / "domain.xml"

    @property
    def config(self) -> Path:
        return self.dir / "config"

    @property
    def status(self) -> Path:
        return self.dir / "run.json"

    @property
    def autostart(self) -> Path:
        return self.dir / "autostart"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def lxc_log(self) -> Path:
        return self.dir / "lxc.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "monitor.pid"

    async def save_definition(self, xml: str) -> None:
        await aiofiles.os.makedirs(self.dir, exist_ok=True)
        await atomic_write(self.definition, xml.encode())

    async def write_config(self, text: str) -> None:
        await atomic_write(self.config, text.encode(), fsync=False)

    async def write_status(self, status: RunStatus) -> None:
        await atomic_write(self.status, status.to_json(), fsync=False)

    async def read_status(self) -> bytes | None:
        return await read_bytes(self.status)

    async def remove(self) -> None:
        """Everything of the container (its root filesystem lives elsewhere)."""
        await aiofiles.os.wrap(shutil.rmtree)(self.dir, ignore_errors=True)

    async def set_autostart(self, enabled: bool) -> None:
        if enabled:
            await atomic_write(self.autostart, b"", fsync=True)
        elif await aiofiles.os.path.exists(self.autostart):
            await aiofiles.os.remove(self.autostart)

    def has_autostart(self) -> bool:
        return os.path.exists(self.autostart)
