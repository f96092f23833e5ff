"""Real starts of the XML features the compatibility work added, checked from inside the
guest (issue 17, part 4).

Every test defines and starts a domain through the real QEMU driver (TCG), waits for the
test guest's ``VIRTBUS-GUEST-READY`` on its serial console and then asks the guest over
its virtio-serial control port (``org.virtbus.guest.0``, a socket the driver generates in
its run dir) what it sees: EFI firmware, a TPM, a mounted virtiofs share, a disk's
contents. Helper processes (swtpm, virtiofsd) are checked on the host as well: they run
while the guest runs and are gone after it. Each test also checks its premise (the guest
without the feature does not see it) or a refusal with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from drivers.qemu import QemuDriver
from drivers.qemu.process import read_cmdline
from tests.e2e.conftest import qemu_pids_under
from tests.e2e.test_qemu_driver import Recorder, wait_serial
from tests.guests import TestGuest, build_test_guest, expected_disk_md5
from tests.procs import qemu_test_settings
from virtbus.errors import ConfigUnsupported, OperationFailed, VirtbusError
from virtbus.protocol.migration import MigrationParams

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

BOOT_TIMEOUT = 180.0  # s: TCG boots (OVMF is slower than SeaBIOS) on a busy 2-core machine
REPLY_TIMEOUT = 60.0
CONTROL = "org.virtbus.guest.0"


@dataclass
class Env:
    driver: QemuDriver
    rec: Recorder
    base: Path

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    def control_socket(self, uuid: str) -> Path:
        """The driver's generated socket of the domain's first (control) channel."""
        return self.run_dir / f"{uuid}.channel0.sock"


async def _open(base: Path) -> Env:
    rec = Recorder()
    driver = QemuDriver(base / "state", base / "run", qemu_test_settings(base))
    await driver.open(rec)
    return Env(driver, rec, base)


async def _close(env: Env) -> None:
    for info in await env.driver.list_domains(include_inactive=False):
        with contextlib.suppress(VirtbusError):
            await env.driver.destroy(info.uuid)
    await env.driver.close()


@pytest.fixture
async def env(e2e_root: Path) -> AsyncIterator[Env]:
    holder = await _open(Path(tempfile.mkdtemp(prefix="c", dir=e2e_root)))
    yield holder
    await _close(holder)


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


def guest_xml(
    guest: TestGuest,
    name: str,
    serial: Path,
    *,
    uuid: str | None = None,
    os_attrs: str = "",
    os_extra: str = "",
    top: str = "",
    devices: str = "",
    features: str = "<acpi/>",
    memory_mib: int = 256,
    machine: str = "q35",
) -> str:
    """The test kernel guest with a console file and the control channel first."""
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{uuid or uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>
  <os{os_attrs}>
    <type arch='x86_64' machine='{machine}'>hvm</type>{os_extra}
    <kernel>{guest.kernel}</kernel><initrd>{guest.initramfs}</initrd>
    <cmdline>{guest.cmdline}</cmdline>
  </os>
  <features>{features}</features>{top}
  <devices>
    <channel type='unix'><target type='virtio' name='{CONTROL}'/></channel>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    {devices}
  </devices>
</domain>"""


