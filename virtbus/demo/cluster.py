"""The demo's two agents and scheduler: in this process (memory://) or as processes (AMQP).

This is the composition root docs/architecture.md allows: the only module under ``virtbus/`` that
imports ``agent``, ``drivers`` and ``scheduler``. Both clusters share one duty beyond
starting things: leave nothing behind. ``stop()`` destroys every guest the demo's agents
hold (an agent stopping leaves guests running, by design), stops the daemons, and as a
last resort kills QEMU processes whose command line names the demo's own temp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.drivers import make_driver
from agent.service import AgentService
from scheduler.service import SchedulerService
from scheduler.settings import SchedulerSettings
from virtbus.bus.base import Bus
from virtbus.bus.factory import open_bus
from virtbus.errors import VirtbusError
from virtbus.protocol import ops
from virtbus.settings import AgentSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """The demo's timings: quick heartbeats so the scheduler sees both hosts within a second."""

    hosts: tuple[str, str] = ("host-a", "host-b")
    heartbeat_interval: float = 0.5
    metrics_interval: float = 30.0
    host_down_after: float = 3.0
    test_migration_time: float = 2.0  # s: the test driver's migration, long enough to watch
    start_timeout: float = 30.0  # a daemon process must say "ready" within this
    stop_timeout: float = 15.0  # SIGTERM, then SIGKILL
    destroy_timeout: float = 20.0  # per guest at clean-up


def driver_options(driver: str, settings: DemoSettings) -> dict[str, str]:
    """The test driver's migration time; the QEMU driver lets the demo guest use the guest
    cache (its kernel and initrd live there, outside any storage pool)."""
    if driver == "qemu":
        from virtbus.guests.build import default_cache_root

        return {"allowed_dirs": str(default_cache_root())}
    return {"migration_time": str(settings.test_migration_time)} if driver == "test" else {}


class InProcessCluster:
    """Agents and scheduler as objects in this process, on a memory:// bus."""

    def __init__(self, url: str, root: Path, driver: str, settings: DemoSettings) -> None:
        self.url, self.root, self.driver, self.settings = url, root, driver, settings
        self.agents: list[AgentService] = []
        self.scheduler: SchedulerService | None = None

    async def start(self) -> None:
        for host in self.settings.hosts:
            cfg = AgentSettings(
                host=host,
                driver=self.driver,
                state_dir=self.root / host[-1],  # short paths: sockets live below
                heartbeat_interval=self.settings.heartbeat_interval,
                metrics_interval=self.settings.metrics_interval,
                driver_options=driver_options(self.driver, self.settings),
            )
            cfg.runtime_dir.mkdir(parents=True, exist_ok=True)
            agent = AgentService(cfg, open_bus(self.url, src=host), make_driver(cfg))
            self.agents.append(agent)
            await agent.start()
        sched = SchedulerSettings(
            state_dir=self.root / "s",
            host_down_after=self.settings.host_down_after,
            progress_poll=0.2,
            leader_probe=0.2,
        )
        self.scheduler = SchedulerService(sched, open_bus(self.url, src="scheduler"))
        await self.scheduler.start()

    async def stop(self) -> None:
        for agent in self.agents:  # guests first: a stopped agent leaves them running
            with contextlib.suppress(VirtbusError, OSError):
                for info in await agent.driver.list_domains(include_inactive=True):
                    await _quietly(agent.driver.destroy(info.uuid), self.settings)
        if self.scheduler is not None:
            await self.scheduler.stop()
        for agent in reversed(self.agents):
            await agent.stop()
        kill_qemus_under(self.root)


class ProcessCluster:
    """``virtbus-agent`` and ``virtbus-scheduler`` processes on a real broker."""

    def __init__(self, url: str, root: Path, driver: str, settings: DemoSettings) -> None:
        self.url, self.root, self.driver, self.settings = url, root, driver, settings
        self.procs: list[tuple[str, asyncio.subprocess.Process]] = []
        self.logs: list[Any] = []

    async def _spawn(self, name: str, *argv: str) -> None:
        log_file = open(self.root / f"{name}.log", "ab")  # noqa: SIM115, ASYNC230  # tiny, closed in stop()
        self.logs.append(log_file)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, "--bus", self.url, "--log-level", "WARNING",
            stdout=asyncio.subprocess.PIPE, stderr=log_file, start_new_session=True,
        )  # fmt: skip
        self.procs.append((name, proc))
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self.settings.start_timeout)
        except TimeoutError:
            line = b""
        if b"ready" not in line:
            tail = (self.root / f"{name}.log").read_text(errors="replace")[-400:]
            raise RuntimeError(f"{name} did not start (log {self.root}/{name}.log):\n{tail}")

    async def start(self) -> None:
        for host in self.settings.hosts:
            state = self.root / host[-1]
            options = [f"--driver-option={k}={v}" for k, v in
                       driver_options(self.driver, self.settings).items()]  # fmt: skip
            await self._spawn(
                host, "-m", "agent", "--host", host, "--driver", self.driver,
                "--state-dir", str(state), "--heartbeat-interval",
                str(self.settings.heartbeat_interval), "--metrics-interval",
                str(self.settings.metrics_interval), *options,
            )  # fmt: skip
        await self._spawn(
            "scheduler", "-m", "scheduler", "--state-dir", str(self.root / "s"),
            "--host-down-after", str(self.settings.host_down_after),
        )  # fmt: skip

    async def destroy_guests(self, bus: Bus) -> None:
        """Every guest on the demo's hosts destroyed and undefined, through the agents."""
        for host in self.settings.hosts:
            route = ops.agent_route(host)
            try:
                found = await bus.call(route, ops.DOMAIN_LIST, {"all": True}, timeout=5)
            except VirtbusError:
                continue
            for d in found["domains"]:
                for op in ((ops.DOMAIN_DESTROY,) if d["state"] != "shutoff" else ()) + (
                    ops.DOMAIN_UNDEFINE,
                ):
                    await _quietly(
                        bus.call(route, op, {"domain": d["uuid"]}, timeout=15), self.settings
                    )

    async def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for _name, proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), self.settings.stop_timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for f in self.logs:
            f.close()
        kill_qemus_under(self.root)
        await delete_agent_queues(self.url, self.settings.hosts)


async def _quietly(step: Any, settings: DemoSettings) -> None:
    """One clean-up step; a failure is logged, never stops the rest of the clean-up."""
    try:
        await asyncio.wait_for(step, settings.destroy_timeout)
    except (VirtbusError, OSError, TimeoutError) as exc:
        log.debug("clean-up step failed: %s", exc)


async def delete_agent_queues(url: str, hosts: tuple[str, ...]) -> None:
    """The agents' durable queues outlive them: the demo removes its own from the broker."""
    import aio_pika  # only the AMQP demo gets here

    try:
        conn = await aio_pika.connect(url, timeout=5)
    except (OSError, aio_pika.exceptions.AMQPError, TimeoutError):
        return
    async with conn:
        for host in hosts:
            ch = await conn.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await ch.queue_delete(f"virtbus.agent.{host}")


def kill_qemus_under(root: Path) -> list[int]:
    """SIGKILL QEMU processes whose command line names ``root`` (the demo's own temp dir)."""
    needle, killed = str(root).encode(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if needle in cmdline and b"qemu" in cmdline.split(b"\0", 1)[0]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    return killed
