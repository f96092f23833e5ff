"""Issue 18: what an agent's stop and crash promise, with real QEMU guests, a real agent
process, the real CLI and RabbitMQ.

- SIGTERM: the agent exits 0, finishes the command in hand, loses no event (published, or
  kept in its outbox and published by the next agent: the sequence numbers have no gap),
  leaves every guest running, and the next agent reattaches without a ``reconciled``
  event (nothing changed behind its back).
- kill -9 between a call's reply and its ack (the agent stops itself there, see
  ``VIRTBUS_FAULT_STOP_BEFORE_ACK`` in virtbus/faults.py): RabbitMQ redelivers the call and
  the next agent answers it from its reply log. The side effect is counted in the guest
  itself: a ``reset`` reboots the test guest, whose serial console prints its ready marker
  once per boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import qemu_pids_under
from tests.e2e.test_qemu_agent import Events
from tests.e2e.test_qemu_driver import firmware_xml, kernel_xml, wait_serial
from tests.e2e.test_qemu_durability import host_events
from tests.guests import READY_MARKER, TestGuest, build_test_guest
from tests.procs import agent_process, cli, unique_host

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
WAIT = 180.0  # a loaded 2-core machine boots the TCG guest slowly: a bound, not a figure


async def until(check: Any, what: str, timeout: float = WAIT) -> None:
    """Wait for a condition on another process (its /proc entry, its log file)."""
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g} s: {what}") from None


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def alive(pid: int) -> bool:
    return proc_state(pid) not in ("gone", "Z", "X")


def seqs(events: Events) -> list[int]:
    """The sequence numbers seen, once each (a republished event is a duplicate)."""
    return sorted({int(e["seq"]) for e in events.seen})


async def run_cli(*args: str) -> None:
    r = await cli(*args)
    assert r.code == 0, (args, r.err)


async def destroy_all(host: str, base: Path) -> None:
    listing = await cli("--json", "list", "--host", host)
    if listing.code == 0:
        for dom in listing.json():
            await cli("destroy", dom["name"], "--host", host)
    for pid in qemu_pids_under(base):  # what the agent could not reach
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def base(e2e_root: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="k", dir=e2e_root))


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


async def test_sigterm_finishes_the_call_in_hand_and_keeps_guests(base: Path) -> None:
    host = unique_host("qt")
    for name in ("t-1", "t-2", "t-3"):
        (base / f"{name}.xml").write_text(firmware_xml(name))
    async with host_events(host) as events:
        try:
            async with agent_process(host, base, driver="qemu", keep_queue=True) as first:
                for name in ("t-1", "t-2"):
                    await run_cli("define", str(base / f"{name}.xml"), "--host", host)
                    await run_cli("start", name, "--host", host)
                await run_cli("define", str(base / "t-3.xml"), "--host", host)
                await events.wait("t-2", "started", "booted")
                # the command in hand: t-3's QEMU is spawned, its start not yet answered
                starting = asyncio.create_task(cli("start", "t-3", "--host", host))
                await until(lambda: len(qemu_pids_under(base)) == 3 or starting.done(), "spawn")
                assert not starting.done(), "start answered before SIGTERM: nothing in hand"
                first.proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(first.proc.wait(), WAIT) == 0
                answer = await starting
                assert answer.code == 0, f"the call in hand was not finished: {answer.err}"
            pids = qemu_pids_under(base)
            assert len(pids) == 3 and all(alive(p) for p in pids), pids
            before = len(events.seen)
            async with agent_process(host, base, driver="qemu"):
                listing = (await cli("--json", "list", "--all", "--host", host)).json()
                assert {d["name"]: d["state"] for d in listing} == dict.fromkeys(
                    ("t-1", "t-2", "t-3"), "running"
                ), listing
                # a marker: events are published in order, so what a reattach published
                # (the outbox's backlog, any reconciled event) arrives before it
                await run_cli("suspend", "t-1", "--host", host)
                await events.wait("t-1", "suspended", "paused")
                after = events.seen[before:]
                assert [e for e in after if e["reconciled"]] == [], after
                assert ("started", "booted") in events.of("t-3")
                numbers = seqs(events)
                assert numbers == list(range(1, numbers[-1] + 1)), f"events lost: {numbers}"
                assert len(events.seen) == len(numbers), "an event was delivered twice"
                assert sorted(qemu_pids_under(base)) == sorted(pids), "a guest was restarted"
        finally:
            await destroy_all(host, base)


async def test_kill9_before_the_ack_is_answered_from_the_reply_log(
    base: Path, guest: TestGuest
) -> None:
    host = unique_host("qk")
    serial = base / "k-1.serial"
    (base / "k-1.xml").write_text(kernel_xml(guest, "k-1", serial))
    stop_at_reset = {"VIRTBUS_FAULT_STOP_BEFORE_ACK": "domain.reset"}
    try:
        async with agent_process(
            host, base, driver="qemu", keep_queue=True, env=stop_at_reset
        ) as first:
            await run_cli("define", str(base / "k-1.xml"), "--host", host)
            await run_cli("start", "k-1", "--host", host)
            await wait_serial(serial, READY_MARKER, 1, WAIT)
            [pid] = qemu_pids_under(base)
            # the reply comes back, then the agent stops itself before the ack
            await run_cli("reset", "k-1", "--host", host)
            await until(lambda: proc_state(first.proc.pid) == "T", "stopped before the ack")
            first.proc.kill()  # kill -9: the unacked call goes back to the queue
            await first.proc.wait()
        await wait_serial(serial, READY_MARKER, 2, WAIT)  # the reset happened once
        log = base / f"agent-{host}.log"
        mark = log.stat().st_size
        async with agent_process(host, base, driver="qemu"):

            def redelivery_answered() -> bool:
                tail = log.read_bytes()[mark:]
                return b"(domain.reset) redelivered: answering from memory" in tail

            try:
                await until(redelivery_answered, "the redelivered reset answered from the log")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{log.read_text()[-4000:]}") from None
            # a marker reset after it (same domain: in delivery order); the guest boots a
            # third time, not a fourth
            await run_cli("reset", "k-1", "--host", host)
            await wait_serial(serial, READY_MARKER, 3, WAIT)
            await run_cli("destroy", "k-1", "--host", host)
            assert serial.read_text(errors="replace").count(READY_MARKER) == 3
            assert qemu_pids_under(base) == [] and not alive(pid)
    finally:
        await destroy_all(host, base)
