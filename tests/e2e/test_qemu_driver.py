"""The QEMU driver against real QEMU processes (the driver used directly, not via the bus).

Firmware-only guests (no kernel, no disk: SeaBIOS just runs) cover the fast paths; the
test-kernel guest from tests/guests covers what needs a cooperating OS (ACPI, panic,
reboot). Timings of start/destroy/suspend+resume are printed by ``test_timings`` (-s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import statistics
import tempfile
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from drivers.base import DriverEvent
from drivers.qemu import QemuDriver
from drivers.qemu.launch import LaunchPlan
from drivers.qemu.monitor import EventQueue, Monitor, MonitorLost, QmpEvent
from drivers.qemu.process import read_cmdline, spawn
from drivers.qemu.settings import QemuSettings
from tests.e2e.conftest import qemu_pids_under
from tests.guests import TestGuest, build_test_guest
from tests.procs import qemu_allowed_dirs, qemu_test_settings
from virtbus.errors import (
    ConfigUnsupported,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol.events import DomainState

pytestmark = pytest.mark.qemu

EVENT_TIMEOUT = 60.0  # s: TCG boots of the test kernel on a busy 2-core machine
TIMING_ROUNDS = 50


@dataclass
class Recorder:
    """The driver's sink: keeps every event and wakes waiters."""

    events: list[DriverEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, event: DriverEvent) -> None:
        self.events.append(event)
        self.changed.set()

    def names(self, domain: str) -> list[tuple[str, str | None]]:
        return [(e.event, e.detail) for e in self.events if e.domain == domain]

    async def wait(
        self, domain: str, event: str, detail: str | None = None, timeout: float = EVENT_TIMEOUT
    ) -> DriverEvent:
        def match(e: DriverEvent) -> bool:
            return (
                e.domain == domain and e.event == event and (detail is None or e.detail == detail)
            )

        deadline = time.monotonic() + timeout
        while True:
            found = next((e for e in self.events if match(e)), None)
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {event}({detail}) for {domain}: {self.names(domain)}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)


@dataclass
class Env:
    driver: QemuDriver
    rec: Recorder
    base: Path

    def pids(self) -> list[int]:
        return qemu_pids_under(self.base)


async def _open_driver(
    base: Path, rec: Recorder, settings: QemuSettings | None = None
) -> QemuDriver:
    settings = replace(settings or QemuSettings(), allowed_dirs=qemu_allowed_dirs(base.parent))
    driver = QemuDriver(base / "state", base / "run", settings)
    await driver.open(rec)
    return driver


@pytest.fixture
async def env(e2e_root: Path) -> AsyncIterator[Env]:
    base = Path(tempfile.mkdtemp(prefix="t", dir=e2e_root))
    rec = Recorder()
    driver = await _open_driver(base, rec)
    holder = Env(driver, rec, base)
    yield holder
    for info in await holder.driver.list_domains(include_inactive=False):
        with contextlib.suppress(VirtbusError):
            await holder.driver.destroy(info.uuid)
    await holder.driver.close()


@pytest.fixture(scope="session")
def guest() -> TestGuest:
    return build_test_guest()


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def firmware_xml(name: str, hv_type: str = "qemu", devices: str = "") -> str:
    return f"""<domain type='{hv_type}'>
  <name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>{devices}</devices>
</domain>"""


def kernel_xml(
    guest: TestGuest, name: str, serial: Path, *, cmds: str = "", panic: bool = False,
    on_crash: str = "destroy", on_reboot: str = "restart", devices: str = "",
) -> str:  # fmt: skip
    """The test guest's domain XML; ``devices``: more elements for <devices>."""
    cmdline = guest.cmdline + (f" virtbus.cmd={cmds}" if cmds else "")
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest.kernel}</kernel><initrd>{guest.initramfs}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>{on_reboot}</on_reboot><on_crash>{on_crash}</on_crash>
  <devices>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    {"<panic model='isa'/>" if panic else ""}{devices}
  </devices>
