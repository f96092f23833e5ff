# ruff: noqa: E501  (tables of XML snippets read better unwrapped)
"""QEMU command line from domain XML: table-driven fragments, CONFIG_UNSUPPORTED cases, and
real QEMU launches of virt-install's default q35 guest (TCG, and KVM when usable)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.qemu.argv import (
    QemuLaunch,
    QemuPaths,
    build_command,
    disk_paths,
    graphics_needing_ports,
)
from drivers.qemu.argv_devices import generated_mac
from drivers.qemu.argv_storage import disk_name_index
from drivers.qemu.capabilities import QemuCapabilities, parse_device_help
from virtbus.domain import parse_domain_xml
from virtbus.errors import ConfigUnsupported, InvalidArgument, XMLError

DATA = Path(__file__).parent / "data"
UUID = "5f0b7c3e-8a4f-4d52-9a1e-2c6b3d7e9f10"
RUN = Path("/run/vb-test")


def domain(
    devices: str = "",
    *,
    hv: str = "qemu",
    machine: str = "q35",
    os_extra: str = "",
    features: str = "<acpi/><apic/>",
    top: str = "",
    memory: str = "<memory unit='MiB'>256</memory>",
    vcpu: str = "<vcpu>2</vcpu>",
) -> str:
    return f"""<domain type='{hv}'>
  <name>t1</name><uuid>{UUID}</uuid>{memory}{vcpu}
  <os><type arch='x86_64' machine='{machine}'>hvm</type>{os_extra}</os>
  <features>{features}</features>{top}
  <devices>{devices}</devices>
