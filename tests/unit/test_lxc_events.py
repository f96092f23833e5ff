"""LXC driver: lxc's monitor messages -> libvirt's events (the sequences lxc really sends,
shared/notes/lxc-here.md), and reconcile snapshots after messages were missed."""

from __future__ import annotations

import signal

import pytest

from drivers.lxc.events import Intent, Outcome, Tracked, give_up, observe, on_message
from drivers.lxc.monitor import LxcState, MonitorMessage
from virtbus.protocol.events import DomainState

S = DomainState
ST = LxcState


def feed(t: Tracked, *items: LxcState | int) -> list[tuple[str, str | None]]:
    """Feed states (and ints: raw exit statuses) to ``t``; the events, in order."""
    events: list[tuple[str, str | None]] = []
    for item in items:
        msg = (
            MonitorMessage(t.name, exit_status=item)
            if isinstance(item, int)
            else MonitorMessage(t.name, state=item)
        )
        events += on_message(t, msg).events
    return events


def running() -> Tracked:
    t = Tracked("c", "u", intents={Intent.START})
    assert feed(t, ST.STARTING, ST.RUNNING) == [("started", "booted")]
    assert (t.state, t.reason, t.intents) == (S.RUNNING, "booted", set())
    return t


EXITED_0 = 0  # raw wait statuses
EXITED_7 = 7 << 8
KILLED = signal.SIGKILL
HANGUP = signal.SIGHUP


def test_freeze_and_thaw_with_lxc_repeats() -> None:
    t = running()
    assert feed(t, ST.FREEZING, ST.FROZEN, ST.FROZEN) == [("suspended", "paused")]
    assert (t.state, t.reason) == (S.PAUSED, "user")
    assert feed(t, ST.THAWED, ST.THAWED, ST.RUNNING) == [("resumed", "unpaused")]
    assert (t.state, t.reason) == (S.RUNNING, "unpaused")


def test_destroy() -> None:
    t = running()
    t.intents.add(Intent.DESTROY)
    assert feed(t, KILLED, ST.STOPPING, ST.STOPPED) == [("stopped", "destroyed")]
    assert (t.state, t.reason, t.intents) == (S.SHUTOFF, "destroyed", set())


def test_destroy_of_a_frozen_container() -> None:
    t = running()
    feed(t, ST.FREEZING, ST.FROZEN)
    t.intents.add(Intent.DESTROY)
    assert feed(t, KILLED, ST.STOPPING, ST.STOPPED) == [("stopped", "destroyed")]


def test_shutdown_asked() -> None:
    t = running()
    t.intents.add(Intent.SHUTDOWN)
    assert feed(t, EXITED_0, ST.STOPPING, ST.STOPPED) == [("stopped", "shutdown")]
    assert t.reason == "shutdown"


@pytest.mark.parametrize("status", [EXITED_0, EXITED_7])
def test_init_exits_by_itself(status: int) -> None:
    t = running()
    assert feed(t, status, ST.STOPPING, ST.STOPPED) == [("stopped", "shutdown")]
    assert (t.state, t.reason) == (S.SHUTOFF, "shutdown")


def test_killed_behind_our_back() -> None:
    t = running()
    assert feed(t, KILLED, ST.STOPPING, ST.STOPPED) == [("stopped", "failed")]
    assert (t.state, t.reason) == (S.SHUTOFF, "crashed")


def test_stop_whose_exit_was_not_seen_is_failed() -> None:
    t = running()
    assert feed(t, ST.STOPPING, ST.STOPPED) == [("stopped", "failed")]


def test_guest_reboot_is_restarted_by_lxc() -> None:
    t = running()
    assert feed(t, HANGUP, ST.STOPPING, ST.STOPPED) == []
    assert t.active and t.rebooting
    assert feed(t, ST.STARTING, ST.RUNNING) == [("reboot", None)]
    assert (t.state, t.reason, t.rebooting) == (S.RUNNING, "booted", False)