class Guest:
    """One connection to the guest's control port: a command line, its one-line reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> Guest:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

    async def ask(self, line: str, expect: str) -> str:
        """Send ``line``; the first reply line starting with ``expect`` (without it)."""
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    raise AssertionError(f"control port closed waiting for {expect!r}")
                text = raw.decode(errors="replace").strip()
                if text.startswith(expect):
                    return text[len(expect) :].strip()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def migrate(src: QemuDriver, dst: QemuDriver, uuid: str, xml: Callable[[str], str]) -> None:
    """The driver's migration steps from ``src`` to ``dst`` on 127.0.0.1, the definition
    ``migrate_begin`` gives passed through ``xml`` (its paths moved to the destination's),
    until the source confirms."""
    params = MigrationParams(listen_address="127.0.0.1")
    uri = await dst.migrate_prepare(xml(await src.migrate_begin(uuid)), params)
    await src.migrate_perform(uuid, uri, params)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while (status := await src.migrate_status(uuid)).status != "completed":
        assert status.status not in ("failed", "cancelled"), status
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.2)
    await dst.migrate_finish(uuid, True)
    await src.migrate_confirm(uuid, True)


async def boot(env: Env, xml: str, serial: Path) -> tuple[str, Guest]:
    """Define and start ``xml``; wait for READY; the uuid and a control connection."""
    ref = await env.driver.define(xml)
    await env.driver.start(ref.uuid)
    await wait_serial(serial, "VIRTBUS-GUEST-READY", timeout=BOOT_TIMEOUT)
    return ref.uuid, await Guest.connect(env.control_socket(ref.uuid))


def processes(program: str, marker: str) -> list[int]:
    """PIDs of ``program`` whose command line names ``marker`` (a path of this test)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = read_cmdline(int(entry.name))
        if argv and Path(argv[0]).name == program and any(marker in a for a in argv):
            found.append(int(entry.name))
    return found


async def wait_gone(program: str, marker: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while processes(program, marker):
        assert time.monotonic() < deadline, f"{program} for {marker} still runs"
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------- UEFI


async def test_uefi_boot_with_ovmf(env: Env, guest: TestGuest) -> None:
    """``<os firmware='efi'>`` selects OVMF from /usr/share/qemu/firmware, creates the NVRAM
    from its template, and the guest runs on EFI firmware (/sys/firmware/efi)."""
    bios_serial, efi_serial = env.base / "bios.serial", env.base / "efi.serial"
    xml = guest_xml(
        guest, "c-efi", efi_serial, os_attrs=" firmware='efi'",
        os_extra="<firmware><feature enabled='no' name='secure-boot'/></firmware>",
    )  # fmt: skip
    # both at once: OVMF under TCG takes most of the time, the BIOS guest boots meanwhile
    booted = await asyncio.gather(
        boot(env, guest_xml(guest, "c-bios", bios_serial), bios_serial),
        boot(env, xml, efi_serial),
        return_exceptions=True,
    )
    ok = [b for b in booted if not isinstance(b, BaseException)]
    try:
        for b in booted:
            if isinstance(b, BaseException):
                raise b
        (_uuid, bios), (uuid, efi) = ok
        assert await bios.ask("ls /sys/firmware/efi", "VIRTBUS-LS") == "/sys/firmware/efi missing"
        reply = await efi.ask("ls /sys/firmware/efi", "VIRTBUS-LS")
        assert reply.startswith("/sys/firmware/efi ") and "missing" not in reply, reply
        assert "efivars" in reply or "runtime" in reply, reply
    finally:
        for _u, g in ok:
            await g.close()
    dumped = await env.driver.xml(uuid)
    loader = re.search(r"<loader[^>]*>([^<]+)</loader>", dumped)
    assert loader is not None and "/usr/share/OVMF/" in loader.group(1), dumped
    nvram = re.search(r"<nvram[^>]*>([^<]+)</nvram>", dumped)
    assert nvram is not None and Path(nvram.group(1)).stat().st_size > 0


# ---------------------------------------------------------------------------- TPM

PCR16_AFTER_EXTEND = hashlib.sha256(bytes(32) + b"\x01" * 32).hexdigest()


async def tpm_extend_and_read(g: Guest) -> None:
    """PCR 16 is zero on a fresh TPM; after one extend it is sha256(0*32 || 1*32)."""
    pcr = "/sys/class/tpm/tpm0/pcr-sha256/16"
    assert (await g.ask(f"cat {pcr}", "VIRTBUS-CAT")).split()[-1].lower() == "0" * 64
    response = (await g.ask("tpm-extend 16", "VIRTBUS-TPM-EXTEND")).split()[-1]
    assert response[12:20] == "00000000", f"TPM2_PCR_Extend failed: response {response}"
    assert (await g.ask(f"cat {pcr}", "VIRTBUS-CAT")).split()[-1].lower() == PCR16_AFTER_EXTEND


TPM = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"


async def test_tpm_visible_in_the_guest_and_swtpm_follows_the_domain(
    env: Env, guest: TestGuest
) -> None:
    serial = env.base / "tpm.serial"
    uuid, g = await boot(env, guest_xml(guest, "c-tpm", serial, devices=TPM), serial)
    try:
        assert (await g.ask("ls /sys/class/tpm", "VIRTBUS-LS")).split()[1:] == ["tpm0"]
        await tpm_extend_and_read(g)
    finally:
        await g.close()
    assert len(processes("swtpm", uuid)) == 1
    state = env.base / "state" / "swtpm" / uuid / "tpm2"
    assert any(state.iterdir()), "swtpm_setup made no state"
    await env.driver.destroy(uuid)
    await wait_gone("swtpm", uuid)
    assert not any(p.name.startswith(uuid) and p.name.endswith(".sock")
                   for p in env.run_dir.iterdir())  # fmt: skip
    assert any(state.iterdir()), "the TPM's state outlives a run"
    await env.driver.undefine(uuid)
    assert not state.exists(), "undefine forgets the TPM state, as libvirt does"


async def test_live_migration_carries_the_swtpm_state(e2e_root: Path, guest: TestGuest) -> None:
    """The destination's swtpm starts empty (no swtpm_setup); the TPM state arrives in
    QEMU's migration stream: the PCR extended on the source reads back on the destination."""
    src = await _open(Path(tempfile.mkdtemp(prefix="s", dir=e2e_root)))
    dst = await _open(Path(tempfile.mkdtemp(prefix="d", dir=e2e_root)))
    try:
        serial = src.base / "console"
        uuid, g = await boot(src, guest_xml(guest, "c-mig", serial, devices=TPM), serial)
        try:
            await tpm_extend_and_read(g)
        finally:
            await g.close()
        console = str(dst.base / "console")
        await migrate(src.driver, dst.driver, uuid, lambda x: x.replace(str(serial), console))
        moved = await Guest.connect(dst.control_socket(uuid))
        try:
            pcr = await moved.ask("cat /sys/class/tpm/tpm0/pcr-sha256/16", "VIRTBUS-CAT")
            assert pcr.split()[-1].lower() == PCR16_AFTER_EXTEND
        finally:
            await moved.close()
        await wait_gone("swtpm", str(src.run_dir))
        assert processes("swtpm", str(dst.run_dir))
        assert not (src.base / "state" / "swtpm" / uuid).exists(), "the state moved away"
        assert any((dst.base / "state" / "swtpm" / uuid / "tpm2").iterdir())
    finally:
        await _close(src)
        await _close(dst)


# ---------------------------------------------------------------------------- virtiofs


async def test_virtiofs_share_mounted_and_read(env: Env, guest: TestGuest) -> None:
    share = env.base / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello from the host\n")
    serial = env.base / "fs.serial"
    xml = guest_xml(
        guest, "c-fs", serial,
        top="<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>",
        devices=f"<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/>"
        f"<source dir='{share}'/><target dir='hostshare'/></filesystem>",
    )  # fmt: skip
    uuid, g = await boot(env, xml, serial)
    try:
        assert await g.ask("mount virtiofs nosuchtag /mnt/x", "VIRTBUS-MOUNT") == "/mnt/x failed"
        assert await g.ask("mount virtiofs hostshare /mnt/h", "VIRTBUS-MOUNT") == "/mnt/h ok"
        reply = await g.ask("cat /mnt/h/hello.txt", "VIRTBUS-CAT")
        assert reply == "/mnt/h/hello.txt hello from the host"
    finally:
        await g.close()
    assert processes("virtiofsd", uuid)
    await env.driver.destroy(uuid)
    await wait_gone("virtiofsd", uuid)


# ---------------------------------------------------------------------------- hugepages

HUGE_KIB = 2048


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/meminfo")


@pytest.fixture
def hugepages(tmp_path: Path) -> Iterator[Path]:
    """Reserve 2 MiB pages for one 256 MiB guest and mount hugetlbfs; undo both after."""
    knob = Path("/proc/sys/vm/nr_hugepages")
    before = int(knob.read_text())
    want = before + 256 * 1024 // HUGE_KIB + 8
    knob.write_text(f"{want}\n")
    mount = tmp_path / "hugepages"
    mount.mkdir()
    try:
        assert int(knob.read_text()) == want, "the kernel could not reserve the hugepages"
        subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(mount)],
                       check=True, timeout=30)  # fmt: skip
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=True, timeout=30)
    finally:
        knob.write_text(f"{before}\n")


