"""Issue 20 end to end: a real ``virtbus-agent --driver lxc``, real containers (Debian's
lxc, a busybox root), the real CLI and RabbitMQ; events as ``virtbus event`` and a bus
subscriber see them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.lxc_support import LxcHost, cname, container_xml
from tests.guests.lxc import ALLOC_RC, HALT, READY, REBOOT, TICK
from tests.procs import cli, event_listener

pytestmark = [pytest.mark.lxc, pytest.mark.rabbitmq]


async def test_lifecycle_through_the_bus_with_ordered_events(lxc_host: LxcHost) -> None:
    h, c = lxc_host, cname("life")
    async with event_listener("--host", h.host, "--count", "8") as ev:
        await h.define(c)
        await h.ok("start", c)
        await h.wait_console(c, READY)
        info = await h.info(c)
        assert (info["state"], info["reason"], info["type"]) == ("running", "booted", "lxc")
        assert info["id"] is not None and info["max_memory_kib"] == 65536
        await h.ok("suspend", c)
        assert await h.state(c) == ("paused", "user")
        await h.ok("resume", c)
        await h.ok("shutdown", c)  # SIGTERM to init, as libvirt sends: it says so and exits
        await h.events.wait(c, "stopped", "shutdown")
        await h.wait_console(c, HALT)
        assert (await h.info(c))["state"] == "shutoff"
        await h.ok("start", c)
        await h.wait_console(c, READY, count=2)
        xml = await h.ok("dumpxml", c)
        assert f"<domain type='lxc' id='{(await h.info(c))['id']}'>" in xml
        await h.ok("destroy", c)
        await h.ok("undefine", c)
        out, _ = await asyncio.wait_for(ev.communicate(), 30)
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert [(e["event"], e["detail"]) for e in events] == [
        ("defined", "added"),
        ("started", "booted"),
        ("suspended", "paused"),
        ("resumed", "unpaused"),
        ("stopped", "shutdown"),
        ("started", "booted"),
        ("stopped", "destroyed"),
        ("undefined", "removed"),
    ]
    assert not any(e["reconciled"] for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + 8))
    assert not (h.lxcpath / c).exists()  # undefine leaves nothing of the container


async def test_dumpxml_validates_against_libvirts_schema(lxc_host: LxcHost, tmp_path: Path) -> None:
    h, c = lxc_host, cname("schema")
    await h.define(c, extra="<memtune><hard_limit unit='MiB'>48</hard_limit></memtune>")
    await h.ok("start", c)
    path = tmp_path / "out.xml"
    path.write_text(await h.ok("dumpxml", c))
    validator = shutil.which("virt-xml-validate")
    assert validator is not None, "virt-xml-validate (libvirt-clients) is missing"
    check = await asyncio.to_thread(
        subprocess.run, [validator, str(path), "domain"], capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr + check.stdout
    await h.ok("destroy", c)


async def test_reboot_restarts_init(lxc_host: LxcHost) -> None:
    h, c = lxc_host, cname("reboot")
    await h.define(c)
    await h.ok("start", c)
    await h.wait_console(c, READY)
    first = (await h.info(c))["id"]
    await h.ok("reboot", c)  # SIGHUP: this init exits, the driver starts it again
    await h.events.wait(c, "reboot")
    await h.wait_console(c, REBOOT)
    await h.wait_console(c, READY, count=2)
    info = await h.info(c)
    assert info["state"] == "running" and info["id"] != first
    assert ("stopped", "shutdown") not in h.events.of(c)
    await h.ok("destroy", c)


async def test_init_exiting_by_itself_is_a_shutdown(lxc_host: LxcHost) -> None:
    h, c = lxc_host, cname("exit")
    await h.define(c, "exit", "3", "0.3")
    await h.ok("start", c)
    await h.events.wait(c, "stopped")
    assert h.events.of(c) == [("defined", "added"), ("started", "booted"), ("stopped", "shutdown")]
    assert await h.state(c) == ("shutoff", "shutdown")
    await h.wait_console(c, "VIRTBUS-LXC-EXIT 3")


async def test_init_killed_from_outside_is_a_failure(lxc_host: LxcHost) -> None:
    h, c = lxc_host, cname("kill")
    await h.define(c)
    await h.ok("start", c)
    await h.wait_console(c, TICK)
    pid = (await h.info(c))["id"]
    with open(f"/proc/{pid}/cmdline", "rb") as fh:  # the premise: that is the container's init
        assert fh.read().split(b"\0")[:2] == [b"/bin/sh", b"/init"]
    os.kill(pid, signal.SIGKILL)
    await h.events.wait(c, "stopped")
    assert h.events.of(c)[-1] == ("stopped", "failed")
    assert await h.state(c) == ("shutoff", "crashed")
    await h.ok("start", c)  # and it starts again
    await h.wait_console(c, READY, count=2)
    await h.ok("destroy", c)


async def test_memory_hard_limit_holds_and_the_oom_kill_is_reported(lxc_host: LxcHost) -> None:
    h, c = lxc_host, cname("oom")
    await h.define(c, "alloc", "64", extra="<memtune><hard_limit unit='MiB'>24</hard_limit>"
                   "</memtune>")  # fmt: skip
    await h.ok("start", c)
    await h.wait_console(c, ALLOC_RC)
    assert f"{ALLOC_RC} 137" in h.console(c).read_text()  # SIGKILLed by the OOM killer
    await h.events.wait(c, "oom_kill")
    kill = h.events.full(c)[-1]
    assert kill["event"] == "oom_kill" and kill["data"]["count"] >= 1
    stats = (await cli("--json", "domstats", c, "--host", h.host)).json()[c]
    assert stats["balloon.maximum"] == 24 * 1024 and stats["balloon.oom_kill"] >= 1
    assert (await h.info(c))["state"] == "running"  # the container itself stays up
    await h.wait_console(c, TICK)
    await h.ok("destroy", c)


async def test_domstats_cpu_time_grows_while_the_container_burns(lxc_host: LxcHost) -> None:
    h = lxc_host
    burn, idle = cname("burn"), cname("idle")
    await h.define(burn, "burn")
    await h.define(idle)
    await h.ok("start", burn)
    await h.ok("start", idle)

    async def cpu() -> dict[str, int]:
        r = await cli("--json", "domstats", burn, idle, "--group", "cpu-total", "--host", h.host)
        return {name: s["cpu.time"] for name, s in r.json().items()}

    await h.wait_console(burn, f"{TICK} 1")
    before = await cpu()
    await h.wait_console(burn, f"{TICK} 3")  # two heartbeats later
    after = await cpu()
    burnt, idled = after[burn] - before[burn], after[idle] - before[idle]
    # no absolute figure (a busy machine gives the burner less): it grew, and far more than
    # the idle container's over the same two heartbeats (the premise: idle barely moves)
    assert burnt > 0 and idled * 10 < burnt, (before, after)
    await h.ok("destroy", burn)
    await h.ok("destroy", idle)


@pytest.mark.parametrize(
    ("label", "change", "code", "says"),
    [
        ("init", lambda x: x.replace("<init>/init</init>", "<init>/sbin/nope</init>"),
         "INVALID_ARG", "init '/sbin/nope' of domain '{name}' does not exist"),
        ("outside", lambda x: re.sub("<source dir='[^']*'/><target dir='/'/>",
                                     "<source dir='/etc'/><target dir='/'/>", x),
         "AUTH_DENIED", "filesystem source '/etc' of domain '{name}' is outside"),
        ("idmap", lambda x: x.replace("<devices>", "<idmap><uid start='0' target='100000' "
                                      "count='1000'/><uid start='10' target='200000' count='5'/>"
                                      "<gid start='0' target='100000' count='10'/></idmap>"
                                      "<devices>"),
         "XML_ERROR", "uid ranges overlap"),
        ("name", lambda x: x.replace("<name>", "<name>bad name "),
         "INVALID_ARG", "invalid container name"),
        ("kvm", lambda x: x.replace("type='lxc'", "type='kvm'"),
         "CONFIG_UNSUPPORTED", "<domain type='kvm'>"),
    ],
)  # fmt: skip
async def test_bad_input_is_refused_and_the_agent_still_serves(
    lxc_host: LxcHost, label: str, change: object, code: str, says: str
) -> None:
    h, c = lxc_host, cname(f"bad-{label}")
    path = h.base / f"{c}.xml"
    good = container_xml(c, h.rootfs)
    path.write_text(change(good))  # type: ignore[operator]
    err = await h.fails("define", str(path))
    assert err.startswith(f"error: {code}: "), err
    assert says.format(name=c) in err, err
    assert json.loads(await h.ok("--json", "list", "--all")) == []  # nothing half-defined
    assert not (h.lxcpath / c).exists()
    path.write_text(good)  # and the agent still serves
    await h.ok("define", str(path))
    await h.ok("start", c)
    await h.ok("destroy", c)
