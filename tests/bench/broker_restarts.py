"""Issue 4 figures: events lost across broker restarts under a steady event load, and the
outbox replay rate.

An agent (test driver, real RabbitMQ) produces a steady stream of events by suspending and
resuming its domains directly on the driver (commands would need the broker, events must
not); RabbitMQ is restarted (``rabbitmqctl stop_app``/``start_app``) several times; a
subscriber reads the event history and counts what it got. Disrupts every other user of
the local broker while it runs.

    .venv/bin/python -m tests.bench.broker_restarts [--restarts 5] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

from agent.service import AgentService
from drivers.test import TestDriver
from tests.bench.common import add_force, check_load
from tests.procs import BUS_URL, unique_host
from virtbus.bus.factory import open_bus
from virtbus.settings import AgentSettings

XML = "<domain type='test'><name>{}</name><memory>65536</memory><os><type>hvm</type></os></domain>"


async def rabbitmqctl(*args: str) -> None:
    await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", *args], check=True, capture_output=True, timeout=120
    )


async def main(restarts: int, rate: float, up: float, down: float) -> None:
    host = unique_host("restarts")
    state = Path(tempfile.mkdtemp(prefix="vbr"))
    driver = TestDriver()
    service = AgentService(
        AgentSettings(host=host, state_dir=state, heartbeat_interval=60, metrics_interval=600),
        open_bus(BUS_URL, src=host),
        driver,
    )
    await service.start()
    client = open_bus(BUS_URL, src="bench")
    await client.connect()
    sub = await client.history(time.time() - 1)
    received: dict[int, int] = {}
    domains = [f"d{i}" for i in range(10)]
    for name in domains:
        await driver.define(XML.format(name))
        await driver.start(name)

    async def read() -> None:
        async for env in sub:
            if env.body.get("host") == host:
                received[env.body["seq"]] = received.get(env.body["seq"], 0) + 1

    async def produce() -> None:
        paused: set[str] = set()
        i = 0
        while True:
            name = domains[i % len(domains)]
            if name in paused:
                await driver.resume(name)
                paused.discard(name)
            else:
                await driver.suspend(name)
                paused.add(name)
            i += 1
            await asyncio.sleep(1 / rate)

    reader = asyncio.create_task(read())
    producer = asyncio.create_task(produce())
    replay_rates = []
    try:
        for n in range(restarts):
            await asyncio.sleep(up)
            await rabbitmqctl("stop_app")
            await asyncio.sleep(down)
            await rabbitmqctl("start_app")
            backlog_at_start = None
            t0 = time.monotonic()
            while len(service.outbox) > 0 or not service.bus.connected:
                if service.bus.connected and backlog_at_start is None:
                    backlog_at_start, t0 = len(service.outbox), time.monotonic()
                await asyncio.sleep(0.01)
            if backlog_at_start:
                replay_rates.append(backlog_at_start / max(time.monotonic() - t0, 1e-3))
            print(f"restart {n + 1}: replayed a backlog of {backlog_at_start} events", flush=True)
        producer.cancel()
        await service.outbox.flush(30)
        last = service.last_seq
        async with asyncio.timeout(60):
            while len(received) < last:
                await asyncio.sleep(0.1)
    except TimeoutError:
        pass
    finally:
        producer.cancel()
        reader.cancel()
        await sub.close()
        await client.close()
        await service.stop()
    last = service.last_seq
    lost = sorted(set(range(1, last + 1)) - set(received))
    dup = sum(c - 1 for c in received.values())
    print(
        f"events produced: {last}; received: {len(received)}; lost: {len(lost)}"
        f"{' ' + str(lost[:10]) if lost else ''}; redelivered copies (deduplicated): {dup}"
    )
    if replay_rates:
        replay_rates.sort()
        print(
            f"outbox replay rate: median {replay_rates[len(replay_rates) // 2]:.0f} events/s "
            f"over {len(replay_rates)} restarts"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--up", type=float, default=3.0, help="s between restarts")
    parser.add_argument("--down", type=float, default=3.0, help="s the broker stays down")
    add_force(parser)
    args = parser.parse_args()
    check_load(args.force)
    asyncio.run(main(args.restarts, args.rate, args.up, args.down))
