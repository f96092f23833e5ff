"""Container parts of libvirt's domain XML: init, filesystems, idmap, memtune, cputune,
features privnet/capabilities, interface addresses (virtbus/domain)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtbus.domain import parse_domain_xml
from virtbus.errors import XMLError

SAMPLE = (Path(__file__).parent / "data" / "lxc-container.xml").read_text()


def lxc(extra: str = "", devices: str = "", os_extra: str = "") -> str:
    return f"""<domain type='lxc'><name>c</name><memory unit='MiB'>64</memory>
      <os><type>exe</type><init>/init</init>{os_extra}</os>{extra}
      <devices><filesystem type='mount'><source dir='/r'/><target dir='/'/></filesystem>
      {devices}</devices></domain>"""


def test_sample_views() -> None:
    d = parse_domain_xml(SAMPLE)
    assert d.hv_type == "lxc" and d.os.type == "exe"
    assert d.os.init == "/sbin/init"
    assert d.os.initargs == ("--tick", "1 second")
    assert d.os.initenv == (("FOO", "bar baz"),)
    assert d.os.initdir == "/tmp"
    root, www, tmp = d.filesystems
    assert (root.type, root.source_path, root.target_dir, root.readonly) == (
        "mount", "/var/lib/virtbus/containers/web1", "/", True,
    )  # fmt: skip
    assert (www.source_dir, www.target_dir, www.readonly) == ("/srv/www", "/var/www", False)
    assert (tmp.type, tmp.ram_kib, tmp.source_path) == ("ram", 16384, None)
    assert d.idmap is not None
    assert [(r.start, r.target, r.count) for r in d.idmap.uid] == [(0, 100000, 65536)]
    assert [(r.start, r.target, r.count) for r in d.idmap.gid] == [(0, 100000, 65536)]
    assert d.memtune is not None
    assert (d.memtune.hard_limit_kib, d.memtune.soft_limit_kib) == (131072, 65536)
    assert d.memtune.swap_hard_limit_kib is None
    assert d.cputune is not None
    assert (d.cputune.shares, d.cputune.period, d.cputune.quota) == (512, 100000, 50000)
    assert d.has_feature("privnet")
    assert d.capabilities is not None
    assert d.capabilities.policy == "default"
    assert d.capabilities.toggles == (("mknod", False), ("sys_time", True))
    iface = d.interfaces[0]
    assert (iface.guest_dev, iface.target_dev, iface.source_bridge) == ("eth0", "vnet-web1", "br0")
    assert [(i.address, i.prefix, i.family) for i in iface.ips] == [("192.168.122.12", 24, "ipv4")]
    assert [(r.address, r.gateway) for r in iface.routes] == [("0.0.0.0", "192.168.122.1")]


def test_defaults_when_absent() -> None:
    d = parse_domain_xml(lxc())
    assert d.os.initargs == () and d.os.initenv == () and d.os.initdir is None
    assert d.idmap is None and d.memtune is None and d.cputune is None
    assert d.capabilities is None
    assert d.filesystems[0].accessmode == "passthrough"


def test_memtune_and_ram_units() -> None:
    d = parse_domain_xml(
        lxc(
            extra="<memtune><hard_limit unit='MiB'>32</hard_limit>"
            "<swap_hard_limit unit='G'>1</swap_hard_limit></memtune>",
            devices="<filesystem type='ram'><source usage='1048576' units='bytes'/>"
            "<target dir='/tmp'/></filesystem>",
        )
    )
    assert d.memtune is not None
    assert (d.memtune.hard_limit_kib, d.memtune.swap_hard_limit_kib) == (32768, 1024 * 1024)
    assert d.filesystems[1].ram_kib == 1024


@pytest.mark.parametrize(
    ("idmap", "message"),
    [
        (
            "<uid start='0' target='100000' count='1000'/><uid start='500' target='300000'"
            " count='10'/><gid start='0' target='100000' count='10'/>",
            "uid ranges overlap: start 0 count 1000 and start 500 count 10",
        ),
        (
            "<uid start='0' target='100000' count='1000'/><uid start='2000' target='100999'"
            " count='10'/><gid start='0' target='100000' count='10'/>",
            "uid ranges overlap: target 100000 count 1000 and target 100999 count 10",
        ),
        (
            "<uid start='0' target='100000' count='10'/><gid start='0' target='100000'"
            " count='10'/><gid start='9' target='200000' count='10'/>",
            "gid ranges overlap: start 0 count 10 and start 9 count 10",
        ),
        ("<uid start='0' target='100000'/>", "missing count in <idmap><uid>"),
        ("<uid start='0' target='100000' count='0'/>", "must be at least 1"),
        ("<gid start='-1' target='100000' count='1'/>", "must be at least 0"),
    ],
)
def test_idmap_errors(idmap: str, message: str) -> None:
    with pytest.raises(XMLError, match=message):
        parse_domain_xml(lxc(extra=f"<idmap>{idmap}</idmap>"))


def test_adjacent_idmap_ranges_are_fine() -> None:
    d = parse_domain_xml(
        lxc(
            extra="<idmap><uid start='0' target='100000' count='10'/>"
            "<uid start='10' target='100010' count='10'/>"
            "<gid start='0' target='100000' count='20'/></idmap>"
        )
    )
    assert d.idmap is not None and len(d.idmap.uid) == 2


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (lxc(os_extra="<initenv>x</initenv>"), "missing name in <os><initenv>"),
        (
            lxc(devices="<filesystem type='mount'><source dir='/x'/></filesystem>"),
            r"missing <target dir=\.\.\.>",
        ),
        (
            lxc(devices="<filesystem type='mount'><source dir='/x'/><target dir='//'/>"
                "</filesystem>"),
            "duplicated for filesystems #0 and #1",
        ),
        (
            lxc(devices="<filesystem type='nfs'><source dir='/x'/><target dir='/y'/>"
                "</filesystem>"),
            "invalid <filesystem type='nfs'",
        ),
        (
            lxc(devices="<filesystem type='ram'><target dir='/y'/></filesystem>"),
            "missing <source usage",
        ),
        (
            lxc(extra="<features><capabilities policy='maybe'/></features>"),
            "invalid <capabilities policy='maybe'",
        ),
        (
            lxc(extra="<features><capabilities><mknod/></capabilities></features>"),
            "missing state in <capabilities><mknod>",
        ),
        (lxc(extra="<cputune><quota>-2</quota></cputune>"), "must be at least -1"),
        (
            lxc(devices="<interface type='bridge'><source bridge='b'/><ip prefix='24'/>"
                "</interface>"),
            "missing address in <ip>",
        ),
        (
            lxc(devices="<interface type='bridge'><source bridge='b'/>"
                "<route address='0.0.0.0'/></interface>"),
            "needs address and gateway",
        ),
    ],
)  # fmt: skip
def test_container_errors(xml: str, message: str) -> None:
    with pytest.raises(XMLError, match=message):
        parse_domain_xml(xml)
