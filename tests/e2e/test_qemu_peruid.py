"""Issue 13 item 5, a uid of its own for each domain's QEMU (``qemu_uid_range``), through a
real agent, the real broker, the CLI and real QEMU: two guests run under two uids of the
range (/proc/PID/status), one guest's uid cannot open the other's disk while both read a
read-only image they share, the uids survive an agent restart, are freed at undefine, and
an exhausted range refuses a start with OPERATION_FAILED naming the setting."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from drivers.qemu import acl
from drivers.qemu.dac import REMEMBER
from tests.e2e.conftest import PORTS, qemu_pids_under
from tests.e2e.test_qemu_dac import disk, status_ids
from tests.e2e.test_qemu_driver import kernel_xml, wait_serial
from tests.guests import READY_MARKER, TestGuest, build_test_guest
from tests.procs import AgentProc, agent_process, cli, qemu_allowed_dirs, unique_host
from tests.storage.test_qemu_volumes import wait_blocks

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
FIRST = 231000  # no account of a test host uses these (checked below)


@dataclass
class Host:
    name: str
    base: Path  # the agent's state dir (searchable by every uid: not under e2e_root)
    images: Path  # the allowed dir: kernel, initrd, disks
    uid_range: str

    def agent(self, keep_queue: bool = False) -> AbstractAsyncContextManager[AgentProc]:
        return agent_process(self.name, self.base, "--driver-option",
                             f"qemu_uid_range={self.uid_range}", driver="qemu",
                             allowed_dirs=qemu_allowed_dirs(self.images),
                             keep_queue=keep_queue)  # fmt: skip

    @property
    def run(self) -> Path:
        return self.base / "run"

    def allocations(self) -> dict[str, int]:
        (path,) = self.base.rglob("qemu-uids.json")
        return {k: int(v) for k, v in json.loads(path.read_text())["uids"].items()}


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


@pytest.fixture
async def host(request: pytest.FixtureRequest) -> AsyncIterator[Host]:
    size = int(getattr(request, "param", 2))
    for uid in range(FIRST, FIRST + size):
        with pytest.raises(KeyError):  # no account of this host may hold it
            pwd.getpwuid(uid)
    base = Path(tempfile.mkdtemp(prefix="virtbus-peruid-"))
    base.chmod(0o755)
    images = base / "images"
    images.mkdir(mode=0o755)
    yield Host(unique_host("peruid"), base, images, f"{FIRST}-{FIRST + size - 1}")
    for pid in qemu_pids_under(base):  # never leave a guest behind
        os.kill(pid, 9)
    shutil.rmtree(base, ignore_errors=True)


def guest_xml(host: Host, guest: TestGuest, name: str, devices: str) -> tuple[str, str]:
    """(xml, uuid) of a guest booting the cached kernel, its serial in its own run dir."""
    kernel, initrd = host.images / "vmlinuz", host.images / "initrd"
    if not kernel.exists():
        shutil.copyfile(guest.kernel, kernel)
        shutil.copyfile(guest.initramfs, initrd)
    xml = kernel_xml(guest, name, Path("/SERIAL"))
    found = re.search(r"<uuid>([^<]+)</uuid>", xml)
    assert found is not None
    uuid = found.group(1)
    xml = (xml.replace("/SERIAL", str(host.run / uuid / "serial.log"))
           .replace(str(guest.kernel), str(kernel)).replace(str(guest.initramfs), str(initrd))
           .replace("</devices>", devices + "</devices>"))  # fmt: skip
    return xml, uuid


def readonly_disk(path: Path, dev: str) -> str:
    return (f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source "
            f"file='{path}'/><target dev='{dev}' bus='sata'/><readonly/></disk>")  # fmt: skip


def pid_of(uuid: str) -> int:
    for pid in qemu_pids_under(Path("/")):
        if f"\0-uuid\0{uuid}\0".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"no QEMU runs domain {uuid}")


def opens_as(uid: int, path: Path) -> subprocess.CompletedProcess[str]:
    """``cat path`` under ``uid`` (gid the same, no supplementary groups): QEMU's identity."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "cat", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def write(path: Path, mode: int) -> Path:
    path.write_bytes(bytes(1 << 20))
    path.chmod(mode)
    return path


async def define_start(host: Host, name: str, xml: str) -> None:
    (host.base / f"{name}.xml").write_text(xml)
    r = await cli("define", str(host.base / f"{name}.xml"), "--host", host.name)
    assert r.code == 0, r.err
    r = await cli("start", name, "--host", host.name)
    assert r.code == 0, r.err


