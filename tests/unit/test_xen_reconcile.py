"""The reconcile state machine fed the sequences observed on real Xen 4.17.

Each test is a sequence of ``xl list -v`` snapshots as docs/xen-testbed.md and
the captures in tests/unit/data/xen/ record them (state letters ``r b p s <reason> d``).
"""

from __future__ import annotations

from drivers.xen.reconcile import Event, Tracked, observe
from drivers.xen.xl import XlDomain
from virtbus.protocol.events import DomainState

UUID = "f273a74c-762a-497b-9e94-0f3ad001d15d"
DOM0 = XlDomain(
    "Domain-0", 0, 1536, 2, "r-----", 20.0, "0" * 8 + "-0000-0000-0000-" + "0" * 12, None
)
REASON = {"-": 0, "r": 1, "s": 2, "c": 3, "w": 4}


def row(domid: int, state: str, name: str = "d1", uuid: str = UUID, cpu: float = 1.0) -> XlDomain:
    code = REASON.get(state[4]) if state[3] == "s" else None
    return XlDomain(name, domid, 128, 1, state, cpu, uuid, code)


def feed(t: Tracked, *snapshots: list[XlDomain], initial: bool = False) -> list[Event]:
    out: list[Event] = []
    for i, snap in enumerate(snapshots):
        out += observe(t, [DOM0, *snap], initial=initial and i == 0)
    return out


def started(**kw: str) -> Tracked:
    t = Tracked("d1", UUID, **kw)
    assert feed(t, [row(5, "r-----")]) == [("started", "booted")]
    return t


def test_create_is_adopted_once_unpaused() -> None:
    t = Tracked("d1", UUID, intent="start")
    # /local/domain/<id> appears while the domain is still paused, then @introduceDomain
    assert feed(t, [], [row(5, "--p---")]) == []
    assert t.domid is None
    assert feed(t, [row(5, "-b----")]) == [("started", "booted")]
    assert (t.domid, t.state, t.reason, t.intent) == (5, DomainState.RUNNING, "booted", None)


def test_initial_snapshot_reattaches_silently() -> None:
    t = Tracked("d1", UUID)
    assert feed(t, [row(9, "r-----")], initial=True) == []
    assert t.domid == 9 and t.state == DomainState.RUNNING
    paused = Tracked("d1", UUID)
    assert feed(paused, [row(9, "--p---")], initial=True) == []
    assert paused.state == DomainState.PAUSED


def test_xl_shutdown_w_sequence() -> None:
    t = started()
    t.intent = "shutdown"
    # @releaseDomain with --ps--, the domain is destroyed, a second @releaseDomain
    assert feed(t, [row(5, "--ps--")], [], []) == [("shutdown", "guest"), ("stopped", "shutdown")]
    assert (t.state, t.reason, t.domid, t.intent) == (DomainState.SHUTOFF, "shutdown", None, None)


def test_shutdown_missed_by_debounce_uses_the_intent() -> None:
    t = started()
    t.intent = "shutdown"
    assert feed(t, []) == [("shutdown", "guest"), ("stopped", "shutdown")]


def test_crash_with_preserve_then_destroy() -> None:
    t = started(on_crash="preserve")
    assert feed(t, [row(5, "---sc-")], [row(5, "---sc-")]) == [("crashed", "panicked")]
    assert t.state == DomainState.CRASHED and t.domid == 5
    assert feed(t, [row(5, "--psc-")]) == []  # xl pause of a crashed domain: still crashed
    t.intent = "destroy"
    assert feed(t, []) == [("stopped", "destroyed")]


def test_crash_with_destroy_policy() -> None:
    t = started()
    assert feed(t, [row(5, "---sc-")], []) == [("crashed", "panicked"), ("stopped", "crashed")]
    assert t.reason == "crashed"


def test_guest_poweroff_preserve_and_default() -> None:
    kept = started(on_poweroff="preserve")
    assert feed(kept, [row(5, "---s--")]) == [("shutdown", "guest")]
    assert kept.state == DomainState.SHUTDOWN and kept.domid == 5
    gone = started()
    assert feed(gone, [row(5, "---s--")], []) == [("shutdown", "guest"), ("stopped", "shutdown")]


def test_reboot_restarts_with_a_new_domid() -> None:
    t = started()
    t.intent = "reboot"
    # two @releaseDomain, a new domid, an @introduceDomain
    events = feed(t, [row(5, "---sr-")], [], [row(6, "--p---")], [row(6, "r-----")])
    assert events == [("reboot", None)]
    assert (t.domid, t.state, t.awaiting_restart) == (6, DomainState.RUNNING, False)


def test_guest_reboot_missed_row_and_on_reboot_destroy() -> None:
    t = started()
    t.intent = "reboot"
    assert feed(t, [], [row(7, "r-----")]) == [("reboot", None)] and t.domid == 7
    final = started(on_reboot="destroy")
    assert feed(final, [row(5, "---sr-")], []) == [("reboot", None), ("stopped", "shutdown")]


def test_destroy_own_and_external() -> None:
    t = started()
    t.intent = "destroy"
    assert feed(t, []) == [("stopped", "destroyed")]
    ext = started()
    assert feed(ext, []) == [("stopped", "destroyed")]  # libvirt: death -> destroyed


def test_external_pause_and_unpause() -> None:
    t = started()
    assert feed(t, [row(5, "--p---")], [row(5, "--p---")]) == [("suspended", "paused")]
    assert feed(t, [row(5, "-b----")]) == [("resumed", "unpaused")]


