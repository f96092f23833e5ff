"""``migrate --copy-storage-all`` on the test driver, through real agents and
virtbus-scheduler: the phases, cancel in each of them, and bad input.

The test driver moves the disk's bytes as the QEMU driver does (a second stream standing in
for NBD, into the volume the destination agent made; see drivers/test.py), then simulated
memory for ``migration_time`` s. The guest's disk is a 4 MiB raw volume of random bytes in
pool ``cs``, whose directory differs per agent. A cancel while the disk is copied (at
1 MiB/s) and one while memory moves both leave the guest running on the source with its
disk as it was and no volume on the destination; a migration that is let run delivers the
same bytes, into a volume owned by the domain's owner. A writable disk that is no file or
volume is CONFIG_UNSUPPORTED.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from tests.integration.test_scheduler_cluster import (  # noqa: F401 - the vhost fixture
    URL,
    agents,
    placed,
    scheduler_process,
    vcli,
    vhost,
    wait_hosts,
)
from tests.procs import cli

MIB = 1 << 20


def xml(name: str, pool: str, extra: str = "") -> str:
    return f"""<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory>
<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices>
<disk type='volume' device='disk'><driver name='qemu' type='raw'/>
<source pool='{pool}' volume='{name}.raw'/><target dev='vda' bus='virtio'/></disk>{extra}
</devices></domain>"""


async def wait_pool(host: str, pool: str, timeout: float = 15) -> None:
    """The scheduler's view shows ``pool`` running on ``host`` (its placement filter
    reads the heartbeats): a migration asked earlier would be NO_HOST."""
    async with asyncio.timeout(timeout):
        while True:
            seen = [h for h in await vcli("hosts") if h["host"] == host]
            if seen and any(p["name"] == pool and p["state"] == "running"
                            for p in seen[0].get("pools", [])):  # fmt: skip
                return
            await asyncio.sleep(0.2)


async def record_of(domain: str) -> dict[str, Any]:
    recs = [r for r in await vcli("migrations") if r["domain"] == domain]
    return max(recs, key=lambda r: r["created"]) if recs else {}


async def wait_phase(domain: str, phase: str, timeout: float = 20) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            rec = await record_of(domain)
            if rec.get("phase") == phase and rec.get("progress", {}).get("disk_total"):
                return rec
            assert rec.get("state") in (None, "queued", "running"), rec.get("error")
            await asyncio.sleep(0.05)


async def wait_end(domain: str, timeout: float = 30) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while (rec := await record_of(domain)).get("state") in (None, "queued", "running"):
            await asyncio.sleep(0.05)
    return rec


async def test_copy_storage_phases_cancel_and_bad_input(
    vhost: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    pool_a, pool_b = tmp_path / "pool-a", tmp_path / "pool-b"
    pool_a.mkdir()
    pool_b.mkdir()
    content = os.urandom(4 * MIB)
    (pool_a / "t1.raw").write_bytes(content)
    config = tmp_path / "agent.toml"
    config.write_text(f"[storage]\nroots = [{json.dumps(str(tmp_path))}]\n")
    opts = ("--config", str(config), "--driver-option", "migration_time=2")
    async with agents(tmp_path, 2, *opts) as (a, b), scheduler_process(tmp_path / "sched"):
        await wait_hosts(2)
        for host, path in ((a.host, pool_a), (b.host, pool_b)):
            await vcli("pool-create-as", "cs", "dir", "--target", str(path), "--host", host)
            await wait_pool(host, "cs")
        (tmp_path / "t1.xml").write_text(xml("t1", "cs"))
        await vcli("define", str(tmp_path / "t1.xml"), "--host", a.host)
        await vcli("start", "t1", "--host", a.host)

        async def on_source_only() -> None:
            assert await placed("t1") == [(a.host, "running")]
            assert await vcli("vol-list", "cs", "--host", b.host) == []
            assert os.listdir(pool_b) == []
            assert (pool_a / "t1.raw").read_bytes() == content

        # --- cancel while the disk is copied (1 MiB/s: 4 s of disk) ---
        r = await cli("migrate", "t1", "--to", b.host, "--copy-storage-all", "--bandwidth", "1",
                      bus=URL)  # fmt: skip
        assert r.code == 0, r.err
        rec = await wait_phase("t1", "storage")
        assert rec["progress"]["phase"] == "disk", rec["progress"]
        assert os.listdir(pool_b) == ["t1.raw"]  # premise: the destination made it
        await vcli("migrate-cancel", "t1")
        rec = await wait_end("t1")
        assert rec["state"] == "cancelled", rec
        assert "progress" not in [p for p, _ in rec["history"]], rec["history"]
        await on_source_only()

        # --- cancel while memory moves (the disk is copied at full speed first) ---
        r = await cli("migrate", "t1", "--to", b.host, "--copy-storage-all", bus=URL)
        assert r.code == 0, r.err
        rec = await wait_phase("t1", "progress")
        assert rec["progress"]["phase"] == "memory", rec["progress"]
        assert rec["progress"]["disk_transferred"] == 4 * MIB, rec["progress"]
        await vcli("migrate-cancel", "t1")
        rec = await wait_end("t1")
        assert rec["state"] == "cancelled", rec
        await on_source_only()

        # --- bad input: a writable block disk cannot be made on the destination ---
        block = (
            "<disk type='block' device='disk'><source dev='/dev/vbnone'/><target dev='vdb'/></disk>"
        )
        (tmp_path / "t2.xml").write_text(xml("t2", "cs", block))
        (pool_a / "t2.raw").write_bytes(b"\0" * MIB)
        await vcli("pool-refresh", "cs", "--host", a.host)
        await vcli("define", str(tmp_path / "t2.xml"), "--host", a.host)
        await vcli("start", "t2", "--host", a.host)
        r = await cli("migrate", "t2", "--to", b.host, "--copy-storage-all", "--wait", bus=URL)
        assert r.code == 1 and "CONFIG_UNSUPPORTED" in r.err and "vdb" in r.err, r.err
        assert await placed("t2") == [(a.host, "running")]
        assert os.listdir(pool_b) == []
        await vcli("destroy", "t2", "--host", a.host)

        # --- let it run: the disk's bytes arrive, through both phases ---
        started = time.monotonic()
        r = await cli("--json", "migrate", "t1", "--to", b.host, "--copy-storage-all", "--wait",
                      bus=URL, timeout=60)  # fmt: skip
        assert r.code == 0, r.err
        phases = [p for p, _ in json.loads(r.out)["history"]]
        assert phases.index("storage") < phases.index("progress") < phases.index("done"), phases
        assert time.monotonic() - started >= 2  # premise: memory took migration_time
        assert await placed("t1") == [(b.host, "running")]
        assert (pool_b / "t1.raw").read_bytes() == content
        assert (pool_a / "t1.raw").read_bytes() == content  # the source's copy stays
        # the volume the destination made is the domain's owner's (here the bus user that
        # defined it; the source's was found by a scan and is nobody's)
        assert (await vcli("dominfo", "t1", "--host", b.host))["owner"] == "guest"
        made = await vcli("vol-info", "t1.raw", "--pool", "cs", "--host", b.host)
        assert made["owner"] == "guest", made
        await vcli("destroy", "t1", "--host", b.host)
