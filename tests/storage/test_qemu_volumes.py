"""Volume disks and disk hot-plug with real QEMU: the QEMU driver resolves
``<disk type='volume'>`` through the agent's StoragePools, a TCG guest sees a hot-plugged
disk appear and go, and a volume a running domain uses cannot be deleted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from drivers.base import Affect, DriverEvent
from drivers.qemu import QemuDriver
from drivers.qemu.settings import QemuSettings
from tests.e2e.conftest import qemu_pids_under
from tests.guests import TestGuest, build_test_guest
from tests.procs import qemu_allowed_dirs
from tests.storage.conftest import Storage, Target, dir_pool_xml, need_tools, open_storage
from virtbus.errors import NoStorageVol, OperationInvalid, OperationTimeout, VirtbusError
from virtbus.protocol.events import DomainState
from virtbus.storage import volume_xml

pytestmark = pytest.mark.qemu
TIMEOUT = 90.0  # s: TCG boots on a busy 2-core machine
MiB = 1 << 20


@dataclass
class Events:
    items: list[DriverEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, event: DriverEvent) -> None:
        self.items.append(event)
        self.changed.set()

    async def wait(self, event: str, timeout: float = TIMEOUT) -> DriverEvent:
        async with asyncio.timeout(timeout):
            while True:
                found = next((e for e in self.items if e.event == event), None)
                if found is not None:
                    return found
                self.changed.clear()
                await self.changed.wait()


@dataclass
class Env:
    driver: QemuDriver
    storage: Storage
    events: Events
    base: Path


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


@pytest.fixture
async def env(workdir: Path) -> AsyncIterator[Env]:
    need_tools()
    root = workdir / "images"
    root.mkdir()
    storage = await open_storage(workdir / "state", root)
    await storage.pools.define(dir_pool_xml("vms", root / "vms"))
    await storage.pools.start("vms", build=True)
    events = Events()
    (workdir / "logs").mkdir()  # the serial log's allowed dir: the disks are the pool's
    driver = QemuDriver(
        workdir / "qstate",
        workdir / "run",
        QemuSettings(detach_timeout=2.0, allowed_dirs=qemu_allowed_dirs(workdir / "logs")),
    )
    driver.set_volume_resolver(storage.pools)
    await driver.open(events)
    yield Env(driver, storage, events, workdir)
    for info in await driver.list_domains(include_inactive=False):
        with contextlib.suppress(VirtbusError):
            await driver.destroy(info.uuid)
    await driver.close()
    assert qemu_pids_under(workdir) == []


def kernel_domain(guest: TestGuest, name: str, serial: Path, disks: str) -> str:
    ports = "".join(
        f"<controller type='pci' index='{i}' model='pcie-root-port'/>" for i in range(1, 7)
    )  # spare ports for hot-plug, as virt-install adds (the disks, the USB controller and
    # the balloon each take one, as under libvirt)
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest.kernel}</kernel><initrd>{guest.initramfs}</initrd>
    <cmdline>{guest.cmdline}</cmdline></os>
  <features><acpi/></features>
  <devices>
    <controller type='pci' index='0' model='pcie-root'/>{ports}
    {disks}
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
  </devices>
</domain>"""


def volume_disk(pool: str, volume: str, dev: str, fmt: str = "qcow2") -> str:
    return (
        f"<disk type='volume' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source pool='{pool}' volume='{volume}'/><target dev='{dev}' bus='virtio'/></disk>"
    )