async def test_two_guests_run_under_their_own_uids_and_cannot_open_each_others_disks(
    host: Host, guest: TestGuest
) -> None:
    # world-readable images: only the labels keep one guest's QEMU out of the other's
    disk_a, disk_b = write(host.images / "a.img", 0o644), write(host.images / "b.img", 0o644)
    iso = write(host.images / "shared.iso", 0o600)  # root's alone: each guest gets an ACL entry
    xml_a, uuid_a = guest_xml(host, guest, "pa", disk(disk_a, "vdb") + readonly_disk(iso, "sda"))
    xml_b, uuid_b = guest_xml(host, guest, "pb", disk(disk_b, "vdb") + readonly_disk(iso, "sda"))
    async with host.agent(keep_queue=True):
        await define_start(host, "pa", xml_a)
        await define_start(host, "pb", xml_b)
        for uuid in (uuid_a, uuid_b):  # booted: each console written under its own uid
            await wait_serial(host.run / uuid / "serial.log", READY_MARKER)
        pid_a, pid_b = pid_of(uuid_a), pid_of(uuid_b)
        (uid_a, *_), _ = status_ids(pid_a)
        (uid_b, *_), _ = status_ids(pid_b)
        assert uid_a != uid_b and {uid_a, uid_b} == {FIRST, FIRST + 1}
        for pid, uid in ((pid_a, uid_a), (pid_b, uid_b)):
            assert status_ids(pid) == ([uid] * 4, [uid] * 4)  # real, eff, saved, fs; gid = uid
        assert host.allocations() == {uuid_a: uid_a, uuid_b: uid_b}
        for path, uid in ((disk_a, uid_a), (disk_b, uid_b)):
            assert json.loads(os.getxattr(path, REMEMBER)) == {
                "uid": 0, "gid": 0, "mode": 0o644, "refs": 1, "holders": [[uid, uid]]}  # fmt: skip
            info = path.stat()
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, uid, 0o600)
        # the domain's run dir is its uid's and holds what its QEMU made; the agent's is root's
        for uuid, uid in ((uuid_a, uid_a), (uuid_b, uid_b)):
            own = host.run / uuid
            assert (own.stat().st_uid, stat.S_IMODE(own.stat().st_mode)) == (uid, 0o700)
            # the agent binds the QMP socket and QEMU inherits it listening (fd=, as
            # libvirt hands its monitor over): the agent's, in the uid's own 0700 dir
            assert (own / "qmp.sock").stat().st_uid == 0
            assert (own / "qemu.pid").read_text().strip() == str(pid_of(uuid))
        run = host.run.stat()
        assert (run.st_uid, run.st_gid, stat.S_IMODE(run.st_mode)) == (0, 0, 0o755)
        # QEMU's identity: A's uid cannot open B's disk (nor B's run dir), B's can
        denied = opens_as(uid_a, disk_b)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
        denied = opens_as(uid_a, host.run / uuid_b / "serial.log")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
        assert opens_as(uid_b, disk_b).returncode == 0
        # the read-only image both use: readable by both, by no other uid, still root's
        assert acl.user_perm(str(iso), uid_a) == 4 and acl.user_perm(str(iso), uid_b) == 4
        assert opens_as(uid_a, iso).returncode == 0 and opens_as(uid_b, iso).returncode == 0
        assert opens_as(FIRST + 50, iso).returncode != 0
        assert iso.stat().st_uid == 0
    # the agent stopped, both guests run on; a new agent reattaches them, same uids
    assert sorted(qemu_pids_under(host.base)) == sorted([pid_a, pid_b])
    async with host.agent():
        for name in ("pa", "pb"):
            r = await cli("--json", "dominfo", name, "--host", host.name)
            assert r.code == 0 and r.json()["state"] == "running", r.err
        # B stopped gives its files back (and its ACL entry), A keeps its own
        assert (await cli("destroy", "pb", "--host", host.name)).code == 0
        info = disk_b.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o644)
        assert acl.user_perm(str(iso), uid_b) is None and acl.user_perm(str(iso), uid_a) == 4
        assert opens_as(uid_a, iso).returncode == 0
        # B started again by the restarted agent has its uid again (A holds the other)
        assert (await cli("start", "pb", "--host", host.name)).code == 0
        assert status_ids(pid_of(uuid_b))[0] == [uid_b] * 4
        assert host.allocations() == {uuid_a: uid_a, uuid_b: uid_b}
        for name in ("pa", "pb"):
            assert (await cli("destroy", name, "--host", host.name)).code == 0
        for path in (disk_a, disk_b):
            info = path.stat()
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o644)
            assert REMEMBER not in os.listxattr(path)  # the last holder gone: forgotten
        info = iso.stat()  # the ACL gone with its last entry, the mode as it was
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
        assert acl.XATTR not in os.listxattr(iso)
        assert host.allocations() == {uuid_a: uid_a, uuid_b: uid_b}  # defined: kept