async def test_guest_on_hugepages(env: Env, guest: TestGuest, hugepages: Path) -> None:
    serial = env.base / "huge.serial"
    xml = guest_xml(
        guest, "c-huge", serial,
        top="<memoryBacking><hugepages><page size='2' unit='MiB'/></hugepages>"
        "<allocation mode='immediate'/></memoryBacking>",
    )  # fmt: skip
    free_before = _meminfo("HugePages_Free")
    uuid, g = await boot(env, xml, serial)
    try:
        assert await g.ask("ping huge", "VIRTBUS-PONG") == "huge"
        used = free_before - _meminfo("HugePages_Free")
        assert used >= 256 * 1024 // HUGE_KIB, f"only {used} hugepages in use"
        (pid,) = qemu_pids_under(env.base)
        assert any(str(hugepages) in a for a in read_cmdline(pid))
    finally:
        await g.close()
    await env.driver.destroy(uuid)
    assert _meminfo("HugePages_Free") == free_before


# ---------------------------------------------------------------------------- NBD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def nbd_export(guest: TestGuest, tmp_path: Path) -> Iterator[int]:
    """The test disk, read-only, exported as 'vbdisk' by qemu-nbd on a local TCP port."""
    port = _free_port()
    image = guest.clone_disk(tmp_path / "nbd.raw")
    proc = subprocess.Popen(
        ["qemu-nbd", "--persistent", "--read-only", "--format=raw", "--export-name=vbdisk",
         "--bind=127.0.0.1", f"--port={port}", str(image)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s, contextlib.suppress(OSError):
                s.connect(("127.0.0.1", port))
                break
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not listen"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()  # only the process this fixture started
        proc.wait(timeout=10)


def nbd_disk(port: int, export: str) -> str:
    return (f"<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
            f"<source protocol='nbd' name='{export}'><host name='127.0.0.1' port='{port}'/>"
            f"</source><target dev='vda' bus='virtio'/><readonly/></disk>")  # fmt: skip


async def test_nbd_disk_read_by_the_guest(env: Env, guest: TestGuest, nbd_export: int) -> None:
    serial = env.base / "nbd.serial"
    uuid, g = await boot(
        env, guest_xml(guest, "c-nbd", serial, devices=nbd_disk(nbd_export, "vbdisk")), serial
    )
    try:
        assert await g.ask("disk-md5 8", "VIRTBUS-DISK-MD5") == f"8 {expected_disk_md5(8)}"
    finally:
        await g.close()
    await env.driver.destroy(uuid)
    bad = guest_xml(guest, "c-nbd-bad", env.base / "bad.serial",
                    devices=nbd_disk(nbd_export, "nosuchexport"))  # fmt: skip
    ref = await env.driver.define(bad)
    with pytest.raises(OperationFailed, match="nosuchexport"):
        await env.driver.start(ref.uuid)
    assert await env.driver.list_domains(include_inactive=False) == []


# ---------------------------------------------------------------------------- hyperv

HYPERV = ("<acpi/><hyperv mode='custom'><relaxed state='on'/><vapic state='on'/>"
          "<spinlocks state='on' retries='8191'/><runtime state='on'/><synic state='on'/>"
          "<stimer state='on'/><reset state='on'/><frequencies state='on'/>"
          "<reenlightenment state='on'/><ipi state='on'/></hyperv>")  # fmt: skip
HV_FLAGS = ("hv-relaxed=on", "hv-vapic=on", "hv-spinlocks=0x1fff", "hv-runtime=on", "hv-synic=on",
            "hv-stimer=on", "hv-reset=on", "hv-frequencies=on", "hv-reenlightenment=on",
            "hv-ipi=on", "hv-time=on")  # fmt: skip


async def test_hyperv_enlightenments_under_tcg(env: Env, guest: TestGuest) -> None:
    """virt-manager's Windows set (minus vpindex) runs under TCG: QEMU gets every
    enlightenment and the guest boots. QEMU's TCG exposes no Hyper-V CPUID leaves, so the
    guest cannot see them; vpindex, which QEMU refuses under TCG, is a clear error."""
    serial = env.base / "hv.serial"
    clock = "<clock offset='utc'><timer name='hypervclock' present='yes'/></clock>"
    uuid, g = await boot(env, guest_xml(guest, "c-hv", serial, features=HYPERV, top=clock),
                         serial)  # fmt: skip
    try:
        assert await g.ask("ping hv", "VIRTBUS-PONG") == "hv"
    finally:
        await g.close()
    (pid,) = qemu_pids_under(env.base)
    argv = read_cmdline(pid)
    cpu = argv[argv.index("-cpu") + 1]
    assert all(flag in cpu.split(",") for flag in HV_FLAGS), cpu
    await env.driver.destroy(uuid)
    vp = HYPERV.replace("<relaxed state='on'/>", "<relaxed state='on'/><vpindex state='on'/>")
    with pytest.raises(ConfigUnsupported, match="vpindex"):  # type='qemu' is always TCG
        await env.driver.define(guest_xml(guest, "c-hv-vp", serial, features=vp))
    assert qemu_pids_under(env.base) == []


# ---------------------------------------------------------------------------- virt-install


async def test_q35_with_index_less_pcie_root_ports(env: Env, guest: TestGuest) -> None:
    """virt-install's q35 layout: index-less pcie-root-ports; each device behind its own
    port. Before, QEMU refused it with "Duplicate device ID 'pci.0'"."""
    disk = guest.clone_disk(env.base / "disk.raw")
    serial = env.base / "vi.serial"
    ports = "<controller type='pci' model='pcie-root-port'/>" * 6
    devices = (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        "<controller type='usb' model='qemu-xhci' ports='15'/>"
        "<controller type='pci' model='pcie-root'/>" + ports
        + "<interface type='user'><model type='virtio'/></interface>"
        "<input type='tablet' bus='usb'/><rng model='virtio'><backend model='random'>"
        "/dev/urandom</backend></rng><memballoon model='virtio'/>"
    )  # fmt: skip
    uuid, g = await boot(env, guest_xml(guest, "c-vi", serial, devices=devices), serial)
    try:
        assert await g.ask("disk-md5 8", "VIRTBUS-DISK-MD5") == f"8 {expected_disk_md5(8)}"
    finally:
        await g.close()
    dumped = await env.driver.xml(uuid)
    ports_xml = re.findall(r"<controller type='pci'[^>]*model='pcie-root-port'[^>]*>", dumped)
    indexes = [re.search(r"index='(\d+)'", c).group(1) for c in ports_xml]  # type: ignore[union-attr]
    assert len(indexes) >= 6 and len(set(indexes)) == len(indexes), dumped
    assert "0" not in indexes
    vda = re.search(
        r"<target dev='vda' bus='virtio'/>\s*<address type='pci' [^>]*bus='(0x[0-9a-f]+)'", dumped
    )
    assert vda is not None and int(vda.group(1), 16) != 0, "the disk sits behind a root port"


def test_the_guest_tools_are_installed() -> None:
    """The premise of the file: the helper programs the driver starts exist here."""
    for tool in ("swtpm", "swtpm_setup", "qemu-nbd", "qemu-img"):
        assert shutil.which(tool), f"{tool} missing: run deploy/setup-dev"
    assert os.access("/usr/lib/qemu/virtiofsd", os.X_OK), "virtiofsd missing"
    assert Path("/usr/share/qemu/firmware/60-edk2-x86_64.json").exists(), "ovmf missing"


# ---------------------------------------------------------------------------- pinning


def _threads(pid: int) -> dict[str, set[int]]:
    """QEMU's threads by name (``CPU 0/TCG``, ...) and the CPUs each may run on."""
    out: dict[str, set[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out[(task / "comm").read_text().strip()] = os.sched_getaffinity(int(task.name))
    return out


async def test_vcpu_and_emulator_pinning_on_the_real_threads(env: Env, guest: TestGuest) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "needs two CPUs to see a pin"
    serial = env.base / "pin.serial"
    xml = guest_xml(
        guest,
        "c-pin",
        serial,
        top=f"<cputune><vcpupin vcpu='0' cpuset='{cpus[1]}'/>"
        f"<emulatorpin cpuset='{cpus[0]}'/></cputune>",
    )
    uuid, g = await boot(env, xml, serial)
    try:
        assert await g.ask("ping pin", "VIRTBUS-PONG") == "pin"
    finally:
        await g.close()
    (pid,) = qemu_pids_under(env.base)
    threads = _threads(pid)
    assert threads["CPU 0/TCG"] == {cpus[1]}, threads
    assert os.sched_getaffinity(pid) == {cpus[0]}, "the emulator (main) thread"
    await env.driver.destroy(uuid)
