"""The test guest boots under plain QEMU (TCG) and obeys its command protocol.

These tests pin down what the other e2e tests rely on: the READY and TICK markers, ACPI
power-off through the power button, and the panic / reboot / poweroff / disk commands on
the second serial port, the virtio-serial port and the kernel command line. They print
build, cached-build and boot-to-READY timings (run with `-s` to see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, QMPClient

from tests.guests import READY_MARKER, TICK_MARKER, qemu_argv
from tests.guests.build import TestGuest, build_test_guest, expected_disk_md5

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@dataclass(frozen=True)
class BootTimeouts:
    """Generous bounds: TCG boots this guest in about 3 s here, CI machines are slower."""

    qmp_accept_s: float = 30.0
    ready_s: float = 60.0
    line_s: float = 20.0
    event_s: float = 30.0
    exit_s: float = 30.0


TIMEOUTS = BootTimeouts()


class LineChannel:
    """A UNIX socket QEMU connects to (chardev client): collects lines, sends commands."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        while line := await reader.readline():
            async with self._changed:
                self.lines.append(line.decode(errors="replace").strip("\r\n"))
                self._changed.notify_all()

    async def wait_for(
        self, predicate: Callable[[str], bool], timeout: float, start: int = 0
    ) -> tuple[int, str]:
        """(index, line) of the first line from `start` on that satisfies `predicate`."""

        async def scan() -> tuple[int, str]:
            async with self._changed:
                while True:
                    for i in range(start, len(self.lines)):
                        if predicate(self.lines[i]):
                            return i, self.lines[i]
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(scan(), timeout)
        except TimeoutError:
            tail = "\n".join(self.lines[-20:])
            raise AssertionError(f"no matching line on {self.path.name}; last:\n{tail}") from None

    async def send(self, line: str) -> None:
        if self._writer is None:
            raise AssertionError(f"QEMU is not connected to {self.path.name}")
        self._writer.write(line.encode() + b"\n")
        await self._writer.drain()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class RunningGuest:
    """One QEMU process running the test guest, with console, control channels and QMP."""

    def __init__(self, guest: TestGuest, workdir: Path) -> None:
        self.guest, self.workdir = guest, workdir
        self.console = LineChannel(workdir / "console.sock")
        self.control = LineChannel(workdir / "control.sock")  # ttyS1
        self.port = LineChannel(workdir / "port.sock")  # virtio-serial port
        self.qmp = QMPClient("test-guest")
        self.events = EventListener()
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = b""
        self._stderr_task: asyncio.Task[None] | None = None
        self.started_at = 0.0

    async def start(
        self, *, extra_cmdline: str = "", pvpanic: bool = True, extra_args: Sequence[str] = ()
    ) -> None:
        for channel in (self.console, self.control, self.port):
            await channel.start()
        self.qmp.register_listener(self.events)
        await self.qmp.start_server(str(self.workdir / "qmp.sock"))
        disk = self.guest.clone_disk(self.workdir / "disk.raw")
        argv = qemu_argv(
            self.guest,
            console=self.console.path,
            qmp=self.workdir / "qmp.sock",
            control=self.control.path,
            port=self.port.path,
            disk=disk,
            pvpanic=pvpanic,
            extra_cmdline=extra_cmdline,
            extra_args=extra_args,
        )
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        self._stderr_task = asyncio.create_task(self._drain_stderr(), name="qemu-stderr")
        await asyncio.wait_for(self.qmp.accept(), TIMEOUTS.qmp_accept_s)

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(4096):
            self.stderr += chunk

    async def wait_ready(self, start: int = 0) -> int:
        index, _ = await self.console.wait_for(
            lambda line: line == READY_MARKER, TIMEOUTS.ready_s, start
        )
        return index

    async def wait_tick(self, n: int, start: int = 0) -> int:
        index, _ = await self.console.wait_for(
            lambda line: line == f"{TICK_MARKER} {n}", TIMEOUTS.line_s, start
        )
        return index

    async def wait_event(self, name: str) -> dict[str, Any]:
        async def get() -> dict[str, Any]:
            while True:
                event = await self.events.get()
                if event["event"] == name:
                    data = event.get("data", {})
                    assert isinstance(data, dict)
                    return data

        try:
            return await asyncio.wait_for(get(), TIMEOUTS.event_s)
        except TimeoutError:
            raise AssertionError(f"no {name} event; console: {self.console.lines[-10:]}") from None

    async def wait_exit(self) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), TIMEOUTS.exit_s)

    async def stop(self) -> None:
        """Kill QEMU by PID if it still runs; close every socket."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._stderr_task is not None:
            await self._stderr_task
        with contextlib.suppress(Exception):  # QEMU is gone: qemu.qmp may raise EOFError
            await self.qmp.disconnect()
        for channel in (self.console, self.control, self.port):
            await channel.close()


@pytest.fixture(scope="session")
def test_guest() -> TestGuest:
    """Build (first run, a few seconds) or find the cached guest."""
    started = time.monotonic()
    guest = build_test_guest(progress=lambda msg: print(f"[guest] {msg}"))
    print(f"[guest] build_test_guest took {time.monotonic() - started:.2f}s")
    return guest


@contextlib.asynccontextmanager
async def running(guest: TestGuest, **start: Any) -> AsyncIterator[RunningGuest]:
    workdir = Path(tempfile.mkdtemp(prefix="vbguest-"))  # short: UNIX socket paths are bounded
    vm = RunningGuest(guest, workdir)
    try:
        await vm.start(**start)
        yield vm
    finally:
        await vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_cached_build_is_reused(test_guest: TestGuest) -> None:
    """A second build finds the cache: nothing is rebuilt (the files are the same ones,
    untouched), whatever the machine's load does to the time it takes (printed)."""
    files = (test_guest.kernel, test_guest.initramfs, test_guest.disk)
    before = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    started = time.monotonic()
    again = build_test_guest(test_guest.directory.parent)
    elapsed = time.monotonic() - started
    print(f"[guest] cached build_test_guest took {elapsed * 1000:.0f} ms")
    assert again == test_guest
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == before, "rebuilt"
    assert test_guest.kernel.is_file() and test_guest.initramfs.is_file()
    assert test_guest.disk.stat().st_size == 16 * 1024 * 1024