</domain>"""


async def wait_serial(
    path: Path, marker: str, count: int = 1, timeout: float = EVENT_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(_read, path)
        if text.count(marker) >= count:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{marker!r} x{count} not on {path}:\n{_read(path)[-2000:]}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


async def wait_until(check: Callable[[], bool], timeout: float = EVENT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# --- the monitor alone ------------------------------------------------------------------
async def test_monitor_errors_events_and_loss(env: Env) -> None:
    """QMP errors become virtbus errors, events are bounded, a dead QEMU is reported."""
    settings = QemuSettings(qmp_timeout=0.3, event_queue=2)
    sock = env.base / "m.qmp"
    argv = ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-machine", "none",
            "-qmp", f"unix:{sock},server=on,wait=off", "-name", "monitor-test"]  # fmt: skip
    proc = await spawn(argv, uuid="monitor-test", logfile=env.base / "m.log")
    queue = EventQueue(settings.event_queue)
    mon = Monitor("m", sock, settings, queue)
    await mon.connect(10.0, proc.alive, 0.01)
    try:
        assert (await mon.execute("query-status"))["status"] == "prelaunch"
        with pytest.raises(OperationFailed, match="no-such-command"):
            await mon.execute("no-such-command")
        for _ in range(4):  # STOP + RESUME pairs: only `limit` events are kept
            await mon.execute("cont")
            await mon.execute("stop")
        assert queue.dropped > 0
        first = await queue.get()
        assert isinstance(first, QmpEvent) and first.name == "RESUME"
        proc.signal(signal.SIGSTOP)  # a hung QEMU
        with pytest.raises(OperationTimeout):
            await mon.execute("query-status")
        proc.signal(signal.SIGKILL)
        assert await proc.wait_exit(10.0, 0.01)
        while not isinstance(item := await asyncio.wait_for(queue.get(), 10.0), MonitorLost):
            pass
        assert item.monitor is mon and not mon.connected
    finally:
        await mon.close()
        await proc.kill(QemuSettings())


# --- firmware-only guests ---------------------------------------------------------------
async def test_firmware_lifecycle_events_in_order(env: Env) -> None:
    drv, name = env.driver, "fw-life"
    ref = await drv.define(firmware_xml(name))
    assert drv.lookup(name) == ref and drv.lookup(ref.uuid) == ref
    with pytest.raises(OperationInvalid):
        await drv.suspend(name)  # shut off
    await drv.start(name)
    info = await drv.info(name)
    assert (info.state, info.reason, info.id) == (DomainState.RUNNING, "booted", 1)
    assert "id='1'" in await drv.xml(name)
    with pytest.raises(OperationInvalid):
        await drv.start(name)
    with pytest.raises(OperationInvalid):
        await drv.resume(name)
    with pytest.raises(OperationInvalid):
        await drv.undefine(name)
    await drv.suspend(name)
    assert (await drv.info(name)).state == DomainState.PAUSED
    with pytest.raises(OperationInvalid):
        await drv.suspend(name)
    await drv.resume(name)
    assert (await drv.info(name)).state == DomainState.RUNNING
    assert (await drv.info(name)).cpu_time_ns > 0
    await drv.destroy(name)
    info = await drv.info(name)
    assert (info.state, info.reason, info.id) == (DomainState.SHUTOFF, "destroyed", None)
    assert env.pids() == []
    await drv.undefine(name)
    assert drv.lookup(name) is None
    assert env.rec.names(name) == [
        ("defined", "added"), ("started", "booted"), ("suspended", "paused"),
        ("resumed", "unpaused"), ("stopped", "destroyed"), ("undefined", "removed"),
    ]  # fmt: skip


async def test_shutdown_timeout_and_reset(env: Env) -> None:
    """SeaBIOS ignores ACPI: shutdown(timeout) times out and the caller may destroy."""
    name = "fw-acpi"
    await env.driver.define(firmware_xml(name))
    await env.driver.start(name)
    with pytest.raises(OperationTimeout):
        await env.driver.shutdown(name, timeout=0.3)
    await env.driver.reset(name)
    await env.rec.wait(name, "reboot")
    assert (await env.driver.info(name)).state == DomainState.RUNNING
    await env.driver.destroy(name)
    assert env.rec.names(name)[1:] == [("started", "booted"), ("reboot", None),
                                       ("stopped", "destroyed")]  # fmt: skip


async def test_definitions_persist_and_duplicates_fail(env: Env) -> None:
    xml = firmware_xml("fw-def")
    ref = await env.driver.define(xml)
    assert (env.base / "state" / "domains" / f"{ref.uuid}.xml").exists()
    await env.driver.define(xml)  # same name + uuid: an update
    with pytest.raises(OperationFailed):
        await env.driver.define(firmware_xml("fw-def"))  # same name, other uuid
    assert env.rec.names("fw-def") == [("defined", "added"), ("defined", "updated")]
    again = QemuDriver(env.base / "state", env.base / "run", qemu_test_settings(env.base))
    await again.open(lambda _e: None)
    assert again.lookup("fw-def") == ref
    await again.close()


async def test_reattach_after_close(env: Env) -> None:
    name = "fw-reattach"
    await env.driver.define(firmware_xml(name))
    await env.driver.start(name)
    pid = env.pids()
    await env.driver.close()  # QEMU keeps running
    assert env.pids() == pid
    rec = Recorder()
    env.driver = await _open_driver(env.base, rec)
    info = await env.driver.info(name)
    assert info.state == DomainState.RUNNING and info.id == 1
    await env.driver.suspend(name)
    await env.driver.destroy(name)
    assert rec.names(name) == [("suspended", "paused"), ("stopped", "destroyed")]
    assert env.pids() == []


async def test_qemu_inherits_its_qmp_socket_listening_and_the_stop_removes_it(env: Env) -> None:
    """QEMU gets its QMP socket already bound and listening (``fd=``, as libvirt hands its
    monitor over): the agent connects as soon as QEMU runs, without waiting for QEMU to
    create it. A restarted agent finds it by its path (test_reattach_after_close)."""
    name = "fw-monitor-fd"
    await env.driver.define(firmware_xml(name))
    await env.driver.start(name)
    (pid,) = env.pids()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    (chardev,) = [a.decode() for a in argv if a.startswith(b"socket,id=charmonitor,")]
    assert re.fullmatch(r"socket,id=charmonitor,fd=\d+,server=on,wait=off", chardev), chardev
    run = env.driver._registry.get(name).run
    assert run is not None and run.qmp_socket.is_socket()
    await env.driver.suspend(name)  # the monitor answers through it
    await env.driver.destroy(name)
    assert not run.qmp_socket.exists()  # QEMU did not make it: the agent removes it


async def test_monitor_loss_with_qemu_alive_reconnects(env: Env) -> None:
    """A dropped QMP connection of a live QEMU is re-established (white-box: we drop it)."""
    name = "fw-reconnect"
    drv = await _open_driver(env.base / "rc", env.rec, QemuSettings(exit_wait=0.2))
    await drv.define(firmware_xml(name))
    await drv.start(name)
    run = drv._registry.get(name).run
    assert run is not None and run.monitor is not None
    old = run.monitor
    await old._client.disconnect()  # as if the socket had broken
    await wait_until(lambda: run.monitor is not None and run.monitor is not old, timeout=10)
    await drv.suspend(name)
    await drv.resume(name)
    await drv.destroy(name)
    assert env.rec.names(name) == [
        ("defined", "added"), ("started", "booted"), ("suspended", "paused"),
        ("resumed", "unpaused"), ("stopped", "destroyed"),
    ]  # fmt: skip
    await drv.close()


async def test_start_failure_reports_log_tail(env: Env, e2e_root: Path) -> None:
    fake = env.base / "fake-qemu"
    fake.write_text("#!/bin/sh\necho 'qemu: something is badly wrong' >&2\nexit 1\n")
    fake.chmod(0o755)
    drv = await _open_driver(env.base / "fake", Recorder(), QemuSettings(emulator=str(fake)))
    await drv.define(firmware_xml("fw-fail"))
    with pytest.raises(OperationFailed, match="something is badly wrong"):
        await drv.start("fw-fail")
    assert (await drv.info("fw-fail")).state == DomainState.SHUTOFF
    await drv.close()


@dataclass
class PipeStep:
    """A launch step shaped as volume leases, taps and helper processes are: it hands QEMU
    the write end of a pipe (``pass_fds``) and records what it is asked to release."""

    fail: bool = False
    read_ends: dict[str, int] = field(default_factory=dict)  # by uuid
    write_fds: dict[str, int] = field(default_factory=dict)  # the numbers QEMU gets
    released: list[str] = field(default_factory=list)

    async def acquire(self, plan: LaunchPlan) -> None:
        if self.fail:
            raise OperationFailed("no lease for this domain")
        read, write = os.pipe()
        os.set_blocking(read, False)
        self.read_ends[plan.live.uuid], self.write_fds[plan.live.uuid] = read, write
        plan.pass_fds.append(write)

    def held_by(self, pid: int, uuid: str) -> bool:
        """Process ``pid`` has this pipe's write end under the number the plan gave."""
        inode = os.fstat(self.read_ends[uuid]).st_ino
        try:
            return os.readlink(f"/proc/{pid}/fd/{self.write_fds[uuid]}") == f"pipe:[{inode}]"
        except OSError:
            return False

    async def release(self, uuid: str) -> None:
        self.released.append(uuid)

    async def all_closed(self, uuid: str, timeout: float = EVENT_TIMEOUT) -> bool:
        """Wait for the pipe to be readable: True at EOF (every write end closed). An exiting
        QEMU is seen gone (its cmdline empties) a moment before the kernel closes its fds."""
        fd, ready = self.read_ends[uuid], asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, ready.set)
        try:
            async with asyncio.timeout(timeout):
                await ready.wait()
        finally:
            loop.remove_reader(fd)
        return os.read(fd, 1) == b""

    def close(self) -> None:
        for fd in self.read_ends.values():
            os.close(fd)

    def writers_left(self, uuid: str) -> bool:
        """True while anyone (QEMU, or the agent's copy) holds the pipe's write end."""
        try:
            return os.read(self.read_ends[uuid], 1) != b""
        except BlockingIOError:
            return True


