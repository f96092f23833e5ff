"""XenStore wire codec and asyncio client.

A real xenstored cannot run without the hypervisor (docs/xen-testbed.md), so the
client is exercised here against a small in-process server speaking the same wire
format; the real one is exercised in the nested-Xen test (tests/e2e/test_xen_nested.py).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.xen.settings import XenStoreSettings
from drivers.xen.xenstore import (
    HEADER,
    PAYLOAD_MAX,
    ConnectionLost,
    Decoder,
    NoEntry,
    Op,
    TryAgain,
    WatchEvent,
    XenStoreClient,
    XenStoreError,
    XenStoreSession,
    check_path,
    encode,
    error_from_payload,
    split_strings,
)
from virtbus.errors import ProtocolError
from virtbus.settings import Backoff

# --- codec -------------------------------------------------------------------------------


def test_header_is_four_host_order_uint32() -> None:
    frame = encode(Op.READ, 7, 3, b"/a\0")
    assert frame[:16] == struct.pack("=IIII", 2, 7, 3, 3) and frame[16:] == b"/a\0"


def test_payload_limit_is_enforced_before_sending() -> None:
    assert len(encode(Op.WRITE, 1, 0, b"x" * PAYLOAD_MAX)) == 16 + PAYLOAD_MAX
    with pytest.raises(ValueError, match="exceeds 4096"):
        encode(Op.WRITE, 1, 0, b"x" * (PAYLOAD_MAX + 1))


@pytest.mark.parametrize("req_id", [-1, 1 << 32])
def test_request_ids_are_uint32(req_id: int) -> None:
    with pytest.raises(ValueError, match="uint32"):
        encode(Op.READ, req_id, 0, b"/\0")
    encode(Op.READ, 0xFFFFFFFF, 0, b"/\0")


def test_paths_are_nul_terminated_and_may_not_contain_nul() -> None:
    assert check_path("/local/domain/0") == b"/local/domain/0\0"
    with pytest.raises(ValueError, match="NUL"):
        check_path("/a\0b")
    with pytest.raises(ValueError):
        check_path("")
    with pytest.raises(ValueError, match="longer"):
        check_path("/" + "a" * 3072)


def test_decoder_reassembles_split_frames_and_refuses_oversize() -> None:
    data = encode(Op.WATCH_EVENT, 0, 0, b"@releaseDomain\0tok\0") + encode(Op.READ, 5, 0, b"v")
    dec = Decoder()
    got = [p for i in range(len(data)) for p in dec.feed(data[i : i + 1])]
    assert [(p.op, p.req_id, p.payload) for p in got] == [
        (15, 0, b"@releaseDomain\0tok\0"),
        (2, 5, b"v"),
    ]
    with pytest.raises(ProtocolError, match="exceeds"):
        Decoder().feed(HEADER.pack(2, 1, 0, PAYLOAD_MAX + 1))


def test_error_payloads_become_typed_errors() -> None:
    assert isinstance(error_from_payload(b"ENOENT\0"), NoEntry)
    assert isinstance(error_from_payload(b"EAGAIN\0"), TryAgain)
    other = error_from_payload(b"EINVAL\0")
    assert type(other) is XenStoreError and other.errno == "EINVAL"
    assert error_from_payload(b"").errno == "EIO"
    assert split_strings(b"a\0b\0") == ["a", "b"] and split_strings(b"") == []


# --- a tiny xenstored --------------------------------------------------------------------


class FakeXenstored:
    """Enough of xenstored for the client: a flat store, watches, transactions, EAGAIN."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store: dict[str, bytes] = {"/local/domain/0/name": b"Domain-0"}
        self.watches: list[tuple[asyncio.StreamWriter, str, str]] = []
        self.conflicts = 0  # commits to answer with EAGAIN
        self.seen_ids: list[int] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        self.kick()
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=2)
        await self.server.wait_closed()

    def kick(self) -> None:
        """Drop every client (xenstored restarting)."""
        for w in self.writers:
            w.close()
        self.writers.clear()
        self.watches.clear()

    def fire(self, path: str) -> None:
        for w, wpath, token in self.watches:
            if path.startswith(wpath) or wpath == path:
                w.write(encode(Op.WATCH_EVENT, 0, 0, f"{path}\0{token}\0".encode()))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        dec = Decoder()
        try:
            while data := await reader.read(65536):
                for pkt in dec.feed(data):
                    self.seen_ids.append(pkt.req_id)
                    op, reply = self._handle(writer, pkt.op, pkt.payload)
                    writer.write(encode(op, pkt.req_id, pkt.tx_id, reply))
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _handle(self, w: asyncio.StreamWriter, op: int, payload: bytes) -> tuple[int, bytes]:
        args = payload.split(b"\0")
        path = args[0].decode()
        if op == Op.READ:
            if path not in self.store:
                return Op.ERROR, b"ENOENT\0"
            return op, self.store[path]
        if op == Op.WRITE:
            self.store[path] = payload[len(args[0]) + 1 :]
            self.fire(path)
            return op, b"OK\0"
        if op == Op.DIRECTORY:
            kids = sorted(
                {k[len(path) + 1 :].split("/")[0] for k in self.store if k.startswith(path + "/")}
            )
            return op, b"".join(k.encode() + b"\0" for k in kids)
        if op == Op.WATCH:
            self.watches.append((w, path, args[1].decode()))
            w.write(encode(Op.WATCH_EVENT, 0, 0, payload))  # fires once on registration
            return op, b"OK\0"
        if op == Op.TRANSACTION_START:
            return op, b"17\0"
        if op == Op.TRANSACTION_END:
            if payload.startswith(b"T") and self.conflicts:
                self.conflicts -= 1
                return Op.ERROR, b"EAGAIN\0"
            return op, b"OK\0"
        if op == Op.GET_DOMAIN_PATH:
            return op, f"/local/domain/{path}\0".encode()
        return Op.ERROR, b"EINVAL\0"


