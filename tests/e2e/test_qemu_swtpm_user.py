"""Issue 13, swtpm confined as QEMU is: with ``qemu_user`` or ``qemu_uid_range`` a
domain's swtpm (and its swtpm_setup) runs under the uid and gid of the domain's QEMU
(/proc/PID/status), its state dir and socket are that uid's, and the guest's TPM still
works (a PCR extended and read back from inside the guest, as test_qemu_compat checks),
through the real QEMU driver, real QEMU (TCG) and real swtpm. libvirt runs swtpm as its
``swtpm_user`` the same way; the state stays the domain's until undefine removes it."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from drivers.qemu import QemuDriver
from tests.e2e.conftest import qemu_pids_under
from tests.e2e.test_qemu_compat import (
    PCR16_AFTER_EXTEND,
    TPM,
    Guest,
    guest_xml,
    migrate,
    processes,
    tpm_extend_and_read,
    wait_gone,
)
from tests.e2e.test_qemu_dac import status_ids
from tests.e2e.test_qemu_driver import Recorder, wait_serial
from tests.guests import READY_MARKER, TestGuest, build_test_guest
from tests.procs import qemu_test_settings
from virtbus.errors import VirtbusError

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
USER = "virtbus-qemu"
FIRST = 232000  # a uid no account of a test host uses (checked below)
BOOT_TIMEOUT = 180.0


@dataclass
class Env:
    driver: QemuDriver
    base: Path  # searchable by every uid (not under e2e_root, which is 0700)
    images: Path

    @property
    def run_dir(self) -> Path:
        return self.base / "run"


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


@asynccontextmanager
async def opened(option: dict[str, str]) -> AsyncIterator[Env]:
    """A QEMU driver whose QEMUs run as ``option`` says (qemu_user or qemu_uid_range)."""
    try:
        pwd.getpwnam(USER)
    except KeyError:
        pytest.fail(f"user {USER} is missing: run deploy/setup-dev")
    for uid in (FIRST, FIRST + 1):
        with pytest.raises(KeyError):  # no account of this host may hold it
            pwd.getpwuid(uid)
    base = Path(tempfile.mkdtemp(prefix="virtbus-swtpm-"))
    base.chmod(0o755)
    images = base / "images"
    images.mkdir(mode=0o755)
    driver = QemuDriver(base / "state", base / "run", qemu_test_settings(base, **option))
    await driver.open(Recorder())
    try:
        yield Env(driver, base, images)
    finally:
        for info in await driver.list_domains(include_inactive=False):
            with contextlib.suppress(VirtbusError):
                await driver.destroy(info.uuid)
        await driver.close()
        for pid in qemu_pids_under(base) + processes("swtpm", str(base)):
            os.kill(pid, signal.SIGKILL)  # never leave a guest or a helper behind
        shutil.rmtree(base, ignore_errors=True)


OPTIONS = {
    "qemu_user": {"qemu_user": USER},
    "qemu_uid_range": {"qemu_uid_range": f"{FIRST}-{FIRST}"},
}


@pytest.fixture(params=list(OPTIONS))
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    async with opened(OPTIONS[request.param]) as e:
        yield e


def tpm_guest(env: Env, guest: TestGuest, name: str) -> tuple[str, Path]:
    """(xml, serial) of the test guest with a TPM, booting copies of its kernel that the
    QEMU user can read."""
    kernel, initrd = env.images / "vmlinuz", env.images / "initrd"
    shutil.copyfile(guest.kernel, kernel)
    shutil.copyfile(guest.initramfs, initrd)
    serial = env.images / "tpm.serial"
    xml = (guest_xml(guest, name, serial, devices=TPM)
           .replace(str(guest.kernel), str(kernel))
           .replace(str(guest.initramfs), str(initrd)))  # fmt: skip
    return xml, serial


def swtpm_ids(uuid: str) -> tuple[list[int], list[int]]:
    (swtpm,) = processes("swtpm", uuid)
    return status_ids(swtpm)


async def test_swtpm_runs_as_the_domains_qemu_and_the_tpm_works(env: Env, guest: TestGuest) -> None:
    xml, serial = tpm_guest(env, guest, "swtpm-user")
    ref = await env.driver.define(xml)
    uuid = ref.uuid
    await env.driver.start(uuid)
    await wait_serial(serial, READY_MARKER, timeout=BOOT_TIMEOUT)
    (qemu,) = qemu_pids_under(env.base)
    uid, gid = (x[0] for x in status_ids(qemu))
    assert uid != 0  # premise: QEMU runs unprivileged
    assert swtpm_ids(uuid) == ([uid] * 4, [gid] * 4)  # real, effective, saved, fs
    state = env.base / "state" / "swtpm" / uuid / "tpm2"
    assert any(state.iterdir()), "swtpm_setup made no state"
    for path in (state, *state.iterdir()):  # made by swtpm_setup as the user
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid), path
    assert state.stat().st_mode & 0o077 == 0  # no other guest's uid reads its keys
    (sock,) = [p for p in env.run_dir.rglob("*swtpm.sock")]
    assert sock.stat().st_uid == uid
    (control,) = [p for p in env.run_dir.rglob("*channel0.sock")]
    g = await Guest.connect(control)
    try:
        assert (await g.ask("ls /sys/class/tpm", "VIRTBUS-LS")).split()[1:] == ["tpm0"]
        await tpm_extend_and_read(g)
    finally:
        await g.close()
    await env.driver.destroy(uuid)
    await wait_gone("swtpm", uuid)
    assert any(state.iterdir()), "the TPM's state outlives a run"
    logs = list(env.run_dir.glob(f"{uuid}.*-swtpm.log"))
    assert logs and all(p.stat().st_uid == uid for p in logs), logs  # premise: the uid's
    await env.driver.undefine(uuid)
    assert not state.exists(), "undefine forgets the TPM state, as libvirt does"
    for path in logs:  # kept, as libvirt keeps them, but no longer a (reusable) uid's
        assert (path.stat().st_uid, path.stat().st_mode & 0o777) == (0, 0o640), path


async def test_a_migrated_tpm_runs_under_the_destinations_uid(guest: TestGuest) -> None:
    """The destination's swtpm starts empty as the destination's own uid for the domain
    (another one of another range here) and receives the TPM's state in QEMU's stream: the
    PCR extended on the source reads back, the state written there is that uid's."""
    async with (
        opened({"qemu_uid_range": f"{FIRST}-{FIRST}"}) as src,
        opened({"qemu_uid_range": f"{FIRST + 1}-{FIRST + 1}"}) as dst,
    ):
        xml, serial = tpm_guest(src, guest, "swtpm-mig")
        uuid = (await src.driver.define(xml)).uuid
        await src.driver.start(uuid)
        await wait_serial(serial, READY_MARKER, timeout=BOOT_TIMEOUT)
        assert swtpm_ids(uuid) == ([FIRST] * 4, [FIRST] * 4)
        (control,) = list(src.run_dir.rglob("*channel0.sock"))
        g = await Guest.connect(control)
        try:
            await tpm_extend_and_read(g)
        finally:
            await g.close()
        shutil.copyfile(src.images / "vmlinuz", dst.images / "vmlinuz")
        shutil.copyfile(src.images / "initrd", dst.images / "initrd")
        await migrate(
            src.driver, dst.driver, uuid, lambda x: x.replace(str(src.base), str(dst.base))
        )
        await wait_gone("swtpm", str(src.run_dir))
        assert swtpm_ids(uuid) == ([FIRST + 1] * 4, [FIRST + 1] * 4)
        (control,) = list(dst.run_dir.rglob("*channel0.sock"))
        moved = await Guest.connect(control)
        try:
            pcr = await moved.ask("cat /sys/class/tpm/tpm0/pcr-sha256/16", "VIRTBUS-CAT")
            assert pcr.split()[-1].lower() == PCR16_AFTER_EXTEND
        finally:
            await moved.close()
        state = dst.base / "state" / "swtpm" / uuid / "tpm2"
        assert any(state.iterdir())
        for path in (state, *state.iterdir()):
            assert path.stat().st_uid == FIRST + 1, path
