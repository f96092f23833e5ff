"""SIGTERM of an agent whose bus is reconnecting: it stops within a bound and exits 0.

The agent (a real process, test driver) reaches the shared broker through a TCP proxy of
the test's own; the proxy is cut, so the agent's bus is reconnecting (each attempt
refused) when the signal comes. Before the fix its stop waited for the connection to come
back (a robust queue's consumer cancel, issue 18) and the process had to be killed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.faults import TcpProxy
from tests.procs import agent_process, terminate, unique_host

pytestmark = pytest.mark.rabbitmq

WAIT = 20.0  # s: a bound, not a figure
STOP_BOUND = 15.0  # s: the connect timeout (5 s) and the rest of the stop, with room


async def wait_for_line(log: Path, text: str) -> None:
    async with asyncio.timeout(WAIT):
        while text not in log.read_text(errors="replace"):
            await asyncio.sleep(0.1)


async def test_sigterm_while_the_bus_reconnects_exits_0_in_bounded_time(
    rabbitmq: None, tmp_path: Path
) -> None:
    proxy = TcpProxy()
    await proxy.start()
    host = unique_host("stoprc")
    try:
        async with agent_process(host, tmp_path, bus=proxy.url()) as agent:
            log = tmp_path / f"agent-{host}.log"
            proxy.cut()  # every connection dropped, new ones refused
            await wait_for_line(log, "bus connection lost")  # the premise: it reconnects
            started = time.monotonic()
            code = await terminate(agent.proc, grace=WAIT)
            took = time.monotonic() - started
            assert code == 0, (code, log.read_text(errors="replace")[-3000:])
            assert took < STOP_BOUND, took
            assert f"agent {host} stopped" in log.read_text(errors="replace")
    finally:
        await proxy.close()
