"""Helpers of the LXC end-to-end tests: real agents (``--driver lxc``), real containers.

Container names carry a per-session token, so the cgroups lxc creates for them
(``lxc.payload.NAME``, ``lxc.monitor.NAME``, global on the host) never meet anyone
else's, and the session guard can find and remove what the tests left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.guests.lxc import LxcRootfs
from tests.procs import BUS_URL, AgentProc, agent_process, cli
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.protocol.events import routing_word

TOKEN = f"vt{uuid.uuid4().hex[:6]}"  # in every container name of this session
EVENT_WAIT = 30.0
CONSOLE_WAIT = 20.0


def cname(label: str) -> str:
    return f"{TOKEN}-{label}"


def container_xml(
    name: str, rootfs: LxcRootfs, *initargs: str, memory_mib: int = 64, extra: str = "",
    devices: str = "", privnet: bool = True,
) -> str:  # fmt: skip
    """A busybox container: the shared root read-only, a ram /tmp, a console."""
    args = "".join(f"<initarg>{a}</initarg>" for a in initargs)
    features = "<features><privnet/></features>" if privnet else ""
    return f"""<domain type='lxc'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  {extra}
  <os><type arch='x86_64'>exe</type><init>/init</init>{args}</os>
  {features}
  <devices>
    <filesystem type='mount'><source dir='{rootfs.path}'/><target dir='/'/><readonly/></filesystem>
    <filesystem type='ram'><source usage='4096' units='KiB'/><target dir='/tmp'/></filesystem>
    {devices}
    <console type='pty'><target type='lxc' port='0'/></console>
  </devices>
</domain>
"""


class Events:
    """Every event of one host, as a bus subscriber receives them."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def add(self, body: dict[str, Any]) -> None:
        self.seen.append(body)
        self._changed.set()

    def of(self, domain: str, *, since: int = 0) -> list[tuple[str, str | None]]:
        return [(e["event"], e["detail"]) for e in self.seen[since:] if e["domain"] == domain]

    def full(self, domain: str, *, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.seen[since:] if e["domain"] == domain]

    async def wait(self, domain: str, event: str, detail: str | None = None, *,
                   since: int = 0, count: int = 1) -> None:  # fmt: skip
        def seen() -> int:
            return sum(1 for e, d in self.of(domain, since=since)
                       if e == event and (detail is None or d == detail))  # fmt: skip

        try:
            async with asyncio.timeout(EVENT_WAIT):
                while seen() < count:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"no {event}({detail}) x{count} for {domain}; saw {self.of(domain, since=since)}"
            ) from None


@asynccontextmanager
async def host_events(host: str, bus_url: str = BUS_URL) -> AsyncIterator[Events]:
    bus = open_bus(bus_url, src="test")
    await bus.connect()
    sub = await bus.subscribe(EVENTS_EXCHANGE, [f"{routing_word(host)}.#"])
    events = Events()

    async def pump() -> None:
        async for env in sub:
            events.add(env.body)

    pumping = asyncio.create_task(pump())
    try:
        yield events
    finally:
        pumping.cancel()
        await sub.close()
        await bus.close()


