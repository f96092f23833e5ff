"""``xl migrate`` as a supervised job, and the destination URI the driver advertises.

xl does the whole migration in one command (suspend, stream, rename, unpause at the
destination), so the libvirt-style begin/prepare/perform/finish/confirm steps map onto
it like this: prepare advertises ``xen+ssh://<host>``; perform runs
``xl migrate -s <transport> <domid> <host>`` in the background; status follows the job;
finish/confirm settle the bookkeeping on each side. The transport is a setting: ``ssh``
between hosts, ``""`` to run ``<host>`` itself as the receiver command (localhost:
``xl migrate-receive``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from drivers.xen.xl import Xl
from virtbus.errors import InvalidArgument, VirtbusError
from virtbus.protocol.migration import MigrationState, MigrationStatus

SCHEME = "xen+ssh"


def make_uri(host: str) -> str:
    return f"{SCHEME}://{quote(host, safe='')}"


def parse_uri(uri: str) -> str:
    """The receiver host (or command) from ``xen+ssh://<host>``."""
    parts = urlsplit(uri)
    if parts.scheme != SCHEME or not parts.netloc:
        raise InvalidArgument(f"not a xen migration URI: {uri!r} (want {SCHEME}://HOST)")
    return unquote(parts.netloc)


@dataclass
class MigrationJob:
    """One ``xl migrate`` run in the background."""

    domid: int
    host: str
    started: float = field(default_factory=time.monotonic)
    status: str = "setup"
    error: str | None = None
    finished: float | None = None
    task: asyncio.Task[None] | None = None

    async def run(self, xl: Xl, ssh: str, timeout: float) -> None:
        self.status = "active"
        try:
            await xl.migrate(self.domid, self.host, ssh, timeout)
            self.status = "completed"
        except VirtbusError as exc:
            # xl's last line ("Migration failed, failed to suspend at sender.") says where;
            # libxl's own error lines before it say why, as libvirt's libxl driver reports
            why = [ln.strip() for ln in getattr(exc, "stderr", "").splitlines() if "error" in ln]
            self.status, self.error = "failed", "; ".join([exc.message, *why[:3]])
        except asyncio.CancelledError:
            self.status = "cancelled"
            raise
        finally:
            self.finished = time.monotonic()

    def to_status(self) -> MigrationStatus:
        end = self.finished if self.finished is not None else time.monotonic()
        return MigrationStatus(
            status=MigrationState.parse(self.status),
            total_time_ms=int((end - self.started) * 1000),
            error=self.error,
        )
