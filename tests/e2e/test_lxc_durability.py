"""LXC: containers outlive the agent (kill -9 and restart: all reattached, what changed
meanwhile reported ``reconciled``), and a lost monitor FIFO is reopened and reconciled."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from drivers.lxc.monitor import LxcState, decode
from tests.e2e.lxc_support import LxcHost, agent_options, cname, host_events, lxc_agent
from tests.guests.lxc import READY, TICK, LxcRootfs
from tests.procs import cli, delete_queues, unique_host

pytestmark = [pytest.mark.lxc, pytest.mark.rabbitmq]


def fifo_of(h: LxcHost) -> Path:
    return Path("/run/lxc") / str(h.lxcpath).lstrip("/") / "monitor-fifo"


async def test_agent_kill9_and_restart_reattaches_every_container(
    lxc_root: Path, lxc_rootfs: LxcRootfs, rabbitmq: None
) -> None:
    host = unique_host("lxcr")
    base = Path(tempfile.mkdtemp(prefix="r", dir=lxc_root))
    names = [cname(f"re{i}") for i in range(3)]
    options = agent_options(lxc_rootfs, base)
    async with host_events(host) as events:
        try:
            async with lxc_agent(host, base, lxc_rootfs, events, options, keep_queue=True) as h:
                for name in names:
                    await h.define(name)
                    await h.ok("start", name)
                for name in names:
                    await h.wait_console(name, READY)
                before = {n: (await h.info(n))["id"] for n in names}
                assert h.agent is not None
                h.agent.proc.kill()  # SIGKILL: no chance to say goodbye
                await h.agent.proc.wait()
            frozen = names[1]
            h.lxc("lxc-freeze", frozen)  # behind the agent's back, while it is away
            mark = len(events.seen)
            async with lxc_agent(host, base, lxc_rootfs, events, options) as h2:
                await events.wait(frozen, "suspended", "paused", since=mark)
                after = events.full(frozen, since=mark)
                assert [(e["event"], e["detail"], e["reconciled"]) for e in after] == [
                    ("suspended", "paused", True)
                ]
                for name in (names[0], names[2]):
                    assert events.of(name, since=mark) == []  # reattached silently
                    assert await h2.state(name) == ("running", "booted")
                assert await h2.state(frozen) == ("paused", "user")
                assert {n: (await h2.info(n))["id"] for n in names} == before  # same inits
                stats = (await cli("--json", "domstats", *names, "--host", host)).json()
                assert all(stats[n]["cpu.time"] > 0 for n in names)  # cgroups found again
                await h2.ok("resume", frozen)  # the monitor is followed again
                await events.wait(frozen, "resumed", "unpaused", since=mark)
                await h2.wait_console(frozen, f"{TICK} 3")
                for name in names:
                    await h2.ok("destroy", name)
                for name in names:
                    await events.wait(name, "stopped", "destroyed", since=mark)
        finally:
            await delete_queues(f"virtbus.agent.{host}")


async def test_lost_monitor_fifo_is_reopened_and_reconciled(
    lxc_root: Path, lxc_rootfs: LxcRootfs, rabbitmq: None
) -> None:
    host = unique_host("lxcf")
    base = Path(tempfile.mkdtemp(prefix="f", dir=lxc_root))
    c = cname("fifo")
    # no periodic check: only the FIFO and its reconnect can tell the agent anything
    options = agent_options(lxc_rootfs, base, "reconcile_interval=600")
    async with host_events(host) as events, lxc_agent(host, base, lxc_rootfs, events,
                                                      options) as h:  # fmt: skip
        await h.define(c)
        await h.ok("start", c)
        await h.wait_console(c, READY)
        fifo = fifo_of(h)
        assert fifo.is_fifo()  # the premise: the agent reads lxc's monitor FIFO there
        os.unlink(fifo)
        fifo.write_bytes(b"")  # a plain file in its place: lxc's messages land here meanwhile
        mark = len(events.seen)
        h.lxc("lxc-freeze", c)
        lost = decode(bytearray(fifo.read_bytes()))
        assert any(m.name == c and m.state == LxcState.FROZEN for m in lost), lost
        os.unlink(fifo)  # the agent makes a new FIFO, reconnects and reconciles
        await events.wait(c, "suspended", "paused", since=mark)
        assert [e["reconciled"] for e in events.full(c, since=mark)] == [True]
        assert fifo.is_fifo()
        await h.ok("resume", c)  # and follows the new FIFO
        await events.wait(c, "resumed", "unpaused", since=mark)
        assert events.full(c, since=mark)[-1]["reconciled"] is False
        await h.ok("destroy", c)
        await events.wait(c, "stopped", "destroyed", since=mark)


async def test_autostart_once_per_boot(
    lxc_root: Path, lxc_rootfs: LxcRootfs, rabbitmq: None
) -> None:
    host = unique_host("lxca")
    base = Path(tempfile.mkdtemp(prefix="a", dir=lxc_root))
    c, other = cname("auto"), cname("manual")
    options = agent_options(lxc_rootfs, base)
    async with host_events(host) as events:
        try:
            async with lxc_agent(host, base, lxc_rootfs, events, options, keep_queue=True) as h:
                await h.define(c)
                await h.define(other)
                await h.ok("autostart", c)
                assert (await h.info(c))["autostart"] is True
                assert (await h.info(other))["autostart"] is False
            marker = fifo_of(h).parent / "virtbus-autostarted"
            assert marker.exists()  # the premise: this boot's autostart is done
            mark = len(events.seen)
            async with lxc_agent(host, base, lxc_rootfs, events, options, keep_queue=True) as h:
                assert (await h.state(c))[0] == "shutoff"  # not twice in one boot
            marker.unlink()  # as a reboot empties /run
            async with lxc_agent(host, base, lxc_rootfs, events, options) as h:
                await events.wait(c, "started", "booted", since=mark)
                await h.wait_console(c, READY)
                assert await h.state(other) == ("shutoff", "unknown")
                await h.ok("autostart", c, "--disable")
                assert (await h.info(c))["autostart"] is False
                await h.ok("destroy", c)
        finally:
            await delete_queues(f"virtbus.agent.{host}")
