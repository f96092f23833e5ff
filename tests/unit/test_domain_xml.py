"""Domain XML: safe parsing, typed views, validation errors, round trips, libvirt's schema."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from virtbus.domain import (
    UNIT_FACTORS,
    DomainDefinition,
    XMLLimits,
    parse_domain_xml,
    to_kib,
    unknown_attributes,
    unknown_devices,
)
from virtbus.domain import xml as domain_xml
from virtbus.errors import XMLError

DATA = Path(__file__).parent / "data"
SAMPLES = sorted(p.name for p in DATA.glob("*.xml"))
Q35 = (DATA / "virt-install-q35.xml").read_text()

MINIMAL = """<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <os><type>hvm</type></os>
  {extra}
  <devices>{devices}</devices>
</domain>"""


def minimal(name: str = "vm", extra: str = "", devices: str = "") -> str:
    return MINIMAL.format(name=name, extra=extra, devices=devices)


def q35_with(change: Callable[[etree._Element], object]) -> str:
    root = etree.fromstring(Q35.encode())
    change(root)
    return str(etree.tostring(root, encoding="unicode"))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("sample", SAMPLES)
def test_round_trip_is_verbatim(sample: str) -> None:
    text = (DATA / sample).read_text()
    defn = parse_domain_xml(text)
    out = defn.to_xml()
    if "<uuid>" in text:
        assert out == text
    # a second pass is stable, from str and from bytes
    assert parse_domain_xml(out).to_xml() == out
    assert parse_domain_xml(out.encode()).to_xml() == out


@pytest.mark.parametrize("hv_type", ["kvm", "qemu", "test", "xen"])
def test_q35_with_each_hypervisor_type(hv_type: str) -> None:
    text = Q35.replace("<domain type='kvm'>", f"<domain type='{hv_type}'>")
    defn = parse_domain_xml(text)
    assert defn.hv_type == hv_type
    assert defn.to_xml() == text


def test_unknown_hypervisor_type_is_kept_for_the_driver_to_judge() -> None:
    assert parse_domain_xml(minimal().replace("'kvm'", "'bhyve'")).hv_type == "bhyve"


def test_compact_input_is_pretty_printed() -> None:
    compact = "".join(line.strip() for line in Q35.splitlines())
    assert parse_domain_xml(compact).to_xml() == Q35


def test_unknown_elements_and_attributes_are_kept() -> None:
    text = minimal(
        extra="""<seclabel type='dynamic' model='selinux' relabel='yes'/>
  <qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
    <qemu:arg value='-newarg'/>
  </qemu:commandline>
  <!-- a comment -->""",
        devices="""<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <disk type='file' device='disk' futureattr='x'>
      <source file='/a.img'/><target dev='vda' bus='virtio'/>
      <iotune><total_bytes_sec>1</total_bytes_sec></iotune>
    </disk>""",
    )
    out = parse_domain_xml(text).to_xml()
    for kept in (
        "<seclabel type='dynamic' model='selinux' relabel='yes'/>",
        "<qemu:arg value='-newarg'/>",
        "<!-- a comment -->",
        "<backend type='emulator' version='2.0'/>",
        "futureattr='x'",
        "<total_bytes_sec>1</total_bytes_sec>",
    ):
        assert kept in out
    again = parse_domain_xml(out)
    assert again.to_xml() == out
    assert [d.tag for d in again.devices] == ["tpm", "disk"]
    assert unknown_attributes(again.disks[0].element, {"type", "device"}) == ["futureattr"]


# ---------------------------------------------------------------- typed views


def test_q35_views() -> None:
    d = parse_domain_xml(Q35)
    assert (d.hv_type, d.name, d.uuid) == (
        "kvm",
        "debian12",
        "5f0b7c3e-8a4f-4d52-9a1e-2c6b3d7e9f10",
    )
    assert (d.memory_kib, d.current_memory_kib, d.vcpus, d.current_vcpus) == (2097152,) * 2 + (2, 2)
    assert (d.os.type, d.os.arch, d.os.machine, d.os.boot_devs) == (
        "hvm",
        "x86_64",
        "pc-q35-7.2",
        ("hd",),
    )
    assert (d.on_poweroff, d.on_reboot, d.on_crash) == ("destroy", "restart", "destroy")
    assert d.features == {"acpi": {}, "apic": {}, "vmport": {"state": "off"}}
    assert d.has_feature("acpi") and not d.has_feature("vmport") and not d.has_feature("pae")
    assert d.cpu is not None and (d.cpu.mode, d.cpu.check, d.cpu.migratable) == (
        "host-passthrough",
        "none",
        True,
    )
    assert d.clock is not None and d.clock.offset == "utc"
    assert [(t.name, t.present, t.tickpolicy) for t in d.clock.timers] == [
        ("rtc", None, "catchup"),
        ("pit", None, "delay"),
        ("hpet", False, None),
    ]
    assert d.pm is not None and (d.pm.suspend_to_mem, d.pm.suspend_to_disk) == (False, False)
    assert d.emulator == "/usr/bin/qemu-system-x86_64"
    assert d.metadata is not None and len(d.metadata) == 1

    vda, cdrom = d.disks
    assert (vda.type, vda.device, vda.driver_name, vda.driver_type, vda.discard) == (
        "file",
        "disk",
        "qemu",
        "qcow2",
        "unmap",
    )
    assert (vda.source_path, vda.target_dev, vda.target_bus, vda.readonly) == (
        "/var/lib/libvirt/images/debian12.qcow2",
        "vda",
        "virtio",
        False,
    )
    assert vda.address is not None and vda.address.get("bus") == "0x04"
    assert (cdrom.device, cdrom.target_bus, cdrom.readonly, cdrom.driver_type) == (
        "cdrom",
        "sata",
        True,
        "raw",
    )

    (nic,) = d.interfaces
    assert (nic.type, nic.mac, nic.model, nic.source_network) == (
        "network",
        "52:54:00:6b:3c:5a",
        "virtio",
        "default",
    )
    assert [(c.type, c.index, c.model) for c in d.controllers][:3] == [
        ("usb", 0, "qemu-xhci"),
        ("pci", 0, "pcie-root"),
        ("pci", 1, "pcie-root-port"),
    ]
    assert sum(c.model == "pcie-root-port" for c in d.controllers) == 7
    assert {c.type for c in d.controllers} == {"usb", "pci", "virtio-serial", "sata"}
    assert [(s.type, s.target_type, s.target_port) for s in d.serials] == [("pty", "isa-serial", 0)]
    assert [(c.type, c.target_type, c.target_port) for c in d.consoles] == [("pty", "serial", 0)]
    assert [(c.type, c.target_type, c.target_name) for c in d.channels] == [
        ("unix", "virtio", "org.qemu.guest_agent.0"),
        ("spicevmc", "virtio", "com.redhat.spice.0"),
    ]
    assert [(i.type, i.bus) for i in d.inputs] == [
        ("tablet", "usb"),
        ("mouse", "ps2"),
        ("keyboard", "ps2"),
    ]
    assert [(g.type, g.port, g.autoport, g.listen) for g in d.graphics] == [
        ("spice", None, True, None),
        ("vnc", -1, True, "127.0.0.1"),
    ]
    assert [s.model for s in d.sounds] == ["ich9"]
    assert [(v.model, v.heads, v.primary) for v in d.videos] == [("virtio", 1, True)]
    assert [(w.model, w.action) for w in d.watchdogs] == [("i6300esb", "reset")]
    assert [(r.model, r.backend_model, r.backend_path) for r in d.rngs] == [
        ("virtio", "random", "/dev/urandom")
    ]
    assert d.memballoon is not None and d.memballoon.model == "virtio"
    assert [x.type for x in d.devices_named("redirdev")] == ["spicevmc", "spicevmc"]
    assert len(d.devices_named("audio")) == 1
    # every view keeps its element
    assert d.disks[0].element.tag == "disk" and d.interfaces[0].element.tag == "interface"


def test_other_samples_views() -> None:
    xen = parse_domain_xml((DATA / "xen-pvh.xml").read_text())
    assert xen.uuid == "3c1f7a2b-9e8d-4c6f-a1b2-c3d4e5f60718"  # normalized from compact form
    assert (xen.memory_kib, xen.current_memory_kib, xen.vcpus, xen.current_vcpus) == (
        262144,
        196608,
        2,
        1,
    )
    assert (xen.os.type, xen.os.kernel, xen.os.initrd, xen.os.cmdline) == (
        "xenpvh",
        "/var/lib/xen/boot/vmlinuz",
        "/var/lib/xen/boot/initrd.img",
        "console=hvc0 root=/dev/xvda1",
    )
    assert xen.on_crash == "preserve"
    assert (xen.interfaces[0].mac, xen.interfaces[0].source_bridge) == (None, "xenbr0")

    test = parse_domain_xml((DATA / "test-default.xml").read_text())
    assert test.os.boot_devs == ("hd", "network")
    assert test.os.loader is not None
    assert (test.os.loader.path, test.os.loader.readonly, test.os.loader.type) == (
        "/usr/share/seabios/bios.bin",
        True,
        "rom",
    )
    assert (test.disks[0].boot_order, test.interfaces[0].boot_order) == (1, 2)
    assert test.interfaces[0].target_dev == "testnet0"
    assert test.on_crash == "coredump-restart"
    assert [p.model for p in test.panics] == ["isa"]


def test_defaults_follow_libvirt() -> None:
    d = parse_domain_xml((DATA / "minimal.xml").read_text())
    assert (d.on_poweroff, d.on_reboot, d.on_crash) == ("destroy", "restart", "destroy")
    assert (d.vcpus, d.current_vcpus) == (1, 1)
    assert d.current_memory_kib == d.memory_kib == 131072
    assert (d.cpu, d.clock, d.pm, d.memballoon, d.emulator, d.metadata) == (None,) * 6
    assert d.disks == () and d.devices == ()
    assert d.features == {}
    nic = parse_domain_xml(minimal(devices="<interface/>")).interfaces[0]
    assert (nic.type, nic.mac) == ("user", None)
    disk = parse_domain_xml(minimal(devices="<disk><target dev='hda'/></disk>")).disks[0]
    assert (disk.type, disk.device, disk.source_path) == ("file", "disk", None)
    serial = parse_domain_xml(minimal(devices="<serial/>")).serials[0]
    assert serial.type == "pty"
    cpu = parse_domain_xml(minimal(extra="<cpu><model fallback='allow'>qemu64</model></cpu>")).cpu
    assert cpu is not None and (cpu.mode, cpu.model, cpu.fallback) == ("custom", "qemu64", "allow")


def test_itco_watchdog_parses() -> None:
    """virt-install on libvirt >= 9.1 adds it for q35; this machine's schema (9.0) predates it."""
    d = parse_domain_xml(minimal(devices="<watchdog model='itco' action='reset'/>"))
    assert [(w.model, w.action) for w in d.watchdogs] == [("itco", "reset")]