async def test_a_hot_plugged_disk_is_its_uids_from_attach_to_detach(
    host: Host, guest: TestGuest
) -> None:
    """A disk attached live is labelled as a launch labels one (libvirt relabels a
    hot-plugged image): a private disk chowned to the domain's uid and closed to the
    others (0600), a read-only one given by an ACL entry; the detach gives both back, and
    a hot-plug QEMU refuses gives back what it had been given."""
    data = write(host.images / "hp.img", 0o644)
    iso = write(host.images / "hp.iso", 0o600)
    bad = write(host.images / "bad.img", 0o644)  # raw bytes, declared qcow2 below
    more = "".join(f"<controller type='pci' index='{i}' model='pcie-root-port'/>"
                   for i in (5, 6))  # fmt: skip
    xml, uuid = guest_xml(host, guest, "ph", PORTS + more)
    ro = disk(iso, "vdc").replace("</disk>", "<readonly/></disk>")
    plugs = {"data": disk(data, "vdb"), "iso": ro,
             "bad": disk(bad, "vdd").replace("type='raw'", "type='qcow2'")}  # fmt: skip
    for name, device in plugs.items():
        (host.base / f"{name}.xml").write_text(device)
    serial = host.run / uuid / "serial.log"

    async def plug(verb: str, name: str) -> tuple[int, str]:
        r = await cli(verb, "ph", str(host.base / f"{name}.xml"), "--live", "--host", host.name)
        return r.code, r.err

    async with host.agent():
        await define_start(host, "ph", xml)
        await wait_blocks(serial, "")  # booted, no disk yet
        (uid, *_), _ = status_ids(pid_of(uuid))
        assert await plug("attach-device", "data") == (0, "")
        assert await plug("attach-device", "iso") == (0, "")
        await wait_blocks(serial, "vda vdb")
        info = data.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, uid, 0o600)
        assert acl.user_perm(str(iso), uid) == 4 and iso.stat().st_uid == 0
        assert opens_as(FIRST + 1, data).returncode != 0  # another guest's uid: shut out
        code, err = await plug("attach-device", "bad")
        assert code != 0 and "OPERATION_FAILED" in err, err
        info = bad.stat()  # QEMU refused it: given back at once
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o644)
        assert REMEMBER not in os.listxattr(bad)
        assert await plug("detach-device", "data") == (0, "")
        assert await plug("detach-device", "iso") == (0, "")
        await wait_blocks(serial, "")
        info = data.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o644)
        assert REMEMBER not in os.listxattr(data)
        assert acl.user_perm(str(iso), uid) is None
        assert (await cli("destroy", "ph", "--host", host.name)).code == 0


@pytest.mark.parametrize("host", [1], indirect=True)  # a range of one uid
async def test_uids_are_freed_at_undefine_and_an_exhausted_range_refuses_a_start(
    host: Host, guest: TestGuest
) -> None:
    xml_a, uuid_a = guest_xml(host, guest, "xa", "")
    xml_b, uuid_b = guest_xml(host, guest, "xb", "")
    async with host.agent():
        await define_start(host, "xa", xml_a)
        assert status_ids(pid_of(uuid_a))[0] == [FIRST] * 4
        (host.base / "xb.xml").write_text(xml_b)
        assert (await cli("define", str(host.base / "xb.xml"), "--host", host.name)).code == 0
        r = await cli("start", "xb", "--host", host.name)
        assert r.code != 0 and "OPERATION_FAILED" in r.err, r.err
        assert f"qemu_uid_range={FIRST}-{FIRST}" in r.err and "no free uid" in r.err, r.err
        assert [pid_of(uuid_a)] == qemu_pids_under(host.base)  # nothing started for it
        r = await cli("--json", "dominfo", "xb", "--host", host.name)  # the agent serves on
        assert r.code == 0 and r.json()["state"] == "shutoff", r.err
        # A stopped still holds its uid (it is defined); undefined, it frees it for B
        assert (await cli("destroy", "xa", "--host", host.name)).code == 0
        r = await cli("start", "xb", "--host", host.name)
        assert r.code != 0 and "no free uid" in r.err, r.err
        assert (await cli("undefine", "xa", "--host", host.name)).code == 0
        assert host.allocations() == {}
        r = await cli("start", "xb", "--host", host.name)
        assert r.code == 0, r.err
        assert status_ids(pid_of(uuid_b))[0] == [FIRST] * 4
        assert host.allocations() == {uuid_b: FIRST}
        assert (await cli("destroy", "xb", "--host", host.name)).code == 0
