"""Issue 13, a confined QEMU (sVirt's DAC part) through a real agent, the real broker, the
CLI and real QEMU: with ``qemu_user=virtbus-qemu`` the guest's QEMU runs as that uid
(/proc/PID/status), owns its files only for the run (given back at destroy, also by an
agent restarted meanwhile; a hot-plugged disk's from its attach to its detach) and cannot
open a root-owned 0600 file it was not given."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from tests.e2e.conftest import PORTS, qemu_pids_under, qmp
from tests.e2e.test_qemu_driver import firmware_xml, kernel_xml, wait_serial
from tests.guests import READY_MARKER, TestGuest, build_test_guest
from tests.procs import AgentProc, agent_process, cli, qemu_allowed_dirs, unique_host
from tests.storage.test_qemu_volumes import wait_blocks

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
USER = "virtbus-qemu"


@dataclass
class Host:
    name: str
    base: Path  # the agent's state dir (searchable by the QEMU user: not under e2e_root)
    images: Path  # the allowed dir, with copies of the guest's kernel and initrd
    options: tuple[str, ...]

    def agent(self, keep_queue: bool = False) -> AbstractAsyncContextManager[AgentProc]:
        return agent_process(self.name, self.base, *self.options, driver="qemu",
                             allowed_dirs=qemu_allowed_dirs(self.images),
                             keep_queue=keep_queue)  # fmt: skip


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        pytest.fail(f"user {USER} is missing: run deploy/setup-dev")
    base = Path(tempfile.mkdtemp(prefix="virtbus-dac-"))
    base.chmod(0o755)
    images = base / "images"
    images.mkdir(mode=0o755)
    yield Host(unique_host("dac"), base, images, ("--driver-option", f"qemu_user={USER}"))
    for pid in qemu_pids_under(base):  # never leave a guest behind
        os.kill(pid, 9)
    shutil.rmtree(base, ignore_errors=True)


def disk(path: Path | str, dev: str) -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{path}'/><target dev='{dev}' bus='virtio'/></disk>")  # fmt: skip


def status_ids(pid: int) -> tuple[list[int], list[int]]:
    text = Path(f"/proc/{pid}/status").read_text()
    uid = re.search(r"^Uid:\s+(.*)$", text, re.M)
    gid = re.search(r"^Gid:\s+(.*)$", text, re.M)
    assert uid and gid
    return [int(x) for x in uid.group(1).split()], [int(x) for x in gid.group(1).split()]


async def test_qemu_runs_unprivileged_and_owns_its_files_only_for_the_run(
    host: Host, guest: TestGuest
) -> None:
    user = pwd.getpwnam(USER)
    kernel, initrd = host.images / "vmlinuz", host.images / "initrd"
    shutil.copyfile(guest.kernel, kernel)
    shutil.copyfile(guest.initramfs, initrd)
    data, secret = host.images / "data.img", host.images / "secret.img"
    for f in (data, secret):
        f.write_bytes(bytes(1 << 20))
        f.chmod(0o600)  # root's, readable by nobody else
    xml = kernel_xml(guest, "dac", Path("/SERIAL"))
    found = re.search(r"<uuid>([^<]+)</uuid>", xml)
    assert found is not None
    uuid = found.group(1)
    own = host.base / "run" / uuid
    serial = own / "serial.log"
    xml = (xml.replace("/SERIAL", str(serial)).replace(str(guest.kernel), str(kernel))
           .replace(str(guest.initramfs), str(initrd))
           .replace("</devices>", disk(data, "vdb") + PORTS + "</devices>"))  # fmt: skip
    (host.base / "dac.xml").write_text(xml)
    (host.base / "shadow.xml").write_text(firmware_xml("shadow", devices=disk("/etc/shadow",
                                                                           "vda")))  # fmt: skip
    (host.base / "secret.xml").write_text(disk(secret, "vdc"))

    async with host.agent(keep_queue=True):
        r = await cli("define", str(host.base / "shadow.xml"), "--host", host.name)
        assert r.code != 0 and "AUTH_DENIED" in r.err and "/etc/shadow" in r.err, r.err
        assert (await cli("define", str(host.base / "dac.xml"), "--host", host.name)).code == 0
        r = await cli("start", "dac", "--host", host.name)
        assert r.code == 0, r.err
        await wait_serial(serial, READY_MARKER)  # booted, its console written as the user
        (pid,) = qemu_pids_under(host.base)
        uids, gids = status_ids(pid)
        assert uids == [user.pw_uid] * 4 and gids == [user.pw_gid] * 4  # real, eff, saved, fs
        for f in (data, serial, own):
            assert f.stat().st_uid == user.pw_uid, f
        assert kernel.stat().st_uid == 0  # read-only boot files are not given away
        # a root-owned 0600 file hot-plugged: given to the user before QEMU opens it (as
        # libvirt relabels a hot-plugged image), seen by the guest, given back at detach
        await wait_blocks(serial, "vda")  # the guest names its one disk (vdb) vda
        r = await cli("attach-device", "dac", str(host.base / "secret.xml"), "--live",
                      "--host", host.name)  # fmt: skip
        assert r.code == 0, r.err
        assert secret.stat().st_uid == user.pw_uid
        await wait_blocks(serial, "vda vdb")
        r = await cli("detach-device", "dac", str(host.base / "secret.xml"), "--live",
                      "--host", host.name)  # fmt: skip
        assert r.code == 0, r.err
        await wait_blocks(serial, "vda")
        assert (secret.stat().st_uid, secret.stat().st_mode & 0o777) == (0, 0o600)
        assert data.stat().st_uid == user.pw_uid  # the run's own disk stays the user's
    # the agent stopped, the guest runs on; a new agent destroys it and gives the files back
    assert qemu_pids_under(host.base) == [pid]
    # a root-owned 0600 file it was not given: QEMU itself cannot open it (its own
    # monitor, as a hostile QEMU would ask)
    monitor = host.base / "run" / f"{uuid}.qmp"
    assert monitor.is_socket(), monitor
    probe = {"driver": "file", "node-name": "probe", "filename": str(secret)}
    (denied,) = await qmp(monitor, ("blockdev-add", probe))
    assert isinstance(denied, ExecuteError) and "Permission denied" in str(denied), denied
    async with host.agent():
        assert (await cli("destroy", "dac", "--host", host.name)).code == 0
        for f in (data, serial, own):
            assert f.stat().st_uid == 0, f
        assert data.stat().st_mode & 0o777 == 0o600
        assert not (host.base / "run" / f"{uuid}.dac.json").exists()
        r = await cli("--json", "dominfo", "dac", "--host", host.name)
        assert r.code == 0 and r.json()["state"] == "shutoff"


async def test_a_file_the_user_cannot_reach_is_a_clear_start_error(
    host: Host, guest: TestGuest
) -> None:
    hidden = host.images / "hidden"
    hidden.mkdir(mode=0o700)  # root's: the QEMU user cannot search it
    shutil.copyfile(guest.kernel, hidden / "vmlinuz")
    shutil.copyfile(guest.initramfs, host.images / "initrd")
    xml = (kernel_xml(guest, "hid", host.images / "hid.log")
           .replace(str(guest.kernel), str(hidden / "vmlinuz"))
           .replace(str(guest.initramfs), str(host.images / "initrd")))  # fmt: skip
    (host.base / "hid.xml").write_text(xml)
    async with host.agent():
        assert (await cli("define", str(host.base / "hid.xml"), "--host", host.name)).code == 0
        r = await cli("start", "hid", "--host", host.name)
        assert r.code != 0 and "OPERATION_FAILED" in r.err, r.err
        assert f"directory '{hidden}' is not searchable" in r.err, r.err
        assert qemu_pids_under(host.base) == []
        assert (await cli("list", "--all", "--host", host.name)).code == 0  # still serves