async def wait_line(path: Path, marker: str, timeout: float = TIMEOUT) -> str:
    """The last console line starting with ``marker`` once it satisfies the caller."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(
            lambda: path.read_text(errors="replace") if path.exists() else ""
        )
        lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(marker)]
        if lines:
            return lines[-1]
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {marker!r} on {path}")


async def wait_blocks(path: Path, want: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = await wait_line(path, "VIRTBUS-BLOCKS", deadline - time.monotonic())
        if line == f"VIRTBUS-BLOCKS {want}".strip():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"guest block devices: {line!r}, wanted {want!r}")


async def test_volume_disk_hotplug_seen_by_the_guest(env: Env, guest: TestGuest) -> None:
    pools = env.storage.pools
    base = await pools.create_volume("vms", volume_xml("base.raw", 16 * MiB, format="raw"))
    shutil.copyfile(guest.disk, base.path)
    await pools.create_volume(
        "vms", volume_xml("root.qcow2", None, format="qcow2", backing=_backing(base.path))
    )
    serial = env.base / "logs" / "console.log"
    xml = kernel_domain(guest, "vol-guest", serial, volume_disk("vms", "root.qcow2", "vda"))
    ref = await env.driver.define(xml)
    await env.driver.start(ref.name)
    assert "<source pool='vms' volume='root.qcow2'/>" in await env.driver.xml(ref.name)
    await wait_line(serial, "VIRTBUS-GUEST-READY")
    await wait_blocks(serial, "vda")
    with pytest.raises(OperationInvalid, match="in use by domain"):
        await pools.delete_volume("vms", "root.qcow2")

    await pools.create_volume("vms", volume_xml("data.qcow2", 64 * MiB, format="qcow2"))
    await env.driver.attach_device(
        ref.name, volume_disk("vms", "data.qcow2", "vdb"), Affect(live=True)
    )
    added = await env.events.wait("device_added")
    assert added.data == {"device": "virtio-disk1", "target": "vdb"}
    await wait_blocks(serial, "vda vdb")
    info = await env.driver.block_info(ref.name, "vdb")
    assert info.capacity == 64 * MiB and info.physical > 0
    assert "volume='data.qcow2'" in await env.driver.xml(ref.name)
    assert "data.qcow2" not in (await env.driver.xml(ref.name)).split("<devices>")[0]
    with pytest.raises(OperationInvalid, match="in use"):
        await pools.delete_volume("vms", "data.qcow2")

    await env.driver.detach_device(ref.name, "<disk><target dev='vdb'/></disk>", Affect(live=True))
    removed = await env.events.wait("device_removed")
    assert removed.data == {"device": "virtio-disk1"}
    await wait_blocks(serial, "vda")
    assert "data.qcow2" not in await env.driver.xml(ref.name)
    await pools.delete_volume("vms", "data.qcow2")  # released by the detach

    await env.driver.destroy(ref.name)
    await pools.delete_volume("vms", "root.qcow2")  # released when the domain stopped


def _backing(path: str):  # type: ignore[no-untyped-def]
    from virtbus.storage import Backing

    return Backing(path, "raw")


async def test_missing_volume_fails_start_naming_pool_and_volume(env: Env) -> None:
    xml = kernel_domain_firmware("novol", volume_disk("vms", "absent.qcow2", "vda"))
    await env.driver.define(xml)
    with pytest.raises(NoStorageVol, match=r"'absent.qcow2' not found in pool 'vms'"):
        await env.driver.start("novol")
    info = await env.driver.info("novol")
    assert info.state == DomainState.SHUTOFF and qemu_pids_under(env.base) == []
    with pytest.raises(Exception, match="pool 'elsewhere'"):
        await env.driver.define(
            kernel_domain_firmware("nopool", volume_disk("elsewhere", "v", "vda"))
        )
        await env.driver.start("nopool")


def kernel_domain_firmware(name: str, disks: str) -> str:
    ports = "".join(f"<controller type='pci' index='{i}' model='pcie-root-port'/>" for i in (1, 2))
    return f"""<domain type='qemu'><name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices><controller type='pci' index='0' model='pcie-root'/>{ports}{disks}</devices>
</domain>"""


async def test_config_attach_and_detach_timeout(env: Env) -> None:
    pools = env.storage.pools
    await pools.create_volume("vms", volume_xml("cfg.qcow2", 32 * MiB, format="qcow2"))
    ref = await env.driver.define(kernel_domain_firmware("fw", ""))
    # shut off: CURRENT means the definition. On q35 a disk sits on a root port (one
    # libvirt adds when none is free), so it can be unplugged later.
    disk = volume_disk("vms", "cfg.qcow2", "vdc")
    await env.driver.attach_device(ref.name, disk, Affect())
    assert "volume='cfg.qcow2'" in await env.driver.xml(ref.name)
    assert (await env.driver.block_info(ref.name, "vdc")).capacity == 32 * MiB
    with pytest.raises(OperationInvalid, match="not running"):
        await env.driver.attach_device(
            ref.name, volume_disk("vms", "cfg.qcow2", "vdd"), Affect(live=True)
        )
    await env.driver.start(ref.name)
    # SeaBIOS has no OS to let go of a disk: the detach gives up, the disk stays
    with pytest.raises(OperationTimeout, match="did not release disk vdc"):
        await env.driver.detach_device(
            ref.name, "<disk><target dev='vdc'/></disk>", Affect(live=True)
        )
    assert "volume='cfg.qcow2'" in await env.driver.xml(ref.name)
    with pytest.raises(OperationInvalid, match="in use"):
        await pools.delete_volume("vms", "cfg.qcow2")
    await env.driver.detach_device(
        ref.name, "<disk><target dev='vdc'/></disk>", Affect(config=True)
    )
    await env.driver.destroy(ref.name)
    assert "cfg.qcow2" not in await env.driver.xml(ref.name)
    await pools.delete_volume("vms", "cfg.qcow2")


async def test_iscsi_direct_volume_opened_by_qemu(env: Env, iscsi_target: Target) -> None:
    pools = env.storage.pools
    await pools.define(
        f"<pool type='iscsi-direct'><name>san</name><source>"
        f"<host name='127.0.0.1' port='{iscsi_target.port}'/><device path='{iscsi_target.iqn}'/>"
        f"<initiator><iqn name='{iscsi_target.initiator}'/></initiator></source></pool>"
    )
    await pools.start("san")
    ref = await env.driver.define(
        kernel_domain_firmware("lun-guest", volume_disk("san", "unit:0:0:2", "vda", "raw"))
    )
    await env.driver.start(ref.name)
    info = await env.driver.block_info(ref.name, "vda")
    assert info.capacity == 32 * MiB
    with pytest.raises(OperationInvalid, match="in use"):
        await pools.wipe_volume("san", "unit:0:0:2")
    await env.driver.destroy(ref.name)
    assert os.path.exists(env.base / "lun2.img")
