"""Storage through a real agent process, the real CLI and the real RabbitMQ: virsh's verbs
end to end, and every handled bad input answered with its code by an agent that then
still serves (the next command succeeds)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import BUS_URL, VIRTBUS, agent_process, cli, unique_host
from tests.storage.conftest import need_tools
from virtbus.client import Client
from virtbus.protocol.base import to_wire

pytestmark = pytest.mark.rabbitmq
MiB = 1 << 20


@dataclass
class Env:
    host: str
    root: Path
    base: Path

    def argv(self, args: tuple[str, ...]) -> list[str]:
        """--host right after the verb (so ``--`` can end the options)."""
        i = 1 if args[0] != "--json" else 2
        return [*args[:i], "--host", self.host, *args[i:]]

    async def ok(self, *args: str) -> str:
        r = await cli(*self.argv(args))
        assert r.code == 0, (args, r.err)
        return r.out

    async def fails(self, code: str, *args: str) -> str:
        r = await cli(*self.argv(args))
        assert r.code == 1 and r.err.startswith(f"error: {code}: "), (args, r.code, r.err)
        # ... and the agent still serves
        await self.ok("pool-list", "--all")
        return r.err


async def validate(path: Path, kind: str) -> bool:
    done = await asyncio.to_thread(subprocess.run, ["virt-xml-validate", str(path), kind])
    return done.returncode == 0


@pytest.fixture
async def env(rabbitmq: None, tmp_path: Path) -> AsyncIterator[Env]:
    need_tools()
    root = tmp_path / "images"
    root.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[storage]\nroots = ["{root}"]\ntransfer_idle_timeout = 2.0\nchunk_size = 262144\n'
    )
    host = unique_host("stcli")
    async with agent_process(host, tmp_path, "--config", str(config)):
        e = Env(host, root, tmp_path)
        await e.ok("pool-define-as", "p", "dir", "--target", str(root / "p"))
        await e.ok("pool-build", "p")
        await e.ok("pool-start", "p")
        yield e


async def test_pool_and_volume_verbs(env: Env) -> None:
    pools = json.loads(await env.ok("--json", "pool-list", "--all"))
    assert [(p["name"], p["state"]) for p in pools] == [("p", "running")]
    assert "Name:" in await env.ok("pool-info", "p")
    xml = env.base / "pool.xml"
    xml.write_text(await env.ok("pool-dumpxml", "p"))
    assert await validate(xml, "storagepool")
    uuid = (await env.ok("pool-uuid", "p")).strip()
    assert (await env.ok("pool-name", uuid)).strip() == "p"
    await env.ok("vol-create-as", "p", "a.qcow2", "1G", "--format", "qcow2")
    info = json.loads(await env.ok("--json", "vol-info", "a.qcow2", "--pool", "p"))
    assert (info["capacity"], info["format"]) == (1 << 30, "qcow2")
    path = (await env.ok("vol-path", "a.qcow2", "--pool", "p")).strip()
    assert path == str(env.root / "p" / "a.qcow2")
    assert (await env.ok("vol-pool", path)).strip() == "p"  # by path
    assert (await env.ok("vol-key", path)).strip() == path
    assert (await env.ok("vol-name", path)).strip() == "a.qcow2"
    vxml = env.base / "vol.xml"
    vxml.write_text(await env.ok("vol-dumpxml", "a.qcow2", "--pool", "p"))
    assert await validate(vxml, "storagevol")
    await env.ok("vol-clone", "a.qcow2", "b.qcow2", "--pool", "p")
    await env.ok("vol-resize", "b.qcow2", "2G", "--pool", "p")
    assert (
        json.loads(await env.ok("--json", "vol-info", "b.qcow2", "--pool", "p"))["capacity"]
        == 2 << 30
    )
    await env.fails("INVALID_ARG", "vol-resize", "b.qcow2", "1G", "--pool", "p")
    await env.ok("vol-resize", "b.qcow2", "1G", "--pool", "p", "--shrink")
    (env.base / "new.xml").write_text(
        "<volume><name>c.raw</name><target><format type='raw'/></target></volume>"
    )
    await env.ok("vol-create-from", "p", str(env.base / "new.xml"), "a.qcow2")
    data = os.urandom(3 * MiB + 17)
    (env.base / "up.bin").write_bytes(data)
    await env.ok("vol-create-as", "p", "u.raw", "1M", "--format", "raw")
    await env.ok("vol-upload", "u.raw", str(env.base / "up.bin"), "--pool", "p")
    await env.ok("vol-download", "u.raw", str(env.base / "down.bin"), "--pool", "p")
    assert (env.base / "down.bin").read_bytes() == data
    await env.ok("vol-wipe", "u.raw", "--pool", "p", "--algorithm", "zero")
    assert (env.root / "p" / "u.raw").read_bytes() == bytes(len(data))
    listing = await env.ok("vol-list", "p")
    assert all(n in listing for n in ("a.qcow2", "b.qcow2", "c.raw", "u.raw"))
    for name in ("a.qcow2", "b.qcow2", "c.raw", "u.raw"):
        await env.ok("vol-delete", name, "--pool", "p")
    await env.ok("pool-autostart", "p")
    await env.ok("pool-destroy", "p")
    await env.ok("pool-delete", "p")
    await env.ok("pool-undefine", "p")
    assert json.loads(await env.ok("--json", "pool-list", "--all")) == []


@pytest.mark.parametrize("name", ["a/b", "..", "-rf"])
async def test_bad_volume_names(env: Env, name: str) -> None:
    await env.fails("INVALID_ARG", "vol-create-as", "p", "--", name, "1M")
    assert os.listdir(env.root / "p") == []


@pytest.mark.parametrize(
    ("capacity", "code"),
    [("1 EiB", "INVALID_ARG"), ("-1", "INVALID_ARG"), ("12 parsecs", "INVALID_ARG")],
)
async def test_bad_capacities(env: Env, capacity: str, code: str) -> None:
    await env.fails(code, "vol-create-as", "--format", "qcow2", "p", "v.qcow2", "--", capacity)
    assert os.listdir(env.root / "p") == []


async def test_unknown_format_and_target_outside_the_roots(env: Env) -> None:
    await env.fails("XML_ERROR", "vol-create-as", "p", "v", "1M", "--format", "floppy")
    await env.fails(
        "OPERATION_INVALID", "pool-define-as", "o", "dir", "--target", str(env.base / "outside")
    )
    assert not (env.base / "outside").exists()


async def test_two_creates_of_one_name(env: Env) -> None:
    results = await asyncio.gather(
        *(
            cli("vol-create-as", "p", "same.qcow2", "1G", "--format", "qcow2", "--host", env.host)
            for _ in range(3)
        )
    )
    assert sorted(r.code for r in results) == [0, 1, 1], [r.err for r in results]
    assert os.listdir(env.root / "p") == ["same.qcow2"]


async def test_pool_dir_disappears(env: Env) -> None:
    os.rmdir(env.root / "p")
    err = await env.fails("OPERATION_FAILED", "pool-refresh", "p")
    assert "inactive" in err
    pools = json.loads(await env.ok("--json", "pool-list", "--all"))
    assert pools[0]["state"] == "inactive"


async def test_cut_off_upload_leaves_the_volume_intact(env: Env) -> None:
    await env.ok("vol-create-as", "p", "keep.raw", "1M", "--format", "raw")
    before = (env.root / "p" / "keep.raw").read_bytes()
    big = env.base / "big.bin"
    with open(big, "wb") as fh:
        fh.truncate(512 * MiB)
        fh.write(os.urandom(MiB))  # data to send; the rest is a hole (still sent)
    proc = await asyncio.create_subprocess_exec(
        *VIRTBUS,
        "--bus",
        BUS_URL,
        "vol-upload",
        "keep.raw",
        str(big),
        "--pool",
        "p",
        "--host",
        env.host,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    temps: list[str] = []
    for _ in range(200):  # until the upload's temporary exists
        temps = [n for n in os.listdir(env.root / "p") if n.startswith(".keep.raw.upload-")]
        if temps or proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    assert temps, "the upload never started"
    proc.send_signal(signal.SIGKILL)  # the client dies mid-upload
    await proc.wait()
    jobs: list[dict[str, object]] = []
    for _ in range(200):  # the idle timeout (2 s) fails the job
        jobs = [j for j in await _jobs(env) if j["kind"] == "vol.upload"]
        if jobs and jobs[0]["state"] != "running":
            break
        await asyncio.sleep(0.1)
    assert jobs[0]["state"] == "failed"
    assert os.listdir(env.root / "p") == ["keep.raw"]
    assert (env.root / "p" / "keep.raw").read_bytes() == before


async def _jobs(env: Env) -> list[dict[str, object]]:
    async with await Client.connect(BUS_URL) as client:
        return [to_wire(j) for j in await client.host(env.host).jobs()]


async def test_disks_volumes_and_remove_all_storage(env: Env) -> None:
    await env.ok("vol-create-as", "p", "root.qcow2", "1G", "--format", "qcow2")
    await env.ok("vol-create-as", "p", "data.qcow2", "1G", "--format", "qcow2")
    domxml = env.base / "vm.xml"
    domxml.write_text(
        f"<domain type='test'><name>vm</name><uuid>{uuidlib.uuid4()}</uuid>"
        "<memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>"
        "<disk type='volume'><source pool='p' volume='root.qcow2'/><target dev='vda'/></disk>"
        "</devices></domain>"
    )
    await env.ok("define", str(domxml))
    await env.ok("start", "vm")
    err = await env.fails("OPERATION_INVALID", "vol-delete", "root.qcow2", "--pool", "p")
    assert "in use by domain" in err
    dev = env.base / "disk.xml"
    dev.write_text(
        "<disk type='volume'><source pool='p' volume='data.qcow2'/><target dev='vdb'/></disk>"
    )
    await env.ok("attach-device", "vm", str(dev), "--live")
    rows = json.loads(await env.ok("--json", "domblklist", "vm"))
    assert [(r["target"], r["source"]) for r in rows] == [
        ("vda", "p/root.qcow2"),
        ("vdb", "p/data.qcow2"),
    ]
    assert json.loads(await env.ok("--json", "domblkinfo", "vm", "vdb"))["target"] == "vdb"
    await env.fails("OPERATION_INVALID", "vol-delete", "data.qcow2", "--pool", "p")
    await env.ok("detach-disk", "vm", "vdb", "--live")
    await env.ok("vol-delete", "data.qcow2", "--pool", "p")
    await env.ok("attach-disk", "vm", "/dev/null", "vdc", "--config")
    assert "vdc" not in await env.ok("domblklist", "vm")  # the next boot's, not the live one
    await env.ok("destroy", "vm")
    assert "vdc" in await env.ok("domblklist", "vm")
    out = await env.ok("undefine", "vm", "--remove-all-storage")
    assert "Volume 'root.qcow2'(p) removed." in out
    assert os.listdir(env.root / "p") == []
    await env.fails("NO_STORAGE_POOL", "vol-list", "nosuchpool")
