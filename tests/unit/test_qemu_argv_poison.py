"""Issue 11, items 4-6: no string of a domain definition escapes into QEMU's command line.

Every value that reaches the argv is either escaped (``,`` doubled in QemuOpts, JSON for
``-device``/``-blockdev``/``-object``) or type-checked (ports, addresses, compression
modes, machine/CPU names, integers). Property tests put ``,``, ``=``, quotes, colons and
newlines into every string field of the XML model, build the argv, read it back the way
QEMU does (tests/qemuopts.py) and require exactly the options the builder meant: only
known keys, and every free-form value intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from drivers.qemu.argv import QemuPaths, build_command
from tests.qemuopts import parse_argv, split
from virtbus.domain import parse_domain_xml
from virtbus.errors import ConfigUnsupported, XMLError

RUN = Path("/run/vbp")
UUID = "0e3bd1a4-42bb-4f0b-9b0c-6a6a4b7f9e21"
NASTY = list(",=\"'\n:; /\\{}[]%#&<>") + list("ab09-_.é")
POISON_MARKS = ",=\"':;"


def text(alphabet: list[str], max_size: int = 24) -> st.SearchStrategy[str]:
    return st.text(alphabet=st.sampled_from(alphabet), min_size=1, max_size=max_size)


# free-form fields: anything but NUL (paths may not hold one) and, for names, '/' and
# control characters (refused at define, as libvirt does)
FREE = text(NASTY)
PATH = FREE.map(lambda s: "/tmp/" + s)
NAME = text([c for c in NASTY if c not in "/\n"]).filter(lambda s: s.strip() != "")
POISON = text(NASTY).filter(lambda s: any(c in POISON_MARKS for c in s))


def _sub(parent: Any, tag: str, text_: str | None = None, **attrs: str) -> Any:
    el = etree.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text_ is not None:
        el.text = text_
    return el


def free_form_xml(v: dict[str, str]) -> str:
    """Every free-form string field that reaches the argv, set to ``v``'s values."""
    dom = etree.Element("domain", type="qemu")
    _sub(dom, "name", v["name"])
    _sub(dom, "uuid", UUID)
    _sub(dom, "memory", "256", unit="MiB")
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="q35")
    _sub(os_, "kernel", v["kernel"])
    _sub(os_, "initrd", v["initrd"])
    _sub(os_, "cmdline", v["cmdline"])
    devices = _sub(dom, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="raw")
    _sub(disk, "source", file=v["disk"])
    _sub(disk, "target", dev="vda", bus="virtio")
    _sub(disk, "serial", v["serial"])
    nic = _sub(devices, "interface", type="bridge")
    _sub(nic, "source", bridge=v["bridge"])
    tap = _sub(devices, "interface", type="ethernet")
    _sub(tap, "target", dev=v["ifname"])
    log = _sub(devices, "serial", type="file")
    _sub(log, "source", path=v["file"])
    _sub(log, "target", port="0")
    sock = _sub(devices, "serial", type="unix")
    _sub(sock, "source", mode="bind", path=v["bind"])
    _sub(sock, "target", port="1")
    chan = _sub(devices, "channel", type="unix")
    _sub(chan, "source", mode="connect", path=v["connect"])
    _sub(chan, "target", type="virtio", name=v["channel"])
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", v["rng"], model="random")
    gfx = _sub(devices, "graphics", type="vnc")
    _sub(gfx, "listen", type="socket", socket=v["vnc"])
    return etree.tostring(dom, encoding="unicode")


FREE_FIELDS = st.fixed_dictionaries(
    {
        "name": NAME,
        "kernel": PATH,
        "initrd": PATH,
        "cmdline": FREE,
        "disk": PATH,
        "serial": FREE,
        "bridge": FREE,
        "ifname": FREE,
        "file": PATH,
        "bind": PATH,
        "connect": PATH,
        "channel": FREE,
        "rng": PATH,
        "vnc": PATH,
    }
)


def build(xml: str) -> list[str]:
    return build_command(parse_domain_xml(xml), QemuPaths(RUN), kvm_available=False).argv


def sock(path: str) -> str:
    return str(Path(path))


