"""From observed ``xl list -v`` rows to libvirt events: a pure state machine.

XenStore only says "something changed" (``@introduceDomain`` / ``@releaseDomain`` name no
domain; pause/unpause say nothing), so every trigger compares a fresh ``xl list -v`` with
what the driver believed, per tracked domain, and emits the difference. No I/O here, so
the sequences observed on real Xen 4.17 (docs/xen-testbed.md) are unit tests.

A domain is tracked by uuid and followed by domid: a reboot gives a new domid with the
same uuid; a localhost migration shows the same uuid twice (``d--incoming`` and later
``d--migratedaway``), so a tracked domain sticks to its domid while it lives and the
destination ignores the domids that existed before it prepared (``exclude``).
The per-domain ``xl`` monitor process applies on_poweroff/on_reboot/on_crash; this
machine only observes the result and never applies them a second time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from drivers.xen.xl import XlDomain
from virtbus.protocol.events import DomainState

Event = tuple[str, str | None]  # (event, detail) in libvirt's vocabulary
RESTARTING = frozenset({"restart", "rename-restart", "coredump-restart"})
# intents during which the driver's own `xl destroy` runs; libxl's destroy pauses the
# domain first, so a pass that lists it meanwhile sees ``--p---``
TEARING_DOWN = frozenset({"destroy", "reset", "reap"})


@dataclass
class Tracked:
    """What the driver believes about one defined domain."""

    name: str
    uuid: str
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    domid: int | None = None
    state: DomainState = DomainState.SHUTOFF
    reason: str = "unknown"
    intent: str | None = None  # start, shutdown, destroy, reboot, reset, migrate_out/in
    seen_reason: str | None = None  # shutdown reason already reported for this domid
    awaiting_restart: bool = False  # the xl monitor will re-create it with a new domid
    incoming: bool = False  # destination of a migration, before finish
    migrated_away: bool = False  # source after a completed migration, before confirm
    exclude: frozenset[int] = field(default_factory=frozenset)
    row: XlDomain | None = None  # last row seen
    creating: bool = False  # the driver's own `xl create` is in flight: do not adopt yet
    reap: bool = False  # shut down with policy destroy: the driver destroys it (see driver)

    @property
    def active(self) -> bool:
        return self.domid is not None or self.awaiting_restart


def _adoptable(t: Tracked, row: XlDomain) -> bool:
    if row.uuid != t.uuid or row.domid in t.exclude or row.domid == 0:
        return False
    return row.name in (t.name, f"{t.name}--incoming")


def _has_run(row: XlDomain) -> bool:
    """A domain someone else (the xl monitor's restart) is still building is not adopted:
    it shows ``------`` with no CPU time, then ``--p---``, and only then runs. A running
    guest that is merely waiting for a CPU also shows ``------`` (most of the time, on a
    loaded host): its CPU time tells it from one being built."""
    if row.shutdown or row.dying:
        return True
    return not row.paused and (row.running or row.blocked or row.cpu_time_s > 0)


def _set(t: Tracked, state: DomainState, reason: str) -> None:
    t.state, t.reason = state, reason


def _on_shutdown_row(t: Tracked, row: XlDomain, out: list[Event]) -> None:
    """The domain reports a shutdown reason (it may still be there a while, or be kept)."""
    why = row.shutdown_reason or "poweroff"
    if t.seen_reason == why:
        return
    t.seen_reason = why
    if why == "poweroff":
        out.append(("shutdown", "guest"))
        _set(t, DomainState.SHUTDOWN, "user")
        t.reap = t.on_poweroff == "destroy"
    elif why in ("crash", "watchdog"):
        out.append(("crashed", "panicked"))
        _set(t, DomainState.CRASHED, "panicked")
        t.reap = t.on_crash == "destroy"
    elif why in ("reboot", "soft_reset"):
        out.append(("reboot", None))
    elif why == "suspend":
        if t.intent == "migrate_out":
            out.append(("suspended", "migrated"))
            _set(t, DomainState.PAUSED, "migration")
        else:
            _set(t, DomainState.PAUSED, "save")


def _on_live_row(t: Tracked, row: XlDomain, out: list[Event]) -> None:
    if row.shutdown:
        _on_shutdown_row(t, row, out)
        return
    if row.dying:  # an xl destroy (ours or not) of a domain that did not shut down: not a
        return  # guest poweroff; it is reported (destroyed) when it vanishes
    t.seen_reason = None  # e.g. a failed migration resumed the source
    if row.paused and t.intent in TEARING_DOWN:
        return  # libxl pauses a domain before destroying it: not a guest suspend
    if row.paused and t.state != DomainState.PAUSED:
        if not t.incoming:
            out.append(("suspended", "paused"))
        _set(t, DomainState.PAUSED, "migration" if t.incoming else "user")
    elif not row.paused and t.state in (DomainState.PAUSED, DomainState.SHUTOFF):
        detail = "migrated" if t.incoming or t.intent == "migrate_in" else "unpaused"
        out.append(("resumed", detail))
        _set(t, DomainState.RUNNING, detail)


def _on_vanished(t: Tracked, out: list[Event]) -> None:
    """Our domid is gone from ``xl list``: decide why, from what we saw and what we did."""
    why = None if t.intent == "destroy" else t.seen_reason  # destroying a preserved one
    if why is None and t.intent != "destroy":  # missed the shutdown row: use our intent
        why = {"shutdown": "poweroff", "reboot": "reboot", "reset": "reset",
               "migrate_out": "suspend"}.get(t.intent or "")  # fmt: skip
        if why == "poweroff":
            out.append(("shutdown", "guest"))
        elif why == "reboot":
            out.append(("reboot", None))
    t.domid, t.row, t.seen_reason, t.reap = None, None, None, False
    policy = {"poweroff": t.on_poweroff, "crash": t.on_crash, "watchdog": t.on_crash}.get(
        why or "", t.on_reboot if why in ("reboot", "soft_reset") else "destroy"
    )
    if why == "reset" or (why is not None and policy in RESTARTING):
        t.awaiting_restart = True
        return
    if why == "suspend" and t.intent == "migrate_out":
        out.append(("stopped", "migrated"))
        t.migrated_away = True
        _set(t, DomainState.SHUTOFF, "migrated")
    elif why == "poweroff" or why in ("reboot", "soft_reset"):
        out.append(("stopped", "shutdown"))
        _set(t, DomainState.SHUTOFF, "shutdown")
    elif why in ("crash", "watchdog"):
        out.append(("stopped", "crashed"))
        _set(t, DomainState.SHUTOFF, "crashed")
    else:
        out.append(("stopped", "destroyed"))
        _set(t, DomainState.SHUTOFF, "destroyed")
    t.intent = None


def _adopt(t: Tracked, row: XlDomain, initial: bool, out: list[Event]) -> None:
    t.domid = row.domid
    if t.incoming:
        out.append(("started", "migrated"))
        _set(t, DomainState.PAUSED if row.paused else DomainState.RUNNING, "migration")
    elif t.awaiting_restart:  # the restart after a reboot: "reboot" was already reported
        t.awaiting_restart = False
        _set(t, DomainState.RUNNING, "booted")
    else:
        if not initial:  # a driver restart reattaches silently
            out.append(("started", "booted"))
        _set(t, DomainState.RUNNING, "booted")
    if t.intent in ("start", "reboot", "reset"):
        t.intent = None
    if row.paused and not t.incoming:
        _set(t, DomainState.PAUSED, "user")
        if not initial:
            out.append(("suspended", "paused"))
    if row.shutdown:
        _on_shutdown_row(t, row, out)


def observe(t: Tracked, rows: Iterable[XlDomain], initial: bool = False) -> list[Event]:
    """Update ``t`` from one ``xl list -v`` snapshot; return the events, in order.

    ``initial``: the first snapshot after the driver (re)started — running domains are
    reattached without ``started`` events.
    """
    out: list[Event] = []
    snapshot = list(rows)
    if t.domid is not None:
        row = next((r for r in snapshot if r.domid == t.domid), None)
        if row is not None and row.uuid == t.uuid:
            t.row = row
            _on_live_row(t, row, out)
            return out
        _on_vanished(t, out)
    if t.migrated_away or t.domid is not None:
        return out
    if t.creating:
        return out
    candidates = [
        r for r in snapshot if _adoptable(t, r) and (t.incoming or initial or _has_run(r))
    ]
    if candidates:
        row = min(candidates, key=lambda r: r.domid)
        t.row = row
        _adopt(t, row, initial, out)
    return out