async def test_boots_ticks_and_powers_off_on_acpi_button(test_guest: TestGuest) -> None:
    async with running(test_guest) as vm:
        ready = await vm.wait_ready()
        print(f"[guest] boot to READY under TCG: {time.monotonic() - vm.started_at:.2f}s")
        first = await vm.wait_tick(0, ready)
        await vm.wait_tick(2, first)
        await vm.qmp.execute("system_powerdown")
        await vm.wait_event("POWERDOWN")
        shutdown = await vm.wait_event("SHUTDOWN")
        assert shutdown["guest"] is True, shutdown
        assert shutdown["reason"] == "guest-shutdown", shutdown
        assert await vm.wait_exit() == 0, vm.stderr.decode()


async def test_panic_command_raises_guest_panicked(test_guest: TestGuest) -> None:
    async with running(test_guest) as vm:
        await vm.wait_tick(0, await vm.wait_ready())
        await vm.control.send("panic")  # over ttyS1
        await vm.control.wait_for(lambda line: line == "VIRTBUS-ACK panic", TIMEOUTS.line_s)
        panicked = await vm.wait_event("GUEST_PANICKED")
        # QEMU 7.2's default `-action panic=shutdown` reports "poweroff", then shuts down.
        assert panicked["action"] == "poweroff", panicked
        shutdown = await vm.wait_event("SHUTDOWN")
        assert shutdown["reason"] == "guest-panic", shutdown
        assert await vm.wait_exit() == 0


