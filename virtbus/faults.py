"""Fault points for the crash tests, in one place: each is an environment variable, read
once at import, and does nothing unless set. Production never sets them; the tests set
them on the agent or scheduler process they start (tests/e2e/test_agent_crash.py,
tests/integration/test_fault_matrix.py).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: ``OP`` or ``OP@N``: the agent stops itself (SIGSTOP) once that op's reply (of its Nth
#: call, default the first) is sent and recorded and before its ack, so a test can kill
#: -9 it where RabbitMQ redelivers an executed call (agent/dispatch.py)
STOP_BEFORE_ACK = os.environ.get("VIRTBUS_FAULT_STOP_BEFORE_ACK")
_STOP_OP, _, _STOP_NTH = (STOP_BEFORE_ACK or "").partition("@")
_stop_calls = 0

#: a migration phase (``perform``, ``finish``, ...): the scheduler dies (exit 137, as
#: after SIGKILL: no cleanup, no flush) when a migration enters it, once the phase is
#: journaled and before its step is sent (scheduler/migration.py)
SCHEDULER_EXIT_AT = os.environ.get("VIRTBUS_FAULT_SCHEDULER_EXIT_AT")


def stop_before_ack(op: str) -> bool:
    """True (once) when the agent's fault point names this call of ``op``: stop here."""
    global _stop_calls
    if not _STOP_OP or op != _STOP_OP:
        return False
    _stop_calls += 1
    return _stop_calls == int(_STOP_NTH or 1)


def scheduler_exit_at(phase: str) -> None:
    """Die here if the scheduler's fault point names ``phase``."""
    if SCHEDULER_EXIT_AT is not None and phase == SCHEDULER_EXIT_AT:
        log.warning("migration phase %s: exiting (fault injection)", phase)
        os._exit(137)