@pytest.fixture
async def xsd(tmp_path: Path) -> AsyncIterator[FakeXenstored]:
    server = FakeXenstored(tmp_path / "socket")
    await server.start()
    yield server
    await server.stop()


def settings(server: FakeXenstored) -> XenStoreSettings:
    return XenStoreSettings(
        path=str(server.path), request_timeout=2.0, reconnect=Backoff(0.01, 0.05)
    )


async def test_client_read_write_directory_and_errors(xsd: FakeXenstored) -> None:
    client = XenStoreClient(settings(xsd))
    await client.connect()
    try:
        assert await client.read("/local/domain/0/name") == b"Domain-0"
        await client.write("/local/domain/0/data/x", b"\x01\x02")
        assert await client.read("/local/domain/0/data/x") == b"\x01\x02"
        assert await client.directory("/local/domain/0") == ["data", "name"]
        assert await client.get_domain_path(3) == "/local/domain/3"
        with pytest.raises(NoEntry):
            await client.read("/nope")
        with pytest.raises(XenStoreError) as err:
            await client.mkdir("/x")
        assert err.value.errno == "EINVAL"
        with pytest.raises(ValueError):
            await client.write("/big", b"x" * PAYLOAD_MAX)  # path + value over the limit
        results = await asyncio.gather(*(client.read("/local/domain/0/name") for _ in range(20)))
        assert set(results) == {b"Domain-0"}
    finally:
        await client.close()


async def test_request_ids_wrap_as_uint32(xsd: FakeXenstored) -> None:
    client = XenStoreClient(settings(xsd))
    await client.connect()
    client._next_id = 0xFFFFFFFF
    await client.read("/local/domain/0/name")
    await client.read("/local/domain/0/name")
    await client.close()
    assert xsd.seen_ids[-2:] == [0xFFFFFFFF, 0]


async def test_watches_fire_on_registration_and_on_change(xsd: FakeXenstored) -> None:
    client = XenStoreClient(settings(xsd))
    await client.connect()
    await client.watch("@releaseDomain", "tok")
    xsd.fire("@releaseDomain")
    events = client.events()
    got = [await anext(events), await anext(events)]
    assert got == [WatchEvent("@releaseDomain", "tok")] * 2
    await client.close()


async def test_transaction_retries_on_eagain(xsd: FakeXenstored) -> None:
    client = XenStoreClient(settings(xsd))
    await client.connect()
    xsd.conflicts = 2
    calls: list[int] = []

    async def body(tx: int) -> str:
        calls.append(tx)
        await client.write("/t", b"1", tx)
        return "done"

    assert await client.transaction(body) == "done" and calls == [17, 17, 17]
    xsd.conflicts = 100
    with pytest.raises(TryAgain):
        await client.transaction(body)
    await client.close()


async def test_eof_fails_pending_and_ends_events(xsd: FakeXenstored) -> None:
    client = XenStoreClient(settings(xsd))
    await client.connect()
    await client.read("/local/domain/0/name")  # the server has seen the connection
    xsd.kick()
    async with asyncio.timeout(2):
        await client.closed.wait()
    assert [e async for e in client.events()] == []
    with pytest.raises(ConnectionLost):
        await client.read("/local/domain/0/name")
    await client.close()


async def test_session_reconnects_rewatches_and_resyncs(xsd: FakeXenstored) -> None:
    events: list[WatchEvent] = []
    resyncs: list[int] = []

    async def on_connected() -> None:
        resyncs.append(1)

    session = XenStoreSession(["@introduceDomain"], events.append, on_connected, settings(xsd))
    task = asyncio.create_task(session.run())
    try:
        async with asyncio.timeout(3):
            await session.connected.wait()
            xsd.kick()  # xenstored restarts
            while session.connects < 2 or not session.connected.is_set():
                await asyncio.sleep(0.01)
            xsd.fire("@introduceDomain")
            while len(events) < 3:
                await asyncio.sleep(0.01)
        assert len(resyncs) == 2 and len(xsd.watches) == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_session_survives_callback_bugs_and_a_failed_resync(xsd: FakeXenstored) -> None:
    """A bug in a callback is logged and skipped; a resync cut off by a lost connection
    (or a request timeout) ends that connection and the session reconnects."""
    events: list[WatchEvent] = []
    resyncs: list[int] = []

    def on_event(event: WatchEvent) -> None:
        events.append(event)
        if len(events) == 1:
            raise KeyError("bug in the watch callback")

    async def on_connected() -> None:
        resyncs.append(1)
        if len(resyncs) == 1:
            raise RuntimeError("bug in the resync callback")  # keeps this connection
        if len(resyncs) == 2:
            raise ConnectionLost("xenstored went away mid-resync")  # reconnects

    session = XenStoreSession(["@introduceDomain"], on_event, on_connected, settings(xsd))
    task = asyncio.create_task(session.run())
    try:
        async with asyncio.timeout(3):
            while len(events) < 1:  # the watch fires on registration: its callback raises
                await asyncio.sleep(0.01)
            xsd.fire("@introduceDomain")
            while len(events) < 2:
                await asyncio.sleep(0.01)
            assert session.connects == 1 and not task.done()
            xsd.kick()
            while len(resyncs) < 3 or not session.connected.is_set():
                await asyncio.sleep(0.01)
            xsd.fire("@introduceDomain")
            while len(events) < 4:  # registration event of connection 3, then this one
                await asyncio.sleep(0.01)
        assert session.connects == 3 and not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