def test_guest_reboot_whose_restart_fails() -> None:
    t = running()
    feed(t, HANGUP, ST.STOPPING, ST.STOPPED)
    assert feed(t, ST.STARTING, ST.ABORTING, ST.ABORTING, ST.STOPPING, ST.STOPPED) == [
        ("stopped", "failed")
    ]
    assert (t.state, t.reason, t.active) == (S.SHUTOFF, "failed", False)


def test_driver_reboot_restarts_when_init_exits() -> None:
    t = running()
    t.intents.add(Intent.REBOOT)
    outcome = Outcome()
    for msg in (MonitorMessage("c", exit_status=EXITED_0), MonitorMessage("c", state=ST.STOPPING),
                MonitorMessage("c", state=ST.STOPPED)):  # fmt: skip
        outcome = on_message(t, msg)
    assert outcome == Outcome(restart=True)
    assert t.state == S.RUNNING and t.restarting  # never seen shut off
    assert feed(t, ST.STARTING, ST.RUNNING) == [("reboot", None)]
    assert not t.intents and not t.restarting


def test_reset_restarts_after_the_kill() -> None:
    t = running()
    t.intents.add(Intent.RESET)
    assert on_message(t, MonitorMessage("c", exit_status=KILLED)) == Outcome()
    on_message(t, MonitorMessage("c", state=ST.STOPPING))
    assert on_message(t, MonitorMessage("c", state=ST.STOPPED)).restart
    assert feed(t, ST.STARTING, ST.RUNNING) == [("reboot", None)]


def test_restart_that_fails_gives_up() -> None:
    t = running()
    t.intents.add(Intent.REBOOT)
    feed(t, EXITED_0, ST.STOPPED)
    assert give_up(t) == Outcome((("stopped", "failed"),))
    assert (t.state, t.reason) == (S.SHUTOFF, "failed")
    assert give_up(t) == Outcome()  # once


def test_start_that_aborts() -> None:
    t = Tracked("c", "u", intents={Intent.START})
    assert feed(t, ST.STARTING, ST.ABORTING, ST.ABORTING, ST.STOPPING, ST.STOPPED) == []
    assert (t.state, t.reason, t.intents) == (S.SHUTOFF, "failed", set())


def test_started_behind_our_back() -> None:
    t = Tracked("c", "u")
    assert feed(t, ST.STARTING, ST.RUNNING) == [("started", "booted")]


def test_generation_counts_messages() -> None:
    t = Tracked("c", "u")
    feed(t, ST.STARTING, ST.RUNNING, EXITED_0)
    assert t.generation == 3


# --- snapshots --------------------------------------------------------------------------
def test_reattach_silently_when_nothing_changed() -> None:
    t = running()
    assert observe(t, "RUNNING") == Outcome()


def test_snapshot_frozen_behind_our_back() -> None:
    t = running()
    assert observe(t, "FROZEN").events == (("suspended", "paused"),)
    assert observe(t, "FROZEN") == Outcome()
    assert observe(t, "RUNNING").events == (("resumed", "unpaused"),)


def test_snapshot_gone() -> None:
    t = running()
    assert observe(t, None).events == (("stopped", "failed"),)
    assert (t.state, t.reason) == (S.SHUTOFF, "crashed")
    assert observe(t, "STOPPED") == Outcome()


def test_snapshot_gone_while_destroying() -> None:
    t = running()
    t.intents.add(Intent.DESTROY)
    assert observe(t, "STOPPED").events == (("stopped", "destroyed"),)


def test_snapshot_started_and_frozen_behind_our_back() -> None:
    t = Tracked("c", "u")
    assert observe(t, "FROZEN").events == (("started", "booted"), ("suspended", "paused"))


def test_snapshot_transient_states_wait() -> None:
    t = running()
    for state in ("STARTING", "STOPPING", "ABORTING", "FREEZING"):
        assert observe(t, state) == Outcome()
    assert t.state == S.RUNNING


def test_snapshot_during_a_driver_restart_waits() -> None:
    t = running()
    t.intents.add(Intent.REBOOT)
    feed(t, EXITED_0, ST.STOPPED)
    assert observe(t, "STOPPED") == Outcome()
    assert observe(t, "RUNNING").events == (("reboot", None),)
