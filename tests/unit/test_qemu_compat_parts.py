# ruff: noqa: E501  (XML snippets read better unwrapped)
"""The pieces behind libvirt-compatible definitions, one by one: definition completion
(indexes, implicit controllers, defaults), PCI addresses, firmware autoselection from QEMU
descriptors, the bounded integers, CPU pinning on real threads, per-domain helper
processes (real programs: dbus-daemon, qemu-img) and the per-run companions.

The whole libvirt corpus goes through the same code in tests/compat; these tests pin the
rules one can read in a few lines, each with its premise.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from drivers.qemu import companions as comp
from drivers.qemu import cputune
from drivers.qemu import helpers as hp
from drivers.qemu.argv import QemuPaths, build_command
from drivers.qemu.capabilities import QemuCapabilities
from drivers.qemu.firmware import fill, load_descriptors
from drivers.qemu.postparse import complete_tree
from drivers.qemu.xmlnum import attr_int, num
from virtbus.domain import parse_domain_xml
from virtbus.errors import ConfigUnsupported, OperationFailed, XMLError

UUID = "2c8d3f41-0b7e-4a55-9a31-5d8e0f1c2b3a"


def dom(
    devices: str = "",
    *,
    machine: str = "q35",
    os_attrs: str = "",
    os_extra: str = "",
    top: str = "",
) -> etree._Element:
    return etree.fromstring(
        f"<domain type='qemu'><name>p</name><uuid>{UUID}</uuid>"
        f"<memory unit='MiB'>256</memory><vcpu>2</vcpu>"
        f"<os{os_attrs}><type arch='x86_64' machine='{machine}'>hvm</type>{os_extra}</os>{top}"
        f"<devices>{devices}</devices></domain>"
    )


def controllers(root: etree._Element, ctype: str) -> list[tuple[str | None, str | None]]:
    return [
        (c.get("index"), c.get("model"))
        for c in root.findall(f"devices/controller[@type='{ctype}']")
    ]


# ---------------------------------------------------------------------------- completion


def test_index_less_root_ports_get_the_lowest_free_indexes() -> None:
    """virt-install's q35 layout: before, every port became index 0 ('pci.0' twice)."""
    root = dom(
        "<controller type='pci' model='pcie-root'/>"
        + "<controller type='pci' model='pcie-root-port'/>" * 3
    )
    complete_tree(root)
    ports = [(i, m) for i, m in controllers(root, "pci") if m == "pcie-root-port"]
    assert ports == [("1", "pcie-root-port"), ("2", "pcie-root-port"), ("3", "pcie-root-port")]
    addrs = {
        c.find("address").get("slot")
        for c in root.findall("devices/controller[@model='pcie-root-port']")
    }
    assert addrs == {"0x01"}, "the first ports share slot 1 as functions, as libvirt puts them"


def test_completion_is_idempotent() -> None:
    root = dom(
        "<disk type='file' device='disk'><source file='/i'/><target dev='sda' bus='scsi'/></disk>"
        "<interface type='user'/><graphics type='vnc'/>"
    )
    complete_tree(root)
    once = etree.tostring(root)
    complete_tree(root)
    assert etree.tostring(root) == once


def test_implicit_devices_as_libvirt_adds_them() -> None:
    root = dom(
        "<disk type='file' device='disk'><source file='/i'/><target dev='sda' bus='scsi'/>"
        "</disk><graphics type='spice'/>"
    )
    complete_tree(root)
    assert ("0", "lsilogic") in controllers(root, "scsi")  # the disk's controller
    assert controllers(root, "usb") == [("0", "qemu-xhci")]
    assert controllers(root, "sata") == [("0", None)]
    videos = root.findall("devices/video/model")
    assert [v.get("type") for v in videos] == ["cirrus"], "graphics without <video>"
    assert root.find("devices/memballoon").get("model") == "virtio"
    assert root.find("devices/watchdog").get("model") == "itco"
    pc = dom("<input type='tablet' bus='usb'/>", machine="pc")
    complete_tree(pc)
    assert controllers(pc, "usb") == [("0", "piix3-uhci")]


def _caps(missing: set[str]) -> QemuCapabilities:
    class Caps(QemuCapabilities):
        def has_device(self, name: str) -> bool:
            return name not in missing

    return Caps(frozenset(), frozenset(), frozenset(), frozenset(), True)


