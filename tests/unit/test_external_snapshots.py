"""External disk-only snapshots without QEMU: the request, libvirt's overlay names, the
definition an external snapshot leaves (overlay on top, the image as its backingStore),
the test driver's simulation and what is refused as libvirt 9.0 refuses it. The real
QEMU path is tests/e2e/test_qemu_external_snapshots.py."""

from __future__ import annotations

import shutil
import subprocess
import uuid as uuidlib
from pathlib import Path

import pytest

from drivers.snapshots import default_overlay, external_disks, with_overlays
from drivers.test import TestDriver
from virtbus.cli.snapshot import request_xml
from virtbus.domain import parse_domain_xml
from virtbus.domain.snapshot import SnapshotDef, parse_snapshot_request
from virtbus.errors import ConfigUnsupported, InvalidArgument, NoSupport, XMLError
from virtbus.protocol.events import DomainState


def domain_xml(name: str, base: Path, extra: str = "") -> str:
    return f"""<domain type='test'><name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os>
  <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>
  <source file='{base}/{name}.img'/><target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><source file='{base}/cd.iso'/><target dev='hdc'/></disk>
  {extra}</devices>
</domain>"""


def test_external_requests_are_parsed_and_bad_ones_refused() -> None:
    req = parse_snapshot_request(
        "<domainsnapshot><name>e</name><memory snapshot='no'/><disks>"
        "<disk name='vda' snapshot='external'><driver type='qcow2'/>"
        "<source file='/p/vda.e'/></disk><disk name='vdb'><source file='/p/b'/></disk>"
        "<disk name='vdc' snapshot='no'/></disks></domainsnapshot>"
    )
    assert req.disks == {"vda": "external", "vdb": "external", "vdc": "no"}
    assert req.files == {"vda": "/p/vda.e", "vdb": "/p/b"} and req.external(False)
    assert parse_snapshot_request(None).external(True)  # --disk-only
    assert not parse_snapshot_request(None).external(False)
    mixed = parse_snapshot_request("<domainsnapshot><disks><disk name='vda' snapshot="
                                   "'external'/><disk name='vdb' snapshot='internal'/>"
                                   "</disks></domainsnapshot>")  # fmt: skip
    with pytest.raises(ConfigUnsupported, match="mixing"):
        mixed.external(False)
    with pytest.raises(ConfigUnsupported, match="memory"):
        parse_snapshot_request("<domainsnapshot><memory snapshot='internal'/>"
                               "</domainsnapshot>").external(True)  # fmt: skip
    with pytest.raises(ConfigUnsupported, match="qcow2"):
        parse_snapshot_request("<domainsnapshot><disks><disk name='vda' snapshot='external'>"
                               "<driver type='raw'/></disk></disks></domainsnapshot>")  # fmt: skip
    with pytest.raises(InvalidArgument, match="absolute"):
        parse_snapshot_request("<domainsnapshot><disks><disk name='vda'><source file='rel'/>"
                               "</disk></disks></domainsnapshot>")  # fmt: skip
    with pytest.raises(XMLError, match="twice"):
        parse_snapshot_request("<domainsnapshot><disks><disk name='vda'/><disk name='vda'/>"
                               "</disks></domainsnapshot>")  # fmt: skip
    xml = request_xml("e", None, None, ["vda,snapshot=external,file=/p/o'1", "vdb,snapshot=no"])
    assert parse_snapshot_request(xml).files == {"vda": "/p/o'1"}


def test_overlays_are_named_and_checked_as_libvirt_does(tmp_path: Path) -> None:
    assert default_overlay("/p/disk.qcow2", "s1") == "/p/disk.s1"
    assert default_overlay("/p/disk", "s1") == "/p/disk.s1"
    assert default_overlay("/p.d/.disk", "s1") == "/p.d/.disk.s1"
    defn = parse_domain_xml(domain_xml("d", tmp_path))
    pairs = external_disks(defn, {}, {}, "s1")  # the cdrom is read-only: left out
    assert [(d.target_dev, o) for d, o in pairs] == [("vda", f"{tmp_path}/d.s1")]
    (tmp_path / "d.s1").write_text("")
    with pytest.raises(ConfigUnsupported, match="already exists"):
        external_disks(defn, {}, {}, "s1")
    with pytest.raises(ConfigUnsupported, match="twice"):
        external_disks(defn, {"vda": f"{tmp_path}/d.img"}, {}, "s2")
    with pytest.raises(InvalidArgument, match="'vdz'"):
        external_disks(defn, {}, {"vdz": "external"}, "s2")
    vol = parse_domain_xml(domain_xml("v", tmp_path).replace(
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>\n  <source file="
        f"'{tmp_path}/v.img'/>", "<disk type='volume' device='disk'><source pool='p' volume='x'/>"
    ))  # fmt: skip
    with pytest.raises(NoSupport, match="type='volume'"):
        external_disks(vol, {}, {}, "s1")


