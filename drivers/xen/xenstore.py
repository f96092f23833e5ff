"""An asyncio client of XenStore's wire protocol over xenstored's UNIX socket.

Why not pyxs: it is thread-based and stops at message type 19. The protocol is small:
a 16-byte header ``type, req_id, tx_id, len`` (uint32, host order) and a payload of at
most 4096 bytes. Path arguments are NUL-terminated; a WRITE's value follows its path's
NUL unterminated; errors come back as ERROR with an errno name (``ENOENT``). Watch
events (``path\\0token\\0``) arrive unsolicited, interleaved with replies, so one reader
task routes replies to their request by id and events into a bounded queue.

:class:`XenStoreClient` is one connection; :class:`XenStoreSession` keeps one alive for
the agent (reconnect with backoff after EOF, re-register watches, tell the owner to
resync, because anything may have happened while it was away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from drivers.xen.settings import XenStoreSettings
from virtbus.aio import backoff_delays
from virtbus.errors import OperationFailed, OperationTimeout, ProtocolError

log = logging.getLogger(__name__)
T = TypeVar("T")

HEADER = struct.Struct("=IIII")  # type, req_id, tx_id, len: host byte order
PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX
ABS_PATH_MAX = 3072  # XENSTORE_ABS_PATH_MAX
UINT32 = 0xFFFFFFFF


class Op(IntEnum):
    """xs_wire.h message types."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


class XenStoreError(OperationFailed):
    """xenstored answered ERROR; ``errno`` is the name it sent (``ENOENT``, ``EAGAIN``...)."""

    def __init__(self, errno: str, message: str = "") -> None:
        super().__init__(f"xenstore: {errno}" + (f" ({message})" if message else ""))
        self.errno = errno


class NoEntry(XenStoreError):
    """ENOENT: the path does not exist."""


class TryAgain(XenStoreError):
    """EAGAIN: a transaction conflicted; retry it from the start."""


class AccessDenied(XenStoreError):
    """EACCES."""


class ConnectionLost(OperationFailed):
    """The socket reached EOF or broke (e.g. xenstored restarted)."""


_ERRNO_CLASSES: dict[str, type[XenStoreError]] = {
    "ENOENT": NoEntry,
    "EAGAIN": TryAgain,
    "EACCES": AccessDenied,
}


def error_from_payload(payload: bytes, context: str = "") -> XenStoreError:
    """Turn an ERROR payload (``b"ENOENT\\0"``) into its typed error."""
    name = payload.split(b"\0", 1)[0].decode("ascii", "replace") or "EIO"
    return _ERRNO_CLASSES.get(name, XenStoreError)(name, context)


@dataclass(frozen=True, slots=True)
class Packet:
    op: int
    req_id: int
    tx_id: int
    payload: bytes


def check_path(path: str) -> bytes:
    """A path argument, NUL-terminated; NUL inside a path or an oversize path is refused."""
    raw = path.encode()
    if b"\0" in raw:
        raise ValueError(f"xenstore path contains NUL: {path!r}")
    if not raw:
        raise ValueError("empty xenstore path")
    if len(raw) > ABS_PATH_MAX:
        raise ValueError(f"xenstore path longer than {ABS_PATH_MAX} bytes")
    return raw + b"\0"