def test_element_helper() -> None:
    d = parse_domain_xml(Q35)
    el = d.element("devices/disk[@device='cdrom']/source")
    assert el is not None and el.get("file", "").endswith(".iso")
    assert d.element("devices/hostdev") is None
    assert len(d.elements("devices/controller[@model='pcie-root-port']")) == 7
    assert d.element("count(devices/disk)") is None  # not an element


# ---------------------------------------------------------------- uuid


def test_missing_uuid_is_generated_and_written_into_the_tree() -> None:
    d1 = parse_domain_xml((DATA / "minimal.xml").read_text())
    d2 = parse_domain_xml((DATA / "minimal.xml").read_text())
    assert uuid.UUID(d1.uuid).version == 4 and d1.uuid != d2.uuid
    out = d1.to_xml()
    assert f"  <name>tiny</name>\n  <uuid>{d1.uuid}</uuid>\n" in out
    assert parse_domain_xml(out).uuid == d1.uuid


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        ("5F0B7C3E-8A4F-4D52-9A1E-2C6B3D7E9F10", "5f0b7c3e-8a4f-4d52-9a1e-2c6b3d7e9f10"),
        ("5f0b7c3e8a4f4d529a1e2c6b3d7e9f10", "5f0b7c3e-8a4f-4d52-9a1e-2c6b3d7e9f10"),
        (" 5f0b7c3e-8a4f-4d52-9a1e-2c6b3d7e9f10\n", "5f0b7c3e-8a4f-4d52-9a1e-2c6b3d7e9f10"),
    ],
)
def test_uuid_forms(given: str, normalized: str) -> None:
    d = parse_domain_xml(minimal(extra=f"<uuid>{given}</uuid>"))
    assert d.uuid == normalized
    assert f"<uuid>{given}</uuid>" in d.to_xml()  # the tree keeps what was given


