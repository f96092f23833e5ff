"""``xl`` as an asyncio subprocess under timeouts, and parsers for what it prints.

Domains are addressed by domid (never by name: names change during a migration, and a
rebooted domain gets a new domid but keeps its uuid). ``xl list -v`` is the one source of
live state: it has the uuid, the state letters ``r b p s <reason> d`` and the reason code.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from virtbus.errors import OperationFailed, OperationTimeout

# xl's shutdown_reason_letters: index = libxl shutdown reason
REASON_LETTERS = "-rscwS"
REASONS = ("poweroff", "reboot", "suspend", "crash", "watchdog", "soft_reset")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_STATE = re.compile(r"^[r-][b-][p-][s-][-rscwS?][d-]$")


class XlError(OperationFailed):
    """An xl command failed; ``stderr`` holds what it said."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class XlDomain:
    """One row of ``xl list -v``."""

    name: str
    domid: int
    mem_mib: int
    vcpus: int
    state: str  # six letters, e.g. "-b----", "---sc-"
    cpu_time_s: float
    uuid: str
    reason_code: int | None  # libxl shutdown reason while shut down, else None

    @property
    def running(self) -> bool:
        return self.state[0] == "r"

    @property
    def blocked(self) -> bool:
        return self.state[1] == "b"

    @property
    def paused(self) -> bool:
        return self.state[2] == "p"

    @property
    def shutdown(self) -> bool:
        return self.state[3] == "s"

    @property
    def dying(self) -> bool:
        return self.state[5] == "d"

    @property
    def shutdown_reason(self) -> str | None:
        """poweroff, reboot, suspend, crash, watchdog, soft_reset (None while not shut down)."""
        if not self.shutdown:
            return None
        if self.reason_code is not None and 0 <= self.reason_code < len(REASONS):
            return REASONS[self.reason_code]
        idx = REASON_LETTERS.find(self.state[4])
        return REASONS[idx] if idx >= 0 else None


def parse_list_verbose(text: str) -> list[XlDomain]:
    """Parse ``xl list -v``. Rows are read from the uuid outwards, so names with spaces
    parse too; a row that does not fit is a :class:`XlError` (xl changed format)."""
    rows: list[XlDomain] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("Name"):
            continue
        tokens = line.split()
        at = next((i for i, t in enumerate(tokens) if _UUID.match(t)), -1)
        if at < 6:
            raise XlError(f"unexpected `xl list -v` row: {line!r}")
        name_tokens = tokens[: at - 5]
        domid, mem, vcpus, state, cpu = tokens[at - 5 : at]
        if not name_tokens or not _STATE.match(state):
            raise XlError(f"unexpected `xl list -v` row: {line!r}")
        reason = tokens[at + 1] if len(tokens) > at + 1 else "-"
        try:
            rows.append(
                XlDomain(
                    name=" ".join(name_tokens),
                    domid=int(domid),
                    mem_mib=int(mem),
                    vcpus=int(vcpus),
                    state=state,
                    cpu_time_s=float(cpu),
                    uuid=tokens[at],
                    reason_code=None if reason == "-" else int(reason),
                )
            )
        except ValueError:
            raise XlError(f"unexpected `xl list -v` row: {line!r}") from None
    return rows


def parse_info(text: str) -> dict[str, str]:
    """``xl info``: ``key : value`` lines."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


class Xl:
    """Runs ``xl``; every call has a timeout and a failure carries xl's stderr."""

    def __init__(self, path: str = "xl", timeout: float = 60.0) -> None:
        self._path = path
        self._timeout = timeout

    async def run(self, *args: str, timeout: float | None = None) -> str:
        limit = self._timeout if timeout is None else timeout
        try:
            proc = await asyncio.create_subprocess_exec(
                self._path,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise XlError(f"cannot run {self._path}: {exc}") from exc
        try:
            async with asyncio.timeout(limit):
                out, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise OperationTimeout(f"xl {' '.join(args)} timed out after {limit} s") from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        stderr = err.decode(errors="replace").strip()
        if proc.returncode != 0:
            last = stderr.splitlines()[-1] if stderr else f"exit status {proc.returncode}"
            raise XlError(f"xl {args[0]} failed: {last}", stderr)
        return out.decode(errors="replace")

    async def list_verbose(self, timeout: float | None = None) -> list[XlDomain]:
        return parse_list_verbose(await self.run("list", "-v", timeout=timeout))

    async def info(self, timeout: float | None = None) -> dict[str, str]:
        return parse_info(await self.run("info", timeout=timeout))

    async def create(self, config_path: str, overrides: Sequence[str] = ()) -> None:
        await self.run("create", config_path, *overrides)

    async def shutdown(self, domid: int) -> None:
        await self.run("shutdown", str(domid))

    async def reboot(self, domid: int) -> None:
        await self.run("reboot", str(domid))

    async def destroy(self, domid: int) -> None:
        await self.run("destroy", str(domid))

    async def pause(self, domid: int) -> None:
        await self.run("pause", str(domid))

    async def unpause(self, domid: int) -> None:
        await self.run("unpause", str(domid))

    async def trigger_reset(self, domid: int) -> None:
        await self.run("trigger", str(domid), "reset")

    async def migrate(self, domid: int, host: str, ssh: str, timeout: float) -> None:
        """``xl migrate -s <ssh> <domid> <host>``: ``ssh=""`` runs ``host`` as the receiver."""
        await self.run("migrate", "-s", ssh, str(domid), host, timeout=timeout)
