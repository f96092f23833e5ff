"""A robust connection that is reconnecting never outlives its event loop.

aio-pika swallows a cancellation that lands in a reconnect attempt unless the connection
was closed (virtbus/bus/reconnect.py). Here a connection to the real broker goes through a
proxy that then turns into a black hole (accepts, never answers), so the reconnect attempt
hangs; the coroutine returns without closing the connection, and ``asyncio.run`` cancels
what is left. Before the fix the loop's shutdown waited for ever.
"""

from __future__ import annotations

import asyncio
import threading

from yarl import URL

from tests.procs import BUS_URL
from virtbus.bus.reconnect import connection_class
from virtbus.settings import Backoff


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _forgotten_connection(reconnecting: threading.Event) -> None:
    broker = URL(BUS_URL)
    links: list[asyncio.StreamWriter] = []
    pipes: set[asyncio.Task[None]] = set()
    held: list[asyncio.StreamWriter] = []
    forwarding = True

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not forwarding:
            held.append(writer)  # a black hole: the attempt waits for an answer
            reconnecting.set()
            return
        up_reader, up_writer = await asyncio.open_connection(broker.host, broker.port)
        links.extend((writer, up_writer))
        pipes.add(asyncio.create_task(_pipe(reader, up_writer)))
        pipes.add(asyncio.create_task(_pipe(up_reader, writer)))

    proxy = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    url = broker.with_host("127.0.0.1").with_port(port)
    cls = connection_class(Backoff(initial=0.05, maximum=0.1))
    connection = cls(url)
    await connection.connect(timeout=60)
    assert not connection.is_closed  # the premise: connected through the proxy
    forwarding = False
    for link in links:
        link.transport.abort()
    await asyncio.wait_for(asyncio.shield(_wait(reconnecting)), 30)
    await asyncio.sleep(0.2)  # inside the hanging attempt
    # returns without closing ``connection``: asyncio.run cancels its reconnect task


async def _wait(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.01)


def test_a_reconnecting_connection_does_not_outlive_its_loop() -> None:
    reconnecting = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(_forgotten_connection(reconnecting))
        except Exception as exc:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert reconnecting.is_set()  # the premise: a reconnect attempt was in hand
    assert not thread.is_alive(), "the event loop's shutdown waits for the reconnect task"
    assert not errors, errors
