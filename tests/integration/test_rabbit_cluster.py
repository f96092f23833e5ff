"""Issue 18: a 3-node RabbitMQ cluster loses the node its agent's queue leader is on.

Three real RabbitMQ nodes of the test's own (tests/rabbitnode.py: own names, ports, data
dirs, epmd port and Erlang cookie under one temp dir), a real agent on the test driver
and two clients, all in this process over the real transport. The agent and client A are
connected to node 1, where the agent's quorum queue has its leader; client B to node 2.
While calls are in flight, node 1's RabbitMQ stops. Then:

- every call is answered, maybe after a retryable error (BUS_UNAVAILABLE for client A,
  whose connection went; OPERATION_TIMEOUT while the queue elects a leader), retried
  with the *same* call id;
- no call runs twice: the driver counts each domain's define (the side effect itself);
- no event is lost: the replicated history stream holds every sequence number;
- the agent and client A are connected again, to another node, and the agent serves.

Its two causes, fixed in virtbus/bus, have a focused test each (the first at the end of
this module, the second in tests/integration/test_bus_node_loss.py): RabbitMQ 3.10/3.11
close a connection that replies to a caller of the stopped node (the redelivered call came
back for ever: amqp_consumers.py, POISONED REPLIES), and aio-pika's restore of a
connection closed meanwhile waited for itself (reconnect.py, ``_on_connected``).

One cluster (tests/integration/conftest.py, shared with the fault matrix's node test: a
3-node start is 12-25 s) serves both tests: each test stops node 1, and the ``cluster``
fixture starts every node's app again before the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from agent.service import AgentService
from drivers.test import TestDriver
from tests.rabbitnode import RabbitCluster
from virtbus.bus.amqp import AmqpBus
from virtbus.bus.topology import call_queue_for
from virtbus.errors import BusUnavailable, RetryableError
from virtbus.protocol import ops
from virtbus.protocol.envelope import Envelope, new_id, ok_body
from virtbus.settings import AgentSettings, Backoff, BusSettings

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="session"),  # the cluster fixture's loop (conftest.py)
]

BEFORE_STOP = 15  # calls answered before node 1 stops
MORE_CALLS = 20  # calls answered after the agent is back, then the load stops
CONCURRENT = 6
DEFINE_TIME = 0.15  # s the driver takes per define: calls are in flight when the node stops
ATTEMPT = 8.0  # s: one attempt's deadline
DEADLINE = 90.0  # s for all calls, node loss included (a bound, not a figure)
BACKOFF = Backoff(initial=0.1, maximum=1.0)
STOP_WAIT = 30.0  # s for a teardown step (a bound, not a figure)
WAIT = 20.0  # s: a bound, not a figure


class CountingDriver(TestDriver):
    """The test driver, counting every define it runs (by domain name)."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self.defined: Counter[str] = Counter()

    async def define(self, xml: str) -> object:  # type: ignore[override]
        name = xml.split("<name>", 1)[1].split("</name>", 1)[0]
        self.defined[name] += 1
        await asyncio.sleep(DEFINE_TIME)
        return await super().define(xml)


def xml(name: str) -> str:
    return (
        f"<domain type='test'><name>{name}</name><memory>1024</memory>"
        "<os><type>hvm</type></os></domain>"
    )


async def queue_members(cluster: RabbitCluster, name: str) -> tuple[str, str, str]:
    """(type, leader, members) of a queue, as the cluster reports it."""
    out = await cluster.ctl("-q", "list_queues", "name", "type", "leader", "members")
    for line in out.splitlines():
        cols = line.split("\t")
        if cols[0] == name:
            return cols[1], cols[2], cols[3]
    raise AssertionError(f"no queue {name} in {out}")


@contextlib.asynccontextmanager
async def bus(url: str, src: str) -> AsyncIterator[AmqpBus]:
    b = AmqpBus(url, src, BusSettings(url=url, connect_timeout=5, reconnect=BACKOFF))
    await b.connect()
    try:
        yield b
    finally:
        await bounded(b.close(), f"closing {src}'s bus")