async def test_panic_with_action_pause_stays_paused(test_guest: TestGuest) -> None:
    async with running(test_guest, extra_args=["-action", "panic=pause"]) as vm:
        await vm.wait_tick(0, await vm.wait_ready())
        await vm.port.send("panic")
        panicked = await vm.wait_event("GUEST_PANICKED")
        assert panicked["action"] == "pause", panicked
        status = await vm.qmp.execute("query-status")
        assert isinstance(status, dict) and status["status"] == "guest-panicked", status
        assert vm.proc is not None and vm.proc.returncode is None


async def test_reboot_command_resets_and_boots_again(test_guest: TestGuest) -> None:
    async with running(test_guest) as vm:
        ready = await vm.wait_ready()
        await vm.wait_tick(1, ready)
        await vm.port.send("reboot")  # over the virtio-serial port
        await vm.port.wait_for(lambda line: line == "VIRTBUS-ACK reboot", TIMEOUTS.line_s)
        reset = await vm.wait_event("RESET")
        assert reset["guest"] is True and reset["reason"] == "guest-reset", reset
        again = await vm.wait_ready(ready + 1)
        await vm.wait_tick(1, again)


async def test_commands_ping_and_disk_io(test_guest: TestGuest) -> None:
    async with running(test_guest) as vm:
        await vm.wait_tick(0, await vm.wait_ready())
        await vm.control.send("ping serial")
        await vm.control.wait_for(lambda line: line == "VIRTBUS-PONG serial", TIMEOUTS.line_s)
        await vm.port.send("ping port")
        await vm.port.wait_for(lambda line: line == "VIRTBUS-PONG port", TIMEOUTS.line_s)
        await vm.port.send("disk-md5 9")
        _, line = await vm.port.wait_for(
            lambda line: line.startswith("VIRTBUS-DISK-MD5"), TIMEOUTS.line_s
        )
        assert line == f"VIRTBUS-DISK-MD5 9 {expected_disk_md5(9)}"
        await vm.port.send("write 2")
        await vm.port.wait_for(lambda line: line == "VIRTBUS-DONE write 2", TIMEOUTS.line_s)
        await vm.port.send("read 4")
        await vm.port.wait_for(lambda line: line == "VIRTBUS-DONE read 4", TIMEOUTS.line_s)
        stats = await vm.qmp.execute("query-blockstats")
        assert isinstance(stats, list)
        disk = next(s["stats"] for s in stats if s.get("qdev", "").find("virtio") >= 0)
        assert disk["wr_bytes"] >= 2 * 1024 * 1024, disk
        assert disk["rd_bytes"] >= 4 * 1024 * 1024, disk
        await vm.port.send("bogus")
        await vm.port.wait_for(lambda line: line == "VIRTBUS-ERROR unknown bogus", TIMEOUTS.line_s)


async def test_cmdline_commands_burn_then_poweroff(test_guest: TestGuest) -> None:
    async with running(test_guest, extra_cmdline="virtbus.cmd=burn@1,poweroff@4") as vm:
        ready = await vm.wait_ready()
        burn, _ = await vm.console.wait_for(
            lambda line: line == "VIRTBUS-DONE burn 1", TIMEOUTS.line_s, ready
        )
        await vm.wait_tick(3, burn)  # ticks keep counting while a CPU burner runs
        shutdown = await vm.wait_event("SHUTDOWN")
        assert shutdown["guest"] is True and shutdown["reason"] == "guest-shutdown", shutdown
        assert await vm.wait_exit() == 0
        ticks = [int(m.group(1)) for line in vm.console.lines
                 if (m := re.fullmatch(rf"{TICK_MARKER} (\d+)", line))]  # fmt: skip
        assert ticks == list(range(len(ticks))), ticks


async def test_power_button_is_armed_when_ready(test_guest: TestGuest) -> None:
    async with running(test_guest, pvpanic=False) as vm:
        await vm.wait_ready()
        await vm.qmp.execute("system_powerdown")  # no grace period after READY
        await vm.console.wait_for(lambda line: line == "VIRTBUS-POWER-BUTTON", TIMEOUTS.line_s)
        shutdown = await vm.wait_event("SHUTDOWN")
        assert shutdown["guest"] is True, shutdown
        assert await vm.wait_exit() == 0
