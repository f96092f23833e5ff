"""Internal snapshots without QEMU: the <domainsnapshot> parser, the metadata tree and its
file, the test driver's simulation (the QEMU driver's checks and libvirt's events), the
QMP event mapping of snapshot jobs, and the CLI's listing filters. The real QEMU path is
tests/e2e/test_qemu_snapshots.py."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import uuid as uuidlib
from pathlib import Path

import pytest

from drivers.base import DriverEvent, Snapshots
from drivers.qemu import events as ev
from drivers.snapshots import SnapshotStore
from drivers.test import TestDriver
from virtbus.cli.snapshot import request_xml, select
from virtbus.cli.trees import tree_lines
from virtbus.domain import without_secrets
from virtbus.domain.snapshot import SnapshotDef, parse_snapshot_request, snapshot_without_secrets
from virtbus.errors import (
    ConfigUnsupported,
    InvalidArgument,
    NoDomainSnapshot,
    NoSupport,
    OperationInvalid,
    XMLError,
)
from virtbus.protocol.events import DomainState
from virtbus.protocol.snapshot import SnapshotInfo


def domain_xml(name: str, fmt: str = "qcow2") -> str:
    return f"""<domain type='test'><name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os>
  <devices><disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>
  <source file='/var/lib/{name}.img'/><target dev='vda' bus='virtio'/></disk></devices>
