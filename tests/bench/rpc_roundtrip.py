"""Foundation benchmark: a suspend+resume pair through the bus vs a bare aio-pika floor.

A real ``virtbus-agent`` process (test driver) serves the calls; the bare floor is two
sequential aio-pika request/replies (direct reply-to) with the same payload size as the
encoded call. Rounds alternate between the two so machine noise hits both alike.

    .venv/bin/python -m tests.bench.rpc_roundtrip [-n 1000] [--rounds 3]
        [--call-queue-type quorum|classic|both] [--uvloop]

``--call-queue-type both`` runs one agent of each type and alternates them round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.bench.bare_amqp import bare_client, bare_roundtrips, percentiles
from tests.bench.common import add_force, check_load
from tests.procs import BUS_URL, agent_process, unique_host
from virtbus.bus.factory import open_bus
from virtbus.protocol import ops
from virtbus.protocol.codec import encode
from virtbus.protocol.envelope import Envelope, Kind

XML = (
    "<domain type='test'><name>bench</name><memory>131072</memory>"
    "<os><type>hvm</type></os></domain>"
)
WARMUP = 50


async def virtbus_pairs(host: str, n: int) -> list[float]:
    bus = open_bus(BUS_URL, src="bench")
    await bus.connect()
    route = ops.agent_route(host)
    try:
        times = []
        for i in range(n + WARMUP):
            start = time.perf_counter()
            await bus.call(route, ops.DOMAIN_SUSPEND, {"domain": "bench"}, timeout=5)
            await bus.call(route, ops.DOMAIN_RESUME, {"domain": "bench"}, timeout=5)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
        return times
    finally:
        await bus.close()


async def bare_pairs(n: int, payload: int, queue: str | None) -> list[float]:
    """Two sequential bare round trips; against a server process when ``queue`` is given."""
    if queue is None:
        singles = await bare_roundtrips(2 * n, payload)
    else:
        singles = await bare_client(BUS_URL, queue, 2 * n, payload)
    return [singles[i] + singles[i + 1] for i in range(0, 2 * n, 2)]


@asynccontextmanager
async def bare_server_process() -> AsyncIterator[str]:
    """A bare aio-pika echo server in its own process, like the agent is."""
    queue = f"bench.bare.{uuid.uuid4().hex[:8]}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.bare_amqp", "--serve", queue
    )
    try:
        await asyncio.sleep(1.5)  # connect + declare
        yield queue
    finally:
        proc.terminate()
        await proc.wait()


async def main(n: int, rounds: int, queue_types: list[str], extra: tuple[str, ...] = ()) -> None:
    payload = len(encode(Envelope(Kind.CALL, ops.DOMAIN_SUSPEND, {"domain": "bench"}, src="bench")))
    with tempfile.TemporaryDirectory() as state:
        async with contextlib.AsyncExitStack() as stack:
            hosts = {}
            for queue_type in queue_types:  # one agent per call queue type, each its own dir
                host = unique_host(f"bench-{queue_type}")
                (Path(state) / host).mkdir()
                await stack.enter_async_context(agent_process(
                    host, Path(state) / host, "--log-level", "WARNING",
                    "--call-queue-type", queue_type, *extra,
                ))  # fmt: skip
                bus = open_bus(BUS_URL, src="bench")
                await bus.connect()
                await bus.call(ops.agent_route(host), ops.DOMAIN_DEFINE, {"xml": XML})
                await bus.call(ops.agent_route(host), ops.DOMAIN_START, {"domain": "bench"})
                await bus.close()
                hosts[queue_type] = host
            ratios: dict[str, list[tuple[float, float]]] = {}
            async with bare_server_process() as queue:
                for r in range(rounds):
                    for queue_type, host in hosts.items():  # alternated round by round
                        ours = percentiles(await virtbus_pairs(host, n))
                        for label, q in (("separate", queue), ("in-process", None)):
                            bare = percentiles(await bare_pairs(n, payload, q))
                            key = f"{queue_type} call queue vs bare server {label}"
                            ratios.setdefault(key, []).append(
                                (ours[0] / bare[0], ours[1] / bare[1])
                            )
                            print(
                                f"round {r + 1}: virtbus ({queue_type} call queue) suspend+resume "
                                f"pair p50={ours[0]:.3f} ms p99={ours[1]:.3f} ms | bare aio-pika "
                                f"pair ({payload} B, server {label}) p50={bare[0]:.3f} ms "
                                f"p99={bare[1]:.3f} ms | ratio p50={ratios[key][-1][0]:.2f} "
                                f"p99={ratios[key][-1][1]:.2f}",
                                flush=True,
                            )
    for label, values in ratios.items():
        print(
            f"median over {rounds} rounds, {label}: "
            f"ratio p50={statistics.median(v[0] for v in values):.2f} "
            f"p99={statistics.median(v[1] for v in values):.2f} (target <= 1.3)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="pairs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--call-queue-type", choices=("quorum", "classic", "both"), default="quorum",
        help="the agent's bus.call_queue_type (both: an agent of each, alternated)",
    )  # fmt: skip
    parser.add_argument("--uvloop", action="store_true", help="the agent runs on uvloop")
    add_force(parser)
    args = parser.parse_args()
    check_load(args.force)
    types = ["quorum", "classic"] if args.call_queue_type == "both" else [args.call_queue_type]
    asyncio.run(main(args.n, args.rounds, types, ("--uvloop",) if args.uvloop else ()))
