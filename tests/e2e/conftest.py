"""e2e fixtures: one session directory for every QEMU and container the tests start, and
guards that none started under it outlives the session (leftovers are stopped or killed
by PID, then reported)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.e2e.lxc_support import (
    LxcHost,
    agent_options,
    clean_up_containers,
    destroy_all,
    host_events,
    lxc_agent,
)
from tests.guests.lxc import LxcRootfs, build_lxc_rootfs
from tests.procs import unique_host

_LEFTOVER_KILL_WAIT = 5.0  # s, per leftover QEMU after SIGKILL


async def enter_together(
    *entries: tuple[AsyncExitStack, AbstractAsyncContextManager[Any]],
) -> list[Any]:
    """Enter each context (an agent, the scheduler: processes that start on their own)
    at once rather than one after another, each into its stack in the order given (so
    they are left in the reverse order, as nested ``async with`` would); what each
    yielded. Should one fail, the others are cancelled and those already entered are
    left by their stacks."""
    results: list[Any] = [None] * len(entries)
    entered = [False] * len(entries)

    async def enter(i: int) -> None:
        results[i] = await entries[i][1].__aenter__()
        entered[i] = True

    try:
        async with asyncio.TaskGroup() as tg:
            for i in range(len(entries)):
                tg.create_task(enter(i))
    finally:
        for (stack, cm), done in zip(entries, entered, strict=True):
            if done:
                stack.push_async_exit(cm)
    return results


PORTS = "<controller type='pci' index='0' model='pcie-root'/>" + "".join(
    f"<controller type='pci' index='{i}' model='pcie-root-port'/>" for i in range(1, 5)
)  # spare root ports: a disk is hot-plugged into one


async def qmp(socket: Path, *commands: tuple[str, dict[str, object]]) -> list[object]:
    """Each command's answer, or the ExecuteError it raised, over QEMU's own monitor
    (the agent stopped: it holds the monitor otherwise)."""
    client = QMPClient("e2e-test")
    await client.connect(str(socket))
    out: list[object] = []
    try:
        for cmd, args in commands:
            try:
                out.append(await client.execute(cmd, args))
            except ExecuteError as exc:
                out.append(exc)
    finally:
        await client.disconnect()
    return out


def qemu_pids_under(root: Path) -> list[int]:
    """PIDs of processes whose command line mentions ``root`` (our run dirs)."""
    needle = str(root).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        program = os.path.basename(cmdline.split(b"\0", 1)[0])  # not its directory's name
        if needle in cmdline and program.startswith(b"qemu"):
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="session")
def e2e_root() -> Iterator[Path]:
    """The session's directory; every run/state dir of a QEMU-starting test lives below it."""
    root = Path(tempfile.mkdtemp(prefix="virtbus-e2e-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def no_qemu_left_behind(e2e_root: Path) -> Iterator[None]:
    """Fail the session if a QEMU started by the tests is still running at its end."""
    yield
    leftovers = qemu_pids_under(e2e_root)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + _LEFTOVER_KILL_WAIT
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):  # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.01)
    if leftovers:
        pytest.fail(f"QEMU processes left running by the tests (killed): {leftovers}")


# --- LXC: real containers (tests/e2e/lxc_support.py) --------------------------------------
@pytest.fixture(scope="session")
def lxc_rootfs() -> LxcRootfs:
    """The busybox root filesystem, built once into the cache; lxc must be installed."""
    missing = [t for t in ("lxc-start", "lxc-stop", "lxc-ls", "lxc-freeze") if not shutil.which(t)]
    if missing:
        pytest.fail(f"lxc is not installed ({', '.join(missing)} missing): run deploy/setup-dev")
    return build_lxc_rootfs()


@pytest.fixture(scope="session")
def lxc_root(e2e_root: Path) -> Iterator[Path]:
    """Where LXC tests keep their agents' state; no container may outlive the session."""
    root = e2e_root / "lxc"
    root.mkdir()
    yield root
    left = clean_up_containers(root)
    if left:
        pytest.fail(f"containers left running by the tests (stopped): {left}")


@pytest.fixture
async def lxc_host(lxc_root: Path, lxc_rootfs: LxcRootfs, rabbitmq: None) -> AsyncIterator[LxcHost]:
    """A real ``virtbus-agent --driver lxc`` on RabbitMQ, and its events."""
    host = unique_host("lxc")
    base = Path(tempfile.mkdtemp(prefix="h", dir=lxc_root))
    async with host_events(host) as events:
        options = agent_options(lxc_rootfs, base)
        async with lxc_agent(host, base, lxc_rootfs, events, options) as h:
            try:
                yield h
            finally:
                await destroy_all(h)