</domain>"""


# --- the request parser -----------------------------------------------------------------
def test_requests_are_parsed_and_bad_ones_refused() -> None:
    assert parse_snapshot_request(None).name is None
    req = parse_snapshot_request(
        "<domainsnapshot><name>s1</name><description>d</description>"
        "<memory snapshot='internal'/><disks><disk name='vdb' snapshot='no'/></disks>"
        "</domainsnapshot>"
    )
    assert (req.name, req.description, req.memory, req.disks) == ("s1", "d", "internal",
                                                                  {"vdb": "no"})  # fmt: skip
    with pytest.raises(InvalidArgument, match="'/'"):
        parse_snapshot_request("<domainsnapshot><name>a/b</name></domainsnapshot>")
    with pytest.raises(NoSupport, match="manual"):
        parse_snapshot_request("<domainsnapshot><memory snapshot='manual'/></domainsnapshot>")
    with pytest.raises(NoSupport, match="'vda'"):
        parse_snapshot_request("<domainsnapshot><disks><disk name='vda' snapshot='manual'/>"
                               "</disks></domainsnapshot>")  # fmt: skip
    with pytest.raises(XMLError, match="bogus"):
        parse_snapshot_request("<domainsnapshot><bogus/></domainsnapshot>")
    with pytest.raises(XMLError, match="expected <domainsnapshot>"):
        parse_snapshot_request("<domain/>")
    with pytest.raises(XMLError, match="DOCTYPE"):
        parse_snapshot_request('<!DOCTYPE x [<!ENTITY e "x">]><domainsnapshot/>')


# --- the metadata tree ------------------------------------------------------------------
def _snap(name: str, parent: str | None) -> SnapshotDef:
    return SnapshotDef(name=name, state="running", creation_time=1, memory=True,
                       disks=("vda",), domain_xml=domain_xml("d"), parent=parent)  # fmt: skip


async def test_the_tree_persists_and_deletes_children_first(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    for name, parent in (("a", None), ("b", "a"), ("c", "b"), ("d", "a")):
        await store.add("u", _snap(name, parent))
    assert store.of("u").current == "d"
    with pytest.raises(OperationInvalid, match="descendant"):
        store.plan_delete("u", "dom", "a", children=False, children_only=False)
    assert store.plan_delete("u", "dom", "b", children=True, children_only=False) == ["c", "b"]
    assert store.plan_delete("u", "dom", "a", children=False, children_only=True) == [
        "c", "d", "b"]  # fmt: skip
    await store.remove("u", ["d"])  # the current one: its parent becomes current
    again = SnapshotStore(tmp_path / "snapshots")
    await again.load()
    assert list(again.of("u").records) == ["a", "b", "c"] and again.of("u").current == "a"
    assert again.info("u", "dom", "a").descendants == 2
    with pytest.raises(NoDomainSnapshot):
        again.get("other-uuid", "other", "a")  # another domain's snapshot is unknown there
    (tmp_path / "snapshots" / "bad.json").write_text("{not json")
    third = SnapshotStore(tmp_path / "snapshots")
    await third.load()  # a corrupt file is set aside, never fatal
    assert not third.has_any("bad") and list(tmp_path.glob("snapshots/bad.json.corrupt-*"))


# --- the test driver: the QEMU driver's rules and libvirt's events ------------------------
async def test_the_test_driver_simulates_snapshots(tmp_path: Path) -> None:
    drv = TestDriver()
    seen: list[DriverEvent] = []
    await drv.open(seen.append)
    assert isinstance(drv, Snapshots)
    await drv.define(domain_xml("d"))
    await drv.define(domain_xml("raw", "raw"))
    await drv.start("d")
    s1 = await drv.snapshot_create("d", "<domainsnapshot><name>s1</name></domainsnapshot>")
    assert (s1.state, s1.memory, s1.current, s1.parent) == ("running", True, True, None)
    await drv.suspend("d")
    s2 = await drv.snapshot_create("d", None)
    assert s2.state == "paused" and s2.parent == "s1" and s2.name.isdigit()
    del seen[:]
    await drv.snapshot_revert("d", "s1", False, False)  # paused -> running snapshot
    assert drv.state("d") == (DomainState.RUNNING, "from_snapshot")
    await drv.snapshot_revert("d", s2.name, False, False)  # running -> paused snapshot
    assert drv.state("d") == (DomainState.PAUSED, "from_snapshot")
    await drv.destroy("d")
    await drv.snapshot_revert("d", "s1", False, True)  # shut off -> --paused
    assert [(e.event, e.detail) for e in seen] == [
        ("resumed", "from_snapshot"), ("suspended", "from_snapshot"),
        ("stopped", "destroyed"), ("started", "from_snapshot"), ("suspended", "from_snapshot"),
    ]  # fmt: skip
    assert (await drv.snapshot_info("d", None)).name == "s1"
    with pytest.raises(ConfigUnsupported, match=r"'vda'.*qcow2.*raw"):
        await drv.snapshot_create("raw", None)
    with pytest.raises(NoDomainSnapshot):
        await drv.snapshot_revert("raw", "s1", False, False)
    with pytest.raises(OperationInvalid, match="descendant"):
        await drv.snapshot_delete("d", "s1", False, False, False)
    await drv.destroy("d")
    with pytest.raises(OperationInvalid, match="snapshots"):
        await drv.undefine("d")
    assert await drv.snapshot_delete("d", "s1", True, False, False) == [s2.name, "s1"]
    with pytest.raises(NoDomainSnapshot):
        await drv.snapshot_info("d", None)
    await drv.undefine("d")


async def test_snapshot_xml_is_valid_libvirt_xml(tmp_path: Path) -> None:
    tool = shutil.which("virt-xml-validate")
    assert tool, "virt-xml-validate missing: run deploy/setup-dev (libvirt-clients)"
    drv = TestDriver()
    await drv.open(lambda _e: None)
    await drv.define(domain_xml("d"))
    await drv.start("d")
    await drv.snapshot_create("d", "<domainsnapshot><name>a</name><description>x &amp; y"
                                   "</description></domainsnapshot>")  # fmt: skip
    await drv.snapshot_create("d", None)
    for info in await drv.snapshot_list("d"):
        path = tmp_path / f"{info.name}.xml"
        path.write_text(await drv.snapshot_xml("d", info.name))
        done = await asyncio.to_thread(subprocess.run, [tool, str(path), "domainsnapshot"],
                                       capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    assert "<parent>\n    <name>a</name>" in (tmp_path / f"{info.name}.xml").read_text()


async def test_a_snapshots_domain_loses_its_secrets_as_dumpxml_does() -> None:
    """snapshot_without_secrets hides what dumpxml's without_secrets hides, inside the
    <domainsnapshot>, and nothing else; a snapshot without a secret is not re-serialised."""
    drv = TestDriver()
    await drv.open(lambda _e: None)
    pw = "<graphics type='vnc' port='-1' autoport='yes' passwd='s3cret'/></devices>"
    await drv.define(domain_xml("d").replace("</devices>", pw))
    await drv.snapshot_create("d", "<domainsnapshot><name>a</name></domainsnapshot>")
    full = await drv.snapshot_xml("d", "a")
    assert "passwd='s3cret'" in full
    hidden = snapshot_without_secrets(full)
    assert "s3cret" not in hidden and "passwd" not in hidden
    assert "<graphics type='vnc' port='-1' autoport='yes'/>" in hidden
    assert hidden == full.replace(" passwd='s3cret'", "")  # only the secret is gone
    inner = hidden[hidden.index("<domain ") : hidden.index("</domain>") + len("</domain>")]
    assert without_secrets(inner) == inner  # the same secrets as dumpxml's
    await drv.define(domain_xml("plain"))
    await drv.snapshot_create("plain", "<domainsnapshot><name>b</name></domainsnapshot>")
    plain = await drv.snapshot_xml("plain", "b")
    assert snapshot_without_secrets(plain) is plain


# --- the QMP event mapping of snapshot jobs -------------------------------------------------
def test_snapshot_jobs_events_map_as_libvirt_reports_them() -> None:
    running = ev.Context(DomainState.RUNNING, "booted")

    def with_(ctx: ev.Context, *flags: ev.Pending) -> ev.Context:
        return ev.Context(ctx.state, ctx.reason, ctx.lifecycle, frozenset(flags))

    assert ev.map_event("STOP", {}, with_(running, ev.Pending.SNAPSHOT)) == ev.NOTHING
    paused = ev.Context(DomainState.PAUSED, "from_snapshot")
    assert ev.map_event("RESUME", {}, with_(paused, ev.Pending.SNAPSHOT)) == ev.NOTHING
    stop = ev.map_event("STOP", {}, with_(running, ev.Pending.REVERT))
    assert stop.events == (("suspended", "from_snapshot", {}),)
    assert stop.state == (DomainState.PAUSED, "from_snapshot")
    resume = ev.map_event("RESUME", {}, with_(paused, ev.Pending.REVERT))
    assert resume.events == (("resumed", "from_snapshot", {}),)
    boot = ev.map_event("RESUME", {}, with_(paused, ev.Pending.REVERT, ev.Pending.START))
    assert boot.events == (("started", "from_snapshot", {}),)
    assert ev.Pending.START in boot.clear
    gone = ev.map_exit(with_(running, ev.Pending.REVERT, ev.Pending.DESTROY))
    assert gone.events == (("stopped", "from_snapshot", {}),)
    assert not ev.needs_status("STOP", with_(running, ev.Pending.SNAPSHOT))


# --- the CLI's filters and drawings ------------------------------------------------------
def _info(name: str, parent: str | None, children: int, current: bool = False) -> SnapshotInfo:
    return SnapshotInfo(name=name, domain="d", state="running", creation_time=0, memory=True,
                        parent=parent, children=children, current=current)  # fmt: skip


def test_snapshot_list_filters_and_tree() -> None:
    snaps = [_info("a", None, 2), _info("b", "a", 1), _info("c", "b", 0, True),
             _info("d", "a", 0), _info("e", None, 0)]  # fmt: skip
    args = argparse.Namespace(from_=None, descendants=False, tree=False, current=False,
                              roots=False, leaves=False, no_leaves=False)  # fmt: skip

    def names(**flags: object) -> list[str]:
        return [s.name for s in select(snaps, argparse.Namespace(**{**vars(args), **flags}))]

    assert names(roots=True) == ["a", "e"]
    assert names(leaves=True) == ["c", "d", "e"]
    assert names(no_leaves=True) == ["a", "b"]
    assert names(current=True) == ["c"]
    assert names(from_="a") == ["b", "d"]
    assert names(from_="a", descendants=True) == ["b", "c", "d"]
    with pytest.raises(NoDomainSnapshot):
        names(from_="zz")
    assert tree_lines(snaps) == ["a", "  |", "  +- b", "  |   |", "  |   +- c", "  |",
                                 "  +- d", "", "e"]  # fmt: skip
    xml = request_xml("n'1", "x<y", "no", ["vda,snapshot=internal"])
    parsed = parse_snapshot_request(xml)
    assert (parsed.name, parsed.description, parsed.memory, parsed.disks) == (
        "n'1", "x<y", "no", {"vda": "internal"})  # fmt: skip
    memory = parse_snapshot_request(request_xml(None, None, "snapshot=external,file=/m", []))
    assert (memory.memory, memory.memory_file) == ("external", "/m")
