"""Pure mapping of QMP events to libvirt's lifecycle vocabulary, as libvirt's QEMU driver does.

No I/O here: the driver hands in what QEMU said, the domain's current state and its
``on_*`` configuration, and what it asked for itself (``pending`` flags); it gets back the
events to emit, the new state and the follow-up QMP actions to take. Keeping it pure
lets the whole table be unit-tested without a QEMU.

Semantics follow libvirt (qemu_process.c / qemu_driver.c):

- ``SHUTDOWN`` -> ``shutdown(guest|host|finished)``, state shutdown; the process is then
  made to exit (``on_poweroff=destroy``) and its exit gives ``stopped(shutdown)``.
- Monitor EOF without a preceding ``SHUTDOWN`` (killed, crashed): ``stopped(failed)`` with
  state ``shutoff(crashed)`` (libvirt's processMonitorEOFEvent); during start:
  ``stopped(failed)``/``shutoff(failed)``; destroy by us: ``stopped(destroyed)``.
- ``GUEST_PANICKED`` -> ``crashed(panicked)`` then ``on_crash``: destroy ->
  ``stopped(crashed)``; restart -> reset + cont (a ``reboot`` event); preserve -> stays.
- A reboot is a "fake reboot": ``system_powerdown``, then on the guest's ``SHUTDOWN``
  (QEMU runs with ``-no-shutdown``) ``system_reset`` and ``cont``: one ``reboot`` event.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from virtbus.protocol.events import DomainState

Emitted = tuple[str, str | None, dict[str, Any]]  # (event, detail, data)


class Pending(StrEnum):
    """What the driver asked QEMU for and is waiting to see the effect of."""

    START = "start"  # launched with -S, `cont` sent: RESUME means booted
    PAUSE = "pause"  # `stop` sent by suspend()
    RESUME = "resume"  # `cont` sent by resume()
    DESTROY = "destroy"  # destroy() in progress: every event until the exit is noise
    FAKE_REBOOT = "fake_reboot"  # a SHUTDOWN/RESET is part of a reboot, not a power-off
    NEEDS_CONT = "needs_cont"  # the reboot's reset happens on a stopped VM: `cont` after RESET
    CRASH_DESTROY = "crash_destroy"  # on_crash=destroy: the exit is stopped(crashed)
    # live migration (drivers/qemu/migration.py; libvirt's qemuProcessHandleResume/Stop)
    MIGRATING = "migrating"  # source: outgoing migration; its failure's RESUME is resumed(migrated)
    INCOMING = "incoming"  # destination: `cont` -> resumed(migrated); an exit -> stopped(failed)
    MIGRATED_OUT = "migrated_out"  # source after success: its exit is stopped(migrated)
    # internal snapshots (drivers/qemu/snapshots.py; libvirt's qemuSnapshotCreateActive...)
    SNAPSHOT = "snapshot"  # snapshot-save's own STOP/RESUME: the guest never looked paused
    REVERT = "revert"  # snapshot-load: STOP/RESUME/start/exit carry the detail from_snapshot
    # saved state (drivers/qemu/saves.py)
    SAVE = "save"  # the save's own stop: no event (the guest ends stopped(saved))
    SAVED = "saved"  # the saved guest's QEMU is stopped: its exit is stopped(saved)
    RESTORE = "restore"  # the restore's `cont`: started(restored)


class Action(StrEnum):
    """A follow-up QMP command the driver runs (in this order) after applying an outcome."""

    QUIT = "quit"
    RESET = "system_reset"
    CONT = "cont"


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """The domain's ``<on_poweroff>``, ``<on_reboot>``, ``<on_crash>`` (libvirt's defaults)."""

    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"


@dataclass(frozen=True, slots=True)
class Context:
    state: DomainState
    reason: str
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    pending: frozenset[Pending] = frozenset()


@dataclass(frozen=True, slots=True)
class Outcome:
    events: tuple[Emitted, ...] = ()
    state: tuple[DomainState, str] | None = None
    actions: tuple[Action, ...] = ()
    add: frozenset[Pending] = frozenset()
    clear: frozenset[Pending] = frozenset()


NOTHING = Outcome()
Handler = Callable[[dict[str, Any], Context, "str | None"], Outcome]
_RESTART = frozenset({"restart", "rename-restart"})
_CRASH_DESTROY = frozenset({"destroy", "coredump-destroy"})
_CRASH_RESTART = frozenset({"restart", "coredump-restart"})

# query-status `status` -> libvirt's paused reason (qemuMonitorVMStatusToPausedReason)
_PAUSE_REASONS = {
    "io-error": "ioerror",
    "watchdog": "watchdog",
    "guest-panicked": "crashed",
    "internal-error": "unknown",
    "postmigrate": "migration",
    "finish-migrate": "migration",
    "inmigrate": "migration",
    "save-vm": "save",
    "restore-vm": "unknown",
    "shutdown": "shutting_down",
    "colo": "unknown",
    "preconfig": "starting_up",
    "prelaunch": "starting_up",
}
# paused reason -> suspended event detail (qemuDomainPausedReasonToSuspendedEvent)
_SUSPEND_DETAILS = {
    "ioerror": "ioerror",
    "watchdog": "watchdog",
    "migration": "migrated",
    "api_error": "api_error",
    "postcopy": "postcopy",
    "postcopy_failed": "postcopy_failed",
}
# BLOCK_IO_ERROR action -> libvirt's io_error action names
_IO_ACTIONS = {"stop": "pause", "ignore": "none", "report": "report"}
_BLOCK_JOB_STATUS = {
    "BLOCK_JOB_COMPLETED": "completed",
    "BLOCK_JOB_CANCELLED": "canceled",
    "BLOCK_JOB_ERROR": "failed",
    "BLOCK_JOB_READY": "ready",
}


def pause_reason(status: str) -> str:
    """libvirt's paused reason for a query-status ``status`` of a stopped VM."""
    return _PAUSE_REASONS.get(status, "unknown")


