"""Real storage for the storage tests: loop devices (plain, partitioned, with a file
system) and a tgtd iSCSI target on 127.0.0.1, each made by a fixture and removed after.

Loop devices are detached by name (never ``losetup -D``); tgtd runs on its own portal and
control port and is stopped by deleting its targets and then the daemon (SIGKILL by pid
as a last resort). Tools that are missing make the tests fail, never skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.jobs import Job, JobManager
from agent.storage import PoolEvent, StoragePools
from virtbus.settings import StorageSettings

TOOLS = (
    "qemu-img",
    "sfdisk",
    "partx",
    "losetup",
    "mkfs.ext4",
    "mkfs.xfs",
    "tgtd",
    "tgtadm",
    "iscsi-ls",
    "iscsi-readcapacity16",
    "scrub",
    "blkid",
    "wipefs",
    "virt-xml-validate",
)


def need_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    assert not missing, f"missing tools (run deploy/setup-dev): {', '.join(missing)}"


def sh(*argv: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr.decode(errors='replace')}"
    return done.stdout.decode()


@dataclass
class Loop:
    """A loop device over a sparse file; ``close`` unmounts what is on it and detaches it."""

    file: Path
    dev: str
    mounts: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, directory: Path, size_mib: int, *, partitions: bool = False) -> Loop:
        need_tools()
        file = directory / f"loop-{uuidlib.uuid4().hex[:8]}.img"
        with open(file, "wb") as fh:
            fh.truncate(size_mib << 20)
        argv = ["losetup", "-f", "--show"] + (["-P"] if partitions else []) + [str(file)]
        return cls(file, sh(*argv).strip())

    def mkfs(self, fs: str = "ext4") -> None:
        sh(f"mkfs.{fs}", *(["-q", "-F"] if fs.startswith("ext") else ["-q", "-f"]), self.dev)

    def close(self) -> None:
        text = Path("/proc/self/mountinfo").read_text()
        for line in text.splitlines():
            fields = line.split()
            src = line.split(" - ")[1].split()[1] if " - " in line else ""
            if src == self.dev or src.startswith(self.dev + "p"):
                subprocess.run(["umount", "-l", fields[4]], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", self.dev], check=False, capture_output=True)
        with contextlib.suppress(FileNotFoundError):
            self.file.unlink()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="virtbus-storage-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def loops(workdir: Path) -> Iterator[list[Loop]]:
    made: list[Loop] = []
    yield made
    for loop in made:
        loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    """A tgtd serving files as LUNs of one target."""

    proc: subprocess.Popen[bytes]
    control: int
    port: int
    iqn: str
    initiator: str = "iqn.2024-01.dev.virtbus:tests"

    def adm(self, *args: str) -> str:
        return sh("tgtadm", "-C", str(self.control), "--lld", "iscsi", *args)

    def stop(self) -> None:
        subprocess.run(
            [
                "tgtadm",
                "-C",
                str(self.control),
                "--lld",
                "iscsi",
                "--op",
                "delete",
                "--mode",
                "target",
                "--tid",
                "1",
                "--force",
            ],
            capture_output=True,
            check=False,
        )
        subprocess.run(
            ["tgtadm", "-C", str(self.control), "--op", "delete", "--mode", "system"],
            capture_output=True,
            check=False,
        )
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def iscsi_target(workdir: Path) -> Iterator[Target]:
    need_tools()
    port, control = free_port(), 1000 + uuidlib.uuid4().int % 30000  # tgtadm: -C < 32768
    proc = subprocess.Popen(
        ["tgtd", "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = Target(proc, control, port, f"iqn.2024-01.dev.virtbus:{uuidlib.uuid4().hex[:8]}")
    try:
        deadline = time.monotonic() + 10
        while True:  # the management socket appears a moment after the start
            done = subprocess.run(
                [
                    "tgtadm",
                    "-C",
                    str(control),
                    "--lld",
                    "iscsi",
                    "--op",
                    "show",
                    "--mode",
                    "target",
                ],
                capture_output=True,
                check=False,
            )
            if done.returncode == 0:
                break
            assert time.monotonic() < deadline, f"tgtd did not answer: {done.stderr!r}"
            time.sleep(0.05)
        target.adm("--op", "new", "--mode", "target", "--tid", "1", "-T", target.iqn)
        for lun in (1, 2):
            lun_file = workdir / f"lun{lun}.img"
            with open(lun_file, "wb") as fh:
                fh.truncate((16 * lun) << 20)
            with open(lun_file, "r+b") as fh:
                fh.write(b"LUN-%d-DATA" % lun)
            target.adm(
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                str(lun),
                "-b",
                str(lun_file),
            )
        target.adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        yield target
    finally:
        target.stop()


@dataclass
class Recorder:
    """Pool and job events, in order."""

    pool_events: list[PoolEvent] = field(default_factory=list)
    job_events: list[tuple[str, str, str]] = field(default_factory=list)  # (id, kind, event)

    def pools(self, name: str) -> list[str]:
        return [e.event for e in self.pool_events if e.pool == name]

    def jobs(self, job_id: str) -> list[str]:
        return [e for i, _k, e in self.job_events if i == job_id]

    def on_job(self, job: Job, event: str) -> None:
        self.job_events.append((job.id, job.kind, event))


@dataclass
class Storage:
    pools: StoragePools
    jobs: JobManager
    rec: Recorder
    state: Path
    root: Path


async def open_storage(
    state: Path, root: Path, rec: Recorder | None = None, **settings: object
) -> Storage:
    rec = rec or Recorder()
    jobs = JobManager(state / "jobs", rec.on_job)
    cfg = StorageSettings(roots=(root,), devices=("/dev/loop*",), **settings)  # type: ignore[arg-type]
    pools = StoragePools(state, cfg, jobs, rec.pool_events.append)
    await pools.open()
    await jobs.load()
    return Storage(pools, jobs, rec, state, root)


def dir_pool_xml(name: str, path: Path, ptype: str = "dir", source: str = "") -> str:
    return (
        f"<pool type='{ptype}'><name>{name}</name>{source}"
        f"<target><path>{path}</path></target></pool>"
    )
