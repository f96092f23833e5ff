"""The QEMU run status file (drivers/qemu/state.py): written on every change of state, so
it is encoded with msgspec; what it says reads back the same, and a file written by the
older json.dumps(indent=1) encoder still reads."""

from __future__ import annotations

import json
from pathlib import Path

from drivers.qemu.state import RunStatus
from virtbus.protocol.events import DomainState


def status() -> RunStatus:
    return RunStatus(
        uuid="0f3c9a52-5b2e-4f6e-9a7d-111111111111", pid=4242, id=7,
        qmp_socket=Path("/run/virtbus/q.sock"), xml="<domain type='kvm'><name>é\"x</name></domain>",
        state=DomainState.PAUSED, reason="user", logfile=Path("/var/log/q.log"),
        sockets=(Path("/run/a"), Path("/run/b")), job={"phase": "perform", "n": 3},
        companions={"helpers": [{"pid": 9, "argv": ["swtpm", "socket"]}]},
        extra={"from_a_newer_agent": {"k": [1, 2]}},
    )  # fmt: skip


def test_status_reads_back_as_written() -> None:
    assert RunStatus.from_json(status().to_json()) == status()


def test_a_status_file_of_the_older_encoder_still_reads() -> None:
    doc = json.loads(status().to_json())
    old = json.dumps(doc, indent=1).encode()
    assert RunStatus.from_json(old) == status()
    assert json.loads(status().to_json()) == json.loads(old)  # the same document
