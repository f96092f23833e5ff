"""Per-domain serialisation of commands, and the memory of recent call ids.

Commands for one domain run strictly one after another; commands for different domains
run concurrently. The key is
the domain's *name* (a UUID ref is resolved first), so a call by name and a call by UUID
for the same guest queue behind each other. The number of waiting commands is bounded by
the bus prefetch, so the per-domain chains need no bound of their own.

A redelivered call (same id, same op, same body) is answered from memory — the same
future, finished or not — and never executed twice. A call that reuses an id for another
op or body is refused with RPC_ERROR, never given the other call's answer. Every future
the memory holds is completed on every path (a reply, an error reply, or "agent stopped"),
so a redelivery can never wait on an answer that will not come.

The dispatcher knows nothing of ops: ``prepare`` (the agent's) turns a call into a
:class:`Prepared` — its declared op, its serialisation key and the handler bound to its
decoded request — or raises the typed error that becomes the reply. Observers (metrics)
see every call's reply when it is ready.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from agent.calllog import CallLog
from virtbus import faults
from virtbus.bus.rpc import body_from_exception
from virtbus.errors import (
    InternalError,
    OperationFailed,
    OperationTimeout,
    ProtocolError,
    VirtbusError,
)
from virtbus.protocol.base import Message, to_wire
from virtbus.protocol.envelope import Envelope, error_body, ok_body
from virtbus.protocol.registry import REGISTRY, Op

log = logging.getLogger(__name__)


Reply = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A call ready to run: what it is, what it is serialised on, and the bound handler."""

    op: Op[Any, Any]
    key: str | None
    run: Callable[[], Awaitable[Message]]


Prepare = Callable[[Envelope], Prepared]
# (call, seconds from delivery to reply, reply body): every call run or refused, once.
Auditor = Callable[[Envelope, float, Reply], None]
# (op, seconds from delivery to reply, reply body): called once per call answered.
Observer = Callable[[str, float, Reply], None]


def call_fingerprint(call: Envelope) -> str:
    """``op:digest-of-body-and-caller``: what makes a second delivery of an id *the same*
    call (maps encoded with sorted keys, so the same body always digests the same).

    An idempotent op (an upload chunk: 1 MiB written at its offset) is fingerprinted by
    its op alone: running it again is harmless, and hashing every chunk would cost more
    than writing it.
    """
    # The caller is part of the call: another user reusing an id is refused, never given
    # the first caller's answer (an idempotent op's too: its repeat skips the policy).
    user = b"\0" + call.user.encode() if call.user else b""
    declared = REGISTRY.get(call.op)
    if declared is not None and declared.idempotent:
        return f"{call.op}:idempotent-{hashlib.blake2b(user, digest_size=8).hexdigest()}"
    try:
        packed = msgspec.msgpack.encode(call.body, order="sorted")
    except (TypeError, ValueError, OverflowError):  # only bodies built in-process
        packed = repr(call.body).encode()
    digest = hashlib.blake2b(packed, digest_size=16)
    digest.update(user)
    return f"{call.op}:{digest.hexdigest()}"


def _op_of(fingerprint: str) -> str:
    return fingerprint.rpartition(":")[0]


