"""Issue 13 item 5, cgroup device rules for block devices (``cgroup_devices=on``,
drivers/qemu/cgroup.py) through a real agent, the real broker, the CLI and real QEMU, on
loop devices: the guest's QEMU runs in a devices cgroup of its own whose devices.list is
exactly libvirt's default ACL, ptys and the loop device it was given (which the guest
reads); QEMU itself cannot open a loop device it was not given (QMP blockdev-add: EPERM)
until it is hot-plugged through the agent, and the detach takes the rule off again; the
group outlives an agent restart and goes when the guest stops; a group the kernel refuses
to build fails the start with OPERATION_FAILED and leaves no group and no QEMU."""

from __future__ import annotations

import hashlib
import os
import pwd
import select
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from drivers.qemu.cgroup import PARENT, agent_key, find_hierarchy
from drivers.qemu.dac import REMEMBER
from tests.e2e.conftest import PORTS, qemu_pids_under, qmp
from tests.e2e.test_qemu_dac import USER, status_ids
from tests.e2e.test_qemu_driver import kernel_xml, wait_serial
from tests.guests import READY_MARKER, TestGuest, build_test_guest
from tests.procs import AgentProc, agent_process, cli, qemu_allowed_dirs, unique_host
from tests.storage.test_qemu_volumes import wait_blocks

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
MIB = 1 << 20
#: libvirt's cgroup_device_acl, spelled out here (not imported: the test checks the list)
ACL = ("/dev/null", "/dev/full", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/ptmx",
       "/dev/kvm", "/dev/userfaultfd")  # fmt: skip


def hierarchy() -> Path:
    root = find_hierarchy()
    if root is None:
        pytest.fail("this host has no cgroup v1 devices hierarchy (drivers/qemu/cgroup.py)")
    return root


@dataclass
class Host:
    name: str
    base: Path  # the agent's state dir
    images: Path  # the loop devices' backing files, serial logs
    loops: list[str]  # /dev/loopN, each on a file of images

    def agent(
        self, *extra: str, keep_queue: bool = False
    ) -> AbstractAsyncContextManager[AgentProc]:
        dirs = qemu_allowed_dirs(self.images, *map(Path, self.loops))
        return agent_process(self.name, self.base, "--driver-option", "cgroup_devices=on",
                             *extra, driver="qemu", allowed_dirs=dirs,
                             keep_queue=keep_queue)  # fmt: skip

    @property
    def run(self) -> Path:
        return self.base / "run"

    def groups(self) -> list[Path]:
        """This agent's domain groups that exist now."""
        parent = hierarchy() / PARENT
        return sorted(parent.glob(f"{agent_key(self.run)}-*")) if parent.exists() else []


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


@pytest.fixture
def host() -> Iterator[Host]:
    hierarchy()
    base = Path(tempfile.mkdtemp(prefix="virtbus-cgdev-"))
    base.chmod(0o755)  # searchable by the QEMU user (the second test)
    images = base / "images"
    images.mkdir(mode=0o755)
    pattern = bytes(range(256)) * (8 * MIB // 256)  # what the guest reads back
    loops: list[str] = []
    nodes: dict[str, os.stat_result] = {}
    h = Host(unique_host("cgdev"), base, images, loops)
    try:
        for i in range(2):
            backing = images / f"disk{i}.img"
            backing.write_bytes(pattern if i == 0 else bytes(8 * MIB))
            loops.append(subprocess.run(["losetup", "--find", "--show", str(backing)],
                                        check=True, capture_output=True,
                                        text=True).stdout.strip())  # fmt: skip
        nodes.update((loop, os.stat(loop)) for loop in loops)  # QEMU user's only for a run
        yield h
    finally:
        for pid in qemu_pids_under(base):  # never leave a guest behind
            with suppress(ProcessLookupError):
                exited = os.pidfd_open(pid)
                os.kill(pid, 9)
                select.select([exited], [], [], 10)  # gone: its group can be removed
                os.close(exited)
        for group in h.groups():  # nor a group (asserted gone by the tests)
            with suppress(OSError):
                group.rmdir()
        with suppress(OSError):  # the parent too when nobody else has one
            (hierarchy() / PARENT).rmdir()
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)
            was = nodes.get(loop)
            if was is not None:  # a guest killed above never gave its node back
                os.chown(loop, was.st_uid, was.st_gid)
                os.chmod(loop, stat.S_IMODE(was.st_mode))
                with suppress(OSError):
                    os.removexattr(loop, REMEMBER)
        shutil.rmtree(base, ignore_errors=True)


def devno(path: str) -> str:
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def expected(*blocks: str) -> set[str]:
    """devices.list of a group with the default ACL and ``blocks`` (read-write)."""
    want = {"c 136:* rw"} | {f"c {devno(p)} rw" for p in ACL if os.path.exists(p)}
    return want | {f"b {devno(b)} rwm" for b in blocks}


def listed(group: Path) -> set[str]:
    return set((group / "devices.list").read_text().split("\n")) - {""}


def block_disk(dev: str, target: str) -> str:
    return (f"<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
            f"<source dev='{dev}'/><target dev='{target}' bus='virtio'/></disk>")  # fmt: skip


