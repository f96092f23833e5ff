"""``virtbus event --since``: the replay from ``virtbus.events.history`` hands over to live
events with no gap and no duplicate, while the host keeps publishing through the seam.

A real agent (test driver) publishes suspend/resume events; a client keeps it busy while
the real CLI subscribes. What the CLI prints must be exactly the host's events from the
first one at or after ``--since``: consecutive sequence numbers, each once.

A vhost of the test's own: ``--since SEQ`` reads the history from its first event (a
host's sequence number names no stream offset), so on the shared broker the test would
time how many events earlier runs and benches left there (654,000 once: over 120 s).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import VIRTBUS, agent_process, private_vhost, unique_host
from virtbus.client import Client
from virtbus.protocol.messages import DomainEvent

pytestmark = pytest.mark.rabbitmq
XML = """<domain type='test'><name>rp</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os></domain>"""
BEFORE, DURING = 20, 120  # events before --since's point, and pairs published through the seam


async def toggle(client: Client, host: str, pairs: int) -> None:
    dom = client.host(host).domain("rp")
    for _ in range(pairs):
        await dom.suspend()
        await dom.resume()


@pytest.fixture
def bus_url() -> Iterator[str]:
    with private_vhost(f"virtbus-replay-{os.getpid()}") as url:
        yield url


@pytest.mark.parametrize("since_kind", ["time", "seq"])
async def test_replay_hands_over_to_live_without_gap_or_duplicate(
    tmp_path: Path, since_kind: str, bus_url: str
) -> None:
    host = unique_host("rp")
    async with agent_process(host, tmp_path, bus=bus_url), await Client.connect(bus_url) as client:
        live = await client.subscribe(host=host)
        seen: list[DomainEvent] = []
        try:
            await client.host(host).define(XML)
            await client.host(host).domain("rp").start()
            await toggle(client, host, BEFORE // 2)
            async with asyncio.timeout(30):
                async for ev in live:  # what the host published so far, live
                    seen.append(ev)
                    if len(seen) == 2 + BEFORE:  # defined, started, then the toggles
                        break
        finally:
            await live.aclose()
        cut = seen[len(seen) // 2]  # replay from the middle of what was published
        earlier = seen[len(seen) // 2 - 1]
        assert cut.ts is not None and earlier.ts is not None and cut.ts > earlier.ts
        # strictly between two events' times, or "after sequence number SEQ"
        since = repr((earlier.ts + cut.ts) / 2) if since_kind == "time" else str(earlier.seq)
        wanted = len(seen) - len(seen) // 2 + 2 * DURING
        busy = asyncio.create_task(toggle(client, host, DURING))  # publishing through the seam
        proc = await asyncio.create_subprocess_exec(
            *VIRTBUS, "--bus", bus_url, "--json", "event", "--host", host, "--since", since,
            "--count", str(wanted), "--timeout", "120",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 150)
        await busy
        assert proc.returncode == 0, err.decode()
        printed = [json.loads(line) for line in out.decode().splitlines()]
        numbers = [e["seq"] for e in printed]
        assert numbers == list(range(cut.seq, cut.seq + wanted)), numbers
        assert all(e["host"] == host for e in printed)
        assert [(e["event"], e["seq"]) for e in printed[: len(seen) - len(seen) // 2]] == [
            (e.event, e.seq) for e in seen[len(seen) // 2 :]
        ]
