"""Per-domain serialisation of commands, and the memory of recent call ids.

Commands for one domain run strictly one after another; commands for different domains
run concurrently. The key is
the domain's *name* (a UUID ref is resolved first), so a call by name and a call by UUID
for the same guest queue behind each other. The number of waiting commands is bounded by
the bus prefetch, so the per-domain chains need no bound of their own.

A redelivered call (same id) is answered from memory — the same future, finished or not —
and never executed twice.

The dispatcher knows nothing of ops: ``prepare`` (the agent's) turns a call into a
:class:`Prepared` — its declared op, its serialisation key and the handler bound to its
decoded request — or raises the typed error that becomes the reply. Observers (metrics)
see every call's reply when it is ready.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent.calllog import CallLog
from virtbus.errors import InternalError, OperationTimeout, VirtbusError
from virtbus.protocol.base import Message, to_wire
from virtbus.protocol.envelope import Envelope, error_body, ok_body
from virtbus.protocol.registry import Op

log = logging.getLogger(__name__)

Reply = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A call ready to run: what it is, what it is serialised on, and the bound handler."""

    op: Op[Any, Any]
    key: str | None
    run: Callable[[], Awaitable[Message]]


Prepare = Callable[[Envelope], Prepared]
# (op, seconds from delivery to reply, reply body): called once per call answered.
Observer = Callable[[str, float, Reply], None]


class CallMemory:
    """Bounded LRU of call id -> reply future (the answer to give a redelivery)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._replies: OrderedDict[str, asyncio.Future[Reply]] = OrderedDict()

    def get(self, call_id: str) -> asyncio.Future[Reply] | None:
        return self._replies.get(call_id)

    def remember(self, call_id: str, reply: asyncio.Future[Reply]) -> None:
        self._replies[call_id] = reply
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
    ) -> None:
        self._prepare = prepare
        self._call_log = call_log
        self._observers: list[Observer] = []
        self._timeout = command_timeout
        self._memory = CallMemory(call_memory)
        self._tails: dict[str, asyncio.Future[Reply]] = {}  # last call submitted per domain
        self._recording: dict[str, asyncio.Future[None]] = {}  # call id -> reply on disk
        self.executed = 0  # commands actually run (redeliveries excluded)

    def submit(self, call: Envelope) -> Awaitable[Reply]:
        """Called in delivery order; never blocks. Returns the awaitable reply body."""
        known = self._memory.get(call.id)
        if known is not None:
            log.info("call %s (%s) redelivered: answering from memory", call.id, call.op)
            return asyncio.shield(known)  # a cancelled waiter must not cancel the answer
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Reply] = loop.create_future()
        self._memory.remember(call.id, reply)
        if self._observers:
            started = loop.time()
            reply.add_done_callback(lambda f: self._observe(call.op, loop.time() - started, f))
        try:
            prepared = self._prepare(call)
        except VirtbusError as exc:
            reply.set_result(error_body(exc.code, exc.message))
            return reply
        except Exception as exc:  # a bug must become a reply, not a dead consumer
            log.exception("call %s (%s) could not be prepared", call.id, call.op)
            reply.set_result(error_body(InternalError.code, f"{type(exc).__name__}: {exc}"))
            return reply
        before = None
        if prepared.key is not None:
            before = self._tails.get(prepared.key)
            self._tails[prepared.key] = reply
        return self._run(call, prepared, reply, before)

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

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
                if self._call_log is not None and prepared.op.mutating:
                    # Written while the reply travels; the ack waits for it (before_ack).
                    recording = self._call_log.record(call.id, body)
                    self._recording[call.id] = recording
                    # Once written there is nothing to wait for: never left behind.
                    recording.add_done_callback(functools.partial(self._recorded, call.id))
                reply.set_result(body)
        except asyncio.CancelledError:
            if not reply.done():
                reply.set_result(error_body("OPERATION_FAILED", "agent stopped mid-command"))
            raise
        finally:
            if key is not None and self._tails.get(key) is reply:
                del self._tails[key]
        return reply.result()

    def _recorded(self, call_id: str, _done: asyncio.Future[None]) -> None:
        self._recording.pop(call_id, None)

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
        return error_body(err.code, err.message)

    async def before_ack(self, call: Envelope) -> None:
        """The transport acks a call only once its reply is recorded: a call redelivered
        after a crash is then answered from the log instead of being run again."""
        recording = self._recording.pop(call.id, None)
        if recording is not None:
            await recording

    def restore(self, replies: list[tuple[str, Reply]]) -> None:
        """Answers remembered from before a restart (oldest first)."""
        loop = asyncio.get_running_loop()
        for call_id, body in replies:
            done: asyncio.Future[Reply] = loop.create_future()
            done.set_result(body)
            self._memory.remember(call_id, done)

    @property
    def pending_domains(self) -> int:
        return len(self._tails)
