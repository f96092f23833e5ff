"""The pure QMP-event -> libvirt-event mapping of the QEMU driver, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from drivers.qemu.events import (
    Action,
    Context,
    Lifecycle,
    Outcome,
    Pending,
    map_event,
    map_exit,
    map_status,
    needs_status,
    pause_reason,
)
from virtbus.protocol.events import LIFECYCLE_DETAILS, OTHER_EVENTS, DomainState

S = DomainState
P = Pending
RUNNING = (S.RUNNING, "booted")


def ctx(
    state: tuple[DomainState, str] = RUNNING,
    pending: set[Pending] | None = None,
    **lifecycle: str,
) -> Context:
    return Context(state[0], state[1], Lifecycle(**lifecycle), frozenset(pending or ()))


def ev(*items: tuple[str, str | None] | tuple[str, str | None, dict[str, Any]]) -> tuple:
    return tuple((i[0], i[1], i[2] if len(i) == 3 else {}) for i in items)  # type: ignore[misc]


# (id, qmp event, data, context, status_reason, expected events, state, actions, add, clear)
CASES: list[tuple[Any, ...]] = [
    # start / suspend / resume
    ("start-resume", "RESUME", {}, ctx((S.PAUSED, "starting_up"), {P.START}), None,
     ev(("started", "booted")), RUNNING, (), set(), {P.START}),
    ("user-stop", "STOP", {}, ctx(RUNNING, {P.PAUSE}), None,
     ev(("suspended", "paused")), (S.PAUSED, "user"), (), set(), {P.PAUSE}),
    ("user-cont", "RESUME", {}, ctx((S.PAUSED, "user"), {P.RESUME}), None,
     ev(("resumed", "unpaused")), (S.RUNNING, "unpaused"), (), set(), {P.RESUME}),
    ("external-cont", "RESUME", {}, ctx((S.PAUSED, "unknown")), None,
     ev(("resumed", "unpaused")), (S.RUNNING, "unpaused"), (), set(), {P.RESUME}),
    ("resume-while-running", "RESUME", {}, ctx(), None, (), None, (), set(), set()),
    ("external-stop", "STOP", {}, ctx(), "unknown",
     ev(("suspended", "paused")), (S.PAUSED, "unknown"), (), set(), set()),
    ("ioerror-stop", "STOP", {}, ctx(), "ioerror",
     ev(("suspended", "ioerror")), (S.PAUSED, "ioerror"), (), set(), set()),
    ("watchdog-stop", "STOP", {}, ctx(), "watchdog",
     ev(("suspended", "watchdog")), (S.PAUSED, "watchdog"), (), set(), set()),
    ("migration-stop", "STOP", {}, ctx(), "migration",
     ev(("suspended", "migrated")), (S.PAUSED, "migration"), (), set(), set()),
    ("panic-stop", "STOP", {}, ctx(), "crashed", (), None, (), set(), set()),
    ("stop-after-shutdown", "STOP", {}, ctx((S.SHUTDOWN, "unknown")), None,
     (), None, (), set(), set()),
    # shutdown / power-off
    ("guest-poweroff", "SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}, ctx(), None,
     ev(("shutdown", "guest")), (S.SHUTDOWN, "unknown"), (Action.QUIT,), set(), set()),
    ("host-signal", "SHUTDOWN", {"guest": False, "reason": "host-signal"}, ctx(), None,
     ev(("shutdown", "host")), (S.SHUTDOWN, "unknown"), (Action.QUIT,), set(), set()),
    ("poweroff-restart", "SHUTDOWN", {"guest": True, "reason": "guest-shutdown"},
     ctx(on_poweroff="restart"), None, ev(("shutdown", "guest")), (S.SHUTDOWN, "unknown"),
     (Action.RESET,), {P.FAKE_REBOOT, P.NEEDS_CONT}, set()),
    ("poweroff-preserve", "SHUTDOWN", {"guest": True}, ctx(on_poweroff="preserve"), None,
     ev(("shutdown", "guest")), (S.SHUTDOWN, "unknown"), (), set(), set()),
    ("quit-after-poweroff", "SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"},
     ctx((S.SHUTDOWN, "unknown")), None, (), None, (), set(), set()),
    ("destroying", "SHUTDOWN", {"guest": False}, ctx(RUNNING, {P.DESTROY}), None,
     (), None, (), set(), set()),
    # reboot
    ("fake-reboot-shutdown", "SHUTDOWN", {"guest": True, "reason": "guest-shutdown"},
     ctx(RUNNING, {P.FAKE_REBOOT}), None, (), None, (Action.RESET,), {P.NEEDS_CONT}, set()),
    ("fake-reboot-stop", "STOP", {}, ctx(RUNNING, {P.FAKE_REBOOT, P.NEEDS_CONT}), None,
     (), None, (), set(), set()),
    ("fake-reboot-reset", "RESET", {"guest": False}, ctx(RUNNING, {P.FAKE_REBOOT, P.NEEDS_CONT}),
     None, ev(("reboot", None)), None, (Action.CONT,), set(), {P.NEEDS_CONT}),
    ("fake-reboot-resume", "RESUME", {}, ctx(RUNNING, {P.FAKE_REBOOT}), None,
     (), RUNNING, (), set(), {P.FAKE_REBOOT, P.NEEDS_CONT}),
    ("reboot-fallback-reset", "RESET", {"guest": False}, ctx(RUNNING, {P.FAKE_REBOOT}), None,
     ev(("reboot", None)), None, (), set(), {P.FAKE_REBOOT}),
    ("guest-reboot", "RESET", {"guest": True, "reason": "guest-reset"}, ctx(), None,
     ev(("reboot", None)), None, (), set(), set()),
    ("guest-reboot-destroy", "RESET", {"guest": True}, ctx(on_reboot="destroy"), None,
     ev(("shutdown", "guest")), (S.SHUTDOWN, "unknown"), (Action.QUIT,), set(), set()),
    ("no-reboot-destroy", "SHUTDOWN", {"guest": True, "reason": "guest-reset"},
     ctx(on_reboot="destroy"), None, ev(("shutdown", "guest")), (S.SHUTDOWN, "unknown"),
     (Action.QUIT,), set(), set()),
    ("no-reboot-restart", "SHUTDOWN", {"guest": True, "reason": "guest-reset"}, ctx(), None,
     (), None, (Action.RESET,), {P.FAKE_REBOOT, P.NEEDS_CONT}, set()),
    # crashes
    ("panic-destroy", "GUEST_PANICKED", {"action": "pause"}, ctx(), None,
     ev(("crashed", "panicked")), (S.CRASHED, "panicked"), (Action.QUIT,), {P.CRASH_DESTROY},
     set()),
    ("panic-restart", "GUEST_PANICKED", {"action": "pause"}, ctx(on_crash="restart"), None,
     ev(("crashed", "panicked")), (S.CRASHED, "panicked"), (Action.RESET,),
     {P.FAKE_REBOOT, P.NEEDS_CONT}, set()),
    ("panic-preserve", "GUEST_PANICKED", {"action": "pause"}, ctx(on_crash="preserve"), None,
     ev(("crashed", "panicked")), (S.CRASHED, "panicked"), (), set(), set()),
    ("panic-shutdown-after", "SHUTDOWN", {"guest": True, "reason": "guest-panic"},
     ctx((S.CRASHED, "panicked"), {P.CRASH_DESTROY}), None, (), None, (), set(), set()),
    ("panic-via-shutdown", "SHUTDOWN", {"guest": True, "reason": "guest-panic"}, ctx(), None,
     ev(("crashed", "panicked")), (S.CRASHED, "panicked"), (Action.QUIT,), {P.CRASH_DESTROY},
     set()),
    ("restart-after-crash", "RESUME", {}, ctx((S.CRASHED, "panicked"), {P.FAKE_REBOOT}), None,
     (), (S.RUNNING, "crashed"), (), set(), {P.FAKE_REBOOT, P.NEEDS_CONT}),
    ("crashloaded", "GUEST_CRASHLOADED", {"action": "run"}, ctx(), None,
     ev(("crashed", "crashloaded")), None, (), set(), set()),
    # power management
    ("s3", "SUSPEND", {}, ctx(), None, ev(("pmsuspended", "memory")),
     (S.PMSUSPENDED, "unknown"), (), set(), set()),
    ("wakeup", "WAKEUP", {}, ctx((S.PMSUSPENDED, "unknown")), None,
     ev(("started", "wakeup")), (S.RUNNING, "wakeup"), (), set(), set()),
    # other events
    ("watchdog", "WATCHDOG", {"action": "reset"}, ctx(), None,
     ev(("watchdog", None, {"action": "reset"})), None, (), set(), set()),
    ("io-error", "BLOCK_IO_ERROR",
     {"device": "drive-virtio-disk0", "operation": "write", "action": "stop", "nospace": True},
     ctx(), None, ev(("io_error", None, {"device": "drive-virtio-disk0", "action": "pause",
                                          "reason": "enospc"})), None, (), set(), set()),
    ("rtc", "RTC_CHANGE", {"offset": 3600}, ctx(), None,
     ev(("rtc_change", None, {"offset": 3600})), None, (), set(), set()),
    ("balloon", "BALLOON_CHANGE", {"actual": 128 * 1024 * 1024}, ctx(), None,
     ev(("balloon_change", None, {"actual": 131072})), None, (), set(), set()),
    ("device-deleted", "DEVICE_DELETED", {"device": "net1", "path": "/x"}, ctx(), None,
     ev(("device_removed", None, {"device": "net1"})), None, (), set(), set()),
    ("device-deleted-no-id", "DEVICE_DELETED", {"path": "/x"}, ctx(), None,
     (), None, (), set(), set()),
    ("block-job", "BLOCK_JOB_COMPLETED", {"device": "d0", "type": "mirror"}, ctx(), None,
     ev(("block_job", None, {"device": "d0", "type": "mirror", "status": "completed"})),
     None, (), set(), set()),
    ("powerdown-ignored", "POWERDOWN", {}, ctx(), None, (), None, (), set(), set()),
    ("unknown-ignored", "NIC_RX_FILTER_CHANGED", {}, ctx(), None, (), None, (), set(), set()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "data", "context", "status", "events", "state", "actions", "add", "clear"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_map_event(
    name: str,
    data: dict[str, Any],
    context: Context,
    status: str | None,
    events: tuple[Any, ...],
    state: tuple[DomainState, str] | None,
    actions: tuple[Action, ...],
    add: set[Pending],
    clear: set[Pending],
) -> None:
    out = map_event(name, data, context, status_reason=status)
    assert out.events == events
    assert out.state == state
    assert out.actions == actions
    assert out.add == frozenset(add)
    assert clear <= out.clear
    _assert_vocabulary(out)


def _assert_vocabulary(out: Outcome) -> None:
    """Every emitted name/detail is libvirt's (virtbus.protocol.events)."""
    lifecycle = {e.value: details for e, details in LIFECYCLE_DETAILS.items()}
    for event, detail, _data in out.events:
        if event in lifecycle:
            assert detail in lifecycle[event], (event, detail)
        else:
            assert event in OTHER_EVENTS, event


