"""Domain XML -> xl config."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.xen.xlconfig import to_xl_config
from virtbus.domain import parse_domain_xml
from virtbus.errors import ConfigUnsupported

DATA = Path(__file__).parent / "data"


def test_pvh_definition() -> None:
    cfg = to_xl_config(parse_domain_xml((DATA / "xen-pvh.xml").read_text()))
    lines = cfg.splitlines()
    for want in (
        'name = "pvh1"',
        'uuid = "3c1f7a2b-9e8d-4c6f-a1b2-c3d4e5f60718"',
        'type = "pvh"',
        "memory = 192",
        "maxmem = 256",
        "vcpus = 1",
        "maxvcpus = 2",
        'on_poweroff = "destroy"',
        'on_reboot = "restart"',
        'on_crash = "preserve"',
        'kernel = "/var/lib/xen/boot/vmlinuz"',
        'ramdisk = "/var/lib/xen/boot/initrd.img"',
        'extra = "console=hvc0 root=/dev/xvda1"',
        'disk = [ "format=raw, vdev=xvda, access=rw, target=/var/lib/xen/images/pvh1.img" ]',
        'vif = [ "bridge=xenbr0, script=vif-bridge" ]',
    ):
        assert want in lines, (want, cfg)


def xml(body: str, os_type: str = "xen", hv: str = "xen") -> str:
    return (
        f"<domain type='{hv}'><name>d</name><memory unit='MiB'>64</memory>"
        f"<os><type>{os_type}</type><kernel>/k</kernel></os><devices>{body}</devices></domain>"
    )


def test_pv_hvm_and_block_cdrom_disks() -> None:
    assert 'type = "pv"' in to_xl_config(parse_domain_xml(xml("")))
    body = (
        "<disk type='block' device='disk'><source dev='/dev/vg/d'/><target dev='xvdb'/>"
        "<readonly/></disk><disk type='file' device='cdrom'><target dev='hdc'/></disk>"
        "<interface type='bridge'><mac address='00:16:3e:00:00:01'/><source bridge='br0'/>"
        "<model type='e1000'/></interface>"
    )
    cfg = to_xl_config(parse_domain_xml(xml(body, "hvm")))
    assert "format=raw, vdev=xvdb, access=ro, backendtype=phy, target=/dev/vg/d" in cfg
    assert "vdev=hdc, access=ro, devtype=cdrom" in cfg
    assert '"mac=00:16:3e:00:00:01, bridge=br0, model=e1000"' in cfg and 'type = "hvm"' in cfg


def test_unsupported_elements_are_named() -> None:
    body = "<graphics type='vnc'/><interface type='user'/><watchdog model='i6300esb'/>"
    with pytest.raises(ConfigUnsupported) as err:
        to_xl_config(parse_domain_xml(xml(body)))
    for name in ("<graphics>", "<interface type='user'>", "<watchdog>"):
        assert name in err.value.message
    with pytest.raises(ConfigUnsupported, match="type='kvm'"):
        to_xl_config(parse_domain_xml(xml("", hv="kvm")))
    no_kernel = xml("").replace("<kernel>/k</kernel>", "")
    with pytest.raises(ConfigUnsupported, match="without <kernel>"):
        to_xl_config(parse_domain_xml(no_kernel))


def test_values_xl_cannot_quote_are_refused() -> None:
    bad = xml("").replace("<kernel>/k</kernel>", '<kernel>/k"x</kernel>')
    with pytest.raises(ConfigUnsupported, match="quote"):
        to_xl_config(parse_domain_xml(bad))
    comma = "<disk type='file'><source file='/a,b'/><target dev='xvda'/></disk>"
    with pytest.raises(ConfigUnsupported, match="spec"):
        to_xl_config(parse_domain_xml(xml(comma)))
