"""TLS against plain on the bus: a suspend+resume pair and event throughput, same run.

One RabbitMQ node of the benchmark's own (tests/rabbitnode.py) with a plain listener and
an amqps listener that logs certificates in by their CN (SASL EXTERNAL), certificates
from ``virtbus.security.pki``, certificate users from ``virtbus.bus.definitions``. Two
real ``virtbus-agent`` processes (test driver) serve the calls: one over plain AMQP as
the dev broker's ``guest``, one over TLS with its host certificate; the caller uses the
same transport as its agent (TLS: a user certificate). Event throughput: an agent-like
publisher (publisher confirms, a window of 256 in flight written at once, as the outbox
sends it: ``--publish each`` for one publish call per event) to one subscriber, timed
from the first publish to the last event received. Rounds alternate plain and TLS (and
which goes first), so machine noise hits both alike. Target: TLS costs <= 15% (pair p50,
events/s).

    .venv/bin/python -m tests.bench.tls_cost [-n 1000] [--events 20000] [--rounds 4]
        [--publish window|each]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tests.bench.common import add_force, check_load
from tests.procs import agent_process
from tests.rabbitnode import NodeTls, RabbitNode, rabbit_node
from virtbus.bus.amqp import AmqpBus
from virtbus.bus.base import Bus
from virtbus.bus.definitions import definitions
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.protocol import ops
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.security import pki

VHOST = "/virtbus"
HOST_PLAIN, HOST_TLS, USER = "bench-plain", "bench-tls", "bench-user"
XML = (
    "<domain type='test'><name>bench</name><memory>131072</memory>"
    "<os><type>hvm</type></os></domain>"
)
WARMUP = 50
WINDOW = 256  # events in flight, as agent.outbox's event_publish_window


@dataclass(frozen=True)
class Side:
    label: str
    host: str
    agent_url: str  # the agent's bus URL
    caller_url: str  # the caller's and subscriber's
    publisher_url: str  # publishes events under ``host``'s name (topic permissions)


def _tls_url(node: RabbitNode, ca: Path, kind: str, name: str) -> str:
    files = ca / f"{kind}s"
    return node.tls_url(VHOST) + (
        f"?cafile={quote(str(ca / 'ca.crt'))}&certfile={quote(str(files / f'{name}.crt'))}"
        f"&keyfile={quote(str(files / f'{name}.key'))}"
    )


@contextlib.asynccontextmanager
async def bench_node(root: Path) -> AsyncIterator[tuple[RabbitNode, Side, Side]]:
    ca = root / "ca"
    pki.init_ca(ca)
    pki.issue(ca, pki.Kind.SERVER, "localhost", alt_names=["127.0.0.1"])
    pki.issue(ca, pki.Kind.HOST, HOST_TLS)
    pki.issue(ca, pki.Kind.USER, USER, role="admin")
    servers = ca / "servers"
    tls = NodeTls(ca / "ca.crt", servers / "localhost.crt", servers / "localhost.key")
    async with rabbit_node(tls=tls) as node:
        defs = root / "definitions.json"
        defs.write_text(json.dumps(definitions(VHOST, None, hosts=[HOST_TLS], clients=[USER])))
        os.chmod(root, 0o755)
        os.chmod(defs, 0o644)  # rabbitmqctl reads it as the rabbitmq user
        await node.ctl("import_definitions", str(defs))
        async with asyncio.timeout(60):  # the import is asynchronous
            while HOST_TLS not in await node.ctl("list_permissions", "-p", VHOST):
                await asyncio.sleep(0.2)
        plain = Side("plain", HOST_PLAIN, node.url, node.url, node.url)
        secure = Side(
            "tls",
            HOST_TLS,
            _tls_url(node, ca, "host", HOST_TLS),
            _tls_url(node, ca, "user", USER),
            _tls_url(node, ca, "host", HOST_TLS),
        )
        yield node, plain, secure


async def _connected(url: str, src: str) -> Bus:
    bus = open_bus(url, src=src)
    await bus.connect()
    return bus


async def pairs(side: Side, n: int) -> list[float]:
    bus = await _connected(side.caller_url, "bench-caller")
    route = ops.agent_route(side.host)
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


async def events_per_second(side: Side, count: int, window: bool = True) -> float:
    """``count`` confirmed events from ``side.host``'s publisher to one subscriber:
    ``window``: each window of 256 written at once (AmqpBus.publish_window, as the agent's
    outbox sends them), else one publish call per event."""
    publisher = await _connected(side.publisher_url, side.host)
    subscriber = await _connected(side.caller_url, "bench-subscriber")
    try:
        sub = await subscriber.subscribe(EVENTS_EXCHANGE, [f"{side.host}.#"])
        key = f"{side.host}.bench.suspended"

        async def receive() -> None:
            got = 0
            async for _ in sub:
                got += 1
                if got == count:
                    return

        reader = asyncio.create_task(receive())
        start = time.perf_counter()
        for first in range(0, count, WINDOW):
            numbers = range(first, min(first + WINDOW, count))
            if window and isinstance(publisher, AmqpBus):  # as the outbox sends a window
                messages = [(key, _event(side.host, i)) for i in numbers]
                await asyncio.gather(*await publisher.publish_window(EVENTS_EXCHANGE, messages))
                continue
            batch = [
                publisher.publish(EVENTS_EXCHANGE, key, _event(side.host, i), confirm=True)
                for i in numbers
            ]
            await asyncio.gather(*batch)
        await asyncio.wait_for(reader, 120)
        elapsed = time.perf_counter() - start
        await sub.close()
        return count / elapsed
    finally:
        await subscriber.close()
        await publisher.close()


def _event(host: str, seq: int) -> Envelope:
    return Envelope(Kind.EVENT, "domain.event", {"seq": seq, "host": host}, src=host)


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def main(n: int, events: int, rounds: int, window: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="virtbus-tls-bench-") as tmp:
        root = Path(tmp)
        async with (
            bench_node(root) as (_node, plain, secure),
            contextlib.AsyncExitStack() as agents,
        ):
            for side in (plain, secure):
                state = root / f"state-{side.label}"
                state.mkdir()
                await agents.enter_async_context(
                    agent_process(side.host, state, "--log-level", "WARNING",
                                  bus=side.agent_url, keep_queue=True)
                )  # fmt: skip
                bus = await _connected(side.caller_url, "bench-setup")
                await bus.call(ops.agent_route(side.host), ops.DOMAIN_DEFINE, {"xml": XML})
                await bus.call(ops.agent_route(side.host), ops.DOMAIN_START,
                               {"domain": "bench"})  # fmt: skip
                await bus.close()
            p50: dict[str, list[float]] = {"plain": [], "tls": []}
            rate: dict[str, list[float]] = {"plain": [], "tls": []}
            for r in range(rounds):
                order = (plain, secure) if r % 2 == 0 else (secure, plain)
                for side in order:
                    times = await pairs(side, n)
                    p50[side.label].append(_p(times, 0.5))
                    per_s = await events_per_second(side, events, window)
                    rate[side.label].append(per_s)
                    print(
                        f"round {r + 1} {side.label:5}: suspend+resume pair "
                        f"p50={_p(times, 0.5):.3f} ms p99={_p(times, 0.99):.3f} ms | "
                        f"events {per_s:,.0f}/s",
                        flush=True,
                    )
    pair_plain, pair_tls = statistics.median(p50["plain"]), statistics.median(p50["tls"])
    ev_plain, ev_tls = statistics.median(rate["plain"]), statistics.median(rate["tls"])
    print(
        f"median over {rounds} rounds: pair p50 plain {pair_plain:.3f} ms, TLS {pair_tls:.3f} "
        f"ms (TLS costs {100 * (pair_tls / pair_plain - 1):+.1f}%); events plain "
        f"{ev_plain:,.0f}/s, TLS {ev_tls:,.0f}/s (TLS costs {100 * (1 - ev_tls / ev_plain):+.1f}%)"
        " (target: <= 15% each)"
    )
    print("load average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="suspend+resume pairs per round")
    parser.add_argument("--events", type=int, default=20000, help="events per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--publish", choices=("window", "each"), default="window",
                        help="events: a window written at once as the outbox does (default), "
                        "or one publish call per event")  # fmt: skip
    add_force(parser)
    args = parser.parse_args()
    check_load(args.force)
    asyncio.run(main(args.n, args.events, args.rounds, args.publish == "window"))
