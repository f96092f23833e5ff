"""Containers in the cluster: placed only on lxc hosts, never migrated live (NO_SUPPORT),
moved offline, and left running by a drain unless it may stop them. Two real lxc agents,
a test-driver agent and ``virtbus-scheduler``, in a RabbitMQ vhost of their own."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.lxc_support import (
    Events,
    LxcHost,
    agent_options,
    cname,
    container_xml,
    destroy_all,
    lxc_agent,
)
from tests.guests.lxc import READY, LxcRootfs
from tests.integration.test_scheduler_cluster import scheduler_process
from tests.procs import agent_process, cli, unique_host

pytestmark = [pytest.mark.lxc, pytest.mark.rabbitmq]
VHOST = f"virtbus-lxc-sched-{os.getpid()}"
URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def vhost(rabbitmq_once: None) -> Iterator[str]:
    _ctl("add_vhost", VHOST)
    _ctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    yield URL
    _ctl("delete_vhost", VHOST)


@pytest.fixture(scope="module")
def rabbitmq_once() -> None:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError as exc:
        pytest.fail(f"RabbitMQ is not reachable on 127.0.0.1:5672: {exc}")


async def vcli(*args: str, ok: bool = True) -> Any:
    r = await cli("--json", *args, bus=URL, timeout=60)
    if not ok:
        assert r.code == 1, (args, r.out)
        return r.err
    assert r.code == 0, (args, r.err)
    return r.json() if r.out.strip() else None


class Cluster:
    def __init__(self, a: LxcHost, b: LxcHost, vm_host: str) -> None:
        self.a, self.b, self.vm_host = a, b, vm_host

    def on(self, host: str) -> LxcHost:
        return self.a if host == self.a.host else self.b

    async def where(self, name: str) -> str:
        rows = [d for d in await vcli("list", "--all") if d["name"] == name]
        assert len(rows) == 1, rows
        host: str = rows[0]["host"]
        return host


@pytest.fixture
async def cluster(vhost: str, lxc_root: Path, lxc_rootfs: LxcRootfs) -> AsyncIterator[Cluster]:
    async with AsyncExitStack() as stack:
        hosts = []
        for label in ("a", "b"):
            host = unique_host(f"lxc{label}")
            base = Path(tempfile.mkdtemp(prefix=label, dir=lxc_root))
            options = agent_options(lxc_rootfs, base)
            hosts.append(await stack.enter_async_context(
                lxc_agent(host, base, lxc_rootfs, Events(), options, bus=URL)))  # fmt: skip
        vm_dir = Path(tempfile.mkdtemp(prefix="vm", dir=lxc_root))
        vm_host = unique_host("vm")
        await stack.enter_async_context(agent_process(vm_host, vm_dir, bus=URL))
        await stack.enter_async_context(scheduler_process(vm_dir / "scheduler", bus=URL))
        async with asyncio.timeout(20):
            while sum(h.get("up", False) for h in await vcli("hosts")) < 3:
                await asyncio.sleep(0.3)
        try:
            yield Cluster(hosts[0], hosts[1], vm_host)
        finally:
            for h in hosts:
                await destroy_all(h)


async def test_placement_live_and_offline_migration(cluster: Cluster, tmp_path: Path) -> None:
    name = cname("placed")
    xml = tmp_path / "c.xml"
    xml.write_text(container_xml(name, cluster.a.rootfs))
    hosts = {h["host"]: h for h in await vcli("hosts")}
    vm, lxc_a = hosts[cluster.vm_host], hosts[cluster.a.host]
    # the premise: spread placement would pick the test-driver host if it could
    assert vm["driver"] == "test" and vm["memory_free_kib"] > lxc_a["memory_free_kib"]
    placed = await vcli("define", str(xml))  # no --host: the scheduler places it
    assert placed["host"] in (cluster.a.host, cluster.b.host)
    src = cluster.on(placed["host"])
    dst = cluster.b if src is cluster.a else cluster.a
    await src.ok("start", name)
    await src.wait_console(name, READY)
    err = await vcli("migrate", name, ok=False)  # live: never
    assert err.startswith("error: NO_SUPPORT: ") and "cannot migrate live" in err, err
    err = await vcli("migrate", name, "--offline", ok=False)  # running: shut it off first
    assert err.startswith("error: OPERATION_INVALID: ") and "shut-off domains only" in err, err
    assert await cluster.where(name) == src.host
    await src.ok("destroy", name)
    moved = await vcli("migrate", name, "--offline")
    assert (moved["source"], moved["destination"]) == (src.host, dst.host)
    assert await cluster.where(name) == dst.host
    assert not (src.lxcpath / name).exists() and (dst.lxcpath / name / "domain.xml").exists()
    await dst.ok("start", name)
    await dst.wait_console(name, READY)
    await dst.ok("destroy", name)


async def test_drain_leaves_containers_running_unless_told(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    name = cname("drained")
    await a.define(name)
    await a.ok("start", name)
    await a.wait_console(name, READY)
    r = await cli("drain", a.host, bus=URL, timeout=60)
    assert r.code == 0, r.err
    assert f"{name}: cannot move live" in r.out, r.out
    assert await a.state(name) == ("running", "booted")  # left running where it was
    assert (await vcli("undrain", a.host))["draining"] is False
    job = await vcli("drain", a.host, "--stop-containers")
    row = job["domains"][name]
    assert job["ok"] and (row["state"], row["destination"]) == ("completed", b.host), job
    assert await cluster.where(name) == b.host
    assert await b.state(name) == ("running", "booted")
    await b.wait_console(name, READY)
    assert not (a.lxcpath / name).exists()  # its definition left the drained host
    await vcli("undrain", a.host)