async def bounded(action: Awaitable[None], what: str) -> None:
    """A teardown step that must end: a test that failed (no node to reconnect to, say)
    still stops its cluster instead of hanging in a close."""
    try:
        async with asyncio.timeout(STOP_WAIT):
            await action
    except TimeoutError:
        raise AssertionError(f"{what} did not end within {STOP_WAIT:g} s") from None


class Caller:
    """Calls that retry a retryable failure with the same call id, counting the retries."""

    def __init__(self, bus: AmqpBus, route: str) -> None:
        self.bus = bus
        self.route = route
        self.retried: Counter[str] = Counter()  # error code -> retries

    async def define(self, name: str, until: float) -> None:
        call_id = new_id()
        while True:
            try:
                await self.bus.call(
                    self.route, ops.DOMAIN_DEFINE, {"xml": xml(name)}, timeout=ATTEMPT,
                    call_id=call_id,
                )  # fmt: skip
                return
            except RetryableError as exc:
                if time.monotonic() > until:
                    raise
                self.retried[exc.code] += 1
                await asyncio.sleep(0.2)


async def test_losing_the_queue_leaders_node_loses_no_call_and_runs_none_twice(
    tmp_path: Path, cluster: RabbitCluster
) -> None:
    n1, n2, _n3 = cluster.nodes
    host = f"qq-{uuid.uuid4().hex[:8]}"
    route = ops.agent_route(host)
    queue = call_queue_for(route).name
    driver = CountingDriver()
    settings = AgentSettings(host=host, state_dir=tmp_path, heartbeat_interval=1,
                             metrics_interval=3600)  # fmt: skip
    agent_bus = AmqpBus(
        cluster.url_from(n1), host,
        BusSettings(url=cluster.url_from(n1), connect_timeout=5, reconnect=BACKOFF),
    )  # fmt: skip
    links: list[bool] = []
    in_flight: set[str] = set()
    done: list[str] = []
    at_loss: dict[str, int] = {}

    def on_link(up: bool) -> None:
        links.append(up)
        if not up and not at_loss:
            at_loss.update(done=len(done), in_flight=len(in_flight))

    agent_bus.add_connection_listener(on_link)
    service = AgentService(settings, agent_bus, driver)
    await service.start()
    try:
        async with (
            bus(cluster.url_from(n1), "client-a") as a,
            bus(cluster.url_from(n2), "client-b") as b,
        ):
            # The premise: a quorum queue led by node 1, replicated on all three; the
            # event history is a stream on all three.
            kind, leader, members = await queue_members(cluster, queue)
            assert (kind, leader) == ("quorum", n1.name), (kind, leader)
            assert all(n.name in members for n in cluster.nodes), members
            kind, _leader, members = await queue_members(cluster, "virtbus.events.history")
            assert kind == "stream" and all(n.name in members for n in cluster.nodes)
            callers = [Caller(a, route), Caller(b, route)]
            until = time.monotonic() + DEADLINE
            names = (f"d{i}" for i in itertools.count())
            after_recovery = asyncio.Event()  # MORE_CALLS answered after the agent's return

            async def worker(caller: Caller) -> None:
                while not after_recovery.is_set():
                    name = next(names)
                    in_flight.add(name)
                    await caller.define(name, until)
                    in_flight.discard(name)
                    done.append(name)
                    if links and links[-1] and len(done) >= at_loss["done"] + MORE_CALLS:
                        after_recovery.set()

            workers = [asyncio.create_task(worker(callers[i % 2])) for i in range(CONCURRENT)]
            async with asyncio.timeout(DEADLINE):
                while len(done) < BEFORE_STOP:
                    await asyncio.sleep(0.05)
                await n1.stop_app()  # node 1's RabbitMQ stops: its connections go
                await asyncio.gather(*workers)
            assert at_loss["in_flight"] > 0, at_loss  # calls were in flight at the loss
            names_issued = {f"d{i}" for i in range(len(done))}
            assert set(done) == names_issued  # every call was answered
            assert set(driver.defined) == names_issued
            assert max(driver.defined.values()) == 1, driver.defined  # none ran twice
            assert False in links and links[-1] is True  # the agent lost n1, came back
            retried = callers[0].retried + callers[1].retried
            assert callers[0].retried["BUS_UNAVAILABLE"] >= 1, retried  # a's link went
            print(f"\nretries after the node loss: {dict(retried)}")

            # Events: the stream (now led elsewhere) holds every sequence number.
            last = service.last_seq
            assert last >= len(done)
            seen: set[int] = set()
            sub = await b.history("first")
            try:
                async with asyncio.timeout(60):
                    async for env in sub:
                        if env.body.get("host") == host:
                            seen.add(int(env.body["seq"]))
                            if len(seen) == last:
                                break
            finally:
                await sub.close()
            assert seen == set(range(1, last + 1))
            # The agent serves, on another node than the one that stopped.
            info = await a.call(route, ops.DOMAIN_INFO, {"domain": "d0"}, timeout=ATTEMPT)
            assert info["name"] == "d0"
            _kind, leader, _members = await queue_members(cluster, queue)
            assert leader != n1.name
    finally:
        await bounded(service.stop(), "stopping the agent")