def encode(op: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """One message; the payload limit is enforced here, before anything is sent."""
    if len(payload) > PAYLOAD_MAX:
        raise ValueError(f"xenstore payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
    for name, value in (("req_id", req_id), ("tx_id", tx_id), ("type", op)):
        if not 0 <= value <= UINT32:
            raise ValueError(f"xenstore {name} {value} is not a uint32")
    return HEADER.pack(op, req_id, tx_id, len(payload)) + payload


class Decoder:
    """Splits a byte stream into packets; an oversize length is a protocol error."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        self._buf += data
        out: list[Packet] = []
        while len(self._buf) >= HEADER.size:
            op, req_id, tx_id, length = HEADER.unpack_from(self._buf)
            if length > PAYLOAD_MAX:
                raise ProtocolError(f"xenstore message of {length} bytes exceeds {PAYLOAD_MAX}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            out.append(Packet(op, req_id, tx_id, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return out


def split_strings(payload: bytes) -> list[str]:
    """NUL-separated strings (DIRECTORY replies, watch events); the trailing NUL is dropped."""
    if not payload:
        return []
    parts = payload.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return [p.decode(errors="replace") for p in parts]  # bad bytes must not kill the reader


@dataclass(frozen=True, slots=True)
class WatchEvent:
    path: str
    token: str


class XenStoreClient:
    """One connection to xenstored. Requests may run concurrently (matched by req_id)."""

    def __init__(self, settings: XenStoreSettings | None = None) -> None:
        self._s = settings or XenStoreSettings()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Packet]] = {}
        self._next_id = 1
        self._events: asyncio.Queue[WatchEvent | None] = asyncio.Queue(self._s.event_queue)
        self.closed = asyncio.Event()

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(self._s.connect_timeout):
                self._reader, self._writer = await asyncio.open_unix_connection(self._s.path)
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(f"cannot connect to xenstored at {self._s.path}: {exc}") from exc
        self._task = asyncio.create_task(self._read_loop(), name=f"xenstore:{self._s.path}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # never swallows our own caller's cancellation
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._lost("connection closed")

    def _lost(self, why: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(why))
        self._pending.clear()
        if not self.closed.is_set():
            self.closed.set()
            if self._events.full():  # the end must reach the consumer: drop an event for it
                self._events.get_nowait()
            self._events.put_nowait(None)

    async def _read_loop(self) -> None:
        assert self._reader is not None
        decoder = Decoder()
        why = "EOF from xenstored"
        try:
            while data := await self._reader.read(65536):
                for pkt in decoder.feed(data):
                    self._dispatch(pkt)
        except (OSError, ProtocolError) as exc:
            why = f"xenstore connection broken: {exc}"
        finally:
            self._lost(why)

    def _dispatch(self, pkt: Packet) -> None:
        if pkt.op == Op.WATCH_EVENT:
            parts = split_strings(pkt.payload)
            event = WatchEvent(parts[0] if parts else "", parts[1] if len(parts) > 1 else "")
            try:
                self._events.put_nowait(event)
            except asyncio.QueueFull:  # the consumer is behind: it will resync anyway
                log.warning("xenstore watch queue full; dropping %s", event.path)
            return
        fut = self._pending.pop(pkt.req_id, None)
        if fut is not None and not fut.done():
            fut.set_result(pkt)

    def _new_id(self) -> int:
        while True:
            req_id = self._next_id
            self._next_id = (self._next_id + 1) & UINT32  # wraps as a uint32
            if req_id not in self._pending:
                return req_id

    async def request(self, op: Op, payload: bytes, tx_id: int = 0) -> bytes:
        """Send one request and wait for its reply payload (ERROR raises its typed error)."""
        if self._writer is None or self.closed.is_set():
            raise ConnectionLost("not connected to xenstored")
        req_id = self._new_id()
        frame = encode(op, req_id, tx_id, payload)
        fut: asyncio.Future[Packet] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            self._writer.write(frame)
            await self._writer.drain()
            async with asyncio.timeout(self._s.request_timeout):
                pkt = await fut
        except TimeoutError:
            raise OperationTimeout(f"xenstore {op.name} timed out") from None
        except OSError as exc:
            raise ConnectionLost(f"xenstore write failed: {exc}") from exc
        finally:
            self._pending.pop(req_id, None)
        if pkt.op == Op.ERROR:
            raise error_from_payload(pkt.payload, f"{op.name} {payload[:80]!r}")
        return pkt.payload

    # --- operations -----------------------------------------------------------------
    async def read(self, path: str, tx: int = 0) -> bytes:
        return await self.request(Op.READ, check_path(path), tx)

    async def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else value
        await self.request(Op.WRITE, check_path(path) + data, tx)

    async def directory(self, path: str, tx: int = 0) -> list[str]:
        return split_strings(await self.request(Op.DIRECTORY, check_path(path), tx))

    async def mkdir(self, path: str, tx: int = 0) -> None:
        await self.request(Op.MKDIR, check_path(path), tx)

    async def rm(self, path: str, tx: int = 0) -> None:
        await self.request(Op.RM, check_path(path), tx)

    async def get_domain_path(self, domid: int) -> str:
        return (
            (await self.request(Op.GET_DOMAIN_PATH, check_path(str(domid)))).rstrip(b"\0").decode()
        )

    async def watch(self, path: str, token: str) -> None:
        await self.request(Op.WATCH, check_path(path) + check_path(token))

    async def unwatch(self, path: str, token: str) -> None:
        await self.request(Op.UNWATCH, check_path(path) + check_path(token))

    async def transaction_start(self) -> int:
        reply = await self.request(Op.TRANSACTION_START, b"\0")
        return int(reply.rstrip(b"\0"))

    async def transaction_end(self, tx: int, commit: bool = True) -> None:
        await self.request(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    async def transaction(self, body: Callable[[int], Awaitable[T]]) -> T:
        """Run ``body(tx_id)`` in a transaction; retried from the start on EAGAIN."""
        delays = backoff_delays(self._s.transaction_backoff)
        for attempt in range(self._s.transaction_retries + 1):
            tx = await self.transaction_start()
            try:
                result = await body(tx)
            except BaseException:
                with contextlib.suppress(XenStoreError, ConnectionLost):
                    await self.transaction_end(tx, commit=False)
                raise
            try:
                await self.transaction_end(tx, commit=True)
                return result
            except TryAgain:
                if attempt == self._s.transaction_retries:
                    raise
                await asyncio.sleep(next(delays))
        raise AssertionError("unreachable")

    async def events(self) -> AsyncIterator[WatchEvent]:
        """Watch events until the connection ends."""
        while (event := await self._events.get()) is not None:
            yield event


class XenStoreSession:
    """The agent's one persistent connection: reconnects, re-watches, asks for resyncs.

    ``on_event(event)`` gets every watch event; ``on_connected()`` runs after each
    (re)connect once the watches are registered — the owner does a full resync there.
    """

    def __init__(
        self,
        watches: Iterable[str],
        on_event: Callable[[WatchEvent], None],
        on_connected: Callable[[], Awaitable[None]],
        settings: XenStoreSettings | None = None,
    ) -> None:
        self._s = settings or XenStoreSettings()
        self._watches = tuple(watches)
        self._on_event = on_event
        self._on_connected = on_connected
        self.client: XenStoreClient | None = None
        self.connects = 0
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Forever: connect, watch, resync, consume; on EOF back off and start over."""
        delays = backoff_delays(self._s.reconnect)
        while True:
            client = XenStoreClient(self._s)
            try:
                await client.connect()
                for path in self._watches:
                    await client.watch(path, f"virtbus:{path}")
            except (ConnectionLost, XenStoreError, OperationTimeout) as exc:
                await client.close()
                delay = next(delays)
                log.warning("xenstore unavailable (%s); retry in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            self.client = client
            self.connects += 1
            self.connected.set()
            try:
                healthy = await self._consume(client)
            finally:
                self.connected.clear()
                self.client = None
                await client.close()
            if healthy:
                delays = backoff_delays(self._s.reconnect)
                log.warning("xenstore connection lost; reconnecting")
            else:  # the resync itself failed: do not hammer xenstored
                delay = next(delays)
                log.warning("xenstore session failed; reconnecting in %.2f s", delay)
                await asyncio.sleep(delay)

    async def _consume(self, client: XenStoreClient) -> bool:
        """Resync, then deliver events until EOF; False if the connection failed us.

        A bug in a callback is logged and skipped: it must not end the session (and with
        it every later event); a lost or stuck connection ends this one, to reconnect.
        """
        try:
            try:
                await self._on_connected()
            except (ConnectionLost, OperationTimeout, XenStoreError):
                raise
            except Exception:
                log.exception("xenstore on_connected callback failed")
            async for event in client.events():
                try:
                    self._on_event(event)
                except Exception:
                    log.exception("xenstore watch callback failed on %s", event.path)
        except (ConnectionLost, OperationTimeout, XenStoreError) as exc:
            log.warning("xenstore resync failed: %s", exc)
            return False
        return True