def needs_status(name: str, ctx: Context) -> bool:
    """True when a STOP was not asked for: the driver must query-status to name its reason."""
    busy = {Pending.PAUSE, Pending.DESTROY, Pending.FAKE_REBOOT, Pending.START,
            Pending.SNAPSHOT, Pending.REVERT, Pending.SAVE}  # fmt: skip
    return name == "STOP" and ctx.state == DomainState.RUNNING and not (busy & ctx.pending)


def map_event(
    name: str, data: dict[str, Any], ctx: Context, *, status_reason: str | None = None
) -> Outcome:
    """One QMP event -> what to emit/change/do. ``status_reason`` is for unrequested STOPs."""
    if {Pending.DESTROY, Pending.MIGRATED_OUT} & ctx.pending and name in _LIFECYCLE_EVENTS:
        return NOTHING  # destroy's / confirm's own SHUTDOWN/STOP noise: only the exit counts
    handler = _HANDLERS.get(name)
    if handler is None:
        return NOTHING
    return handler(data, ctx, status_reason)


def map_status(running: bool, status: str, ctx: Context) -> Outcome:
    """QEMU's run state (``query-status``) found after (re)connecting, against what the
    driver last knew: the events nobody heard meanwhile (libvirt's qemuProcessUpdateState)."""
    state = ctx.state
    if running:
        if state == DomainState.PAUSED:
            return Outcome(
                events=(("resumed", "unpaused", {}),), state=(DomainState.RUNNING, "unpaused")
            )
        if state != DomainState.RUNNING:
            return Outcome(state=(DomainState.RUNNING, "unknown"))
        return NOTHING
    if status == "shutdown" and state not in (DomainState.SHUTDOWN, DomainState.CRASHED):
        return map_event("SHUTDOWN", {}, ctx)  # the guest powered off while nobody listened
    if status == "guest-panicked" and state != DomainState.CRASHED:
        return map_event("GUEST_PANICKED", {}, ctx)
    if state == DomainState.RUNNING:
        reason = "user" if status == "paused" else pause_reason(status)
        detail = _SUSPEND_DETAILS.get(reason, "paused")
        return Outcome(events=(("suspended", detail, {}),), state=(DomainState.PAUSED, reason))
    if state == DomainState.SHUTDOWN and ctx.lifecycle.on_poweroff == "destroy":
        return Outcome(actions=(Action.QUIT,))  # the agent died before its `quit`
    return NOTHING


