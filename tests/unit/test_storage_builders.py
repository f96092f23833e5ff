"""The XML virsh's pool-define-as and attach-disk build, and domblklist's rows."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from virtbus.domain import parse_domain_xml
from virtbus.domain.devices import parse_disk_device
from virtbus.errors import InvalidArgument
from virtbus.storage import parse_pool_xml
from virtbus.storage.builders import (
    BlockListEntry,
    DiskArgs,
    PoolArgs,
    block_list,
    disk_xml,
    pool_xml,
)


def test_pool_define_as_documents_parse_and_validate(tmp_path: Path) -> None:
    docs = [
        pool_xml(PoolArgs("d", "dir", target="/srv/d")),
        pool_xml(PoolArgs("f", "fs", source_dev="/dev/vdb", source_format="xfs", target="/srv/f")),
        pool_xml(PoolArgs("k", "disk", source_dev="/dev/vdc", source_format="gpt", target="/dev")),
        pool_xml(
            PoolArgs(
                "i",
                "iscsi-direct",
                source_host="127.0.0.1:3260",
                source_dev="iqn.2024-01.dev.virtbus:t",
                source_initiator="iqn.2024-01.dev.virtbus:i",
            )
        ),
    ]
    tool = shutil.which("virt-xml-validate")
    assert tool, "virt-xml-validate missing: run deploy/setup-dev"
    for i, xml in enumerate(docs):
        pool = parse_pool_xml(xml)
        path = tmp_path / f"p{i}.xml"
        path.write_text(pool.to_xml())
        done = subprocess.run([tool, str(path), "storagepool"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    iscsi = parse_pool_xml(docs[3])
    assert iscsi.source.hosts[0].port == 3260 and iscsi.source.initiator_iqn
    with pytest.raises(InvalidArgument, match="unknown pool type"):
        pool_xml(PoolArgs("x", "tape"))


def test_attach_disk_documents() -> None:
    el = parse_disk_device(
        disk_xml(
            DiskArgs(
                "/srv/a.qcow2",
                "vdb",
                subdriver="qcow2",
                targetbus="virtio",
                cache="none",
                mode="readonly",
            )
        )
    )
    assert el.get("type") == "file" and el.find("source").get("file") == "/srv/a.qcow2"  # type: ignore[union-attr]
    assert el.find("driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "none"}  # type: ignore[union-attr]
    assert el.find("readonly") is not None
    block = parse_disk_device(disk_xml(DiskArgs("/dev/loop3", "sdb")))
    assert block.get("type") == "block" and block.find("source").get("dev") == "/dev/loop3"  # type: ignore[union-attr]
    with pytest.raises(InvalidArgument):
        disk_xml(DiskArgs("/x", "vdb", mode="writeonly"))


def test_domblklist_rows() -> None:
    defn = parse_domain_xml(
        "<domain type='kvm'><name>v</name><memory>65536</memory><os><type>hvm</type></os>"
        "<devices><disk type='file'><source file='/srv/a.img'/><target dev='vda'/></disk>"
        "<disk type='volume'><source pool='p' volume='b.qcow2'/><target dev='vdb'/></disk>"
        "<disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk></devices></domain>"
    )
    assert block_list(defn) == [
        BlockListEntry("file", "disk", "vda", "/srv/a.img"),
        BlockListEntry("volume", "disk", "vdb", "p/b.qcow2"),
        BlockListEntry("file", "cdrom", "sda", "-"),
    ]
