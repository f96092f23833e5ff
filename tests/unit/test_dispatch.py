"""The agent's dispatcher: per-domain order, cross-domain concurrency, redelivery memory."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.dispatch import Dispatcher, Prepared
from virtbus.errors import OperationInvalid
from virtbus.protocol import ops
from virtbus.protocol.base import Accepted, Empty
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.protocol.registry import Access, Op, Service, Target

# An op of this test only (not registered): the dispatcher needs only its declaration.
TEST_OP: Op[Empty, Accepted] = Op(
    "test.op", Empty, Accepted, Service.AGENT, "a test op", access=Access.LIFECYCLE,
    target=Target.DOMAIN,
)  # fmt: skip


def _call(op: str, domain: str | None = None, call_id: str | None = None) -> Envelope:
    body = {"domain": domain} if domain else {}
    env = Envelope(kind=Kind.CALL, op=op, body=body)
    if call_id:
        env = Envelope(kind=Kind.CALL, op=op, body=body, id=call_id)
    return env


class Recorder:
    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.max_active: dict[str, int] = {}
        self.log: list[tuple[str, str]] = []
        self.overlap = 0
        self.running = 0

    async def execute(self, call: Envelope) -> Any:
        dom = call.body.get("domain", "-")
        self.active[dom] = self.active.get(dom, 0) + 1
        self.max_active[dom] = max(self.max_active.get(dom, 0), self.active[dom])
        self.running += 1
        self.overlap = max(self.overlap, self.running)
        self.log.append(("begin", call.id))
        await asyncio.sleep(0.001)
        self.log.append(("end", call.id))
        self.running -= 1
        self.active[dom] -= 1
        if call.op == "fail":
            raise OperationInvalid("nope")
        if call.op == "bug":
            raise ValueError("bug")
        return {"id": call.id}


def _dispatcher(rec: Recorder, timeout: float = 5.0) -> Dispatcher:
    def prepare(call: Envelope) -> Prepared:
        return Prepared(TEST_OP, call.body.get("domain"), lambda: rec.execute(call))

    return Dispatcher(prepare, command_timeout=timeout, call_memory=100)


async def test_one_domain_strictly_ordered_many_domains_concurrent() -> None:
    rec = Recorder()
    d = _dispatcher(rec)
    same = [_call("x", "d1") for _ in range(50)]
    replies = [d.submit(c) for c in same]
    others = [d.submit(_call("x", f"d{i}")) for i in range(2, 22)]
    await asyncio.gather(*replies, *others)
    assert rec.max_active["d1"] == 1
    order = [cid for kind, cid in rec.log if kind == "begin" and cid in {c.id for c in same}]
    assert order == [c.id for c in same]
    assert rec.overlap >= 10


async def test_redelivered_call_answered_not_rerun() -> None:
    rec = Recorder()
    d = _dispatcher(rec)
    call = _call("x", "d1", call_id="same")
    first = await d.submit(call)
    again = await d.submit(call)
    assert first == again == {"ok": True, "result": {"id": "same"}}
    assert d.executed == 1


async def test_errors_become_error_replies() -> None:
    rec = Recorder()
    d = _dispatcher(rec)
    assert (await d.submit(_call("fail", "d1")))["error"]["code"] == "OPERATION_INVALID"
    bug = await d.submit(_call("bug", "d1"))
    assert bug["error"]["code"] == "INTERNAL_ERROR" and "ValueError" in bug["error"]["message"]
    assert (await d.submit(_call("x", "d1")))["ok"] is True  # the worker survived


async def test_command_timeout() -> None:
    async def slow(call: Envelope) -> Any:
        await asyncio.sleep(10)

    d = Dispatcher(
        lambda call: Prepared(TEST_OP, None, lambda: slow(call)),
        command_timeout=0.05,
        call_memory=10,
    )
    reply = await d.submit(_call("x"))
    assert reply["error"]["code"] == "OPERATION_TIMEOUT"


async def test_a_failing_key_is_answered_and_so_is_its_redelivery() -> None:
    """A key function that raises (e.g. a definition whose XML does not parse) must still
    complete the remembered future: a redelivery of that id used to wait forever."""

    rec = Recorder()

    def prepare(call: Envelope) -> Prepared:
        if call.body.get("domain") == "poison":
            raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")
        return Prepared(TEST_OP, None, lambda: rec.execute(call))

    d = Dispatcher(prepare, command_timeout=5, call_memory=10)
    call = _call("x", "poison", call_id="p1")
    first = await asyncio.wait_for(d.submit(call), 1)
    again = await asyncio.wait_for(d.submit(call), 1)  # the redelivery: same answer, at once
    assert first == again
    assert first["error"]["code"] == "INTERNAL_ERROR" and "ValueError" in first["error"]["message"]
    assert d.executed == 0


async def test_an_id_reused_for_another_call_is_rpc_error_not_the_old_answer() -> None:
    rec = Recorder()
    d = _dispatcher(rec)
    assert (await d.submit(_call("x", "d1", call_id="same")))["ok"] is True
    other_op = await d.submit(_call("y", "d1", call_id="same"))
    other_body = await d.submit(_call("x", "d2", call_id="same"))
    for reply in (other_op, other_body):
        assert reply["ok"] is False and reply["error"]["code"] == "RPC_ERROR", reply
    assert "'x'" not in other_op["error"]["message"] and "(x)" in other_op["error"]["message"]
    assert d.executed == 1  # neither ran, and the first answer is still the one remembered
    assert (await d.submit(_call("x", "d1", call_id="same")))["result"] == {"id": "same"}


async def test_fingerprint_ignores_map_order_but_not_values() -> None:
    from agent.dispatch import call_fingerprint

    a = Envelope(Kind.CALL, "op", {"a": 1, "b": {"c": [1, 2], "d": "x"}})
    b = Envelope(Kind.CALL, "op", {"b": {"d": "x", "c": [1, 2]}, "a": 1})
    c = Envelope(Kind.CALL, "op", {"a": 1, "b": {"c": [2, 1], "d": "x"}})
    assert call_fingerprint(a) == call_fingerprint(b) != call_fingerprint(c)
    assert call_fingerprint(a) != call_fingerprint(Envelope(Kind.CALL, "op2", a.body))


async def test_fingerprint_holds_the_caller_for_every_op() -> None:
    """Another user reusing a call id is another call (refused), never the first caller's
    answer: an idempotent op (an upload chunk, fingerprinted without its body) included,
    whose repeat is answered from memory without the policy check."""
    from agent.dispatch import call_fingerprint

    for op in ("op", ops.STORAGE_VOL_UPLOAD_CHUNK):
        body = {"job": "j", "offset": 0, "data": b"x"}
        alice = Envelope(Kind.CALL, op, body, id="c1", user="alice")
        bob = Envelope(Kind.CALL, op, dict(body), id="c1", user="bob")
        again = Envelope(Kind.CALL, op, dict(body), id="c1", user="alice")
        assert call_fingerprint(alice) == call_fingerprint(again) != call_fingerprint(bob), op
        assert call_fingerprint(alice).rpartition(":")[0] == op


async def test_restored_replies_without_fingerprint_match_on_the_id() -> None:
    """Call logs written before fingerprints existed still answer their redeliveries."""
    rec = Recorder()
    d = _dispatcher(rec)
    old = {"ok": True, "result": "from before"}
    d.restore([("legacy", None, old), ("new", "x:00", old)])
    assert await d.submit(_call("x", "d1", call_id="legacy")) == old
    assert (await d.submit(_call("x", "d1", call_id="new")))["error"]["code"] == "RPC_ERROR"
    assert d.executed == 0


class HeldLog:
    """A call log whose writes finish when the test says (the dispatcher's before_ack
    must wait for them)."""

    def __init__(self) -> None:
        self.writes: list[asyncio.Future[None]] = []

    def record(self, call_id: str, fingerprint: str, body: Any) -> asyncio.Future[None]:
        self.writes.append(asyncio.get_running_loop().create_future())
        return self.writes[-1]


async def _acked(d: Dispatcher, call: Envelope) -> bool:
    """Whether before_ack(call) returns while the reply's write is still held: it does no
    I/O of its own, so a bounded number of loop turns (not a wall-clock wait, which a loaded
    machine can outrun) settles it either way."""
    ack = asyncio.ensure_future(d.before_ack(call))
    for _ in range(100):
        if ack.done():
            break
        await asyncio.sleep(0)
    done = ack.done()
    ack.cancel()
    return done


def _recording_dispatcher(log: HeldLog) -> Dispatcher:
    rec = Recorder()

    def prepare(call: Envelope) -> Prepared:
        return Prepared(TEST_OP, call.body.get("domain"), lambda: rec.execute(call))

    return Dispatcher(prepare, command_timeout=5.0, call_memory=100, call_log=log)  # type: ignore[arg-type]


def _redelivery_of(call: Envelope) -> Envelope:
    return Envelope(kind=call.kind, op=call.op, body=dict(call.body), id=call.id, ts=call.ts)


async def test_the_ack_waits_for_the_reply_on_disk_for_the_same_call_only() -> None:
    assert TEST_OP.journaled  # the premise: its replies are recorded
    reuse = Envelope(kind=Kind.CALL, op="test.op", body={"domain": "d2"}, id="c1")
    for acked, held in ((lambda c: c, True), (_redelivery_of, True), (lambda c: reuse, False)):
        log = HeldLog()
        d = _recording_dispatcher(log)
        call = _call("test.op", "d1", call_id="c1")
        await d.submit(call)
        assert len(log.writes) == 1 and not log.writes[0].done()
        # The delivery that ran, or a redelivery of it, waits for its record; another
        # call that reuses the id is not held by it.
        assert await _acked(d, acked(call)) is not held


async def test_the_ack_of_a_call_that_changed_something_waits_for_the_events_on_disk() -> None:
    """A define's ``defined`` event must be in the outbox's log before the define is acked
    (agent/outbox.py durable()); a read changes nothing and is not held."""
    held, asked = asyncio.Event(), []

    async def durable() -> None:
        asked.append(True)
        await held.wait()

    def prepare(call: Envelope) -> Prepared:
        raise AssertionError("before_ack prepares nothing")

    d = Dispatcher(prepare, command_timeout=5, call_memory=10, events_durable=durable)
    assert await _acked(d, _call(ops.DOMAIN_INFO, "d1")) and asked == []
    assert not await _acked(d, _call(ops.DOMAIN_DEFINE, "d1")) and asked == [True]
    held.set()
    assert await _acked(d, _call(ops.DOMAIN_DEFINE, "d1"))