def map_exit(ctx: Context) -> Outcome:
    """The QEMU process is gone (libvirt's processMonitorEOFEvent)."""
    if Pending.MIGRATED_OUT in ctx.pending:
        return _stopped("migrated", "migrated")
    if Pending.SAVED in ctx.pending:
        return _stopped("saved", "saved")
    if Pending.REVERT in ctx.pending and Pending.DESTROY in ctx.pending:
        return _stopped("from_snapshot", "from_snapshot")  # reverting to a shut-off snapshot
    if Pending.INCOMING in ctx.pending:  # an incoming migration failed or was rolled back
        return _stopped("failed", "failed")
    if Pending.DESTROY in ctx.pending:
        return _stopped("destroyed", "destroyed")
    if Pending.CRASH_DESTROY in ctx.pending:
        return _stopped("crashed", "crashed")
    if Pending.START in ctx.pending:
        return _stopped("failed", "failed")
    if ctx.state == DomainState.SHUTDOWN:
        return _stopped("shutdown", "shutdown")
    return _stopped("failed", "crashed")  # closed without SHUTDOWN: assume it crashed


def _stopped(detail: str, reason: str) -> Outcome:
    return Outcome(
        events=(("stopped", detail, {}),),
        state=(DomainState.SHUTOFF, reason),
        clear=frozenset(Pending),
    )


# --- handlers ---------------------------------------------------------------------------
def _shutdown(data: dict[str, Any], ctx: Context, _status: str | None) -> Outcome:
    reason = data.get("reason")
    if ctx.state == DomainState.CRASHED:
        return NOTHING  # the panic's own SHUTDOWN (panic action "shutdown")
    if ctx.state == DomainState.SHUTDOWN:
        return NOTHING  # the SHUTDOWN of our own `quit` after the guest's
    if reason == "guest-panic":
        return _panicked({}, ctx, None)
    if Pending.FAKE_REBOOT in ctx.pending:
        return Outcome(actions=(Action.RESET,), add=frozenset({Pending.NEEDS_CONT}))
    if reason == "guest-reset" and ctx.lifecycle.on_reboot in _RESTART:
        return Outcome(
            actions=(Action.RESET,), add=frozenset({Pending.FAKE_REBOOT, Pending.NEEDS_CONT})
        )
    guest = data.get("guest")
    detail = "guest" if guest is True else "host" if guest is False else "finished"
    event: Emitted = ("shutdown", detail, {})
    action = ctx.lifecycle.on_reboot if reason == "guest-reset" else ctx.lifecycle.on_poweroff
    if action in _RESTART:
        return Outcome(
            events=(event,),
            state=(DomainState.SHUTDOWN, "unknown"),
            actions=(Action.RESET,),
            add=frozenset({Pending.FAKE_REBOOT, Pending.NEEDS_CONT}),
        )
    if action == "preserve":
        return Outcome(events=(event,), state=(DomainState.SHUTDOWN, "unknown"))
    return Outcome(events=(event,), state=(DomainState.SHUTDOWN, "unknown"), actions=(Action.QUIT,))


def _reset(data: dict[str, Any], ctx: Context, _status: str | None) -> Outcome:
    reboot: Emitted = ("reboot", None, {})
    if Pending.NEEDS_CONT in ctx.pending:
        return Outcome(
            events=(reboot,), actions=(Action.CONT,), clear=frozenset({Pending.NEEDS_CONT})
        )
    if Pending.FAKE_REBOOT in ctx.pending:  # the fallback reset of a running guest
        return Outcome(events=(reboot,), clear=frozenset({Pending.FAKE_REBOOT}))
    if data.get("guest") is True and ctx.lifecycle.on_reboot == "destroy":
        return Outcome(
            events=(("shutdown", "guest", {}),),
            state=(DomainState.SHUTDOWN, "unknown"),
            actions=(Action.QUIT,),
        )
    return Outcome(events=(reboot,))