@pytest.mark.parametrize(
    ("missing", "model"),
    [
        (set(), "qemu-xhci"),
        ({"qemu-xhci"}, "nec-xhci"),
        ({"qemu-xhci", "nec-usb-xhci"}, "ich9-ehci1"),
        ({"qemu-xhci", "nec-usb-xhci", "ich9-usb-ehci1"}, None),
    ],
)
def test_default_usb_on_q35_is_the_best_this_qemu_has(missing: set[str], model: str | None) -> None:
    root = dom()
    complete_tree(root, caps=_caps(missing))
    assert controllers(root, "usb") == ([("0", model)] if model else [])


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ("<controller type='pci' index='0' model='pci-root'/>", "must be model='pcie-root'"),
        (
            "<video><model type='vga' primary='yes'/></video><video><model type='qxl' primary='yes'/></video>",
            "Only one primary video device",
        ),
        ("<controller type='usb' index='0' model='qemu-xhci' ports='16'/>", "up to '15' ports"),
    ],
)
def test_completion_refuses_what_libvirt_refuses(devices: str, message: str) -> None:
    with pytest.raises((XMLError, ConfigUnsupported), match=message):
        complete_tree(dom(devices))


# ---------------------------------------------------------------------------- firmware


def _descriptor(
    path: Path, name: str, code: str, features: list[str], machines: tuple[str, ...] = ("pc-q35-*",)
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(
        json.dumps(
            {
                "interface-types": ["uefi"],
                "mapping": {
                    "device": "flash",
                    "executable": {"filename": code, "format": "raw"},
                    "nvram-template": {"filename": code + ".vars", "format": "raw"},
                },
                "targets": [{"architecture": "x86_64", "machines": list(machines)}],
                "features": features,
                "tags": [],
            }
        )
    )


@pytest.fixture
def firmware_dirs(tmp_path: Path) -> tuple[Path, ...]:
    system, local = tmp_path / "usr", tmp_path / "etc"
    _descriptor(system, "40-secure.json", "/fw/secure.fd", ["secure-boot", "requires-smm"])
    _descriptor(system, "60-plain.json", "/fw/plain.fd", [], ("pc-i440fx-*", "pc-q35-*"))
    _descriptor(system, "70-other.json", "/fw/other.fd", [])
    return local, system


def _loader(root: etree._Element) -> str:
    return root.find("os/loader").text or ""


def test_efi_autoselection_by_priority_features_and_machine(
    firmware_dirs: tuple[Path, ...], tmp_path: Path
) -> None:
    descriptors = load_descriptors(firmware_dirs)
    assert [Path(d.path).name for d in descriptors] == [
        "40-secure.json",
        "60-plain.json",
        "70-other.json",
    ]
    root = dom(os_attrs=" firmware='efi'")
    fill(root, descriptors, tmp_path)
    assert _loader(root) == "/fw/secure.fd" and root.find("os/loader").get("secure") == "yes"
    assert root.find("features/smm") is not None, "the firmware requires SMM: libvirt enables it"
    nvram = root.find("os/nvram")
    assert nvram.get("template") == "/fw/secure.fd.vars" and nvram.text.startswith(str(tmp_path))
    root = dom(
        os_attrs=" firmware='efi'",
        os_extra="<firmware><feature enabled='no' name='secure-boot'/></firmware>",
    )
    fill(root, descriptors, tmp_path)
    assert _loader(root) == "/fw/plain.fd"
    root = dom(os_attrs=" firmware='efi'", machine="pc")  # an alias: pc-i440fx-*
    fill(root, descriptors, tmp_path)
    assert _loader(root) == "/fw/plain.fd"


def test_efi_without_a_matching_descriptor_is_refused(
    firmware_dirs: tuple[Path, ...], tmp_path: Path
) -> None:
    root = dom(
        os_attrs=" firmware='efi'",
        machine="pc",
        os_extra="<firmware><feature enabled='yes' name='secure-boot'/></firmware>",
    )
    with pytest.raises(ConfigUnsupported, match="Unable to find 'efi' firmware"):
        fill(root, load_descriptors(firmware_dirs), tmp_path)


def test_an_override_in_etc_hides_the_system_descriptor(firmware_dirs: tuple[Path, ...]) -> None:
    local, _system = firmware_dirs
    local.mkdir()
    (local / "40-secure.json").write_text("")  # an empty file masks it (QEMU's spec)
    assert [Path(d.path).name for d in load_descriptors(firmware_dirs)] == [
        "60-plain.json",
        "70-other.json",
    ]


# ---------------------------------------------------------------------------- integers


@pytest.mark.parametrize("raw", ["abc", "1" * 5000, "-3", "0x", "²"])
def test_integers_from_xml_are_xml_errors_never_python_ones(raw: str) -> None:
    el = etree.fromstring(f"<model heads='{raw}'/>")
    with pytest.raises(XMLError, match="<model heads"):
        num(el, "heads", maximum=16)


def test_attribute_integers_take_hex_and_defaults() -> None:
    el = etree.fromstring("<address bus='0x1f' slot='3'/>")
    assert (attr_int(el, "bus"), attr_int(el, "slot"), attr_int(el, "unit", 7)) == (31, 3, 7)
    assert attr_int(None, "bus", 5) == 5


# ---------------------------------------------------------------------------- pinning


def test_vcpu_pins_reach_the_threads_of_a_real_process() -> None:
    """The plan from <cputune>, applied with sched_setaffinity to real threads (this test's
    own, standing in for QEMU's vCPU threads: the thread ids come from QMP in the driver)."""
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "needs two CPUs to see a pin"
    xml = (
        f"<domain type='qemu'><name>pin</name><uuid>{UUID}</uuid><memory unit='MiB'>64</memory>"
        f"<vcpu cpuset='{cpus[0]}'>2</vcpu><cputune><vcpupin vcpu='1' cpuset='{cpus[1]}'/>"
        "</cputune><os><type machine='q35'>hvm</type></os></domain>"
    )
    tuning = build_command(
        parse_domain_xml(xml), QemuPaths(Path("/run/p")), kvm_available=False
    ).cpu_tuning
    assert tuning.vcpus == {0: frozenset({cpus[0]}), 1: frozenset({cpus[1]})}
    tids: list[int] = []
    stop = threading.Event()
    workers = [
        threading.Thread(target=lambda: (tids.append(threading.get_native_id()), stop.wait()))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    try:
        while len(tids) < 2:
            time.sleep(0.01)

        async def execute(cmd: str, args: Any = None) -> Any:
            assert cmd == "query-cpus-fast"
            return [{"cpu-index": i, "thread-id": tid} for i, tid in enumerate(tids)]

        asyncio.run(cputune.apply(tuning, os.getpid(), execute))
        assert [os.sched_getaffinity(t) for t in tids] == [{cpus[0]}, {cpus[1]}]
    finally:
        stop.set()
        for w in workers:
            w.join()


def test_pins_naming_cpus_this_host_lacks_are_refused() -> None:
    tuning = cputune.CpuTuning(vcpus={0: frozenset({4095})})
    with pytest.raises(OperationFailed, match="4095"):
        cputune.check_host(tuning, frozenset(os.sched_getaffinity(0)))


# ---------------------------------------------------------------------------- helpers


def _dbus(run: Path, name: str = "bus") -> hp.HelperSpec:
    sock = run / f"{name}.sock"
    argv = ("dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address=unix:path={sock}")
    return hp.HelperSpec("dbus-daemon", name, argv, sock)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


async def test_helpers_start_ready_and_stop(tmp_path: Path) -> None:
    assert shutil.which("dbus-daemon"), "dbus-daemon is a dependency (deploy/setup-dev)"
    running = await hp.start((_dbus(tmp_path),), tmp_path, UUID)
    (proc,) = running.processes
    assert proc.socket.exists() and _alive(proc.pid)
    doc = hp.HelperProcess.from_json(proc.to_json())
    assert doc == proc
    await hp.stop(running)
    assert not proc.socket.exists() and not _alive(proc.pid)


async def test_helpers_all_or_none(tmp_path: Path) -> None:
    good = _dbus(tmp_path, "good")
    bad = hp.HelperSpec(
        "dbus-daemon", "bad", ("dbus-daemon", "--no-such-option"), tmp_path / "bad.sock"
    )
    with pytest.raises(OperationFailed, match=r"exited .* before it was ready"):
        await hp.start((good, bad), tmp_path, UUID)
    assert not good.socket.exists(), "the helper that did start was stopped again"
    assert "no-such-option" in (tmp_path / f"{UUID}.bad.log").read_text()


async def test_a_reattached_helper_is_stopped_by_pid_but_a_reused_pid_is_not(
    tmp_path: Path,
) -> None:
    running = await hp.start((_dbus(tmp_path),), tmp_path, UUID)
    (proc,) = running.processes
    stranger = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        # what a restarted agent knows: the status file's records, no child handles; a
        # record whose pid now runs something else (not naming the socket) is left alone
        reused = hp.HelperProcess("dbus-daemon", "x", stranger.pid, proc.socket, proc.logfile)
        await hp.stop(hp.Running([reused]))
        assert stranger.returncode is None, "a pid that is not our helper is never signalled"
        await hp.stop(hp.Running([hp.HelperProcess.from_json(proc.to_json())]))
        assert not _alive(proc.pid) and not proc.socket.exists()
    finally:
        stranger.kill()
        await stranger.wait()
        await hp.stop(running)  # reaps our child


# ---------------------------------------------------------------------------- companions


def _launch(xml: str, run: Path, **settings: Any) -> Any:
    from drivers.qemu.argv_common import ArgvSettings

    return build_command(
        parse_domain_xml(xml),
        QemuPaths(run),
        kvm_available=False,
        settings=ArgvSettings(**settings),
    )


def _xml(os_extra: str = "", devices: str = "") -> str:
    return (
        f"<domain type='qemu'><name>c</name><uuid>{UUID}</uuid><memory unit='MiB'>64</memory>"
        f"<os><type machine='q35'>hvm</type>{os_extra}</os><devices>{devices}</devices></domain>"
    )


async def test_nvram_is_made_from_its_template_once(tmp_path: Path) -> None:
    template = tmp_path / "VARS.fd"
    template.write_bytes(b"\x55" * 4096)
    nvram = tmp_path / "nv" / "c_VARS.fd"
    os_extra = (
        f"<loader readonly='yes' type='pflash'>{template}</loader>"
        f"<nvram template='{template}'>{nvram}</nvram>"
    )
    launch = _launch(_xml(os_extra), tmp_path)
    done = await comp.prepare(launch, tmp_path, UUID)
    assert nvram.read_bytes() == template.read_bytes() and (nvram.stat().st_mode & 0o777) == 0o600
    nvram.write_bytes(b"guest wrote this")
    await comp.release(done)
    await comp.release(await comp.prepare(launch, tmp_path, UUID))
    assert nvram.read_bytes() == b"guest wrote this", "an existing NVRAM is the guest's: kept"


async def test_missing_secret_and_host_device_are_clear_start_errors(tmp_path: Path) -> None:
    disk = (
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
        "<source protocol='iscsi' name='iqn.2013-07.com.example:iscsi/1'>"
        "<host name='127.0.0.1' port='3260'/></source><auth username='u'>"
        "<secret type='iscsi' usage='lab'/></auth><target dev='vda' bus='virtio'/></disk>"
    )
    launch = _launch(_xml(devices=disk), tmp_path, secrets_dir=tmp_path / "secrets")
    with pytest.raises(OperationFailed, match="secret 'lab' has no value on this host"):
        await comp.prepare(launch, tmp_path, UUID)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "lab").write_text("c2VjcmV0\n")
    await comp.release(await comp.prepare(launch, tmp_path, UUID))
    hostdev = (
        "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
        "<address domain='0' bus='0x7f' slot='0x1f' function='7'/></source></hostdev>"
    )
    with pytest.raises(OperationFailed, match=r"0000:7f:1f\.7 does not exist on this host"):
        await comp.prepare(_launch(_xml(devices=hostdev), tmp_path), tmp_path, UUID)


async def test_transient_disk_writes_go_to_an_overlay_deleted_after(tmp_path: Path) -> None:
    image = tmp_path / "base.qcow2"
    await asyncio.to_thread(
        subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True
    )
    disk = (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{image}'/><target dev='vda' bus='virtio'/><transient/></disk>"
    )
    launch = _launch(_xml(devices=disk), tmp_path)
    nodes = [json.loads(v) for i, v in enumerate(launch.argv[1:]) if launch.argv[i] == "-blockdev"]
    base = next(n for n in nodes if n.get("node-name") == "disk0-format")
    top = next(n for n in nodes if n.get("node-name") == "disk0-transient-format")
    assert base["read-only"] is True and top["backing"] == "disk0-format"
    done = await comp.prepare(launch, tmp_path, UUID)
    (overlay,) = done.overlays
    out = await asyncio.to_thread(
        subprocess.run,
        ["qemu-img", "info", "--output=json", str(overlay)],
        check=True,
        capture_output=True,
    )
    info = json.loads(out.stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(image)
    again = comp.Companions.from_json(done.to_json())  # as a restarted agent reads it
    await comp.release(again)
    assert not overlay.exists() and image.exists()
