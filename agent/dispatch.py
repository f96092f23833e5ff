"""Per-domain serialisation of commands, and the memory of recent call ids.

Commands for one domain run strictly one after another (one worker per domain, created
on demand, gone when idle); commands for different domains run concurrently. The key is
the domain's *name* (a UUID ref is resolved first), so a call by name and a call by UUID
for the same guest queue behind each other. The number of queued commands is bounded by
the bus prefetch, so the per-domain queues need no bound of their own.

A redelivered call (same id) is answered from memory — the same future, finished or not —
and never executed twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from virtbus.aio import TaskGroup
from virtbus.errors import InternalError, OperationTimeout, VirtbusError
from virtbus.protocol.envelope import Envelope, error_body, ok_body

log = logging.getLogger(__name__)

Reply = dict[str, Any]
Execute = Callable[[Envelope], Awaitable[Any]]
KeyOf = Callable[[Envelope], str | None]


@dataclass(slots=True)
class _Job:
    call: Envelope
    reply: asyncio.Future[Reply]


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
    """Turns calls into replies: dedup, per-domain ordering, timeouts, error mapping."""

    def __init__(
        self,
        execute: Execute,
        key_of: KeyOf,
        *,
        command_timeout: float,
        call_memory: int,
    ) -> None:
        self._execute = execute
        self._key_of = key_of
        self._timeout = command_timeout
        self._memory = CallMemory(call_memory)
        self._queues: dict[str, asyncio.Queue[_Job]] = {}
        self._tasks = TaskGroup("dispatch")
        self.executed = 0  # commands actually run (redeliveries excluded)

    def submit(self, call: Envelope) -> Awaitable[Reply]:
        """Called in delivery order; never blocks. Returns the future reply body."""
        known = self._memory.get(call.id)
        if known is not None:
            log.info("call %s (%s) redelivered: answering from memory", call.id, call.op)
            return known
        reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._memory.remember(call.id, reply)
        try:
            key = self._key_of(call)
        except VirtbusError as exc:
            reply.set_result(error_body(exc.code, exc.message))
            return reply
        job = _Job(call, reply)
        if key is None:
            self._tasks.spawn(self._run(job), name=f"call:{call.op}")
            return reply
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = asyncio.Queue()
            self._tasks.spawn(self._worker(key, queue), name=f"domain:{key}")
        queue.put_nowait(job)
        return reply

    async def _worker(self, key: str, queue: asyncio.Queue[_Job]) -> None:
        # No await between the emptiness check and the removal: a job submitted later
        # either lands before the check or finds no queue and starts a new worker.
        while not queue.empty():
            await self._run(queue.get_nowait())
        del self._queues[key]

    async def _run(self, job: _Job) -> None:
        if job.reply.done():
            return
        self.executed += 1
        try:
            result = await asyncio.wait_for(self._execute(job.call), self._timeout)
            body = ok_body(result)
        except asyncio.CancelledError:
            if not job.reply.done():
                job.reply.set_result(error_body("OPERATION_FAILED", "agent stopped mid-command"))
            raise
        except TimeoutError:
            err = OperationTimeout(f"{job.call.op} did not finish within {self._timeout:g} s")
            body = error_body(err.code, err.message)
        except VirtbusError as exc:
            body = error_body(exc.code, exc.message)
        except Exception as exc:  # a bug must become a reply, not a dead worker
            log.exception("call %s (%s) failed unexpectedly", job.call.id, job.call.op)
            err = InternalError(f"{type(exc).__name__}: {exc}")
            body = error_body(err.code, err.message)
        if not job.reply.done():
            job.reply.set_result(body)

    @property
    def busy(self) -> int:
        return len(self._tasks)

    async def stop(self, grace: float) -> None:
        """Finish the commands in hand within ``grace``; cancel the rest."""
        await self._tasks.stop(grace)