def options(parsed: list[tuple[str, Any]], name: str) -> list[Any]:
    return [value for opt, value in parsed if opt == name]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FREE_FIELDS)
def test_free_form_strings_reach_qemu_intact_and_add_no_option(v: dict[str, str]) -> None:
    parsed = parse_argv(build(free_form_xml(v)))  # asserts: known keys only, none twice
    assert options(parsed, "-name") == [{"guest": v["name"], "debug-threads": "on"}]
    assert options(parsed, "-kernel") == [v["kernel"]]
    assert options(parsed, "-initrd") == [v["initrd"]]
    assert options(parsed, "-append") == [v["cmdline"]]
    chardevs = {c["id"]: c for c in options(parsed, "-chardev")}
    assert chardevs["charserial0"] == {"backend": "file", "id": "charserial0", "path": v["file"]}
    # socket paths are the same path, spelled as pathlib does ('a//b' is 'a/b')
    bind = {"backend": "socket", "id": "charserial1", "path": sock(v["bind"]), "server": "on"}
    assert chardevs["charserial1"] == bind | {"wait": "off"}
    connect = {"backend": "socket", "id": "charchannel0", "path": sock(v["connect"])}
    assert chardevs["charchannel0"] == connect  # connect mode: no server option
    netdevs = {n["id"]: n for n in options(parsed, "-netdev")}
    assert netdevs["hostnet0"] == {"type": "bridge", "id": "hostnet0", "br": v["bridge"]}
    assert netdevs["hostnet1"] == {"type": "tap", "id": "hostnet1", "script": "no",
                                   "downscript": "no", "ifname": v["ifname"]}  # fmt: skip
    assert options(parsed, "-vnc") == [{"vnc": f"unix:{sock(v['vnc'])}", "audiodev": "audio1"}]
    blockdevs = options(parsed, "-blockdev")
    assert [b["filename"] for b in blockdevs if "filename" in b] == [v["disk"]]
    devices = {d["id"]: d for d in options(parsed, "-device")}
    # libvirt writes a serial's spaces as '\ ' (qemuBuildDiskDeviceProps); the guest sees them
    assert devices["virtio-disk0"]["serial"] == v["serial"].replace(" ", "\\ ")
    assert devices["channel0"]["name"] == v["channel"]
    assert [o["filename"] for o in options(parsed, "-object")] == [v["rng"].strip()]  # text


# ---------------------------------------------------------------- typed fields: refused

BASE_TYPED = {
    "machine": "q35",
    "model": "qemu64",
    "feature": "avx",
    "tcp_host": "127.0.0.1",
    "tcp_service": "45991",
    "mode": "bind",
    "spice_listen": "127.0.0.1",
    "compression": "auto_glz",
    "vnc_listen": "127.0.0.1",
    "audio": "1",
    "slot": "0x05",
    "chassis": "3",
    "ports": "4",
}


def typed_xml(v: dict[str, str]) -> str:
    """Every typed field that reaches the argv, set to ``v``'s values."""
    dom = etree.Element("domain", type="qemu")
    _sub(dom, "name", "typed")
    _sub(dom, "uuid", UUID)
    _sub(dom, "memory", "256", unit="MiB")
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=v["machine"])
    cpu = _sub(dom, "cpu", mode="custom")
    _sub(cpu, "model", v["model"])
    _sub(cpu, "feature", name=v["feature"], policy="require")
    devices = _sub(dom, "devices")
    _sub(devices, "controller", type="pci", index="1", model="pcie-root-port").append(
        etree.Element("target", chassis=v["chassis"])
    )
    _sub(devices, "controller", type="usb", index="0", model="qemu-xhci", ports=v["ports"])
    tcp = _sub(devices, "serial", type="tcp")
    _sub(tcp, "source", mode=v["mode"], host=v["tcp_host"], service=v["tcp_service"])
    _sub(tcp, "protocol", type="raw")
    spice = _sub(devices, "graphics", type="spice", port="5930", listen=v["spice_listen"])
    _sub(spice, "image", compression=v["compression"])
    _sub(devices, "graphics", type="vnc", port="5901", listen=v["vnc_listen"])
    _sub(devices, "audio", id=v["audio"], type="spice")
    sound = _sub(devices, "sound", model="ich9")
    _sub(sound, "audio", id=v["audio"])
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "address", type="pci", domain="0", bus="0", slot=v["slot"], function="0")
    return etree.tostring(dom, encoding="unicode")