def test_the_definition_runs_on_the_overlay_backed_by_the_image(tmp_path: Path) -> None:
    defn = parse_domain_xml(domain_xml("d", tmp_path))
    once = with_overlays(defn, {"vda": "/o/1"})
    twice = with_overlays(once, {"vda": "/o/2"})
    vda = next(d for d in twice.disks if d.target_dev == "vda")
    assert (vda.source_path, vda.driver_type) == ("/o/2", "qcow2")
    layers = [(b.get("type"), b.find("format").get("type"), b.find("source").get("file"))
              for b in vda.element.iter("backingStore")]  # fmt: skip
    assert layers == [("file", "qcow2", "/o/1"), ("file", "raw", f"{tmp_path}/d.img")]
    assert "/o/1" not in defn.to_xml()  # a copy: the original is untouched
    tool = shutil.which("virt-xml-validate")
    assert tool, "virt-xml-validate missing: run deploy/setup-dev (libvirt-clients)"
    path = tmp_path / "d.xml"
    path.write_text(twice.to_xml().replace("type='test'", "type='qemu'"))
    done = subprocess.run([tool, str(path), "domain"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


async def test_the_test_driver_simulates_external_snapshots(tmp_path: Path) -> None:
    drv = TestDriver()
    await drv.open(lambda _e: None)
    await drv.define(domain_xml("d", tmp_path))
    await drv.start("d")
    live = await drv.snapshot_create("d", "<domainsnapshot><name>a</name></domainsnapshot>",
                                     disk_only=True)  # fmt: skip
    assert (live.state, live.location, live.memory) == ("disk-snapshot", "external", False)
    assert f"{tmp_path}/d.a" in await drv.xml("d")
    with pytest.raises(ConfigUnsupported, match="revert to external snapshot"):
        await drv.snapshot_revert("d", "a", False, False)
    with pytest.raises(ConfigUnsupported, match="--metadata"):
        await drv.snapshot_delete("d", "a", False, False, False)
    with pytest.raises(ConfigUnsupported, match="guest agent is not configured"):
        await drv.snapshot_create("d", None, disk_only=True, quiesce=True)
    with pytest.raises(InvalidArgument, match="--disk-only"):
        await drv.snapshot_create("d", None, quiesce=True)
    await drv.destroy("d")
    off = await drv.snapshot_create("d", "<domainsnapshot><name>b</name></domainsnapshot>",
                                    disk_only=True)  # fmt: skip
    assert (off.state, off.parent) == ("shutoff", "a")
    assert f"{tmp_path}/d.b" in await drv.xml("d")
    xml = await drv.snapshot_xml("d", "b")
    assert "snapshot='external'" in xml and f"{tmp_path}/d.a" in xml
    assert await drv.snapshot_delete("d", "a", True, False, True) == ["b", "a"]


def test_external_snapshots_round_trip_their_record() -> None:
    snap = SnapshotDef(name="e", state="disk-snapshot", creation_time=1, memory=False,
                       disks=("vda",), domain_xml="<domain/>",
                       overlays=(("vda", "/o"),))  # fmt: skip
    again = SnapshotDef.from_json(snap.to_json())
    assert again == snap and again.external
    old = snap.to_json()
    del old["overlays"]  # written by an agent before external snapshots: internal
    assert not SnapshotDef.from_json(old).external


# --- external snapshots with memory (--memspec) -------------------------------------------
def test_memory_requests_are_parsed_as_libvirt_parses_them() -> None:
    req = parse_snapshot_request(request_xml("m", None, "file=/p/m,snapshot=external", []))
    assert (req.memory, req.memory_file, req.external(False)) == ("external", "/p/m", True)
    bare = parse_snapshot_request(request_xml("m", None, "/p/m", []))  # virsh: [file=]name
    assert (bare.memory, bare.memory_file) == ("external", "/p/m")
    assert parse_snapshot_request(request_xml("m", None, "snapshot=no", [])).memory == "no"
    for memspec, match in (("snapshot=external", "require a filename"),
                           ("file=rel/m", "must be absolute"),
                           ("file=/p/m,snapshot=internal", "requires external")):  # fmt: skip
        with pytest.raises(XMLError, match=match):
            parse_snapshot_request(request_xml("m", None, memspec, []))
    with pytest.raises(InvalidArgument, match="--memspec"):
        request_xml("m", None, "file=/a,file=/b", [])
    with pytest.raises(XMLError, match="disk-only"):
        req.external(True)  # --disk-only --memspec
    mixed = request_xml("m", None, "/p/m", ["vda,snapshot=internal"])
    with pytest.raises(ConfigUnsupported, match="mixing internal and external"):
        parse_snapshot_request(mixed).external(False)


async def test_the_test_driver_simulates_memory_snapshots(tmp_path: Path) -> None:
    drv = TestDriver()
    await drv.open(lambda _e: None)
    await drv.define(domain_xml("d", tmp_path))
    mem = tmp_path / "d.mem"
    xml = request_xml("m", None, f"file={mem}", [])
    with pytest.raises(XMLError, match="offline"):  # shut off: no memory to save
        await drv.snapshot_create("d", xml)
    await drv.start("d")
    with pytest.raises(InvalidArgument, match="no directory"):
        await drv.snapshot_create("d", request_xml("m", None, f"{tmp_path}/no/m", []))
    mem.write_text("")
    with pytest.raises(ConfigUnsupported, match="already exists"):
        await drv.snapshot_create("d", xml)
    mem.unlink()
    with pytest.raises(ConfigUnsupported, match="disk's image"):
        await drv.snapshot_create("d", request_xml("m", None, f"{tmp_path}/d.img", []))
    assert not mem.exists() and await drv.snapshot_list("d") == []
    snap = await drv.snapshot_create("d", xml)
    assert (snap.state, snap.location, snap.memory) == ("running", "external", True)
    assert f"{tmp_path}/d.m" in await drv.xml("d")  # the disk on its overlay
    dumped = await drv.snapshot_xml("d", "m")
    assert f"<memory snapshot='external' file='{mem}'/>" in dumped, dumped
    assert "<state>running</state>" in dumped
    assert (await drv.info("d")).state == DomainState.RUNNING  # the guest goes on
    with pytest.raises(ConfigUnsupported, match="revert to external snapshot"):
        await drv.snapshot_revert("d", "m", False, False)
    await drv.destroy("d")
    await drv.restore(str(mem), False, False)  # the memory file is a save image
    info = await drv.info("d")
    assert (info.state, info.reason) == (DomainState.RUNNING, "restored")


def test_memory_snapshots_round_trip_their_record() -> None:
    snap = SnapshotDef(name="m", state="running", creation_time=1, memory=True,
                       disks=("vda",), domain_xml="<domain/>", overlays=(("vda", "/o"),),
                       memory_file="/p/m")  # fmt: skip
    again = SnapshotDef.from_json(snap.to_json())
    assert again == snap and again.external
    memory_only = SnapshotDef(name="m", state="paused", creation_time=1, memory=True,
                              disks=(), domain_xml="<domain/>", memory_file="/p/m")  # fmt: skip
    assert memory_only.external  # no overlay, still external: not revertable (libvirt 9.0)


async def test_the_test_driver_halts_and_takes_live_memory_snapshots(tmp_path: Path) -> None:
    seen: list[tuple[str, str | None]] = []
    drv = TestDriver()
    await drv.open(lambda e: seen.append((e.event, e.detail)))
    await drv.define(domain_xml("d", tmp_path))
    await drv.start("d")
    with pytest.raises(NoSupport, match="full system"):  # --live: only with memory to a file
        await drv.snapshot_create("d", None, live=True)
    mem = tmp_path / "d.mem"
    snap = await drv.snapshot_create("d", request_xml("m", None, str(mem), []), halt=True,
                                     live=True)  # fmt: skip
    assert (snap.state, snap.memory) == ("running", True) and mem.exists()
    info = await drv.info("d")
    assert (info.state, info.reason) == (DomainState.SHUTOFF, "from_snapshot")
    assert seen[-1] == ("stopped", "from_snapshot")
    with pytest.raises(NoSupport, match="full system"):  # shut off
        await drv.snapshot_create("d", request_xml("n", None, f"{tmp_path}/n.mem", []), live=True)
    await drv.restore(str(mem), False, False)
    assert (await drv.info("d")).state == DomainState.RUNNING