async def test_launch_steps_pass_fds_and_release_by_uuid(env: Env) -> None:
    """A launch step's fd reaches QEMU under its number and only there; what it acquired is
    released when the run ends, also by a restarted agent, and when the launch fails."""
    base, name = env.base / "steps", "fw-steps"
    pipe, failing = PipeStep(), PipeStep(fail=True)
    drv = QemuDriver(base / "state", base / "run", qemu_test_settings(base), steps=[pipe, failing])
    await drv.open(env.rec)
    ref = await drv.define(firmware_xml(name))
    with pytest.raises(OperationFailed, match="no lease"):
        await drv.start(name)
    assert pipe.released == failing.released == [ref.uuid]  # every step, by uuid
    assert not pipe.writers_left(ref.uuid)  # the agent's copy of the fd is closed
    assert qemu_pids_under(base) == [] and drv.state(name)[0] == DomainState.SHUTOFF

    failing.fail = False
    await drv.start(name)
    (pid,) = qemu_pids_under(base)
    assert pipe.held_by(pid, ref.uuid) and failing.held_by(pid, ref.uuid)
    assert not pipe.held_by(os.getpid(), ref.uuid)  # the agent closed its copy
    await drv.close()  # the guest keeps running, and keeps what its launch acquired
    assert pipe.released == [ref.uuid]

    again = PipeStep()
    drv = QemuDriver(base / "state", base / "run", qemu_test_settings(base), steps=[again])
    await drv.open(env.rec)
    await drv.destroy(name)
    assert again.released == [ref.uuid]  # a restarted agent releases by uuid
    assert await pipe.all_closed(ref.uuid)  # only QEMU held it: gone with QEMU
    await drv.close()
    assert env.rec.names(name) == [("defined", "added"), ("started", "booted"),
                                   ("stopped", "destroyed")]  # fmt: skip
    for step in (pipe, failing):
        step.close()