@dataclass
class LxcHost:
    """An agent running the lxc driver, its state dir and the events it publishes."""

    host: str
    base: Path
    rootfs: LxcRootfs
    events: Events
    options: list[str] = field(default_factory=list)
    agent: AgentProc | None = None
    bus: str = BUS_URL

    @property
    def lxcpath(self) -> Path:
        return self.base / "lxc"

    def console(self, name: str) -> Path:
        return self.lxcpath / name / "console.log"

    async def ok(self, *args: str) -> str:
        r = await cli(*args, "--host", self.host, bus=self.bus)
        assert r.code == 0, (args, r.err)
        return r.out

    async def fails(self, *args: str) -> str:
        r = await cli(*args, "--host", self.host, bus=self.bus)
        assert r.code == 1, (args, r.out)
        assert r.err.startswith("error: "), r.err
        return r.err

    async def define(self, name: str, *initargs: str, **kw: Any) -> None:
        path = self.base / f"{name}.xml"
        path.write_text(container_xml(name, self.rootfs, *initargs, **kw))
        await self.ok("define", str(path))

    async def info(self, name: str) -> dict[str, Any]:
        r = await cli("--json", "dominfo", name, "--host", self.host, bus=self.bus)
        assert r.code == 0, r.err
        info: dict[str, Any] = r.json()
        return info

    async def state(self, name: str) -> tuple[str, str]:
        r = await cli("--json", "domstate", name, "--host", self.host, bus=self.bus)
        assert r.code == 0, r.err
        return r.json()["state"], r.json()["reason"]

    async def wait_console(self, name: str, marker: str, count: int = 1) -> None:
        path = self.console(name)
        deadline = time.monotonic() + CONSOLE_WAIT
        while _read(path).count(marker) < count:
            assert time.monotonic() < deadline, (
                f"{marker!r} x{count} not in {path}:\n" + (_read(path)[-1500:])
            )
            await asyncio.sleep(0.05)

    def lxc(self, tool: str, name: str, *args: str) -> None:
        """Run an lxc tool on this agent's containers behind its back."""
        netns = next((o.split("=", 1)[1] for o in self.options if o.startswith("netns=")), "")
        prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
        subprocess.run([*prefix, tool, "-P", str(self.lxcpath), "-n", name, *args],
                       check=True, capture_output=True, timeout=30)  # fmt: skip


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def agent_options(rootfs: LxcRootfs, base: Path, *extra: str) -> list[str]:
    return [f"allowed_roots={rootfs.cache_dir}:{base}", "reconcile_interval=0.5", *extra]


@asynccontextmanager
async def lxc_agent(host: str, base: Path, rootfs: LxcRootfs, events: Events,
                    options: list[str], **kw: Any) -> AsyncIterator[LxcHost]:  # fmt: skip
    flags = [x for o in options for x in ("--driver-option", o)]
    async with agent_process(host, base, *flags, driver="lxc", **kw) as agent:
        yield LxcHost(host, base, rootfs, events, options, agent, kw.get("bus", BUS_URL))


async def destroy_all(h: LxcHost) -> None:
    """Leave no container behind (the agent keeps them running when it stops)."""
    r = await cli("--json", "list", "--host", h.host, bus=h.bus)
    if r.code == 0:
        for dom in r.json():
            await cli("destroy", dom["name"], "--host", h.host, bus=h.bus)


# --- the session guard ----------------------------------------------------------------------
def monitors_under(root: Path) -> list[tuple[int, str, str]]:
    """lxc monitor processes (``[lxc monitor] LXCPATH NAME``) of containers below ``root``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if cmd.startswith("[lxc monitor] ") and str(root) in cmd:
                _, _, rest = cmd.partition("] ")
                path, _, name = rest.strip().rpartition(" ")
                found.append((int(entry), path, name))
    return found


def clean_up_containers(root: Path, kill_wait: float = 5.0) -> list[str]:
    """Stop (lxc-stop -k) every container still running below ``root``, then kill its
    monitor by PID if it lingers; remove the empty cgroups of this session's names."""
    left = []
    for pid, path, name in monitors_under(root):
        left.append(name)
        subprocess.run(["lxc-stop", "-P", path, "-n", name, "-k"], capture_output=True,
                       timeout=30, check=False)  # fmt: skip
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + kill_wait
    while monitors_under(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    run = Path("/run/lxc") / str(root).lstrip("/")
    shutil.rmtree(run, ignore_errors=True)  # monitor FIFOs of agents killed -9
    for parent in run.parents:  # and the directories made for them
        if parent == Path("/run/lxc"):
            break
        with contextlib.suppress(OSError):
            parent.rmdir()
    for hierarchy in Path("/sys/fs/cgroup").glob("*"):
        for d in [*hierarchy.glob(f"lxc.*.{TOKEN}-*"), *hierarchy.glob(f"*/lxc.*.{TOKEN}-*")]:
            with contextlib.suppress(OSError):
                d.rmdir()
    return left
