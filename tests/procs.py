"""Real processes for tests: ``virtbus-agent``, ``virtbus-scheduler`` and the ``virtbus`` CLI,
as users run them (no virtbus import here: tests of raw clients use it too)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika

if TYPE_CHECKING:
    from drivers.qemu.settings import QemuSettings

BUS_URL = os.environ.get("VIRTBUS_TEST_BUS_URL", "amqp://guest:guest@127.0.0.1:5672/")
BIN = Path(sys.executable).parent
VIRTBUS = (
    [str(BIN / "virtbus")]
    if (BIN / "virtbus").exists()
    else [sys.executable, "-m", "virtbus.cli.main"]
)
AGENT = (
    [str(BIN / "virtbus-agent")]
    if (BIN / "virtbus-agent").exists()
    else [sys.executable, "-m", "agent"]
)


def unique_host(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def cli(*args: str, bus: str = BUS_URL, timeout: float = 30.0) -> CliResult:
    """Run ``virtbus --bus BUS ARGS...`` to completion."""
    proc = await asyncio.create_subprocess_exec(
        *VIRTBUS,
        "--bus",
        bus,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return CliResult(proc.returncode or 0, out.decode(), err.decode())


@dataclass
class AgentProc:
    host: str
    proc: asyncio.subprocess.Process
    state_dir: Path


def qemu_allowed_dirs(*dirs: Path) -> tuple[Path, ...]:
    """The directories a test's QEMU domains may name files in (path confinement,
    drivers/qemu/confine.py): the test guests' cache (kernels, images) and ``dirs``."""
    from virtbus.guests.build import default_cache_root  # only tests of QEMU need it

    return (default_cache_root(), *dirs)


def qemu_test_settings(base: Path, **fields: Any) -> QemuSettings:
    """QEMU driver settings for a test whose files live under ``base``'s parent (see
    :func:`qemu_allowed_dirs`); ``fields`` are further settings."""
    from drivers.qemu.settings import QemuSettings

    return QemuSettings(allowed_dirs=qemu_allowed_dirs(base.parent), **fields)


@asynccontextmanager
async def agent_process(
    host: str,
    state_dir: Path,
    *extra: str,
    driver: str = "test",
    bus: str = BUS_URL,
    keep_queue: bool = False,
    allowed_dirs: tuple[Path, ...] | None = None,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
) -> AsyncIterator[AgentProc]:
    """A real agent process (``env``: extra environment variables); stopped with SIGTERM
    and its queue deleted. A SIGTERM exit other than 0 fails the test (unless the test
    already failed): the README promises a clean stop.

    A QEMU agent's domains may name files in ``allowed_dirs``, by default the guest cache
    and the parent of ``state_dir`` (where the tests put disks, serial logs and sockets).
    Its log goes to ``log_dir`` (default: the state dir).
    """
    if driver == "qemu":
        dirs = qemu_allowed_dirs(state_dir.parent) if allowed_dirs is None else allowed_dirs
        extra = ("--driver-option", "allowed_dirs=" + ":".join(map(str, dirs)), *extra)
    log = open((log_dir or state_dir) / f"agent-{host}.log", "ab")  # noqa: SIM115  # closed below; tiny local file
    proc = await asyncio.create_subprocess_exec(
        *AGENT,
        "--host",
        host,
        "--driver",
        driver,
        "--state-dir",
        str(state_dir),
        "--bus",
        bus,
        "--heartbeat-interval",
        "0.5",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        env={**os.environ, **env} if env else None,
    )
    failed = False
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"ready" in line, f"agent did not start: {line!r}"
        yield AgentProc(host, proc, state_dir)
    except BaseException:
        failed = True
        raise
    finally:
        code = await terminate(proc)
        log.close()
        if not keep_queue:
            await delete_queues(f"virtbus.agent.{host}")
    if code not in (None, 0) and not failed:
        raise AssertionError(f"agent {host} exited {code} after SIGTERM (see {log.name})")


async def terminate(proc: asyncio.subprocess.Process, grace: float = 20.0) -> int | None:
    """SIGTERM and wait: the exit code, or None when the process had already exited (a
    test killed it) or had to be killed after ``grace`` (then the code is -9, a failure)."""
    if proc.returncode is not None:
        return None
    proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        proc.kill()
        return await proc.wait()


async def delete_queues(*names: str) -> None:
    conn = await aio_pika.connect(BUS_URL)
    async with conn:
        for name in names:
            ch = await conn.channel()
            with suppress(aio_pika.exceptions.AMQPError):
                await ch.queue_delete(name)


async def fresh_journal(bus: str) -> None:
    """Delete the scheduler journal stream of ``bus``'s vhost. The journal lives on the bus
    (scheduler/journal.py): a module's tests share a vhost, and a record one test left in
    flight would be taken over by the next test's scheduler, as a standby would."""
    from virtbus.bus.topology import JOURNAL_QUEUE  # lazily: raw-client tests use this file

    conn = await aio_pika.connect(bus)
    async with conn:
        ch = await conn.channel()
        with suppress(aio_pika.exceptions.AMQPError):
            await ch.queue_delete(JOURNAL_QUEUE)


@asynccontextmanager
async def event_listener(
    *args: str, bus: str = BUS_URL
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``virtbus --json event ARGS`` running until its --count is reached; ready when yielded."""
    proc = await asyncio.create_subprocess_exec(
        *VIRTBUS,
        "--bus",
        bus,
        "--json",
        "event",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 20)
        assert b"listening" in line, line
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


SCHEDULER = (
    [str(BIN / "virtbus-scheduler")]
    if (BIN / "virtbus-scheduler").exists()
    else [sys.executable, "-m", "scheduler"]
)


@asynccontextmanager
async def scheduler_process(
    state_dir: Path,
    *extra: str,
    bus: str = BUS_URL,
    new_cluster: bool | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real scheduler (short host-down and step timeouts; ``extra`` options come after
    them and win); stopped with SIGTERM (an exit other than 0 fails the test, unless the
    test killed it). Give it a vhost of its own: the scheduler queue has a single active
    consumer. ``new_cluster`` (default: the state dir is new) drops the journal on the bus
    first (see :func:`fresh_journal`). ``proc.scheduler_id`` is the id it printed."""
    if new_cluster is None:
        new_cluster = not state_dir.exists()
    if new_cluster:
        await fresh_journal(bus)
    state_dir.mkdir(parents=True, exist_ok=True)
    log = open(state_dir / "scheduler.log", "ab")  # noqa: SIM115  # closed below; tiny local file
    proc = await asyncio.create_subprocess_exec(
        *SCHEDULER, "--bus", bus, "--state-dir", str(state_dir), "--host-down-after", "3",
        "--step-timeout", "5", "--cleanup-timeout", "5", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=log, env={**os.environ, **env} if env else None,
    )  # fmt: skip
    failed = False
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"ready" in line, f"scheduler did not start: {line!r}"
        proc.scheduler_id = line.split()[1].decode()  # type: ignore[attr-defined]
        yield proc
    except BaseException:
        failed = True
        raise
    finally:
        code = await terminate(proc)
        log.close()
    if code not in (None, 0) and not failed:  # SIGTERM is a clean stop: exit 0
        raise AssertionError(f"scheduler exited {code} after SIGTERM (see {log.name})")


@contextmanager
def private_vhost(name: str) -> Iterator[str]:
    """A RabbitMQ vhost of its own (rabbitmqctl), deleted afterwards: its URL."""

    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)

    ctl("add_vhost", name)
    try:
        ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        ctl("delete_vhost", name)
