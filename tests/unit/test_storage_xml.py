"""Pool and volume XML: libvirt's own corpus parses, dumpxml validates against libvirt's
schemas (virt-xml-validate), and bad names, sizes and formats are refused with a code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.compat.corpus import ensure_corpus
from virtbus.errors import InvalidArgument, XMLError
from virtbus.storage import (
    POOL_TYPES,
    Backing,
    PoolSizes,
    VolumeFacts,
    check_name,
    parse_pool_xml,
    parse_size_arg,
    parse_volume_xml,
    volume_xml,
)

# One minimal definition per libvirt pool type (from storagepool.rng's requirements).
MINIMAL = {
    "dir": "<target><path>/srv/p</path></target>",
    "fs": "<source><device path='/dev/loop9'/><format type='ext4'/></source>"
          "<target><path>/srv/p</path></target>",
    "netfs": "<source><host name='nfs.example.com'/><dir path='/export'/></source>"
             "<target><path>/srv/p</path></target>",
    "logical": "<source><name>vg0</name></source>",
    "disk": "<source><device path='/dev/loop9'/><format type='gpt'/></source>"
            "<target><path>/dev</path></target>",
    "iscsi": "<source><host name='127.0.0.1'/><device path='iqn.2024-01.dev.virtbus:t'/>"
             "</source><target><path>/dev/disk/by-path</path></target>",
    "iscsi-direct": "<source><host name='127.0.0.1' port='3260'/>"
                    "<device path='iqn.2024-01.dev.virtbus:t'/>"
                    "<initiator><iqn name='iqn.2024-01.dev.virtbus:init'/></initiator></source>",
    "scsi": "<source><adapter name='host0'/></source><target><path>/dev/disk/by-path</path>"
            "</target>",
    "mpath": "<target><path>/dev/mapper</path></target>",
    "rbd": "<source><name>rbd</name><host name='mon1'/></source>",
    "sheepdog": "<source><name>sd</name><host name='sd1' port='7000'/></source>",
    "gluster": "<source><name>vol</name><host name='g1'/></source>",
    "zfs": "<source><name>tank</name></source>",
    "vstorage": "<source><name>cluster</name></source><target><path>/mnt/v</path></target>",
}  # fmt: skip


def validate(tmp_path: Path, xml: str, kind: str) -> None:
    tool = shutil.which("virt-xml-validate")
    assert tool, "virt-xml-validate is missing: run deploy/setup-dev (libvirt-clients)"
    path = tmp_path / f"{kind}.xml"
    path.write_text(xml)
    done = subprocess.run([tool, str(path), kind], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{done.stderr}\n{xml}"


def test_every_pool_type_parses_and_dumps_valid_xml(tmp_path: Path) -> None:
    assert set(MINIMAL) == set(POOL_TYPES)
    for ptype, body in MINIMAL.items():
        name = "" if ptype in ("logical", "rbd", "sheepdog", "gluster", "zfs") else "<name>p</name>"
        pool = parse_pool_xml(f"<pool type='{ptype}'>{name}{body}</pool>")
        assert pool.type == ptype and pool.name
        validate(tmp_path, pool.to_xml(PoolSizes(10, 4, 6)), "storagepool")


def test_libvirt_corpus_round_trips_and_validates(tmp_path: Path) -> None:
    corpus = ensure_corpus().root / "tests"  # libvirt's source, fetched into the cache once
    pools = sorted((corpus / "storagepoolxml2xmlin").glob("*.xml"))
    vols = sorted((corpus / "storagevolxml2xmlin").glob("*.xml"))
    assert len(pools) > 30 and len(vols) > 20, f"libvirt's test corpus is missing in {corpus}"
    for path in pools:
        pool = parse_pool_xml(path.read_bytes())
        again = parse_pool_xml(pool.to_xml())
        assert (again.name, again.uuid, again.type) == (pool.name, pool.uuid, pool.type)
        validate(tmp_path, pool.to_xml(PoolSizes(1, 2, 3)), "storagepool")
    for path in vols:
        vol = parse_volume_xml(path.read_bytes())
        validate(tmp_path, vol.to_xml(), "storagevol")


def test_pool_sizes_and_defaults_are_written_by_dumpxml() -> None:
    pool = parse_pool_xml("<pool type='dir'><name>d</name><capacity>99</capacity>"
                          "<target><path>/srv/d/</path></target></pool>")  # fmt: skip
    assert pool.target_path == "/srv/d" and len(pool.uuid) == 36
    out = pool.to_xml(PoolSizes(capacity=1000, allocation=400, available=600))
    assert "<capacity unit='bytes'>1000</capacity>" in out
    assert "<available unit='bytes'>600</available>" in out and ">99<" not in out
    logical = parse_pool_xml("<pool type='logical'><source><name>vg0</name></source></pool>")
    assert (logical.name, logical.target_path) == ("vg0", "/dev/vg0")
    assert parse_pool_xml(f"<pool type='disk'><name>d</name>{MINIMAL['disk']}</pool>"
                          ).source_format == "gpt"  # fmt: skip


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<pool><name>x</name></pool>", "missing <pool type"),
        ("<pool type='floppy'><name>x</name></pool>", "unknown storage pool type"),
        ("<pool type='dir'><name>x</name></pool>", "missing <target><path>"),
        ("<pool type='dir'><name>a/b</name><target><path>/s</path></target></pool>", "'/'"),
        ("<pool type='dir'><name>x</name><target><path>rel</path></target></pool>", "absolute"),
        ("<pool type='dir'><name>x</name><target><path>/a/../etc</path></target></pool>", "'..'"),
        ("<pool type='fs'><name>x</name><target><path>/s</path></target></pool>", "device"),
        ("<pool type='fs'><name>x</name><source><device path='/dev/a'/><format type='ntfs'/>"
         "</source><target><path>/s</path></target></pool>", "format type='ntfs'"),
        ("<pool type='netfs'><name>x</name><source><dir path='/e'/></source>"
         "<target><path>/s</path></target></pool>", "host"),
        ("<pool type='iscsi-direct'><name>x</name><source><host name='h'/>"
         "<device path='iqn.2024-01.x:y'/></source></pool>", "initiator"),
        ("<pool type='dir'><name>x</name><uuid>nope</uuid><target><path>/s</path></target>"
         "</pool>", "uuid"),
        ("<!DOCTYPE p [<!ENTITY e 'x'>]><pool type='dir'><name>&e;</name></pool>", "DOCTYPE"),
        ("<domain type='kvm'/>", "root element must be <pool>"),
    ],
)  # fmt: skip
def test_bad_pool_xml_is_refused(xml: str, message: str) -> None:
    with pytest.raises(XMLError, match=message):
        parse_pool_xml(xml)


@pytest.mark.parametrize("name", ["a/b", "..", ".", "a\0b", "-rf", "tab\there", " x", ""])
def test_bad_volume_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_name(name)
    with pytest.raises(XMLError):
        parse_volume_xml(f"<volume><name>{name.replace(chr(0), '&#0;')}</name></volume>")


def test_good_names_pass() -> None:
    for name in ("disk.qcow2", "a-b_c", "vm1..img", "ünïcode", "sda1"):
        assert check_name(name) == name


@pytest.mark.parametrize(
    ("arg", "size"),
    [("4096", 4096), ("10G", 10 * 2**30), ("1 GiB", 2**30), ("5GB", 5 * 10**9), ("1E", 2**60),
     ("1 EiB", 2**60), ("0", 0), (" 2M ", 2 * 2**20)],
)  # fmt: skip
def test_size_arguments(arg: str, size: int) -> None:
    assert parse_size_arg(arg) == size


@pytest.mark.parametrize("arg", ["-1", "12 parsecs", "1.5G", "", "G", "0x10", "99999999999E"])
def test_ill_formed_size_arguments(arg: str) -> None:
    with pytest.raises(InvalidArgument, match="capacity"):
        parse_size_arg(arg)


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<volume><name>v</name><capacity>-1</capacity></volume>", "non-negative"),
        ("<volume><name>v</name><capacity unit='parsec'>12</capacity></volume>", "unit"),
        ("<volume><name>v</name><capacity unit='E'>99999</capacity></volume>", "too large"),
        ("<volume><name>v</name><target><format type='floppy'/></target></volume>", "format"),
        ("<volume type='tape'><name>v</name></volume>", "volume type"),
        ("<volume><name>v</name><backingStore><format type='raw'/></backingStore></volume>",
         "backingStore"),
    ],
)  # fmt: skip
def test_bad_volume_xml_is_refused(xml: str, message: str) -> None:
    with pytest.raises(XMLError, match=message):
        parse_volume_xml(xml)


def test_volume_dumpxml_with_facts_validates(tmp_path: Path) -> None:
    xml = volume_xml("v.qcow2", 2**30, format="qcow2", backing=Backing("/srv/p/base", "raw"))
    vol = parse_volume_xml(xml)
    assert (vol.name, vol.capacity, vol.format, vol.allocation) == ("v.qcow2", 2**30, "qcow2", None)
    facts = VolumeFacts(
        name="v.qcow2", type="file", path="/srv/p/v.qcow2", key="/srv/p/v.qcow2",
        format="qcow2", capacity=2**30, allocation=196608, physical=196608,
        backing=Backing("/srv/p/base", "raw"), mode=0o600, owner=0, group=0,
        timestamps={"atime": "1.5", "mtime": "2.000000001"},
    )  # fmt: skip
    out = vol.to_xml(facts)
    assert "<physical unit='bytes'>196608</physical>" in out and "<mode>0600</mode>" in out
    validate(tmp_path, out, "storagevol")
    assert parse_volume_xml(out).backing == Backing("/srv/p/base", "raw")