class CallMemory:
    """Bounded LRU of call id -> (fingerprint, reply future), the answer to a redelivery.

    The fingerprint is None for replies restored from a call log written before
    fingerprints existed: those match on the id alone.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._replies: OrderedDict[str, tuple[str | None, asyncio.Future[Reply]]] = OrderedDict()

    def get(self, call_id: str) -> tuple[str | None, asyncio.Future[Reply]] | None:
        return self._replies.get(call_id)

    def remember(self, call_id: str, fingerprint: str | None, reply: asyncio.Future[Reply]) -> None:
        self._replies[call_id] = (fingerprint, reply)
        while len(self._replies) > self._size:
            self._replies.popitem(last=False)

    def __len__(self) -> int:
        return len(self._replies)


class Dispatcher:
    """Turns calls into replies: dedup, per-domain ordering, timeouts, error mapping.

    Ordering is a chain, not a worker: each call for a domain waits for the reply future
    of the call submitted before it, then runs in the transport's own task. No task and
    no queue per call on the hot path; the chain's length is bounded by the prefetch.
    """

    def __init__(
        self,
        prepare: Prepare,
        *,
        command_timeout: float,
        call_memory: int,
        call_log: CallLog | None = None,
        auditor: Auditor | None = None,
        events_durable: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._prepare = prepare
        self._events_durable = events_durable
        self._auditor = auditor
        self._call_log = call_log
        self._observers: list[Observer] = []
        self._timeout = command_timeout
        self._memory = CallMemory(call_memory)
        self._tails: dict[str, asyncio.Future[Reply]] = {}  # last call submitted per domain
        # call id -> (fingerprint, reply on disk, the delivery recorded): what before_ack
        # waits for
        self._recording: dict[str, tuple[str, asyncio.Future[None], Envelope]] = {}
        self.executed = 0  # commands actually run (redeliveries excluded)

    def submit(self, call: Envelope) -> Awaitable[Reply]:
        """Called in delivery order; never blocks. Returns the awaitable reply body."""
        fingerprint = call_fingerprint(call)
        known = self._memory.get(call.id)
        if known is not None:
            seen, answer = known
            if seen is not None and seen != fingerprint:
                log.warning(
                    "call id %s reused for %s (first used for %s): refused",
                    call.id,
                    call.op,
                    _op_of(seen),
                )
                return _answered(
                    error_body(
                        ProtocolError(
                            f"call id {call.id!r} was already used for a different call "
                            f"({_op_of(seen)}): every call needs an id of its own"
                        )
                    )
                )
            log.info("call %s (%s) redelivered: answering from memory", call.id, call.op)
            return asyncio.shield(answer)  # a cancelled waiter must not cancel the answer
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Reply] = loop.create_future()
        self._memory.remember(call.id, fingerprint, reply)
        started = loop.time()
        if self._observers:
            reply.add_done_callback(lambda f: self._observe(call.op, loop.time() - started, f))
        if self._auditor is not None:
            reply.add_done_callback(lambda f: self._audit(call, loop.time() - started, f))
        try:
            prepared = self._prepare(call)
        except VirtbusError as exc:
            reply.set_result(error_body(exc))
            return reply
        except Exception as exc:  # a bug must become a reply, not a dead consumer
            log.exception("call %s (%s) could not be prepared", call.id, call.op)
            reply.set_result(error_body(InternalError(f"{type(exc).__name__}: {exc}")))
            return reply
        before = None
        if prepared.key is not None:
            before = self._tails.get(prepared.key)
            self._tails[prepared.key] = reply
        return self._run(call, fingerprint, prepared, reply, before)

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    def _audit(self, call: Envelope, seconds: float, reply: asyncio.Future[Reply]) -> None:
        if reply.cancelled() or self._auditor is None:
            return
        try:
            self._auditor(call, seconds, reply.result())
        except Exception:  # the audit's bug must not touch the call path
            log.exception("call auditor failed")

    def _observe(self, op: str, seconds: float, reply: asyncio.Future[Reply]) -> None:
        if reply.cancelled():
            return
        for observer in self._observers:
            try:
                observer(op, seconds, reply.result())
            except Exception:  # an observer's bug must not touch the call path
                log.exception("call observer failed")

    async def _run(
        self,
        call: Envelope,
        fingerprint: str,
        prepared: Prepared,
        reply: asyncio.Future[Reply],
        before: asyncio.Future[Reply] | None,
    ) -> Reply:
        key = prepared.key
        try:
            if before is not None and not before.done():
                await asyncio.wait([before])  # never cancels the predecessor
            if not reply.done():
                body = await self._execute_once(call, prepared)
                if self._call_log is not None and prepared.op.journaled:
                    self._record(call, fingerprint, body)
                reply.set_result(body)
        except asyncio.CancelledError:
            if not reply.done():
                reply.set_result(error_body(OperationFailed("agent stopped mid-command")))
            raise
        except Exception as exc:  # the future must complete, whatever failed
            log.exception("call %s (%s): dispatch failed", call.id, call.op)
            if not reply.done():
                reply.set_result(body_from_exception(exc, call.op))
        finally:
            if key is not None and self._tails.get(key) is reply:
                del self._tails[key]
        return reply.result()

    def _record(self, call: Envelope, fingerprint: str, body: Reply) -> None:
        """Written while the reply travels; the ack waits for it (before_ack)."""
        assert self._call_log is not None
        recording = self._call_log.record(call.id, fingerprint, body)
        entry = (fingerprint, recording, call)
        self._recording[call.id] = entry

        def written(_done: asyncio.Future[None]) -> None:  # nothing left to wait for
            if self._recording.get(call.id) is entry:
                del self._recording[call.id]

        recording.add_done_callback(written)

    async def _execute_once(self, call: Envelope, prepared: Prepared) -> Reply:
        self.executed += 1
        try:
            async with asyncio.timeout(self._timeout):
                return ok_body(to_wire(await prepared.run()))
        except TimeoutError:
            err: VirtbusError = OperationTimeout(
                f"{call.op} did not finish within {self._timeout:g} s"
            )
        except VirtbusError as exc:
            err = exc
        except Exception as exc:  # a bug must become a reply, not a dead consumer
            log.exception("call %s (%s) failed unexpectedly", call.id, call.op)
            err = InternalError(f"{type(exc).__name__}: {exc}")
        return error_body(err)

    async def before_ack(self, call: Envelope) -> None:
        """The transport acks a call only once its reply is recorded: a call redelivered
        after a crash is then answered from the log instead of being run again. A call that
        changed something also waits for the events stamped so far to be on disk
        (``events_durable``): its own are among them, and an answered call whose events a
        crash lost would not run again to make them."""
        entry = self._recording.get(call.id)
        # The delivery that ran is the same call without digesting its body again; another
        # delivery of its id (a redelivery) waits too only if it is the same call.
        if entry is not None and (entry[2] is call or entry[0] == call_fingerprint(call)):
            del self._recording[call.id]
            await entry[1]
        declared = REGISTRY.get(call.op)
        if self._events_durable is not None and declared is not None and declared.mutating:
            await self._events_durable()
        if faults.stop_before_ack(call.op):  # the crash window of the crash tests
            log.warning("call %s (%s): stopping before its ack (fault injection)", call.id, call.op)
            os.kill(os.getpid(), signal.SIGSTOP)

    def restore(self, replies: list[tuple[str, str | None, Reply]]) -> None:
        """Answers remembered from before a restart (oldest first)."""
        loop = asyncio.get_running_loop()
        for call_id, fingerprint, body in replies:
            done: asyncio.Future[Reply] = loop.create_future()
            done.set_result(body)
            self._memory.remember(call_id, fingerprint, done)

    @property
    def pending_domains(self) -> int:
        return len(self._tails)


def _answered(body: Reply) -> asyncio.Future[Reply]:
    done: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    done.set_result(body)
    return done
