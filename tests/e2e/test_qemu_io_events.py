"""QEMU events from a real QEMU through a real agent, as a bus subscriber sees them (not
from the mapping tables of tests/unit).

- ``io_error`` and ``suspended(ioerror)``: the guest's disk is served by qemu-nbd over a
  blkdebug node that fails every read with EIO; with ``rerror_policy='stop'`` the
  guest's first read of it (the kernel probing the disk) stops the VM. ``resume`` retries
  the read, which fails again: a second pair of events, and the guest is paused again.

``balloon_change``, ``rtc_change`` and ``watchdog`` are in test_qemu_guest_events.py;
``device_removed`` from a real hot-unplug is tested on the driver in
tests/storage/test_qemu_volumes.py (the guest lets go of a virtio disk).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_agent_crash import destroy_all, host_events, run_cli
from tests.guests import TestGuest, build_test_guest
from tests.procs import agent_process, cli, unique_host

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


@pytest.fixture
def base(e2e_root: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="ev", dir=e2e_root))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def failing_disk(base: Path) -> Iterator[int]:
    """qemu-nbd exporting 'bad', whose every read fails with EIO (blkdebug): its port."""
    image = base / "bad.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "16M"], check=True)
    node = (
        "driver=raw,file.driver=blkdebug,file.inject-error.0.event=read_aio,"
        f"file.inject-error.0.errno=5,file.image.driver=file,file.image.filename={image}"
    )
    port = _free_port()
    proc = subprocess.Popen(
        ["qemu-nbd", "--persistent", "--export-name=bad", "--bind=127.0.0.1", f"--port={port}",
         "--image-opts", node],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(600):  # listening within 30 s
            with socket.socket() as s, contextlib.suppress(OSError):
                s.connect(("127.0.0.1", port))
                break
            assert proc.poll() is None, "qemu-nbd exited"
            subprocess.run(["sleep", "0.05"], check=True)
        else:
            raise AssertionError("qemu-nbd did not listen")
        yield port
    finally:
        proc.terminate()  # only the process this fixture started
        proc.wait(timeout=10)


def failing_disk_xml(guest: TestGuest, name: str, serial: Path, port: int) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest.kernel}</kernel><initrd>{guest.initramfs}</initrd>
    <cmdline>{guest.cmdline}</cmdline></os>
  <features><acpi/></features>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' error_policy='stop' rerror_policy='stop'/>
      <source protocol='nbd' name='bad'><host name='127.0.0.1' port='{port}'/></source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
  </devices>
</domain>"""


async def test_a_failing_disk_gives_io_error_and_pauses_the_guest(
    base: Path, guest: TestGuest, failing_disk: int
) -> None:
    host = unique_host("qe")
    xml = base / "e-io.xml"
    xml.write_text(failing_disk_xml(guest, "e-io", base / "e-io.serial", failing_disk))
    async with host_events(host) as events:
        try:
            async with agent_process(host, base, driver="qemu"):
                await run_cli("define", str(xml), "--host", host)
                await run_cli("start", "e-io", "--host", host)
                await events.wait("e-io", "io_error")
                await events.wait("e-io", "suspended", "ioerror")
                [err] = [e for e in events.seen if e["event"] == "io_error"][:1]
                assert err["data"]["action"] == "pause", err
                assert err["data"]["device"], err  # names the disk that failed
                state = (await cli("--json", "domstate", "e-io", "--host", host)).json()
                assert (state["state"], state["reason"]) == ("paused", "ioerror"), state
                # resume retries the failed read: it fails again, the guest pauses again
                await run_cli("resume", "e-io", "--host", host)
                await events.wait_count("e-io", "suspended", "ioerror", 2)
                assert [e for e, _ in events.of("e-io")].count("io_error") >= 2
                await run_cli("destroy", "e-io", "--host", host)
        finally:
            await destroy_all(host, base)