# ---------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("value", "unit", "kib"),
    [
        (1024, "b", 1),
        (1025, "bytes", 2),  # rounded up, as libvirt does
        (1, "byte", 1),
        (1000, "KB", 977),
        (5, "k", 5),
        (5, "KiB", 5),
        (5, None, 5),
        (1, "MB", 977),
        (3, "M", 3072),
        (3, "MiB", 3072),
        (3, "mib", 3072),
        (1, "GB", 976563),
        (2, "G", 2097152),
        (2, "GiB", 2097152),
        (1, "TB", 976562500),
        (1, "T", 1024**3),
        (1, "TiB", 1024**3),
        (1, "P", 1024**4),
    ],
)
def test_units(value: int, unit: str | None, kib: int) -> None:
    assert to_kib(value, unit) == kib
    attr = f" unit='{unit}'" if unit else ""
    text = minimal().replace("<memory unit='MiB'>128</memory>", f"<memory{attr}>{value}</memory>")
    assert parse_domain_xml(text).memory_kib == kib


def test_unit_table_covers_libvirt_units() -> None:
    for unit in ("b", "bytes", "kb", "k", "kib", "mb", "m", "mib", "gb", "g", "gib", "tb", "t"):
        assert unit in UNIT_FACTORS
    with pytest.raises(ValueError, match="unknown unit"):
        to_kib(1, "XB")