def test_the_typed_base_builds_and_reads_back_as_meant() -> None:
    """The premise of the refusal tests: with sane values every typed field is used."""
    parsed = parse_argv(build(typed_xml(BASE_TYPED)))
    assert options(parsed, "-machine")[0]["type"] == "q35"
    assert options(parsed, "-cpu") == ["qemu64,avx=on"]
    tcp = next(c for c in options(parsed, "-chardev") if c["id"] == "charserial0")
    assert (tcp["host"], tcp["port"], tcp["server"]) == ("127.0.0.1", "45991", "on")
    spice = options(parsed, "-spice")[0]
    assert (spice["addr"], spice["image-compression"]) == ("127.0.0.1", "auto_glz")
    assert options(parsed, "-vnc") == [{"vnc": "127.0.0.1:1", "audiodev": "audio1"}]
    assert options(parsed, "-audiodev") == [{"driver": "spice", "id": "audio1"}]
    devices = {d["driver"]: d for d in options(parsed, "-device")}
    assert devices["virtio-rng-pci"]["addr"] == "0x5"
    by_id = {d["id"]: d for d in options(parsed, "-device")}
    assert by_id["pci.1"]["chassis"] == 3 and devices["qemu-xhci"]["p2"] == 4


def shape(argv: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Which options, with which keys: what a poisoned value must not change."""
    return [
        (opt, tuple(sorted(value)) if isinstance(value, dict) else ())
        for opt, value in parse_argv(argv)
    ]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(BASE_TYPED)), POISON)
def test_a_poisoned_typed_field_is_refused_or_changes_nothing(field: str, poison: str) -> None:
    """Refused with a libvirt code (XML_ERROR, CONFIG_UNSUPPORTED), or, when the value is
    valid after all (``::`` is an IPv6 address), the argv has exactly the base's options."""
    try:
        argv = build(typed_xml({**BASE_TYPED, field: poison}))
    except (XMLError, ConfigUnsupported):
        return
    assert shape(argv) == shape(build(typed_xml(BASE_TYPED))), (field, poison)


# ---------------------------------------------------------------- the inputs


def _domain(devices: str) -> str:
    return (
        f"<domain type='qemu'><name>i</name><uuid>{UUID}</uuid>"
        "<memory unit='MiB'>256</memory><os><type machine='q35'>hvm</type></os>"
        f"<devices>{devices}</devices></domain>"
    )


def test_item_4_a_logfile_in_a_tcp_service_is_refused() -> None:
    xml = _domain(
        "<serial type='tcp'><source mode='bind' host='127.0.0.1' "
        "service='45991,logfile=/any/path'/><protocol type='raw'/></serial>"
    )
    with pytest.raises(XMLError, match="service"):
        build(xml)


def test_item_5_an_address_in_the_spice_compression_is_refused() -> None:
    xml = _domain(
        "<graphics type='spice' port='5930' listen='127.0.0.1'>"
        "<image compression='auto_glz,addr=0.0.0.0'/></graphics>"
    )
    with pytest.raises(XMLError, match="compression"):
        build(xml)


def test_the_splitter_reads_the_escapes_the_way_qemu_does() -> None:
    """Checks the checker: what the old builder emitted for items 4 and 5 shows up."""
    old_tcp = "socket,id=charserial0,host=127.0.0.1,port=45991,logfile=/any/path,server=on"
    assert ("logfile", "/any/path") in split(old_tcp, "backend")
    old_spice = "port=5930,addr=127.0.0.1,image-compression=auto_glz,addr=0.0.0.0"
    assert [v for k, v in split(old_spice, None) if k == "addr"] == ["127.0.0.1", "0.0.0.0"]
    assert split("file,id=c,path=/a,,logfile=/b", "backend")[2] == ("path", "/a,logfile=/b")
    assert split("unix:/a=b", "vnc") == [("unix:/a", "b")]  # why -vnc spells out vnc=