def _stop(_data: dict[str, Any], ctx: Context, status_reason: str | None) -> Outcome:
    if Pending.SNAPSHOT in ctx.pending:
        return NOTHING
    if Pending.SAVE in ctx.pending:
        return Outcome(state=(DomainState.PAUSED, "save"))
    if Pending.REVERT in ctx.pending:
        return Outcome(
            events=(("suspended", "from_snapshot", {}),),
            state=(DomainState.PAUSED, "from_snapshot"),
        )
    if Pending.PAUSE in ctx.pending:
        return Outcome(
            events=(("suspended", "paused", {}),),
            state=(DomainState.PAUSED, "user"),
            clear=frozenset({Pending.PAUSE}),
        )
    if not needs_status("STOP", ctx):
        return NOTHING
    reason = status_reason or "unknown"
    if reason in ("crashed", "shutting_down"):
        return NOTHING  # GUEST_PANICKED / SHUTDOWN say it better
    detail = _SUSPEND_DETAILS.get(reason, "paused")
    return Outcome(events=(("suspended", detail, {}),), state=(DomainState.PAUSED, reason))


def _resume(_data: dict[str, Any], ctx: Context, _status: str | None) -> Outcome:
    if Pending.SNAPSHOT in ctx.pending:
        return NOTHING
    if Pending.RESTORE in ctx.pending and Pending.START in ctx.pending:
        return Outcome(
            events=(("started", "restored", {}),),
            state=(DomainState.RUNNING, "restored"),
            clear=frozenset({Pending.START, Pending.RESUME}),
        )
    if Pending.SAVE in ctx.pending:  # a failed save resumes the guest: no event either
        return Outcome(state=(DomainState.RUNNING, "save_canceled"))
    if Pending.REVERT in ctx.pending:  # libvirt: started (from shut off) or resumed
        event = "started" if Pending.START in ctx.pending else "resumed"
        return Outcome(
            events=((event, "from_snapshot", {}),),
            state=(DomainState.RUNNING, "from_snapshot"),
            clear=frozenset({Pending.START, Pending.RESUME}),
        )
    if Pending.INCOMING in ctx.pending:  # migrate_finish's `cont` on the destination
        return Outcome(
            events=(("resumed", "migrated", {}),),
            state=(DomainState.RUNNING, "migrated"),
            clear=frozenset({Pending.INCOMING, Pending.RESUME}),
        )
    if (
        Pending.MIGRATING in ctx.pending
        and ctx.state == DomainState.PAUSED
        and ctx.reason == "migration"
    ):  # QEMU (or migrate_confirm) resumed the source after a failed switch-over
        return Outcome(
            events=(("resumed", "migrated", {}),),
            state=(DomainState.RUNNING, "migration_canceled"),
            clear=frozenset({Pending.MIGRATING, Pending.RESUME}),
        )
    if Pending.START in ctx.pending:
        return Outcome(
            events=(("started", "booted", {}),),
            state=(DomainState.RUNNING, "booted"),
            clear=frozenset({Pending.START}),
        )
    if Pending.FAKE_REBOOT in ctx.pending:
        reason = "crashed" if ctx.state == DomainState.CRASHED else "booted"
        return Outcome(
            state=(DomainState.RUNNING, reason),
            clear=frozenset({Pending.FAKE_REBOOT, Pending.NEEDS_CONT}),
        )
    if Pending.RESUME in ctx.pending or ctx.state == DomainState.PAUSED:
        return Outcome(
            events=(("resumed", "unpaused", {}),),
            state=(DomainState.RUNNING, "unpaused"),
            clear=frozenset({Pending.RESUME}),
        )
    return NOTHING