@pytest.mark.parametrize(
    ("current", "expected"),
    [("65536", 65536), ("999999", 131072), ("0", 131072)],  # libvirt clamps to <memory>
)
def test_current_memory_is_clamped_like_libvirt(current: str, expected: int) -> None:
    d = parse_domain_xml(minimal(extra=f"<currentMemory unit='KiB'>{current}</currentMemory>"))
    assert d.current_memory_kib == expected


# ---------------------------------------------------------------- errors


def _remove(path: str) -> Callable[[etree._Element], None]:
    def change(root: etree._Element) -> None:
        for el in root.xpath(path):
            el.getparent().remove(el)

    return change


def _set(path: str, attr: str | None, value: str) -> Callable[[etree._Element], None]:
    def change(root: etree._Element) -> None:
        for el in root.xpath(path):
            if attr is None:
                el.text = value
            else:
                el.set(attr, value)

    return change


def _set_boot_order(root: etree._Element) -> None:
    disk = root.find("devices/disk")
    assert disk is not None
    etree.SubElement(disk, "boot").set("order", "0")


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<domain type='kvm'><name>&lol3;</name><memory>1</memory><os><type>hvm</type></os></domain>"""

XXE = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<domain type='kvm'><name>&xxe;</name><memory>1</memory><os><type>hvm</type></os></domain>"""

EXTERNAL_DTD = """<!DOCTYPE domain SYSTEM "http://127.0.0.1:9/domain.dtd">
<domain type='kvm'><name>a</name><memory>1</memory><os><type>hvm</type></os></domain>"""