def test_localhost_migration_source_and_destination() -> None:
    src = started()
    src.intent = "migrate_out"
    dst = Tracked("d1", UUID, incoming=True, intent="migrate_in", exclude=frozenset({5}))
    # control/shutdown=suspend; source ---ss-; target d1--incoming paused; renames;
    # @releaseDomain; target unpaused
    snapshots = [
        [row(5, "---ss-")],
        [row(5, "---ss-"), row(6, "--p---", "d1--incoming")],
        [row(5, "---ss-", "d1--migratedaway"), row(6, "--p---", "d1")],
        [row(6, "--p---")],
        [row(6, "r-----")],
    ]
    assert feed(src, *snapshots) == [("suspended", "migrated"), ("stopped", "migrated")]
    assert src.migrated_away and src.domid is None and src.reason == "migrated"
    assert feed(dst, *snapshots) == [("started", "migrated"), ("resumed", "migrated")]
    assert dst.domid == 6 and dst.state == DomainState.RUNNING


def test_failed_migration_resumes_the_source() -> None:
    t = started()
    t.intent = "migrate_out"
    assert feed(t, [row(5, "---ss-")]) == [("suspended", "migrated")]
    t.intent = None  # the driver clears it when `xl migrate` fails
    assert feed(t, [row(5, "r-----")]) == [("resumed", "unpaused")]
    assert t.state == DomainState.RUNNING and t.seen_reason is None


def test_other_uuids_and_names_are_ignored() -> None:
    t = Tracked("d1", UUID, intent="start")
    other = row(8, "r-----", "d1", "11111111-2222-3333-4444-555555555555")
    away = row(9, "r-----", "d1--migratedaway")
    assert feed(t, [other, away]) == [] and t.domid is None


def test_own_create_in_flight_is_not_adopted_and_restarts_wait_until_running() -> None:
    t = Tracked("d1", UUID, intent="start", creating=True)
    assert feed(t, [row(5, "------", cpu=0.0)], [row(5, "r-----")]) == [] and t.domid is None
    t.creating = False
    assert feed(t, [row(5, "r-----")]) == [("started", "booted")]
    ext = Tracked("d1", UUID)  # someone else's xl create: ------ and --p--- are not adopted
    assert feed(ext, [row(6, "------", cpu=0.0)], [row(6, "--p---", cpu=0.0)]) == []
    assert feed(ext, [row(6, "-b----")]) == [("started", "booted")]


def test_a_guest_waiting_for_a_cpu_is_adopted() -> None:
    # on a loaded host a booting guest is mostly runnable-not-running: ------ with CPU time
    # (tests/unit/data/xen/xl-list-v-1.txt: p3); never seeing it r or b must not matter
    t = Tracked("d1", UUID, intent="start")
    assert feed(t, [row(5, "------", cpu=0.0)], [row(5, "------", cpu=0.4)]) == [
        ("started", "booted")
    ]
    rebooted = started()
    rebooted.intent = "reboot"
    restart = [row(6, "------", cpu=0.0)], [row(6, "--p---", cpu=0.0)], [row(6, "------", cpu=0.2)]
    assert feed(rebooted, [row(5, "---sr-")], [], *restart) == [("reboot", None)]
    assert (rebooted.domid, rebooted.state) == (6, DomainState.RUNNING)


def test_destroy_policies_are_reaped_by_the_driver() -> None:
    t = started()  # on_poweroff destroy: xl config says preserve, the driver destroys
    assert feed(t, [row(5, "---s--")]) == [("shutdown", "guest")] and t.reap
    t.intent = "reap"
    assert feed(t, []) == [("stopped", "shutdown")]
    assert not t.reap and t.intent is None
    c = started()
    assert feed(c, [row(5, "---sc-")]) == [("crashed", "panicked")] and c.reap
    c.intent = "reap"
    assert feed(c, []) == [("stopped", "crashed")]
    kept = started(on_crash="preserve")
    feed(kept, [row(5, "---sc-")])
    assert not kept.reap


def test_the_pause_of_our_own_destroy_is_not_a_suspend() -> None:
    # libxl's destroy pauses the domain first: a pass listing it meanwhile sees --p---
    t = started()
    t.intent = "destroy"
    assert feed(t, [row(5, "--p---")], []) == [("stopped", "destroyed")]
    r = started()
    r.intent = "reset"  # the driver destroys, then re-creates (it reports the reboot)
    assert feed(r, [row(5, "--p---")], [], [row(6, "r-----")]) == []
    assert (r.domid, r.state, r.intent) == (6, DomainState.RUNNING, None)
    ext = started()  # nobody of ours is destroying: a pause is a pause
    assert feed(ext, [row(5, "--p---")]) == [("suspended", "paused")]


def test_a_dying_domain_is_destroyed_not_shut_down() -> None:
    # libxl's destroy kills a domain that did not shut down: while its pages and backends
    # go it lists as dying without a shutdown reason (--p--d); the nested bed's `agent`
    # scenario saw its own destroy reported as shutdown(guest) + stopped(shutdown), and
    # the reap of the "poweroff" destroyed it a second time
    t = started()
    t.intent = "destroy"
    assert feed(t, [row(5, "--p--d")], [row(5, "-----d")], []) == [("stopped", "destroyed")]
    assert not t.reap and t.intent is None
    ext = started()  # someone else's xl destroy: death -> destroyed, nothing to reap
    assert feed(ext, [row(5, "--p--d")]) == [] and not ext.reap
    assert feed(ext, []) == [("stopped", "destroyed")]
    crash = started(on_crash="preserve")  # a shut-down one dying keeps its reason
    assert feed(crash, [row(5, "---sc-")], [row(5, "--pscd")], []) == [
        ("crashed", "panicked"), ("stopped", "crashed"),
    ]  # fmt: skip