async def queue_messages(cluster: RabbitCluster, name: str) -> int:
    """Messages of a queue, ready and unacknowledged, as the cluster counts them."""
    out = await cluster.ctl("-q", "list_queues", "name", "messages")
    for line in out.splitlines():
        cols = line.split("\t")
        if cols[0] == name:
            return int(cols[1])
    raise AssertionError(f"no queue {name} in {out}")


def bus_to(cluster: RabbitCluster, first: int, src: str) -> AmqpBus:
    url = cluster.url_from(cluster.nodes[first])
    return AmqpBus(url, src, BusSettings(url=url, connect_timeout=5, reconnect=BACKOFF))


async def test_a_reply_to_a_caller_of_a_stopped_node_does_not_bring_its_call_back(
    cluster: RabbitCluster,
) -> None:
    n1 = cluster.nodes[0]
    route = f"agent.nl-{uuid.uuid4().hex[:8]}"
    server = bus_to(cluster, 1, "server")  # on node 2: the queue's leader is there
    caller = bus_to(cluster, 0, "caller-on-n1")
    other = bus_to(cluster, 1, "caller-on-n2")
    deliveries: list[str] = []
    started = asyncio.Event()
    release = asyncio.Event()

    def handler(call: Envelope) -> Awaitable[dict[str, Any]]:
        deliveries.append(call.id)
        started.set()

        async def answer() -> dict[str, Any]:
            await release.wait()
            return ok_body({"echo": call.body})

        return answer()

    await server.connect()
    try:
        await server.serve(route, handler)
        await caller.connect()
        await other.connect()
        lost = asyncio.create_task(caller.call(route, "host.ping", {"n": 1}, timeout=60))
        await asyncio.wait_for(started.wait(), WAIT)
        await n1.stop_app()  # the caller's node stops; its reply address names that node
        with pytest.raises(BusUnavailable):
            await lost
        release.set()  # the server replies to the stopped node's caller
        queue = call_queue_for(route).name
        async with asyncio.timeout(WAIT):  # the call is acked at last, not back for ever
            while await queue_messages(cluster, queue) != 0:
                await asyncio.sleep(0.2)
        assert len(deliveries) <= 2, deliveries  # the first, and at most one redelivery
        assert set(deliveries) == {deliveries[0]}
        # The server serves on: a caller of a live node is answered.
        reply = await other.call(route, "host.ping", {"n": 2}, timeout=WAIT)
        assert reply == {"echo": {"n": 2}}
    finally:
        for bus in (other, caller, server):
            await bounded(bus.close(), "closing a bus")