ERROR_CASES: list[tuple[str, str | bytes, str]] = [
    ("malformed", "<domain type='kvm'><name>x</name>", "malformed domain XML"),
    ("not xml", "hello", "malformed domain XML"),
    ("empty", "  ", "empty"),
    ("billion laughs", BILLION_LAUGHS, "DOCTYPE"),
    ("xxe", XXE, "DOCTYPE"),
    ("external dtd", EXTERNAL_DTD, "DOCTYPE"),
    (
        "utf-16 doctype",
        BILLION_LAUGHS.replace('"1.0"?', '"1.0" encoding="UTF-16"?').encode("utf-16"),
        "DOCTYPE",
    ),
    ("undefined entity", minimal(name="&foo;"), "malformed domain XML"),
    ("wrong root", "<network><name>x</name></network>", "root element must be <domain>"),
    ("no type", minimal().replace(" type='kvm'", ""), "missing <domain type=...>"),
    ("missing name", q35_with(_remove("name")), "missing <name>"),
    ("empty name", minimal(name=" "), "<name> must not be empty"),
    ("slash in name", minimal(name="a/b"), "must not contain '/'"),
    ("missing memory", q35_with(_remove("memory")), "Memory size must be specified via <memory>"),
    ("bad unit", q35_with(_set("memory", "unit", "XB")), "invalid <memory unit='XB'>"),
    (
        "bad current unit",
        q35_with(_set("currentMemory", "unit", "KiBB")),
        "invalid <currentMemory unit='KiBB'>",
    ),
    ("memory not int", q35_with(_set("memory", None, "lots")), "<memory> must be a non-negative"),
    ("negative memory", q35_with(_set("memory", None, "-1")), "<memory> must be a non-negative"),
    ("zero memory", q35_with(_set("memory", None, "0")), "<memory> must be greater than zero"),
    ("bad uuid", q35_with(_set("uuid", None, "not-a-uuid")), "invalid <uuid> 'not-a-uuid'"),
    ("short uuid", q35_with(_set("uuid", None, "5f0b7c3e-8a4f-4d52-9a1e")), "invalid <uuid>"),
    (
        "misplaced dashes",
        q35_with(_set("uuid", None, "5f0b7c3e8-a4f-4d52-9a1e-2c6b3d7e9f10")),
        "invalid <uuid>",
    ),
    ("vcpu zero", q35_with(_set("vcpu", None, "0")), "<vcpu> must be a positive integer"),
    ("vcpu text", q35_with(_set("vcpu", None, "two")), "<vcpu> must be a positive integer"),
    ("vcpu negative", q35_with(_set("vcpu", None, "-2")), "<vcpu> must be a positive integer"),
    ("vcpu current", q35_with(_set("vcpu", "current", "4")), "<vcpu current='4'> exceeds"),
    ("vcpu current 0", q35_with(_set("vcpu", "current", "0")), "<vcpu current='0'> must be"),
    ("bad on_crash", q35_with(_set("on_crash", None, "explode")), "invalid <on_crash>='explode'"),
    (
        "coredump on_reboot",
        q35_with(_set("on_reboot", None, "coredump-destroy")),
        "invalid <on_reboot>='coredump-destroy'",
    ),
    ("missing os", q35_with(_remove("os")), "missing <os>"),
    ("missing os type", q35_with(_remove("os/type")), "missing <os><type>"),
    ("bad os type", q35_with(_set("os/type", None, "dos")), "invalid <os><type>='dos'"),
    ("bad boot dev", q35_with(_set("os/boot", "dev", "usb")), "invalid <boot dev='usb'"),
    (
        "disk without target",
        q35_with(_remove("devices/disk[1]/target")),
        "missing <target dev=...> in <disk type='file'> (source /var/lib/libvirt/images/debian12",
    ),
    (
        "disk bad device",
        q35_with(_set("devices/disk[1]", "device", "tape")),
        "invalid <disk device='tape'",
    ),
    (
        "disk bad cache",
        q35_with(_set("devices/disk[1]/driver", "cache", "fast")),
        "<driver cache='fast'",
    ),
    (
        "duplicate target",
        q35_with(_set("devices/disk[2]/target", "dev", "vda")),
        "<target dev='vda'> duplicated",
    ),
    (
        "bad mac",
        q35_with(_set("devices/interface/mac", "address", "52:54:00:zz:00:01")),
        "invalid <mac address='52:54:00:zz:00:01'> in <interface type='network'>",
    ),
    (
        "multicast mac",
        q35_with(_set("devices/interface/mac", "address", "01:00:5e:00:00:01")),
        "is multicast",
    ),
    ("bad boot order", q35_with(_set_boot_order), "<boot order='0'"),
    (
        "bad graphics port",
        q35_with(_set("devices/graphics[2]", "port", "vnc")),
        "<graphics type='vnc' port='vnc'",
    ),
    (
        "bad autoport",
        q35_with(_set("devices/graphics[1]", "autoport", "maybe")),
        "autoport='maybe'",
    ),
    (
        "bad cpu mode",
        q35_with(_set("cpu", "mode", "host-everything")),
        "invalid <cpu mode='host-everything'",
    ),
    (
        "two balloons",
        minimal(devices="<memballoon model='virtio'/><memballoon model='none'/>"),
        "only one <memballoon>",
    ),
    ("balloon without model", minimal(devices="<memballoon/>"), "missing model in <memballoon>"),
    (
        "bad timer",
        q35_with(_set("clock/timer[3]", "present", "perhaps")),
        "<timer name='hpet' present='perhaps'",
    ),
]


