"""From lxc's monitor messages (and ``lxc-ls`` snapshots) to libvirt's events: pure.

No I/O here, so the sequences lxc really sends (shared/notes/lxc-here.md) are unit
tests. lxc reports ``STARTING RUNNING`` for a start, ``FREEZING FROZEN`` / ``THAWED
RUNNING`` around a freeze, and, when init ends, an exit message with its raw wait
status followed by ``STOPPING STOPPED``. How a stop is reported depends on what the
driver asked for (``intents``) and on that status:

- destroy → ``stopped(destroyed)``; shutdown → ``stopped(shutdown)``;
- init exited by itself (``WIFEXITED``) → ``stopped(shutdown)``, as libvirt's LXC driver;
- init killed behind the driver's back (``WIFSIGNALED``), or the exit went unseen →
  ``stopped(failed)`` with state ``shutoff(crashed)``, as the QEMU driver reports a
  killed QEMU;
- init died of SIGHUP (it called reboot(2)): lxc restarts the container itself, and
  the ``RUNNING`` that follows is a ``reboot`` event;
- a reboot or reset the driver asked for, whose init just exited: the driver starts the
  container again (``Outcome.restart``), as libvirt's LXC driver does, and its
  ``RUNNING`` is the ``reboot`` event.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from enum import StrEnum

from drivers.lxc.monitor import LxcState, MonitorMessage
from virtbus.protocol.events import DomainState

S = DomainState
Event = tuple[str, str | None]  # (event, detail) in libvirt's vocabulary
_TRANSIENT = frozenset({"STARTING", "STOPPING", "ABORTING", "FREEZING"})


class Intent(StrEnum):
    """What the driver asked of a container and has not yet seen happen."""

    START = "start"
    SHUTDOWN = "shutdown"
    DESTROY = "destroy"
    REBOOT = "reboot"
    RESET = "reset"


@dataclass
class Tracked:
    """What the driver believes about one container."""

    name: str
    uuid: str
    state: DomainState = S.SHUTOFF
    reason: str = "unknown"
    lxc_state: str = "STOPPED"
    intents: set[Intent] = field(default_factory=set)
    exit_status: int | None = None  # init's raw wait status, from the exit message
    rebooting: bool = False  # init rebooted itself: lxc is restarting the container
    restarting: bool = False  # the driver is starting it again (reboot, reset)
    generation: int = 0  # bumped by every message: a snapshot older than it is stale

    @property
    def active(self) -> bool:
        return self.state != S.SHUTOFF or self.rebooting or self.restarting


@dataclass(frozen=True, slots=True)
class Outcome:
    events: tuple[Event, ...] = ()
    restart: bool = False  # the driver must start the container again (reboot, reset)


_NOTHING = Outcome()


def _set(t: Tracked, state: DomainState, reason: str) -> None:
    t.state, t.reason = state, reason


def _final(t: Tracked, detail: str, reason: str) -> Outcome:
    _set(t, S.SHUTOFF, reason)
    t.intents.clear()
    t.rebooting = t.restarting = False
    return Outcome((("stopped", detail),))


def _running(t: Tracked) -> Outcome:
    if t.rebooting or t.restarting:
        t.rebooting = t.restarting = False
        t.intents -= {Intent.START, Intent.REBOOT, Intent.RESET}
        _set(t, S.RUNNING, "booted")
        return Outcome((("reboot", None),))
    if t.state == S.SHUTOFF:
        t.intents.discard(Intent.START)
        _set(t, S.RUNNING, "booted")
        return Outcome((("started", "booted"),))
    if t.state == S.PAUSED:  # thawed, and the THAWED message was not seen
        _set(t, S.RUNNING, "unpaused")
        return Outcome((("resumed", "unpaused"),))
    return _NOTHING


def _frozen(t: Tracked) -> Outcome:
    if t.state == S.PAUSED:
        return _NOTHING  # lxc repeats FROZEN
    started = _running(t) if t.state == S.SHUTOFF else _NOTHING
    _set(t, S.PAUSED, "user")
    return Outcome((*started.events, ("suspended", "paused")))


def _thawed(t: Tracked) -> Outcome:
    if t.state != S.PAUSED:
        return _NOTHING
    _set(t, S.RUNNING, "unpaused")
    return Outcome((("resumed", "unpaused"),))


def _stopped(t: Tracked) -> Outcome:
    status, t.exit_status = t.exit_status, None
    if t.rebooting or t.restarting:  # the restart after a reboot failed
        return _final(t, "failed", "failed")
    if t.state == S.SHUTOFF:  # a start that failed before RUNNING, or a repeat
        if Intent.START in t.intents:
            t.intents.discard(Intent.START)
            t.reason = "failed"
        return _NOTHING
    signalled = status is not None and os.WIFSIGNALED(status)
    hangup = signalled and os.WTERMSIG(status or 0) == signal.SIGHUP
    if Intent.DESTROY in t.intents:
        return _final(t, "destroyed", "destroyed")
    if Intent.RESET in t.intents or (Intent.REBOOT in t.intents and not hangup):
        t.restarting = True  # state stays running(booted) until it runs again
        return Outcome(restart=True)
    if hangup:
        t.rebooting = True
        return _NOTHING
    if Intent.SHUTDOWN in t.intents or (status is not None and os.WIFEXITED(status)):
        return _final(t, "shutdown", "shutdown")
    return _final(t, "failed", "crashed")  # killed behind our back, or the exit went unseen


def give_up(t: Tracked, detail: str = "failed", reason: str = "failed") -> Outcome:
    """The driver could not bring the container back (a restart failed, or a destroy
    caught it between two runs): it is shut off."""
    if not t.active:
        return _NOTHING
    return _final(t, detail, reason)


def on_message(t: Tracked, message: MonitorMessage) -> Outcome:
    """Apply one monitor message to ``t``; the events to publish, in order."""
    t.generation += 1
    if message.exit_status is not None:
        t.exit_status = message.exit_status
        return _NOTHING
    state = message.state
    if state is None:
        return _NOTHING
    t.lxc_state = state.value
    if state == LxcState.RUNNING:
        return _running(t)
    if state == LxcState.FROZEN:
        return _frozen(t)
    if state == LxcState.THAWED:
        return _thawed(t)
    if state == LxcState.STOPPED:
        return _stopped(t)
    return _NOTHING  # STARTING, STOPPING, ABORTING, FREEZING: the next message decides


def observe(t: Tracked, lxc_state: str | None) -> Outcome:
    """Apply a snapshot (``lxc-ls``'s state, None = not there) after messages may have
    been missed: the monitor reconnected, the agent restarted, or a periodic check found
    a difference (a freeze through the cgroup, a killed monitor)."""
    lxc = lxc_state or "STOPPED"
    if lxc in _TRANSIENT:
        return _NOTHING  # the next pass sees where it went
    t.lxc_state = lxc
    if lxc == "STOPPED":
        if t.state == S.SHUTOFF and not t.rebooting:
            return _NOTHING
        if t.restarting:
            return _NOTHING  # the driver is starting it again
        return _stopped(t)
    if lxc == "FROZEN":
        return _frozen(t)
    if t.state == S.PAUSED:
        return _thawed(t)
    return _running(t)
