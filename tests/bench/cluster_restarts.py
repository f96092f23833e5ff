"""A 3-node RabbitMQ cluster restarted one node at a time under 200 events/s (issue 18's
benchmark): events lost (target 0), duplicates delivered, the longest delivery gap.

Three nodes of the bench's own (tests/rabbitnode.py), a real ``virtbus-agent`` (test
driver, ``event_rate``: its running domain emits ``rtc_change`` at ``--rate`` a second)
connected with every node in its URL, and a history subscriber connected the same way.
Each restart is ``stop_app`` of one node, a pause, ``start_app``; the node restarted goes
round the three, ``--restarts`` times (5 times over: 15). Then the source is stopped with
a marker and the subscriber's view is judged: every sequence number from 1 to the last
(lost = the missing ones), deliveries beyond one per number (duplicates, deduplicated by
the number), and the longest wait between two deliveries.

    .venv/bin/python -m tests.bench.cluster_restarts [--restarts 5] [--rate 200] [--down 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.common import add_force, check_load
from tests.integration.test_fault_matrix import connected, end_marker, history, start_tick
from tests.procs import agent_process, unique_host
from tests.rabbitnode import rabbit_cluster


async def run(restarts: int, rate: int, down: float, base: Path) -> None:
    host = unique_host("cr")
    state = base / host
    state.mkdir()
    async with rabbit_cluster(3) as cluster:
        url = cluster.url
        options = ("--driver-option", f"event_rate={rate}")
        async with (
            history(url, [host]) as events,
            connected(url, "cluster-restarts") as bus,
            agent_process(host, state, *options, bus=url, log_dir=base),
        ):
            await start_tick(bus, host)
            t0 = time.monotonic()
            for i in range(restarts * len(cluster.nodes)):
                node = cluster.nodes[i % len(cluster.nodes)]
                await asyncio.sleep(down)
                await node.stop_app()
                await asyncio.sleep(down)
                await node.start_app()
                await cluster.nodes[(i + 1) % 3].ctl("await_online_nodes", "3")
                seen = events.hosts[host]
                print(f"  restart {i + 1:2d} of {node.name}: {len(seen.by_seq)} events so far,"
                      f" longest gap {seen.gap:.2f} s", flush=True)  # fmt: skip
            await asyncio.sleep(down)
            await end_marker(bus, events, host)
            took = time.monotonic() - t0
            # a second reader from the stream's start, once the cluster is whole, tells the
            # broker's losses from the live reader's
            # (node by node: a restarted node's stream replica may not serve yet)
            reread = ""
            for member in cluster.nodes:
                async with history(member.url, [host]) as again:
                    try:
                        await again.wait(host, f"tick-{host}", "stopped")
                    except AssertionError:
                        print(f"  the whole stream not read through {member.name} in 60 s:"
                              f" {len(again.hosts[host].by_seq)} events", flush=True)  # fmt: skip
                        continue
                    reread = member.name
                    break
    seen = events.hosts[host]
    last = max(seen.by_seq)
    lost = sorted(set(range(1, last + 1)) - set(seen.by_seq))
    missing = sorted(set(range(1, last + 1)) - set(again.hosts[host].by_seq))
    print(f"# 3-node cluster, {restarts * 3} node restarts ({restarts} times over),"
          f" {rate} events/s,"
          f" {took:.0f} s")  # fmt: skip
    print(f"  events published (last seq) {last}, delivered {seen.deliveries}")
    print(f"  lost {len(lost)} (target 0){f': {lost[:20]}' if lost else ''}")
    print(f"  missing from a read of the whole stream afterwards (through {reread or 'no node'}):"
          f" {len(missing)} (target 0)"
          f"{f': {missing[:20]}' if missing else ''}")  # fmt: skip
    print(f"  duplicates delivered {seen.deliveries - len(seen.by_seq)} (deduplicated by seq)")
    print(f"  longest delivery gap {seen.gap:.2f} s")


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=5, help="times over the three nodes")
    parser.add_argument("--rate", type=int, default=200, help="events a second")
    parser.add_argument("--down", type=float, default=3.0, help="s before and while a node is down")
    add_force(parser)
    args = parser.parse_args(argv)
    check_load(args.force)
    base = Path(tempfile.mkdtemp(prefix="vb-cr-"))
    try:
        await run(args.restarts, args.rate, args.down, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    one, five, _ = os.getloadavg()
    print(f"load average at the end: {one:.2f} {five:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
