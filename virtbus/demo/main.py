"""``virtbus demo``: two agents, a scheduler and a guest's whole life, in one command.

The CLI imports this module only when ``demo`` runs (it pulls in the agent, the drivers
and the scheduler). Everything lives in a fresh temp dir with short paths (QEMU's UNIX
sockets are limited to 107 bytes); on exit, error, Ctrl-C or SIGTERM the guests are
destroyed, the daemons stopped and the temp dir removed, so no QEMU is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from virtbus.bus.factory import open_bus
from virtbus.cli.context import Context
from virtbus.cli.output import fail
from virtbus.cli.term import ProgressLine, Style
from virtbus.client import Client
from virtbus.demo.cluster import DemoSettings, InProcessCluster, ProcessCluster, kill_qemus_under
from virtbus.demo.tour import NAME, run_tour
from virtbus.errors import VirtbusError
from virtbus.settings import BusSettings

QEMU_BINARY = "qemu-system-x86_64"
CALL_TIMEOUT = 60.0  # s: a TCG QEMU start or a migration step on a busy 2-core machine
GUEST_MEMORY_MIB = 256


def choose_driver(requested: str) -> tuple[str, str]:
    """(driver, why) — QEMU when asked for or when its binary is installed."""
    if requested == "test":
        return "test", "the in-memory test driver (--driver test)"
    if shutil.which(QEMU_BINARY):
        return "qemu", f"the QEMU driver ({QEMU_BINARY} found): a small Linux guest under TCG"
    if requested == "qemu":
        raise VirtbusError(f"--driver qemu: {QEMU_BINARY} is not installed")
    return "test", f"the in-memory test driver ({QEMU_BINARY} is not installed)"


def guest_xml(kernel: Path | None = None, initrd: Path | None = None, cmdline: str = "") -> str:
    """The demo guest: TCG (type='qemu'), 256 MiB; the test kernel when QEMU runs it."""
    boot = (
        f"<kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline>"
        if kernel
        else ""
    )
    return (
        f"<domain type='qemu'>\n  <name>{NAME}</name>\n"
        f"  <memory unit='MiB'>{GUEST_MEMORY_MIB}</memory>\n  <vcpu>1</vcpu>\n"
        f"  <os><type arch='x86_64' machine='q35'>hvm</type>{boot}</os>\n"
        "  <features><acpi/></features>\n</domain>\n"
    )


async def build_guest(line: ProgressLine) -> str:
    """The test guest's XML, building the guest first (a spinner shows each build step)."""
    from virtbus.guests.build import build_test_guest

    loop = asyncio.get_running_loop()
    step = ["looking for the test guest in the cache"]
    started = time.monotonic()

    def progress(message: str) -> None:  # called in the builder's thread
        loop.call_soon_threadsafe(step.__setitem__, 0, message)

    async def spin() -> None:
        for mark in itertools.cycle("|/-\\"):
            line.update(f"  {mark} test guest: {step[0]} ({time.monotonic() - started:.0f} s)")
            await asyncio.sleep(0.2)

    spinner = asyncio.create_task(spin(), name="demo:guest-spinner")
    try:
        guest = await asyncio.to_thread(build_test_guest, None, progress)
    finally:
        spinner.cancel()
        await asyncio.wait([spinner])
        line.interrupt()
    print(f"  test guest: {guest.kernel.parent} ({time.monotonic() - started:.1f} s)")
    return guest_xml(guest.kernel, guest.initramfs, guest.cmdline)


async def _demo(url: str, requested: str, root: Path) -> int:
    style, settings = Style(), DemoSettings()
    driver, why = choose_driver(requested)
    separate = not url.startswith("memory://")
    where = "separate processes on " + url.split("@")[-1] if separate else "this process"
    print(style(f"virtbus demo: {why}; agents and scheduler in {where}", "bold"))
    xml = guest_xml()
    if driver == "qemu":
        try:
            xml = await build_guest(ProgressLine())
        except Exception as exc:  # noqa: BLE001  # any build failure: the test driver still works
            driver = "test"
            print(style(f"  cannot build the test guest ({exc}): using the test driver", "yellow"))
    xml_file = root / f"{NAME}.xml"
    xml_file.write_text(xml)
    cluster: InProcessCluster | ProcessCluster = (
        ProcessCluster(url, root, driver, settings)
        if separate
        else InProcessCluster(url, root, driver, settings)
    )
    bus = open_bus(url, src=f"demo-{os.getpid()}", settings=BusSettings(call_timeout=CALL_TIMEOUT))
    await bus.connect()
    try:
        await cluster.start()
        ctx = Context(client=Client(bus, timeout=CALL_TIMEOUT), json=False, timeout=CALL_TIMEOUT)
        await run_tour(ctx, settings.hosts, xml_file)
    finally:
        print(style("cleaning up: guests destroyed, agents and scheduler stopped", "dim"))
        if isinstance(cluster, ProcessCluster):
            await cluster.destroy_guests(bus)
        await cluster.stop()
        await bus.close()
    return 0


async def _guarded(url: str, requested: str, root: Path) -> int:
    """SIGTERM cancels the demo like Ctrl-C does, so its clean-up runs either way."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await _demo(url, requested, root)


def main(args: argparse.Namespace) -> int:
    """Run the demo; the exit status (0 when the whole tour completed)."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    url = args.demo_bus or f"memory://demo-{os.getpid()}"
    root = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))  # short: socket paths <= 107 B
    try:
        return asyncio.run(_guarded(url, args.driver, root))
    except VirtbusError as exc:
        return fail(exc.code, exc.message)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nvirtbus demo: interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        kill_qemus_under(root)  # belt and braces: nothing of ours may outlive the demo
        shutil.rmtree(root, ignore_errors=True)