@pytest.mark.parametrize(
    ("xml", "message"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_invalid_xml_raises_xml_error_naming_the_problem(xml: str | bytes, message: str) -> None:
    with pytest.raises(XMLError) as info:
        parse_domain_xml(xml)
    assert message in info.value.message
    assert info.value.code == "XML_ERROR"


def test_size_bound() -> None:
    with pytest.raises(XMLError, match="over the limit of 100 bytes"):
        parse_domain_xml(Q35, limits=XMLLimits(max_bytes=100))
    padded = minimal(extra="<!--" + "x" * (1 << 20) + "-->")
    with pytest.raises(XMLError, match="over the limit of 1048576 bytes"):
        parse_domain_xml(padded)
    assert parse_domain_xml(padded, limits=XMLLimits(max_bytes=2 << 20)).name == "vm"


def test_dtd_is_refused_after_parsing_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The byte-level pre-check is a shortcut; the parsed document is checked as well."""
    monkeypatch.setattr(domain_xml, "_reject_dtd", lambda data: None)
    for doc in (BILLION_LAUGHS, XXE, EXTERNAL_DTD):
        with pytest.raises(XMLError, match="DOCTYPE"):
            parse_domain_xml(doc)


def test_wrong_input_type() -> None:
    with pytest.raises(XMLError, match="must be str or bytes"):
        parse_domain_xml(42)  # type: ignore[arg-type]


def test_encodings() -> None:
    declared = "<?xml version='1.0' encoding='ISO-8859-1'?>\n" + minimal(name="café")
    assert parse_domain_xml(declared).name == "café"  # str: the declaration is overridden
    assert parse_domain_xml(declared.encode("latin-1")).name == "café"
    assert parse_domain_xml(minimal(name="café").encode()).name == "café"


# ---------------------------------------------------------------- changes


def test_set_interface_mac_writes_back() -> None:
    d = parse_domain_xml((DATA / "xen-pvh.xml").read_text())
    d.set_interface_mac(0, "52:54:00:AA:BB:CC")
    assert d.interfaces[0].mac == "52:54:00:aa:bb:cc"
    out = d.to_xml()
    assert "<interface type='bridge'>\n      <mac address='52:54:00:aa:bb:cc'/>" in out
    assert parse_domain_xml(out).interfaces[0].mac == "52:54:00:aa:bb:cc"
    d.set_interface_mac(0, "52:54:00:00:00:01")  # replaces, does not add
    assert d.to_xml().count("<mac ") == 1
    with pytest.raises(XMLError, match="invalid <mac"):
        d.set_interface_mac(0, "nonsense")
    with pytest.raises(IndexError):
        d.set_interface_mac(5, "52:54:00:00:00:02")
    assert d.interfaces[0].mac == "52:54:00:00:00:01"


def test_runtime_setters() -> None:
    d = parse_domain_xml(Q35)
    d.set_interface_target_dev(0, "vnet3")
    d.set_graphics_port(1, 5901)
    d.set_chardev_source_path("serial", 0, "/dev/pts/7")
    d.set_current_memory_kib(1048576)
    d.set_current_vcpus(1)
    assert d.interfaces[0].target_dev == "vnet3"
    assert d.graphics[1].port == 5901
    assert d.serials[0].source_path == "/dev/pts/7"
    assert d.current_memory_kib == 1048576
    assert (d.vcpus, d.current_vcpus) == (2, 1)
    with pytest.raises(XMLError, match="exceeds the maximum"):
        d.set_current_vcpus(3)
    assert d.current_vcpus == 1
    d.set_current_vcpus(2)
    assert "current=" not in d.to_xml()
    with pytest.raises(ValueError):
        d.set_chardev_source_path("disk", 0, "/x")
    d.set_name("renamed")
    assert d.name == "renamed" and "<name>renamed</name>" in d.to_xml()


def test_edit_rolls_back_an_invalid_change() -> None:
    d = parse_domain_xml(Q35)
    root = d.root
    with (
        pytest.raises(XMLError, match="Memory size must be specified via <memory>"),
        d.edit() as tree,
    ):
        mem = tree.find("memory")
        assert mem is not None
        tree.remove(mem)
    assert d.root is root and d.memory_kib == 2097152
    assert d.to_xml() == Q35
    with d.edit() as tree:
        etree.SubElement(tree.find("devices"), "panic").set("model", "isa")
    assert [p.model for p in d.panics] == ["isa"]


def test_failed_refresh_keeps_previous_views() -> None:
    d = parse_domain_xml(Q35)
    vcpu = d.root.find("vcpu")
    assert vcpu is not None
    vcpu.text = "zero"
    with pytest.raises(XMLError, match="<vcpu> must be a positive integer"):
        d.refresh()
    assert d.vcpus == 2 and d.name == "debian12"
    vcpu.text = "4"
    d.refresh()
    assert d.vcpus == 4


def test_copy_is_independent() -> None:
    d = parse_domain_xml(Q35)
    c = d.copy()
    assert isinstance(c, DomainDefinition) and c.uuid == d.uuid
    c.set_interface_mac(0, "52:54:00:00:00:09")
    assert d.interfaces[0].mac == "52:54:00:6b:3c:5a"
    assert d.to_xml() == Q35


# ---------------------------------------------------------------- unknown devices


@pytest.mark.parametrize(
    ("supported", "unknown"),
    [
        (
            {
                "disk",
                "interface",
                "controller",
                "serial",
                "console",
                "channel",
                "input",
                "graphics",
                "sound",
                "audio",
                "video",
                "redirdev",
                "watchdog",
                "memballoon",
                "rng",
            },
            [],
        ),
        (
            {
                "disk:disk",
                "interface:user",
                "controller",
                "serial:pty",
                "console",
                "input",
                "memballoon",
            },
            [
                "<disk device='cdrom'>",
                "<interface type='network'>",
                "<channel>",
                "<graphics>",
                "<sound>",
                "<audio>",
                "<video>",
                "<redirdev>",
                "<watchdog>",
                "<rng>",
            ],
        ),
        (
            {
                "disk",
                "interface",
                "controller",
                "serial",
                "console",
                "input",
                "memballoon",
                "channel:unix",
                "graphics:vnc",
                "sound",
                "audio",
                "video",
                "watchdog",
                "rng",
            },
            ["<channel type='spicevmc'>", "<graphics type='spice'>", "<redirdev>"],
        ),
    ],
)
def test_unknown_devices(supported: set[str], unknown: list[str]) -> None:
    assert unknown_devices(parse_domain_xml(Q35), supported) == unknown


# ---------------------------------------------------------------- libvirt's schema

VALIDATOR = shutil.which("virt-xml-validate")


@pytest.mark.skipif(VALIDATOR is None, reason="virt-xml-validate (libvirt-clients) not installed")
@pytest.mark.parametrize("sample", SAMPLES)
def test_output_validates_against_libvirt_schema(sample: str, tmp_path: Path) -> None:
    d = parse_domain_xml((DATA / sample).read_text())
    if d.interfaces:
        d.set_interface_mac(0, "52:54:00:12:34:56")
    path = tmp_path / sample
    path.write_text(d.to_xml())
    assert VALIDATOR is not None
    proc = subprocess.run(
        [VALIDATOR, str(path), "domain"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