def devices_group(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "devices" in controllers.split(","):
            return path
    raise AssertionError(f"pid {pid} is in no devices cgroup")


async def test_qemu_opens_only_the_block_devices_it_is_given(host: Host, guest: TestGuest) -> None:
    given, other = host.loops
    serial = host.images / "cg.log"
    xml = kernel_xml(guest, "cg", serial, cmds="disk-md5+1@1").replace(
        "<devices>", "<devices>" + PORTS + block_disk(given, "vda"))  # fmt: skip
    uuid = xml.split("<uuid>")[1].split("</uuid>")[0]
    (host.base / "cg.xml").write_text(xml)
    (host.base / "vdb.xml").write_text(block_disk(other, "vdb"))
    probe = {"driver": "host_device", "node-name": "probe", "read-only": True, "locking": "off"}
    async with host.agent(keep_queue=True):
        r = await cli("define", str(host.base / "cg.xml"), "--host", host.name)
        assert r.code == 0, r.err
        r = await cli("start", "cg", "--host", host.name)
        assert r.code == 0, r.err
        (pid,) = qemu_pids_under(host.base)
        (group,) = host.groups()
        assert group.name.endswith(uuid)
        assert devices_group(pid) == f"/{PARENT}/{group.name}"
        assert (group / "cgroup.procs").read_text().split() == [str(pid)]
        assert listed(group) == expected(given)
        # the guest reads the loop device through QEMU: the pattern written to its file
        await wait_serial(serial, READY_MARKER)
        md5 = hashlib.md5(bytes(range(256)) * (MIB // 256)).hexdigest()
        await wait_serial(serial, f"VIRTBUS-DISK-MD5 1 {md5}")
    # the agent stopped, the guest runs on: QEMU's own monitor, as a hostile QEMU would
    # open a device node by itself (root: only the cgroup stops it)
    assert qemu_pids_under(host.base) == [pid]
    denied, allowed, _ = await qmp(
        host.run / f"{uuid}.qmp",
        ("blockdev-add", {**probe, "filename": other}),
        ("blockdev-add", {**probe, "filename": given}),
        ("blockdev-del", {"node-name": "probe"}),
    )
    assert isinstance(denied, ExecuteError) and "Operation not permitted" in str(denied), denied
    assert not isinstance(allowed, ExecuteError), allowed
    async with host.agent():  # reattached: the same group, the same rules
        r = await cli("--json", "dominfo", "cg", "--host", host.name)
        assert r.code == 0 and r.json()["state"] == "running", r.err
        assert host.groups() == [group] and devices_group(pid) == f"/{PARENT}/{group.name}"
        assert listed(group) == expected(given)
        # hot-plugged through the agent: allowed before QEMU opens it, the guest sees it
        r = await cli("attach-device", "cg", str(host.base / "vdb.xml"), "--live",
                      "--host", host.name)  # fmt: skip
        assert r.code == 0, r.err
        assert listed(group) == expected(given, other)
        await wait_blocks(serial, "vda vdb")
        r = await cli("--json", "domblkinfo", "cg", "vdb", "--host", host.name)
        assert r.code == 0 and r.json()["capacity"] == 8 * MIB, (r.out, r.err)
        # unplugged: the rule goes with it, the given disk's stays
        r = await cli("detach-device", "cg", str(host.base / "vdb.xml"), "--live",
                      "--host", host.name)  # fmt: skip
        assert r.code == 0, r.err
        await wait_blocks(serial, "vda")
        assert listed(group) == expected(given)
        # stopped: the group goes
        assert (await cli("destroy", "cg", "--host", host.name)).code == 0
        assert host.groups() == [] and not group.exists()
        assert qemu_pids_under(host.base) == []


async def test_a_group_the_kernel_refuses_fails_the_start_and_leaves_nothing(
    host: Host, guest: TestGuest
) -> None:
    refused = host.loops[1]
    parent = hierarchy() / PARENT
    kernel, initrd = host.images / "vmlinuz", host.images / "initrd"  # readable by the user
    shutil.copyfile(guest.kernel, kernel)
    shutil.copyfile(guest.initramfs, initrd)
    xml = (kernel_xml(guest, "ref", host.images / "ref.log")
           .replace(str(guest.kernel), str(kernel)).replace(str(guest.initramfs), str(initrd))
           .replace("<devices>", "<devices>" + block_disk(refused, "vda")))  # fmt: skip
    (host.base / "ref.xml").write_text(xml)
    async with host.agent("--driver-option", f"qemu_user={USER}"):
        assert (await cli("define", str(host.base / "ref.xml"), "--host", host.name)).code == 0
        parent.mkdir(exist_ok=True)
        rule = f"b {devno(refused)} rwm"
        (parent / "devices.deny").write_text(rule)  # no group under it may allow the device
        try:
            r = await cli("start", "ref", "--host", host.name)
        finally:
            (parent / "devices.allow").write_text(rule)
        assert r.code != 0 and "OPERATION_FAILED" in r.err, r.err
        assert f"'{rule}'" in r.err and "Operation not permitted" in r.err, r.err
        assert host.groups() == [] and qemu_pids_under(host.base) == []
        assert os.stat(refused).st_uid == 0  # the user's only for a run
        r = await cli("--json", "dominfo", "ref", "--host", host.name)
        assert r.code == 0 and r.json()["state"] == "shutoff", r.err
        # the agent serves on: with the device allowed again the same domain starts, its
        # QEMU in its group and under the QEMU user (joined as root, then dropped to it)
        r = await cli("start", "ref", "--host", host.name)
        assert r.code == 0, r.err
        (pid,) = qemu_pids_under(host.base)
        (group,) = host.groups()
        assert devices_group(pid) == f"/{PARENT}/{group.name}"
        assert listed(group) == expected(refused)
        user = pwd.getpwnam(USER)
        uids, gids = status_ids(pid)
        assert uids == [user.pw_uid] * 4 and gids == [user.pw_gid] * 4
        assert (await cli("destroy", "ref", "--host", host.name)).code == 0
        assert host.groups() == []