async def test_missing_disk_is_a_clear_error(env: Env) -> None:
    missing = env.base / "no-such-disk.qcow2"
    disk = (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{missing}'/><target dev='vda' bus='virtio'/></disk>")  # fmt: skip
    await env.driver.define(firmware_xml("fw-nodisk", devices=disk))
    with pytest.raises(OperationFailed, match=str(missing)):
        await env.driver.start("fw-nodisk")
    assert env.pids() == []
    assert env.rec.names("fw-nodisk") == [("defined", "added")]


async def test_unsupported_device_names_it(env: Env) -> None:
    lease = "<lease><lockspace>s</lockspace><key>k</key><target path='/l'/></lease>"
    with pytest.raises(ConfigUnsupported, match="<lease>"):
        await env.driver.define(firmware_xml("fw-unsup", devices=lease))
    assert env.driver.lookup("fw-unsup") is None
    assert env.rec.names("fw-unsup") == []


async def test_a_host_device_this_host_lacks_is_a_clear_start_error(env: Env) -> None:
    """<hostdev> builds its argv (VFIO); without the device, start says so, nothing runs."""
    hostdev = ("<hostdev mode='subsystem' type='pci' managed='yes'><source>"
               "<address domain='0x0000' bus='0x7f' slot='0x1f' function='0x7'/>"
               "</source></hostdev>")  # fmt: skip
    await env.driver.define(firmware_xml("fw-hostdev", devices=hostdev))
    with pytest.raises(OperationFailed, match=r"0000:7f:1f\.7 does not exist on this host"):
        await env.driver.start("fw-hostdev")
    assert env.driver.state("fw-hostdev")[0] == DomainState.SHUTOFF
    assert env.pids() == []


@pytest.mark.skipif(not kvm_usable(), reason="/dev/kvm is missing or not openable here")
async def test_kvm_firmware_guest(env: Env) -> None:
    await env.driver.define(firmware_xml("fw-kvm", hv_type="kvm"))
    await env.driver.start("fw-kvm")
    assert (await env.driver.info("fw-kvm")).hv_type == "kvm"
    assert any("kvm" in " ".join(read_cmdline(p)) for p in env.pids())
    await env.driver.destroy("fw-kvm")
    assert env.rec.names("fw-kvm")[-1] == ("stopped", "destroyed")


# --- the test-kernel guest ----------------------------------------------------------------
async def test_acpi_shutdown(env: Env, guest: TestGuest) -> None:
    serial = env.base / "acpi.serial"
    await env.driver.define(kernel_xml(guest, "k-acpi", serial))
    await env.driver.start("k-acpi")
    await wait_serial(serial, "VIRTBUS-GUEST-READY")
    await env.driver.shutdown("k-acpi", timeout=EVENT_TIMEOUT)
    assert env.rec.names("k-acpi")[1:] == [
        ("started", "booted"),
        ("shutdown", "guest"),
        ("stopped", "shutdown"),
    ]
    info = await env.driver.info("k-acpi")
    assert (info.state, info.reason) == (DomainState.SHUTOFF, "shutdown")
    assert env.pids() == []


async def test_guest_initiated_poweroff(env: Env, guest: TestGuest) -> None:
    serial = env.base / "poweroff.serial"
    await env.driver.define(kernel_xml(guest, "k-off", serial, cmds="poweroff@1"))
    await env.driver.start("k-off")
    await env.rec.wait("k-off", "stopped")
    assert env.rec.names("k-off")[2:] == [("shutdown", "guest"), ("stopped", "shutdown")]
    assert "VIRTBUS-ACK poweroff" in _read(serial)


async def test_reboot_keeps_guest_running(env: Env, guest: TestGuest) -> None:
    serial = env.base / "reboot.serial"
    await env.driver.define(kernel_xml(guest, "k-reboot", serial))
    await env.driver.start("k-reboot")
    await wait_serial(serial, "VIRTBUS-GUEST-READY")
    await env.driver.reboot("k-reboot")
    await env.rec.wait("k-reboot", "reboot")
    await wait_serial(serial, "VIRTBUS-GUEST-READY", count=2)
    info = await env.driver.info("k-reboot")
    assert info.state == DomainState.RUNNING
    names = {event for event, _detail in env.rec.names("k-reboot")}
    assert not names & {"shutdown", "stopped", "suspended"}, env.rec.names("k-reboot")


async def test_guest_reboot_with_on_reboot_destroy(env: Env, guest: TestGuest) -> None:
    serial = env.base / "rbd.serial"
    xml = kernel_xml(guest, "k-rbd", serial, cmds="reboot@1", on_reboot="destroy")
    await env.driver.define(xml)
    await env.driver.start("k-rbd")
    await env.rec.wait("k-rbd", "stopped")
    assert env.rec.names("k-rbd")[2:] == [("shutdown", "guest"), ("stopped", "shutdown")]
    assert env.pids() == []


async def test_kill9_is_a_crash(env: Env, guest: TestGuest) -> None:
    serial = env.base / "kill.serial"
    await env.driver.define(kernel_xml(guest, "k-kill", serial))
    await env.driver.start("k-kill")
    [pid] = env.pids()
    os.kill(pid, signal.SIGKILL)
    # libvirt (processMonitorEOFEvent): EOF without SHUTDOWN -> stopped(failed), shutoff(crashed)
    await env.rec.wait("k-kill", "stopped", "failed")
    info = await env.driver.info("k-kill")
    assert (info.state, info.reason) == (DomainState.SHUTOFF, "crashed")


async def test_panic_with_on_crash_destroy(env: Env, guest: TestGuest) -> None:
    serial = env.base / "panic.serial"
    await env.driver.define(kernel_xml(guest, "k-panic", serial, cmds="panic@1", panic=True))
    await env.driver.start("k-panic")
    await env.rec.wait("k-panic", "stopped")
    assert env.rec.names("k-panic")[2:] == [("crashed", "panicked"), ("stopped", "crashed")]
    info = await env.driver.info("k-panic")
    assert (info.state, info.reason) == (DomainState.SHUTOFF, "crashed")
    assert env.pids() == []


# --- figures ------------------------------------------------------------------------------
async def test_timings(env: Env) -> None:
    """p50 of start, destroy and a suspend+resume pair of a firmware-only guest (-s prints)."""
    hv_type = "kvm" if kvm_usable() else "qemu"
    drv = env.driver
    await drv.define(firmware_xml("fw-bench", hv_type=hv_type))
    starts, destroys, pairs = [], [], []
    for _ in range(TIMING_ROUNDS):
        t0 = time.perf_counter()
        await drv.start("fw-bench")
        t1 = time.perf_counter()
        await drv.destroy("fw-bench")
        t2 = time.perf_counter()
        starts.append(t1 - t0)
        destroys.append(t2 - t1)
    await drv.start("fw-bench")
    for _ in range(TIMING_ROUNDS):
        t0 = time.perf_counter()
        await drv.suspend("fw-bench")
        await drv.resume("fw-bench")
        pairs.append(time.perf_counter() - t0)
    await drv.destroy("fw-bench")

    def ms(values: list[float]) -> str:
        q = statistics.quantiles(values, n=100)
        return f"p50 {statistics.median(values) * 1e3:.1f} ms, p90 {q[89] * 1e3:.1f} ms"

    print(f"\n[{hv_type}] start {ms(starts)}; destroy {ms(destroys)}; suspend+resume {ms(pairs)}")
    assert statistics.median(destroys) < 1.0
    assert statistics.median(pairs) < 0.1