def _panicked(_data: dict[str, Any], ctx: Context, _status: str | None) -> Outcome:
    if ctx.state == DomainState.CRASHED:
        return NOTHING
    event: Emitted = ("crashed", "panicked", {})
    state = (DomainState.CRASHED, "panicked")
    action = ctx.lifecycle.on_crash
    if action in _CRASH_DESTROY:
        return Outcome(
            events=(event,), state=state, actions=(Action.QUIT,),
            add=frozenset({Pending.CRASH_DESTROY}),
        )  # fmt: skip
    if action in _CRASH_RESTART:
        return Outcome(
            events=(event,), state=state, actions=(Action.RESET,),
            add=frozenset({Pending.FAKE_REBOOT, Pending.NEEDS_CONT}),
        )  # fmt: skip
    return Outcome(events=(event,), state=state)


def _crashloaded(_data: dict[str, Any], _ctx: Context, _status: str | None) -> Outcome:
    return Outcome(events=(("crashed", "crashloaded", {}),))


def _suspend(detail: str) -> Handler:
    def handler(_data: dict[str, Any], ctx: Context, _status: str | None) -> Outcome:
        if ctx.state == DomainState.PMSUSPENDED:
            return NOTHING
        return Outcome(
            events=(("pmsuspended", detail, {}),), state=(DomainState.PMSUSPENDED, "unknown")
        )

    return handler


def _wakeup(_data: dict[str, Any], ctx: Context, _status: str | None) -> Outcome:
    if ctx.state != DomainState.PMSUSPENDED:
        return NOTHING
    return Outcome(events=(("started", "wakeup", {}),), state=(DomainState.RUNNING, "wakeup"))


def _simple(event: str, build: Callable[[dict[str, Any]], dict[str, Any] | None]) -> Handler:
    """A non-lifecycle event whose data is built from the QMP data (None: drop it)."""

    def handler(data: dict[str, Any], _ctx: Context, _status: str | None) -> Outcome:
        payload = build(data)
        return NOTHING if payload is None else Outcome(events=((event, None, payload),))

    return handler


def _io_error(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "device": data.get("device") or data.get("node-name") or "",
        "action": _IO_ACTIONS.get(str(data.get("action")), str(data.get("action"))),
    }
    if data.get("nospace"):
        out["reason"] = "enospc"
    elif data.get("reason"):
        out["reason"] = data["reason"]
    return out


def _block_job(name: str) -> Handler:
    def build(data: dict[str, Any]) -> dict[str, Any] | None:
        if str(data.get("device", "")).startswith("virtbus-"):
            return None  # virtbus's own jobs: their follower reports them (blockjobs.py)
        out = {"device": data.get("device", ""), "type": data.get("type", ""),
               "status": _BLOCK_JOB_STATUS[name]}  # fmt: skip
        if data.get("error"):
            out["error"] = data["error"]
        return out

    return _simple("block_job", build)


_HANDLERS: dict[str, Handler] = {
    "SHUTDOWN": _shutdown,
    "RESET": _reset,
    "STOP": _stop,
    "RESUME": _resume,
    "GUEST_PANICKED": _panicked,
    "GUEST_CRASHLOADED": _crashloaded,
    "SUSPEND": _suspend("memory"),
    "SUSPEND_DISK": _suspend("disk"),
    "WAKEUP": _wakeup,
    "WATCHDOG": _simple("watchdog", lambda d: {"action": d.get("action", "")}),
    "BLOCK_IO_ERROR": _simple("io_error", _io_error),
    "RTC_CHANGE": _simple("rtc_change", lambda d: {"offset": int(d.get("offset", 0))}),
    "BALLOON_CHANGE": _simple("balloon_change", lambda d: {"actual": int(d["actual"]) // 1024}),
    "DEVICE_DELETED": _simple(
        "device_removed", lambda d: {"device": d["device"]} if d.get("device") else None
    ),
    # MIGRATION / MIGRATION_PASS are followed by the migration job (drivers/qemu/migration.py),
    # which publishes `migration` events with the full progress: nothing to map here.
    **{name: _block_job(name) for name in _BLOCK_JOB_STATUS},
}
_LIFECYCLE_EVENTS = frozenset(
    {"SHUTDOWN", "RESET", "STOP", "RESUME", "GUEST_PANICKED", "GUEST_CRASHLOADED", "SUSPEND",
     "SUSPEND_DISK", "WAKEUP"}
)  # fmt: skip