EXIT_CASES = [
    ("destroyed", ctx(RUNNING, {P.DESTROY}), "destroyed", "destroyed"),
    ("destroy-after-shutdown", ctx((S.SHUTDOWN, "unknown"), {P.DESTROY}), "destroyed",
     "destroyed"),
    ("crash-destroy", ctx((S.CRASHED, "panicked"), {P.CRASH_DESTROY}), "crashed", "crashed"),
    ("start-failed", ctx((S.PAUSED, "starting_up"), {P.START}), "failed", "failed"),
    ("after-shutdown", ctx((S.SHUTDOWN, "unknown")), "shutdown", "shutdown"),
    ("killed", ctx(), "failed", "crashed"),
    ("killed-while-paused", ctx((S.PAUSED, "user")), "failed", "crashed"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("context", "detail", "reason"), [c[1:] for c in EXIT_CASES], ids=[c[0] for c in EXIT_CASES]
)
def test_map_exit(context: Context, detail: str, reason: str) -> None:
    out = map_exit(context)
    assert out.events == (("stopped", detail, {}),)
    assert out.state == (S.SHUTOFF, reason)
    assert out.clear == frozenset(Pending)
    _assert_vocabulary(out)


def test_destroy_silences_lifecycle_events_but_not_others() -> None:
    destroying = ctx(RUNNING, {P.DESTROY})
    for name in ("STOP", "RESUME", "RESET", "GUEST_PANICKED", "SHUTDOWN"):
        assert map_event(name, {"guest": False}, destroying).events == ()
    assert map_event("RTC_CHANGE", {"offset": 1}, destroying).events


def test_needs_status_only_for_unrequested_stop() -> None:
    assert needs_status("STOP", ctx())
    assert not needs_status("STOP", ctx(RUNNING, {P.PAUSE}))
    assert not needs_status("STOP", ctx(RUNNING, {P.FAKE_REBOOT}))
    assert not needs_status("STOP", ctx((S.PAUSED, "user")))
    assert not needs_status("RESUME", ctx())


@pytest.mark.parametrize(
    ("status", "reason"),
    [("io-error", "ioerror"), ("watchdog", "watchdog"), ("guest-panicked", "crashed"),
     ("postmigrate", "migration"), ("shutdown", "shutting_down"), ("paused", "unknown"),
     ("whatever-new", "unknown")],
)  # fmt: skip
def test_pause_reason(status: str, reason: str) -> None:
    assert pause_reason(status) == reason
    assert reason in ("unknown", "ioerror", "watchdog", "crashed", "migration", "shutting_down")


# (id, running, query-status status, context, expected events, state, actions)
STATUS_CASES: list[tuple[Any, ...]] = [
    ("still-running", True, "running", ctx(), (), None, ()),
    ("resumed-meanwhile", True, "running", ctx((S.PAUSED, "user")),
     ev(("resumed", "unpaused")), (S.RUNNING, "unpaused"), ()),
    ("running-again", True, "running", ctx((S.SHUTDOWN, "unknown")),
     (), (S.RUNNING, "unknown"), ()),
    ("paused-meanwhile", False, "paused", ctx(),
     ev(("suspended", "paused")), (S.PAUSED, "user"), ()),
    ("ioerror-meanwhile", False, "io-error", ctx(),
     ev(("suspended", "ioerror")), (S.PAUSED, "ioerror"), ()),
    ("migration-pause", False, "postmigrate", ctx(),
     ev(("suspended", "migrated")), (S.PAUSED, "migration"), ()),
    ("still-paused", False, "paused", ctx((S.PAUSED, "user")), (), None, ()),
    ("powered-off-meanwhile", False, "shutdown", ctx(),
     ev(("shutdown", "finished")), (S.SHUTDOWN, "unknown"), (Action.QUIT,)),
    ("powered-off-preserve", False, "shutdown", ctx(on_poweroff="preserve"),
     ev(("shutdown", "finished")), (S.SHUTDOWN, "unknown"), ()),
    ("panicked-meanwhile", False, "guest-panicked", ctx(),
     ev(("crashed", "panicked")), (S.CRASHED, "panicked"), (Action.QUIT,)),
    ("still-crashed", False, "guest-panicked", ctx((S.CRASHED, "panicked")), (), None, ()),
    ("quit-never-sent", False, "shutdown", ctx((S.SHUTDOWN, "unknown")), (), None, (Action.QUIT,)),
    ("shutdown-preserved", False, "shutdown", ctx((S.SHUTDOWN, "unknown"), on_poweroff="preserve"),
     (), None, ()),
    ("destroying", False, "shutdown", ctx(RUNNING, {P.DESTROY}), (), None, ()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("running", "status", "context", "events", "state", "actions"),
    [c[1:] for c in STATUS_CASES],
    ids=[c[0] for c in STATUS_CASES],
)
def test_map_status(
    running: bool, status: str, context: Context, events: tuple[Any, ...],
    state: tuple[DomainState, str] | None, actions: tuple[Action, ...],
) -> None:  # fmt: skip
    """What a (re)connected monitor finds, against what the driver knew (the resync)."""
    out = map_status(running, status, context)
    assert (out.events, out.state, out.actions) == (events, state, actions)
    _assert_vocabulary(out)