</domain>"""


def build(xml: str, **kw: Any) -> QemuLaunch:
    kw.setdefault("kvm_available", True)
    return build_command(parse_domain_xml(xml), QemuPaths(RUN), **kw)


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def devs(argv: list[str]) -> list[dict[str, Any]]:
    return [json.loads(v) for v in values(argv, "-device")]


def dev(argv: list[str], driver: str) -> dict[str, Any]:
    found = [d for d in devs(argv) if d["driver"] == driver]
    assert found, f"no -device {driver} in {argv}"
    return found[0]


def blockdevs(argv: list[str]) -> list[dict[str, Any]]:
    return [json.loads(v) for v in values(argv, "-blockdev")]


FILE_DISK = "<disk type='file' device='disk'><driver name='qemu' type='{fmt}'{attrs}/>"
FILE_DISK += "<source file='/img/a.{fmt}'/><target dev='{dev}' bus='{bus}'/>{extra}</disk>"


def disk(
    fmt: str = "qcow2", dev: str = "vda", bus: str = "virtio", attrs: str = "", extra: str = ""
) -> str:
    return FILE_DISK.format(fmt=fmt, dev=dev, bus=bus, attrs=attrs, extra=extra)


# ---------------------------------------------------------------------------- basics


def test_basics_and_fixed_options() -> None:
    launch = build(domain(hv="kvm"))
    argv = launch.argv
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-S", "-no-shutdown"):
        assert flag in argv
    assert values(argv, "-name") == ["guest=t1,debug-threads=on"]
    assert values(argv, "-uuid") == [UUID]
    assert values(argv, "-accel") == ["kvm"]
    assert values(argv, "-m") == ["size=262144k"]  # libvirt's form, in KiB
    assert values(argv, "-smp") == ["2,sockets=2,cores=1,threads=1"]
    assert values(argv, "-display") == ["none"]
    assert values(argv, "-msg") == ["timestamp=on"]
    assert values(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    assert launch.qmp_socket == RUN / f"{UUID}.qmp"
    assert launch.pidfile == RUN / f"{UUID}.pid"
    assert launch.logfile == RUN / f"{UUID}.log"
    assert values(argv, "-pidfile") == [str(launch.pidfile)]
    assert f"path={launch.qmp_socket},server=on,wait=off" in values(argv, "-chardev")[0]
    assert values(argv, "-mon") == ["chardev=charmonitor,id=monitor,mode=control"]
    assert "-incoming" not in argv
    assert launch.sockets[0] == launch.qmp_socket
    assert launch.accel == "kvm"
    # a launch hands QEMU the QMP socket already listening at that path
    handed = build(domain(), kvm_available=True, monitor_fd=9)
    assert values(handed.argv, "-chardev")[0] == "socket,id=charmonitor,fd=9,server=on,wait=off"
    assert handed.qmp_socket == launch.qmp_socket and handed.sockets[0] == launch.qmp_socket
    # libvirt adds a virtio balloon when <memballoon> is absent
    assert dev(argv, "virtio-balloon-pci")["id"] == "balloon0"


def test_incoming_and_emulator() -> None:
    launch = build(domain(), incoming="tcp:0:4444", emulator="/usr/bin/qemu-system-x86_64")
    assert launch.argv[0] == "/usr/bin/qemu-system-x86_64"
    assert values(launch.argv, "-incoming") == ["defer"]
    assert launch.incoming_uri == "tcp:0:4444"


def test_memory_and_balloon_target() -> None:
    xml = domain(
        memory="<memory unit='KiB'>1049000</memory><currentMemory unit='MiB'>512</currentMemory>"
    )
    launch = build(xml)
    assert values(launch.argv, "-m") == ["size=1048576k"]  # aligned down to 1 MiB, as libvirt
    assert launch.balloon and launch.balloon_target_kib == 512 * 1024
    assert build(domain()).balloon_target_kib is None


CASES: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, domain() kwargs, flag, expected value fragment)
    ("tcg", {"hv": "qemu"}, "-accel", "tcg"),
    ("machine-q35", {"machine": "pc-q35-7.2"}, "-machine", "pc-q35-7.2,usb=off"),
    ("machine-pc", {"machine": "pc-i440fx-7.2"}, "-machine", "pc-i440fx-7.2,"),
    ("acpi-on", {}, "-machine", "acpi=on"),
    ("acpi-off", {"features": "<apic/>"}, "-machine", "acpi=off"),
    ("vmport", {"features": "<acpi/><vmport state='off'/>"}, "-machine", "vmport=off"),
    ("smm", {"features": "<smm state='on'/>"}, "-machine", "smm=on"),
    ("vcpu-current", {"vcpu": "<vcpu current='1'>4</vcpu>"}, "-smp", "1,maxcpus=4,"),
    (
        "topology",
        {
            "vcpu": "<vcpu>4</vcpu>",
            "top": "<cpu><topology sockets='1' cores='2' threads='2'/></cpu>",
        },
        "-smp",
        "4,sockets=1,dies=1,clusters=1,cores=2,threads=2",
    ),
    ("cpu-passthrough", {"hv": "kvm", "top": "<cpu mode='host-passthrough'/>"}, "-cpu", "host"),
    ("cpu-host-model", {"hv": "kvm", "top": "<cpu mode='host-model'/>"}, "-cpu", "host"),
    ("cpu-host-model-tcg", {"top": "<cpu mode='host-model'/>"}, "-cpu", "max"),
    ("cpu-maximum", {"top": "<cpu mode='maximum'/>"}, "-cpu", "max"),
    (
        "cpu-custom",
        {
            "top": "<cpu mode='custom'><model>Skylake-Client</model>"
            "<feature policy='require' name='vmx'/><feature policy='disable' name='mpx'/></cpu>"
        },
        "-cpu",
        "Skylake-Client,vmx=on,mpx=off",
    ),
    ("clock-utc", {"top": "<clock offset='utc'/>"}, "-rtc", "base=utc"),
    ("clock-local", {"top": "<clock offset='localtime'/>"}, "-rtc", "base=localtime"),
    (
        "rtc-catchup",
        {"top": "<clock offset='utc'><timer name='rtc' tickpolicy='catchup'/></clock>"},
        "-rtc",
        "base=utc,driftfix=slew",
    ),
    (
        "pit-delay-kvm",
        {"hv": "kvm", "top": "<clock offset='utc'><timer name='pit' tickpolicy='delay'/></clock>"},
        "-global",
        "kvm-pit.lost_tick_policy=delay",
    ),
    (
        "hpet-off",
        {"top": "<clock offset='utc'><timer name='hpet' present='no'/></clock>"},
        "-machine",
        "hpet=off",
    ),
    (
        "pm-q35",
        {"top": "<pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>"},
        "-global",
        "ICH9-LPC.disable_s3=1",
    ),
    (
        "pm-q35-s4",
        {"top": "<pm><suspend-to-disk enabled='no'/></pm>"},
        "-global",
        "ICH9-LPC.disable_s4=1",
    ),
    (
        "pm-pc",
        {"machine": "pc", "top": "<pm><suspend-to-mem enabled='no'/></pm>"},
        "-global",
        "PIIX4_PM.disable_s3=1",
    ),
    ("on-reboot-destroy", {"top": "<on_reboot>destroy</on_reboot>"}, "-action", "reboot=shutdown"),
    ("kernel", {"os_extra": "<kernel>/k/vmlinuz</kernel>"}, "-kernel", "/k/vmlinuz"),
    (
        "initrd",
        {"os_extra": "<kernel>/k/vmlinuz</kernel><initrd>/k/initrd</initrd>"},
        "-initrd",
        "/k/initrd",
    ),
    (
        "append",
        {"os_extra": "<kernel>/k/vmlinuz</kernel><cmdline>console=ttyS0</cmdline>"},
        "-append",
        "console=ttyS0",
    ),
    ("bootmenu", {"os_extra": "<bootmenu enable='yes'/>"}, "-boot", "menu=on,strict=on"),
    ("bios-rom", {"os_extra": "<loader type='rom'>/fw/bios.bin</loader>"}, "-bios", "/fw/bios.bin"),
    (
        "uefi-pflash",
        {
            "os_extra": "<loader readonly='yes' type='pflash'>/fw/CODE.fd</loader>"
            "<nvram>/var/nv/t1_VARS.fd</nvram>"
        },
        "-machine",
        "pflash0=pflash0-format,pflash1=pflash1-storage",
    ),
]


@pytest.mark.parametrize(
    ("kw", "flag", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_option_fragments(kw: dict[str, Any], flag: str, fragment: str) -> None:
    argv = build(domain(**kw)).argv
    got = values(argv, flag)
    assert any(fragment in v for v in got), f"{flag} {fragment!r} not in {got}"


def test_no_cpu_means_no_cpu_flag_and_pit_policy_even_under_tcg() -> None:
    xml = domain(top="<clock offset='utc'><timer name='pit' tickpolicy='delay'/></clock>")
    argv = build(xml).argv
    assert "-cpu" not in argv
    # libvirt sets it under TCG too; QEMU ignores a global for a device it does not create
    assert "kvm-pit.lost_tick_policy=delay" in values(argv, "-global")


def test_pflash_blockdevs() -> None:
    xml = domain(
        os_extra="<loader readonly='yes' type='pflash'>/fw/CODE.fd</loader><nvram>/nv/V.fd</nvram>"
    )
    nodes = blockdevs(build(xml).argv)
    assert nodes[1] == {
        "node-name": "pflash0-format",
        "read-only": True,
        "driver": "raw",
        "file": "pflash0-storage",
    }
    # a raw NVRAM is attached without a format node, as libvirt 11 does
    assert nodes[2]["filename"] == "/nv/V.fd" and nodes[2]["read-only"] is False
    assert len(nodes) == 3


# ---------------------------------------------------------------------------- disks


def test_qcow2_virtio_disk_blockdev() -> None:
    launch = build(domain(disk(attrs=" cache='none' io='native' discard='unmap'")))
    storage, fmt = blockdevs(launch.argv)
    assert storage == {
        "driver": "file",
        "filename": "/img/a.qcow2",
        "node-name": "disk0-storage",
        "auto-read-only": True,
        "cache": {"direct": True, "no-flush": False},
        "discard": "unmap",
        "aio": "native",
    }
    assert fmt["driver"] == "qcow2" and fmt["file"] == "disk0-storage"
    assert fmt["read-only"] is False and fmt["cache"] == {"direct": True, "no-flush": False}
    d = dev(launch.argv, "virtio-blk-pci")
    assert d["drive"] == "disk0-format" and d["id"] == "virtio-disk0"
    assert d["write-cache"] == "on"
    assert launch.disks[0].node_name == "disk0-format"
    assert launch.disks[0].device_id == "virtio-disk0"


@pytest.mark.parametrize(
    ("cache", "direct", "no_flush", "wc"),
    [
        ("none", True, False, "on"),
        ("writeback", False, False, "on"),
        ("writethrough", False, False, "off"),
        ("directsync", True, False, "off"),
        ("unsafe", False, True, "on"),
    ],
)
def test_cache_modes(cache: str, direct: bool, no_flush: bool, wc: str) -> None:
    argv = build(domain(disk(fmt="raw", attrs=f" cache='{cache}'"))).argv
    (node,) = blockdevs(argv)  # raw: the storage node alone, as libvirt
    assert node["cache"] == {"direct": direct, "no-flush": no_flush}
    assert dev(argv, "virtio-blk-pci")["write-cache"] == wc


@pytest.mark.parametrize("io", ["threads", "io_uring"])
def test_io_modes(io: str) -> None:
    assert blockdevs(build(domain(disk(attrs=f" io='{io}'"))).argv)[0]["aio"] == io


def test_discard_ignore_and_readonly() -> None:
    argv = build(domain(disk(attrs=" discard='ignore'", extra="<readonly/>"))).argv
    storage, fmt = blockdevs(argv)
    assert storage["discard"] == "unmap"  # the file node may always unmap
    assert fmt["discard"] == "ignore" and fmt["read-only"] is True


def test_block_device_and_buses() -> None:
    xml = domain(
        "<disk type='block' device='disk'><source dev='/dev/vg/lv'/><target dev='vdb'/></disk>"
        + disk(dev="sda", bus="sata")
        + disk(dev="sdb", bus="scsi")
        + "<disk type='file' device='cdrom'><target dev='sdc' bus='sata'/></disk>"
    )
    launch = build(xml)
    argv = launch.argv
    assert blockdevs(argv)[0]["driver"] == "host_device"
    assert dev(argv, "virtio-blk-pci")["id"] == "virtio-disk1"
    hd = dev(argv, "ide-hd")
    assert hd["bus"] == "ide.0" and hd["id"] == "sata0-0-0"
    cd = dev(argv, "ide-cd")  # empty cdrom: no drive
    assert cd["bus"] == "ide.2" and "drive" not in cd
    # implicit controller, libvirt's x86 default model (behind a pcie-to-pci-bridge on q35)
    assert dev(argv, "lsi")["id"] == "scsi0"
    assert dev(argv, "lsi")["bus"] == dev(argv, "pcie-pci-bridge")["id"]
    sd = dev(argv, "scsi-hd")
    assert sd["bus"] == "scsi0.0" and sd["scsi-id"] == 1 and sd["id"] == "scsi0-0-0-1"
    cdrom = next(d for d in launch.disks if d.target_dev == "sdc")
    assert cdrom.node_name is None
    assert disk_paths(parse_domain_xml(xml)) == ["/dev/vg/lv", "/img/a.qcow2", "/img/a.qcow2"]


def test_cdrom_readonly_and_ide_on_pc() -> None:
    xml = domain(
        "<disk type='file' device='cdrom'><source file='/i.iso'/><target dev='hdc'/></disk>",
        machine="pc",
    )
    argv = build(xml).argv
    assert blockdevs(argv)[0]["read-only"] is True
    cd = dev(argv, "ide-cd")
    assert cd["bus"] == "ide.1" and cd["unit"] == 0 and cd["id"] == "ide0-1-0"


def test_sata_on_pc_adds_ahci_and_lsilogic() -> None:
    xml = domain(
        disk(dev="sda", bus="sata")
        + disk(dev="sdb", bus="scsi")
        + "<controller type='scsi' index='0' model='lsilogic'/>",
        machine="pc",
    )
    argv = build(xml).argv
    assert dev(argv, "ahci")["id"] == "sata0"
    assert dev(argv, "ide-hd")["bus"] == "sata0.0"
    assert dev(argv, "lsi")["id"] == "scsi0"
    assert dev(argv, "scsi-hd")["scsi-id"] == 1


def test_boot_order_os_and_per_device() -> None:
    xml = domain(
        disk() + "<disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>"
        "<interface type='user'/>",
        os_extra="<boot dev='cdrom'/><boot dev='hd'/><boot dev='network'/>",
    )
    argv = build(xml).argv
    assert values(argv, "-boot") == ["strict=on"]
    assert dev(argv, "ide-cd")["bootindex"] == 1
    assert dev(argv, "virtio-blk-pci")["bootindex"] == 2
    assert dev(argv, "rtl8139")["bootindex"] == 3
    argv = build(domain(disk(extra="<boot order='2'/>"))).argv
    assert dev(argv, "virtio-blk-pci")["bootindex"] == 2


def test_disk_name_index() -> None:
    assert [disk_name_index(n) for n in ("vda", "sdb", "hdd", "sdz", "sdaa")] == [0, 1, 3, 25, 26]


# ---------------------------------------------------------------------------- network


def test_interfaces_models_and_generated_mac() -> None:
    xml = domain(
        "<interface type='user'><model type='virtio'/></interface>"
        "<interface type='bridge'><mac address='52:54:00:aa:bb:cc'/><source bridge='br0'/>"
        "<model type='e1000'/></interface>"
        "<interface type='ethernet'><target dev='tap7'/><model type='e1000e'/></interface>"
        "<interface type='user'><model type='rtl8139'/></interface>"
    )
    launch = build(xml)
    argv = launch.argv
    assert [json.loads(v) for v in values(argv, "-netdev")] == [
        {"type": "user", "id": "hostnet0"},
        {"type": "bridge", "br": "br0", "id": "hostnet1"},
        {"type": "tap", "ifname": "tap7", "script": "no", "downscript": "no", "id": "hostnet2"},
        {"type": "user", "id": "hostnet3"},
    ]
    nic = dev(argv, "virtio-net-pci")
    assert nic["netdev"] == "hostnet0" and nic["id"] == "net0"
    assert nic["mac"] == launch.generated_macs[0] == generated_mac("52:54:00", UUID, 0)
    assert nic["mac"].startswith("52:54:00:")
    assert dev(argv, "e1000")["mac"] == "52:54:00:aa:bb:cc"
    assert dev(argv, "e1000e")["netdev"] == "hostnet2"
    assert set(launch.generated_macs) == {0, 2, 3}
    assert launch.nets[2].ifname == "tap7"
    # stable across builds, so a rebuilt command line keeps the guest's MAC
    assert build(xml).generated_macs == launch.generated_macs


# ---------------------------------------------------------------------------- chardevs


def test_serial_console_same_device() -> None:
    xml = domain(
        "<serial type='pty'><target port='0'/></serial>"
        "<console type='pty'><target type='serial' port='0'/></console>"
    )
    launch = build(xml)
    assert values(launch.argv, "-chardev")[1:] == ["pty,id=charserial0"]
    serials = [d for d in devs(launch.argv) if d["driver"] == "isa-serial"]
    assert serials == [
        {"driver": "isa-serial", "chardev": "charserial0", "id": "serial0", "index": 0}
    ]
    assert [c.chardev_id for c in launch.chardevs] == ["charserial0", "charserial0"]


def test_console_alone_becomes_serial_and_file_unix_null() -> None:
    xml = domain(
        "<console type='file'><source path='/log/c,1.log'/><target type='serial'/></console>"
        "<serial type='unix'><source mode='bind' path='/run/s.sock'/><target port='1'/></serial>"
        "<serial type='null'><target port='2'/></serial>"
    )
    chardevs = values(build(xml).argv, "-chardev")
    assert "socket,id=charserial1,path=/run/s.sock,server=on,wait=off" in chardevs
    assert "null,id=charserial2" in chardevs
    assert "file,id=charserial0,path=/log/c,,1.log" in chardevs  # keyval comma escaping


def test_virtio_console_and_guest_agent() -> None:
    xml = domain(
        "<console type='pty'><target type='virtio'/></console>"
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    )
    launch = build(xml)
    argv = launch.argv
    assert dev(argv, "virtio-serial-pci")["id"] == "virtio-serial0"  # implicit controller
    con = dev(argv, "virtconsole")
    assert con["nr"] == 0 and con["bus"] == "virtio-serial0.0"
    port = dev(argv, "virtserialport")
    assert port["name"] == "org.qemu.guest_agent.0" and port["nr"] == 1
    assert launch.guest_agent_socket == RUN / f"{UUID}.channel0.sock"
    assert f"path={launch.guest_agent_socket},server=on,wait=off" in values(argv, "-chardev")[2]
    assert launch.guest_agent_socket in launch.sockets


def test_channel_explicit_port_is_not_reused() -> None:
    xml = domain(
        "<controller type='virtio-serial' index='0'/>"
        "<channel type='pty'><target type='virtio' name='a'/></channel>"
        "<channel type='unix'><source mode='bind' path='/r/ga.sock'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/>"
        "<address type='virtio-serial' controller='0' bus='0' port='1'/></channel>"
    )
    launch = build(xml)
    ports = [d["nr"] for d in devs(launch.argv) if d["driver"] == "virtserialport"]
    assert ports == [2, 1]
    assert launch.guest_agent_socket == Path("/r/ga.sock")


# ---------------------------------------------------------------------------- graphics


def test_vnc_autoport_and_fixed() -> None:
    launch = build(domain("<graphics type='vnc' port='-1' autoport='yes' listen='0.0.0.0'/>"))
    assert values(launch.argv, "-vnc") == ["0.0.0.0:0,to=99,audiodev=audio1"]
    assert launch.vnc is not None and launch.vnc.autoport
    argv = build(domain("<graphics type='vnc' port='5905' autoport='no'/>")).argv
    assert values(argv, "-vnc") == ["127.0.0.1:5,audiodev=audio1"]
    argv = build(
        domain("<graphics type='vnc'><listen type='address' address='::1'/></graphics>")
    ).argv
    assert values(argv, "-vnc") == ["[::1]:0,to=99,audiodev=audio1"]


def test_spice_needs_port_from_driver() -> None:
    xml = domain(
        "<graphics type='spice' autoport='yes'><image compression='off'/></graphics>"
        "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>"
        "<video><model type='qxl' ram='65536' vram='65536' vgamem='16384' heads='1'/></video>"
    )
    assert graphics_needing_ports(parse_domain_xml(xml)) == [0]
    with pytest.raises(InvalidArgument, match="graphics_ports"):
        build(xml)
    launch = build(xml, graphics_ports={0: 5930})
    assert values(launch.argv, "-spice") == [
        "port=5930,addr=127.0.0.1,disable-ticketing=on,image-compression=off,seamless-migration=on"
    ]
    assert "spicevmc,id=charchannel0,name=vdagent" in values(launch.argv, "-chardev")
    qxl = dev(launch.argv, "qxl-vga")
    assert qxl["ram_size"] == 64 << 20 and qxl["vgamem_mb"] == 16


# ---------------------------------------------------------------------------- devices


def test_pcie_root_ports_and_addresses() -> None:
    xml = domain(
        "<controller type='pci' index='0' model='pcie-root'/>"
        "<controller type='pci' index='1' model='pcie-root-port'><model name='pcie-root-port'/>"
        "<target chassis='1' port='0x10'/><address type='pci' domain='0x0000' bus='0x00' "
        "slot='0x02' function='0x0' multifunction='on'/></controller>"
        + disk(extra="<address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>")
        + "<interface type='user'/>"
    )
    argv = build(xml).argv
    rp = dev(argv, "pcie-root-port")
    assert rp == {
        "driver": "pcie-root-port",
        "port": 16,
        "chassis": 1,
        "id": "pci.1",
        "bus": "pcie.0",
        "addr": "0x2",
        "multifunction": True,
    }
    blk = dev(argv, "virtio-blk-pci")
    assert blk["bus"] == "pci.1" and blk["addr"] == "0x0"
    # a conventional PCI NIC on q35 goes behind a pcie-to-pci-bridge libvirt adds
    nic = dev(argv, "rtl8139")
    bridge = dev(argv, "pcie-pci-bridge")
    assert nic["bus"] == bridge["id"]
    assert dev(argv, "virtio-balloon-pci")["bus"] not in ("pcie.0", "pci.1")  # own root port


def test_usb_controllers_and_inputs() -> None:
    xml = domain(
        "<controller type='usb' index='0' model='ich9-ehci1'/>"
        "<controller type='usb' index='0' model='ich9-uhci1'><master startport='0'/></controller>"
        "<controller type='usb' index='0' model='ich9-uhci2'><master startport='2'/></controller>"
        "<input type='tablet' bus='usb'><address type='usb' bus='0' port='1'/></input>"
        "<input type='keyboard' bus='usb'/><input type='mouse' bus='usb'/>"
        "<input type='mouse' bus='ps2'/><input type='keyboard' bus='ps2'/>"
    )
    argv = build(xml).argv
    assert dev(argv, "ich9-usb-ehci1")["id"] == "usb"
    assert dev(argv, "ich9-usb-uhci2") | {} == dev(argv, "ich9-usb-uhci2")
    assert dev(argv, "ich9-usb-uhci2")["firstport"] == 2
    assert dev(argv, "ich9-usb-uhci2")["masterbus"] == "usb.0"
    assert dev(argv, "usb-tablet") == {
        "driver": "usb-tablet",
        "id": "input0",
        "bus": "usb.0",
        "port": "1",
    }
    assert dev(argv, "usb-kbd")["bus"] == "usb.0" and dev(argv, "usb-mouse")
    assert [d["driver"] for d in devs(argv)].count("usb-tablet") == 1


@pytest.mark.parametrize(
    ("machine", "xml", "driver"),
    [
        ("q35", "<controller type='usb' model='qemu-xhci' ports='15'/>", "qemu-xhci"),
        ("q35", "<controller type='usb' model='nec-xhci'/>", "nec-usb-xhci"),
        ("pc", "<controller type='usb' model='piix3-uhci'/>", "piix3-usb-uhci"),
        ("q35", "<input type='tablet' bus='usb'/>", "qemu-xhci"),  # implicit default
        ("pc", "<input type='tablet'/>", "piix3-usb-uhci"),
        ("q35", "<controller type='virtio-serial' index='0' ports='16'/>", "virtio-serial-pci"),
        ("q35", "<controller type='scsi' model='virtio-scsi'/>", "virtio-scsi-pci"),
        ("pc", "<controller type='pci' index='1' model='pci-bridge'/>", "pci-bridge"),
        ("q35", "<video><model type='vga'/></video>", "VGA"),
        ("q35", "<video><model type='virtio' heads='1' primary='yes'/></video>", "virtio-vga"),
        ("q35", "<video><model type='cirrus'/></video>", "cirrus-vga"),
        ("q35", "<video><model type='bochs'/></video>", "bochs-display"),
        ("q35", "<sound model='ich9'/>", "ich9-intel-hda"),
        ("q35", "<sound model='ich6'/>", "hda-duplex"),
        ("pc", "<sound model='ac97'/>", "AC97"),
        ("q35", "<watchdog model='i6300esb' action='poweroff'/>", "i6300esb"),
        ("pc", "<watchdog model='ib700'/>", "ib700"),
        (
            "q35",
            "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>",
            "virtio-rng-pci",
        ),
        ("q35", "<panic model='isa'/>", "pvpanic"),
        ("q35", "<memballoon model='virtio' autodeflate='on'/>", "virtio-balloon-pci"),
        ("q35", "<input type='tablet' bus='virtio'/>", "virtio-tablet-pci"),
        ("q35", "<serial type='pty'><target type='pci-serial' port='0'/></serial>", "pci-serial"),
    ],
)
def test_device_table(machine: str, xml: str, driver: str) -> None:
    assert dev(build(domain(xml, machine=machine)).argv, driver)


def test_device_details() -> None:
    argv = build(domain("<memballoon model='none'/><video><model type='none'/></video>")).argv
    assert not any(d["driver"].startswith(("virtio-balloon", "VGA")) for d in devs(argv))
    argv = build(domain("<sound model='ich9'/>")).argv
    assert [json.loads(v) for v in values(argv, "-audiodev")] == [
        {"id": "audio1", "driver": "none"}
    ]
    assert dev(argv, "hda-duplex")["audiodev"] == "audio1"
    argv = build(domain("<watchdog model='itco' action='pause'/>")).argv
    assert "ICH9-LPC.noreboot=off" in values(argv, "-global")
    assert "watchdog=pause" in values(argv, "-action")
    argv = build(domain("<rng model='virtio'><backend model='builtin'/></rng>")).argv
    assert json.loads(values(argv, "-object")[0]) == {"id": "objrng0", "qom-type": "rng-builtin"}
    argv = build(domain("<memballoon model='virtio' autodeflate='on'/>")).argv
    assert dev(argv, "virtio-balloon-pci")["deflate-on-oom"] is True
    argv = build(domain("<video><model type='vga'/></video>", machine="pc")).argv
    assert dev(argv, "VGA")["addr"] == "0x2"  # libvirt's slot for the primary video on pc
    argv = build(domain(features="<acpi/><vmcoreinfo state='on'/>")).argv
    assert dev(argv, "vmcoreinfo")


# ---------------------------------------------------------------------------- refusals

UNSUPPORTED: list[tuple[str, dict[str, Any], str]] = [
    ("kvm-unavailable", {"hv": "kvm", "_kvm": False}, "KVM is not available"),
    ("hv-xen", {"hv": "xen"}, "<domain type='xen'>"),
    ("machine", {"machine": "microvm"}, "machine type 'microvm'"),
    ("passthrough-tcg", {"top": "<cpu mode='host-passthrough'/>"}, "host-passthrough"),
    ("vhostuser", {"devices": "<interface type='vhostuser'/>"}, "<interface type='vhostuser'>"),
    (
        "network",
        {"devices": "<interface type='network'><source network='lab'/></interface>"},
        "maps only 'default'",
    ),
    (
        "nic-model",
        {"devices": "<interface type='user'><model type='idontexist'/></interface>"},
        "idontexist",
    ),
    (
        "nic-filterref",
        {"devices": "<interface type='user'><filterref filter='x'/></interface>"},
        "<filterref>",
    ),
    (
        "qemu-commandline",
        {
            "top": "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-s'/></qemu:commandline>"
        },
        "raw QEMU arguments",
    ),
    # refused by design: virtbus has no security driver, cgroup tuning, storage pools or
    # host network management (README, "The QEMU driver")
    (
        "seclabel",
        {"top": "<seclabel type='dynamic' model='selinux'/>"},
        "<seclabel type='dynamic'>",
    ),
    ("memtune", {"top": "<memtune><hard_limit>1000000</hard_limit></memtune>"}, "<memtune>"),
    ("blkiotune", {"top": "<blkiotune><weight>800</weight></blkiotune>"}, "<blkiotune>"),
    ("cpu-shares", {"top": "<cputune><shares>100</shares></cputune>"}, "<cputune><shares>"),
    (
        "vlan",
        {
            "devices": "<interface type='bridge'><source bridge='br0'/><vlan><tag id='42'/></vlan></interface>"
        },
        "<vlan>",
    ),
    ("ide-on-q35", {"devices": disk(dev="hda", bus="ide")}, "IDE controllers are unsupported"),
    (
        "virtio-cdrom",
        {"devices": "<disk type='file' device='cdrom'><target dev='vdb' bus='virtio'/></disk>"},
        "cdrom'> on bus 'virtio'",
    ),
    (
        "ro-sata",
        {"devices": disk(dev="sda", bus="sata", extra="<readonly/>")},
        "readonly sata disks are not supported",
    ),
    (
        "spicevmc-no-spice",
        {
            "devices": "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>"
        },
        "needs <graphics type='spice'>",
    ),
    ("watchdog-dump", {"devices": "<watchdog model='i6300esb' action='dump'/>"}, "action='dump'"),
    ("itco-on-pc", {"machine": "pc", "devices": "<watchdog model='itco'/>"}, "iTCO"),
    ("balloon-xen", {"devices": "<memballoon model='xen'/>"}, "<memballoon model='xen'>"),
    (
        "usb-none",
        {"devices": "<controller type='usb' model='none'/><input type='tablet' bus='usb'/>"},
        "USB is disabled for this domain",
    ),
    ("input-evdev", {"devices": "<input type='evdev'/>"}, "<input type='evdev'"),
    ("on-reboot-preserve", {"top": "<on_reboot>preserve</on_reboot>"}, "<on_reboot>preserve"),
    ("on-crash-coredump", {"top": "<on_crash>coredump-destroy</on_crash>"}, "coredump-destroy"),
    ("firmware-efi", {"os_extra": "", "_firmware": "efi"}, "firmware='efi'"),
    (
        "loader-secure-no-smm",
        {"os_extra": "<loader type='pflash' secure='yes'>/c.fd</loader>"},
        "Secure boot requires SMM feature enabled",
    ),
    ("dtb", {"os_extra": "<dtb>/x.dtb</dtb>"}, "<os><dtb>"),
    (
        "video-bochs-secondary",
        {"devices": "<video><model type='vga'/></video><video><model type='bochs'/></video>"},
        "only valid as primary video device",
    ),
    (
        "transient-readonly",
        {"devices": disk(extra="<transient/><readonly/>")},
        "must not be read-only",
    ),
]

#: what earlier versions refused and now builds as libvirt does (one line each; the
#: compatibility harness, tests/compat, holds the whole corpus)
NOW_SUPPORTED: list[tuple[str, dict[str, Any], str, str]] = [
    ("parallel", {"devices": "<parallel type='pty'/>"}, "-device", '"driver":"isa-parallel"'),
    (
        "hyperv",
        {"hv": "kvm", "features": "<acpi/><hyperv mode='custom'><relaxed state='on'/></hyperv>"},
        "-cpu",
        "hv-relaxed=on",
    ),
    (
        "floppy",
        {
            "devices": "<disk type='file' device='floppy'><source file='/f'/><target dev='fda'/></disk>"
        },
        "-device",
        '"driver":"floppy"',
    ),
    ("usb-disk", {"devices": disk(dev="sda", bus="usb")}, "-device", '"driver":"usb-storage"'),
    ("sdl", {"devices": "<graphics type='sdl'/>"}, "-display", "sdl"),
    ("sb16", {"machine": "pc", "devices": "<sound model='sb16'/>"}, "-device", '"driver":"sb16"'),
    ("vmvga", {"devices": "<video><model type='vmvga'/></video>"}, "-device", "vmware-svga"),
    (
        "nbd",
        {
            "devices": "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='x'><host name='h' port='10809'/></source><target dev='vda'/></disk>"
        },
        "-blockdev",
        '"driver":"nbd","server":{"type":"inet","host":"h","port":"10809"},"export":"x"',
    ),
    (
        "hostdev",
        {
            "devices": "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0' bus='3' slot='0' function='0'/></source></hostdev>"
        },
        "-device",
        '"driver":"vfio-pci","host":"0000:03:00.0"',
    ),
    (
        "tpm-emulator",
        {"devices": "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"},
        "-tpmdev",
        "emulator,id=tpm-tpm0,chardev=chrtpm-tpm0",
    ),
    (
        "virtiofs",
        {
            "devices": "<filesystem type='mount'><driver type='virtiofs'/><source dir='/srv'/><target dir='share'/></filesystem>",
            "top": "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>",
        },
        "-device",
        '"driver":"vhost-user-fs-pci"',
    ),
]


@pytest.mark.parametrize(
    ("kw", "flag", "fragment"), [c[1:] for c in NOW_SUPPORTED], ids=[c[0] for c in NOW_SUPPORTED]
)
def test_now_supported(kw: dict[str, Any], flag: str, fragment: str) -> None:
    kw = dict(kw)
    devices = kw.pop("devices", "")
    got = values(build(domain(devices, **kw)).argv, flag)
    assert any(fragment in v for v in got), f"{flag} {fragment!r} not in {got}"


def test_helpers_are_described_not_started() -> None:
    """swtpm and virtiofsd are data in the launch; the driver starts them."""
    launch = build(domain(NOW_SUPPORTED[-2][1]["devices"]))
    (swtpm,) = launch.helpers
    assert swtpm.kind == "swtpm" and swtpm.argv[:2] == ("swtpm", "socket")
    assert f"type=unixio,path={swtpm.socket},mode=0600" in swtpm.argv
    # an incoming migration brings the state: no setup then (as libvirt)
    assert swtpm.state is not None and swtpm.setup and not swtpm.incoming_setup


def test_hostdev_without_source_is_an_xml_error() -> None:
    with pytest.raises(XMLError, match="needs <source><address>"):
        build(domain("<hostdev mode='subsystem' type='pci'/>"))


@pytest.mark.parametrize(
    ("kw", "message"), [c[1:] for c in UNSUPPORTED], ids=[c[0] for c in UNSUPPORTED]
)
def test_config_unsupported(kw: dict[str, Any], message: str) -> None:
    kw = dict(kw)
    kvm = kw.pop("_kvm", True)
    firmware = kw.pop("_firmware", None)
    devices = kw.pop("devices", "")
    xml = domain(devices, **kw)
    if firmware:
        xml = xml.replace("<os>", f"<os firmware='{firmware}'>")
    with pytest.raises(ConfigUnsupported) as exc:
        build(xml, kvm_available=kvm)
    assert message in exc.value.message


def test_topology_mismatch_is_xml_error() -> None:
    with pytest.raises(XMLError, match="topology"):
        build(domain(top="<cpu><topology sockets='3' cores='1' threads='1'/></cpu>"))


def test_long_run_dir_is_refused() -> None:
    with pytest.raises(ConfigUnsupported, match="UNIX limit"):
        build_command(parse_domain_xml(domain()), QemuPaths(Path("/r" * 40)), kvm_available=True)


def test_capabilities_gate_devices() -> None:
    caps = QemuCapabilities(
        devices=parse_device_help(
            'name "VGA", bus PCI\nname "virtio-balloon-pci", bus PCI, alias "virtio-balloon"\n'
            'name "pcie-root-port", bus PCI\n'
        ),
        machines=frozenset({"q35", "pc"}),
        accelerators=frozenset({"tcg"}),
        chardevs=frozenset({"pty"}),
        spice=False,
    )
    assert "virtio-balloon" in caps.devices
    build(domain("<video><model type='vga'/></video>"), caps=caps)
    with pytest.raises(ConfigUnsupported, match="no device 'cirrus-vga'"):
        build(domain("<video><model type='cirrus'/></video>"), caps=caps)
    with pytest.raises(ConfigUnsupported, match="SPICE"):
        build(domain("<graphics type='spice' port='5901'/>"), caps=caps)
    with pytest.raises(ConfigUnsupported, match=r"machine type 'pc-q35-7\.2'"):
        build(domain(machine="pc-q35-7.2"), caps=caps)


# ---------------------------------------------------------------------------- real QEMU


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _virt_install_xml(tmp: Path, hv: str) -> str:
    """virt-install's default q35 guest, pointed at files in ``tmp``.

    Changed for this host only where virtbus refuses by design or the host lacks it:
    ``type='network'`` becomes user networking; the ISO is dropped (an empty cdrom);
    ``host-passthrough`` is dropped (refused under TCG, and fails under nested KVM here).
    """
    xml = (DATA / "virt-install-q35.xml").read_text()
    image = tmp / "debian12.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True, timeout=30
    )
    xml = xml.replace("/var/lib/libvirt/images/debian12.qcow2", str(image))
    xml = xml.replace(
        "<source file='/var/lib/libvirt/images/debian-12.5.0-amd64-netinst.iso'/>", ""
    )
    xml = xml.replace("<interface type='network'>", "<interface type='user'>")
    xml = xml.replace("<source network='default'/>", "")
    xml = xml.replace("<cpu mode='host-passthrough' check='none' migratable='on'/>", "")
    return xml.replace("<domain type='kvm'>", f"<domain type='{hv}'>")


class _QMP:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rw")
        assert "QMP" in json.loads(self.file.readline())
        self.execute("qmp_capabilities")

    def execute(self, cmd: str) -> Any:
        self.file.write(json.dumps({"execute": cmd}) + "\n")
        self.file.flush()
        while True:
            msg = json.loads(self.file.readline())
            if "event" not in msg:
                return msg.get("return", msg)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


@contextlib.contextmanager
def _qemu(launch: QemuLaunch, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(launch.argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        # QEMU binds the socket before it listens: wait until a connect is accepted (the
        # driver's monitor waits the same way), failing at once if QEMU exits
        while not _accepts(launch.qmp_socket):
            if proc.poll() is not None:
                pytest.fail(f"QEMU exited {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no QMP socket after 15 s: {log.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()  # only the process this test started
        proc.wait(timeout=10)


@pytest.mark.qemu
@pytest.mark.parametrize("hv", ["qemu", "kvm"])
def test_virt_install_default_launches(
    hv: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        pytest.fail("QEMU is installed on this project's machines; qemu-system-x86_64 missing")
    if hv == "kvm" and not _kvm_usable():
        pytest.skip("/dev/kvm cannot be opened read-write here: no KVM launch")
    run_dir = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))  # short: UNIX socket paths
    request.addfinalizer(lambda: shutil.rmtree(run_dir, ignore_errors=True))
    defn = parse_domain_xml(_virt_install_xml(tmp_path, hv))
    ports = {i: _free_port() for i in graphics_needing_ports(defn)}
    launch = build_command(
        defn, QemuPaths(run_dir), kvm_available=hv == "kvm", graphics_ports=ports
    )
    with _qemu(launch, tmp_path / "qemu.log") as proc:
        qmp = _QMP(launch.qmp_socket)
        try:
            assert qmp.execute("query-status")["status"] == "prelaunch"
            assert qmp.execute("query-kvm")["enabled"] is (hv == "kvm")
            qdevs = {b["qdev"] for b in qmp.execute("query-block") if b.get("qdev")}
            assert any("virtio-disk0" in q for q in qdevs)
            chardevs = {c["label"]: c["filename"] for c in qmp.execute("query-chardev")}
            assert chardevs["charserial0"].startswith("pty:/dev/pts/")
            assert launch.guest_agent_socket is not None and launch.guest_agent_socket.exists()
            vnc = qmp.execute("query-vnc")
            assert vnc["enabled"] and 5900 <= int(vnc["service"]) < 6000
            assert launch.pidfile.read_text().strip() == str(proc.pid)
            qmp.execute("quit")
        finally:
            qmp.close()
        assert proc.wait(timeout=10) == 0
    for path in launch.sockets:
        path.unlink(missing_ok=True)


KITCHEN_SINK = {
    "pc": """
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='writeback' io='threads'/><source file='{img}'/><target dev='hda' bus='ide'/></disk>
    <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none' io='native' discard='unmap'/><source file='{raw}'/><target dev='sda' bus='sata'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw' cache='unsafe'/><source file='{raw2}'/><target dev='sdb' bus='scsi'/></disk>
    <controller type='scsi' index='0' model='lsilogic'/>
    <controller type='pci' index='1' model='pci-bridge'/>
    <controller type='usb' index='0' model='piix3-uhci'/>
    <interface type='user'><model type='e1000'/><boot order='2'/></interface>
    <interface type='user'><model type='rtl8139'/><address type='pci' domain='0x0000' bus='0x01' slot='0x03' function='0x0'/></interface>
    <serial type='file'><source path='{tmp}/serial.log'/><target port='0'/></serial>
    <serial type='null'><target port='1'/></serial>
    <console type='pty'><target type='virtio'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <input type='keyboard' bus='usb'/><input type='mouse' bus='usb'/>
    <graphics type='vnc' port='-1' autoport='yes'/>
    <video><model type='cirrus'/></video>
    <sound model='ac97'/>
    <watchdog model='ib700' action='poweroff'/>
    <rng model='virtio'><backend model='builtin'/></rng>
    <panic model='isa'/>
    <memballoon model='virtio' autodeflate='on'/>""",
    "q35": """
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='directsync' io='io_uring'/><source file='{img}'/><target dev='vda' bus='virtio'/><serial>abc123</serial></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw' cache='writethrough'/><source file='{raw}'/><target dev='sda' bus='scsi'/><readonly/></disk>
    <disk type='file' device='cdrom'><target dev='sdb' bus='scsi'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{raw2}'/><target dev='sdc' bus='sata'/><address type='drive' controller='0' bus='0' target='0' unit='3'/></disk>
    <controller type='usb' index='0' model='ich9-ehci1'/>
    <controller type='usb' index='0' model='ich9-uhci1'><master startport='0'/></controller>
    <controller type='usb' index='0' model='ich9-uhci2'><master startport='2'/></controller>
    <controller type='usb' index='0' model='ich9-uhci3'><master startport='4'/></controller>
    <controller type='virtio-serial' index='0' ports='16'/>
    <interface type='user'><model type='e1000e'/></interface>
    <serial type='pty'><target type='pci-serial' port='0'/></serial>
    <channel type='pty'><target type='virtio' name='org.example.0'/><address type='virtio-serial' controller='0' bus='0' port='3'/></channel>
    <input type='tablet' bus='virtio'/><input type='tablet' bus='usb'/>
    <graphics type='vnc' port='-1'><listen type='socket'/></graphics>
    <video><model type='vga'/></video><video><model type='virtio'/></video>
    <sound model='ich6'/><audio id='1' type='none'/>
    <watchdog model='itco' action='pause'/>
    <panic model='isa'/>""",
}


@pytest.mark.qemu
@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_kitchen_sink_launches(machine: str, request: pytest.FixtureRequest) -> None:
    """Most devices the builder emits, in one guest QEMU must accept (TCG)."""
    tmp = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    files = {"img": tmp / "a.qcow2", "raw": tmp / "b.raw", "raw2": tmp / "c.raw"}
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(files["img"]), "16M"], check=True
    )
    for key in ("raw", "raw2"):
        files[key].write_bytes(b"\0" * (1 << 20))
    devices = KITCHEN_SINK[machine].format(tmp=tmp, **{k: str(v) for k, v in files.items()})
    xml = domain(
        devices,
        machine=machine,
        features="<acpi/><apic/><vmport state='off'/>",
        top="<clock offset='localtime'><timer name='rtc' tickpolicy='catchup' track='guest'/>"
        "<timer name='hpet' present='no'/></clock><on_reboot>destroy</on_reboot>"
        "<pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>"
        "<cpu mode='custom'><model>qemu64</model><topology sockets='1' cores='2' threads='1'/></cpu>",
        vcpu="<vcpu current='1'>2</vcpu>",
        memory="<memory unit='MiB'>256</memory><currentMemory unit='MiB'>192</currentMemory>",
    ).replace(UUID, "0b0c0d0e-0000-4000-8000-00000000000" + ("1" if machine == "pc" else "2"))
    launch = build_command(parse_domain_xml(xml), QemuPaths(tmp), kvm_available=False)
    with _qemu(launch, tmp / "qemu.log") as proc:
        qmp = _QMP(launch.qmp_socket)
        try:
            assert qmp.execute("query-status")["status"] == "prelaunch"
            assert qmp.execute("query-balloon").get("actual") is not None
            qmp.execute("quit")
        finally:
            qmp.close()
        assert proc.wait(timeout=10) == 0


@pytest.mark.qemu
async def test_probe_capabilities_accepts_virt_install_default(tmp_path: Path) -> None:
    from drivers.qemu.capabilities import probe

    caps = await probe()
    assert {"tcg"} <= caps.accelerators and "q35" in caps.machines
    assert caps.has_device("virtio-blk-pci") and caps.has_device("pcie-root-port")
    defn = parse_domain_xml(_virt_install_xml(tmp_path, "qemu"))
    launch = build_command(
        defn, QemuPaths(RUN), kvm_available=False, graphics_ports={0: 5999}, caps=caps
    )
    assert launch.spice is not None and launch.spice.port == 5999


def test_libvirt_default_network_is_user_networking() -> None:
    """virt-install's <interface type='network'><source network='default'/> runs unchanged."""
    launch = build(domain("<interface type='network'><source network='default'/></interface>"))
    assert values(launch.argv, "-netdev") == ['{"type":"user","id":"hostnet0"}']
