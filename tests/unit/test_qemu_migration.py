"""Unit tests of the QEMU migration pieces that need no QEMU: QMP arguments, URIs,
query-migrate parsing, the job that follows a migration, and the lifecycle mapping of
migration-related QMP events."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from drivers.base import MigrationParams, MigrationStatus
from drivers.qemu import events as ev
from drivers.qemu.migration import (
    TLS_ID,
    Job,
    MigrationSettings,
    capability_list,
    configure,
    free_port,
    parameter_map,
    parse_tcp_uri,
    start_incoming,
    status_from_query,
    tcp_uri,
    tls_hostname,
    tls_object,
)
from virtbus.errors import InvalidArgument, MigrateFailed, OperationFailed
from virtbus.protocol.base import decode, to_wire
from virtbus.protocol.events import DomainState as S

SETTINGS = MigrationSettings(progress_interval=0.05)


def caps(params: MigrationParams, role: str) -> dict[str, bool]:
    return {c["capability"]: c["state"] for c in capability_list(params, role)}  # type: ignore[arg-type]


def test_capabilities_plain_turns_everything_off_but_events() -> None:
    src = caps(MigrationParams(), "source")
    assert src == {"events": True, "postcopy-ram": False, "multifd": False,
                   "auto-converge": False, "return-path": False,
                   "pause-before-switchover": False}  # fmt: skip
    assert caps(MigrationParams(), "destination") == {
        "events": True, "postcopy-ram": False, "multifd": False,
    }  # fmt: skip


def test_capabilities_postcopy_multifd_autoconverge() -> None:
    pc = MigrationParams(postcopy=True, auto_converge=True)
    assert caps(pc, "source")["postcopy-ram"] and caps(pc, "source")["return-path"]
    assert caps(pc, "source")["auto-converge"]
    assert caps(pc, "destination")["postcopy-ram"]
    assert "auto-converge" not in caps(pc, "destination")  # source-only
    mf = MigrationParams(parallel=2)
    assert caps(mf, "source")["multifd"] and caps(mf, "destination")["multifd"]


def test_capabilities_copy_storage_pauses_the_source_before_switchover() -> None:
    """The mirrors are completed at pre-switchover (libvirt's order); only the source."""
    cs = MigrationParams(copy_storage_all=True)
    assert caps(cs, "source")["pause-before-switchover"]
    assert "pause-before-switchover" not in caps(cs, "destination")


PLAIN = {"tls-creds": ""}  # every attempt says it is not over TLS (QEMU keeps parameters)


def test_parameters() -> None:
    params = MigrationParams(bandwidth_mib_s=50, max_downtime_ms=100, parallel=2)
    assert parameter_map(params, "source", SETTINGS) == {
        "multifd-channels": 2, "max-bandwidth": 50 * 1024 * 1024, "downtime-limit": 100,
        **PLAIN, "tls-hostname": "",
    }  # fmt: skip
    assert parameter_map(params, "destination", SETTINGS) == {"multifd-channels": 2, **PLAIN}
    default = parameter_map(MigrationParams(), "source", SETTINGS)
    assert default == {"max-bandwidth": SETTINGS.unlimited_bandwidth, "downtime-limit": 300,
                       **PLAIN, "tls-hostname": ""}  # fmt: skip
    assert parameter_map(MigrationParams(), "destination", SETTINGS) == PLAIN


def test_tls_parameters_and_credentials() -> None:
    """--tls: both sides name the credentials; the source the name the destination's
    certificate must carry (the host, unless tls_destination says otherwise)."""
    tls = MigrationParams(tls=True)
    src = parameter_map(tls, "source", SETTINGS, "node-b")
    assert (src["tls-creds"], src["tls-hostname"]) == (TLS_ID, "node-b")
    assert parameter_map(tls, "destination", SETTINGS) == {"tls-creds": TLS_ID}
    assert tls_hostname(tls, "tcp:192.0.2.7:4444", "node-b") == "node-b"
    assert tls_hostname(tls, "tcp:192.0.2.7:4444") == "192.0.2.7"
    other = MigrationParams(tls=True, tls_destination="mig.example.net")
    assert tls_hostname(other, "tcp:192.0.2.7:4444", "node-b") == "mig.example.net"
    server = tls_object("destination", "/etc/pki/qemu", False)
    assert server == {"qom-type": "tls-creds-x509", "id": TLS_ID, "dir": "/etc/pki/qemu",
                      "endpoint": "server", "verify-peer": False}  # fmt: skip
    client = tls_object("source", "/etc/pki/qemu", False)
    assert (client["endpoint"], client["verify-peer"]) == ("client", True)  # always checks
    with pytest.raises(InvalidArgument, match="without tls"):
        decode({"tls_destination": "node-b"}, MigrationParams)
    with pytest.raises(InvalidArgument, match="host name"):
        decode({"tls": True, "tls_destination": "a_b"}, MigrationParams)


def test_params_qemu_would_refuse_are_refused_when_decoded() -> None:
    """One check, in the type (virtbus.protocol.migration): no driver-side copy."""
    assert decode({"postcopy": True}, MigrationParams) == MigrationParams(postcopy=True)
    with pytest.raises(InvalidArgument, match="postcopy"):
        decode({"postcopy": True, "parallel": 2}, MigrationParams)
    for bad in ({"bandwidth_mib_s": 0}, {"parallel": -1}, {"max_downtime_ms": 2_000_001},
                {"listen_address": "::1,to=9"}):  # fmt: skip
        with pytest.raises(InvalidArgument):
            decode(bad, MigrationParams)
    with pytest.raises(InvalidArgument, match="postcopy"):
        decode({"postcopy": True, "copy_storage_inc": True}, MigrationParams)
    with pytest.raises(InvalidArgument, match="alternatives"):  # virsh's flags exclude too
        decode({"copy_storage_all": True, "copy_storage_inc": True}, MigrationParams)
    assert decode({"copy_storage_inc": True}, MigrationParams).copy_storage


def test_uris() -> None:
    assert tcp_uri("127.0.0.1", 4444) == "tcp:127.0.0.1:4444"
    assert tcp_uri("::1", 4444) == "tcp:[::1]:4444"
    assert parse_tcp_uri("tcp:127.0.0.1:4444") == ("127.0.0.1", 4444)
    assert parse_tcp_uri("tcp:[::1]:4444") == ("::1", 4444)
    for bad in ("unix:/tmp/x", "tcp:127.0.0.1", "tcp::4444", "tcp:h:99999", "exec:cat"):
        with pytest.raises(InvalidArgument):
            parse_tcp_uri(bad)
    assert 0 < free_port("127.0.0.1") < 65536


def test_status_from_query() -> None:
    ram = {"transferred": 10, "remaining": 0, "total": 100, "dirty-sync-count": 3}
    reply = {"status": "completed", "downtime": 36, "total-time": 1000, "ram": ram}
    st = status_from_query(reply)
    assert (st.status, st.transferred, st.remaining, st.total, st.passes) == (
        "completed", 10, 0, 100, 3,
    )  # fmt: skip
    assert (st.downtime_ms, st.total_time_ms, st.error) == (36, 1000, None)
    failed = status_from_query({"status": "failed", "error-desc": "Unable to write"})
    assert failed.error == "Unable to write" and failed.total == 0
    assert status_from_query({}).status == "none"
    # QEMU 7.2 after postcopy: "downtime" is a timestamp, not a duration
    assert (
        status_from_query({"status": "completed", "downtime": 10**9, "total-time": 29}).downtime_ms
        is None
    )


class FakeQemu:
    """Scripted QMP: records commands, answers query-migrate from a list of replies."""

    def __init__(self, replies: list[dict[str, Any]] | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.replies = replies or []
        self.fail: dict[str, Exception] = {}

    async def execute(self, cmd: str, args: Any = None, timeout: float | None = None) -> Any:
        self.calls.append((cmd, args))
        if cmd in self.fail:
            raise self.fail.pop(cmd)
        if cmd == "query-migrate":
            return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return {}


async def test_configure_order() -> None:
    qemu = FakeQemu()
    await configure(qemu.execute, MigrationParams(parallel=2), "destination", SETTINGS)
    assert [c for c, _ in qemu.calls] == ["migrate-set-capabilities", "migrate-set-parameters"]
    qemu.calls.clear()
    await configure(qemu.execute, MigrationParams(), "destination", SETTINGS)
    assert qemu.calls[-1] == ("migrate-set-parameters", PLAIN)


async def test_start_incoming_retries_a_taken_port() -> None:
    qemu = FakeQemu()
    qemu.fail["migrate-incoming"] = OperationFailed("Failed to bind socket: Address already in use")
    uri = await start_incoming(qemu.execute, MigrationParams(), SETTINGS)
    assert [c for c, _ in qemu.calls] == ["migrate-incoming", "migrate-incoming"]
    assert uri == qemu.calls[-1][1]["uri"] and uri.startswith("tcp:127.0.0.1:")
    qemu.fail["migrate-incoming"] = OperationFailed("something else")
    with pytest.raises(MigrateFailed):
        await start_incoming(qemu.execute, MigrationParams(), SETTINGS)


def _q(status: str, passes: int = 1, remaining: int = 50) -> dict[str, Any]:
    return {"status": status, "ram": {"transferred": 100 - remaining, "remaining": remaining,
                                      "total": 100, "dirty-sync-count": passes}}  # fmt: skip


async def test_job_follows_to_completion_and_emits_progress() -> None:
    qemu = FakeQemu([_q("active"), _q("active", 2, 10), _q("completed", 2, 0)])
    job = Job("source", MigrationParams(), SETTINGS)
    seen: list[dict[str, Any]] = []
    task = asyncio.create_task(job.follow(qemu.execute, lambda st: seen.append(to_wire(st))))
    job.feed("MIGRATION", {"status": "active"})
    await asyncio.wait_for(task, 2)
    assert not job.active and job.status.status == "completed"
    assert seen[-1]["status"] == "completed" and seen[-1]["remaining"] == 0
    assert [s["passes"] for s in seen] == sorted(s["passes"] for s in seen)
    assert "migrate-start-postcopy" not in [c for c, _ in qemu.calls]


async def test_an_end_announced_by_event_before_the_query_saw_it_is_reported_once() -> None:
    """The race seen on a loaded machine: QEMU's MIGRATION 'completed' event is read while
    the query answered just before still says 'active'. The end state must be reported
    by the query that follows, once, and never before an 'active'."""
    qemu = FakeQemu([_q("active"), _q("completed", 2, 0)])
    job = Job("source", MigrationParams(), SETTINGS)
    seen: list[str] = []

    async def execute(cmd: str, args: Any = None, timeout: float | None = None) -> Any:
        reply = await qemu.execute(cmd, args, timeout)
        if cmd == "query-migrate" and reply["status"] == "active":
            job.feed("MIGRATION", {"status": "completed"})  # arrives before the reply is read
        return reply

    task = asyncio.create_task(job.follow(execute, lambda st: seen.append(st.status)))
    job.feed("MIGRATION", {"status": "active"})
    await asyncio.wait_for(task, 2)
    assert seen.count("completed") == 1 and seen[-1] == "completed", seen


async def test_job_switches_to_postcopy_after_first_pass() -> None:
    qemu = FakeQemu([_q("active", 1), _q("active", 2), _q("postcopy-active", 2),
                     _q("completed", 2, 0)])  # fmt: skip
    job = Job("source", MigrationParams(postcopy=True), SETTINGS)
    task = asyncio.create_task(job.follow(qemu.execute, lambda st: None))
    await asyncio.wait_for(task, 2)
    cmds = [c for c, _ in qemu.calls]
    assert cmds.count("migrate-start-postcopy") == 1
    assert job.postcopy_started and job.in_postcopy


async def test_job_ended_from_outside_reports_failed() -> None:
    qemu = FakeQemu([_q("active")])
    job = Job("source", MigrationParams(), SETTINGS)
    seen: list[MigrationStatus] = []
    task = asyncio.create_task(job.follow(qemu.execute, seen.append))
    await asyncio.sleep(0.12)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert job.status.status == "failed" and seen[-1].status == "failed"


async def test_destination_job_done_on_event_and_wait_status() -> None:
    job = Job("destination", MigrationParams(), SETTINGS)
    assert not await job.wait_status(lambda st: st.status == "completed", 0.05)
    asyncio.get_running_loop().call_later(0.02, job.feed, "MIGRATION", {"status": "completed"})
    assert await job.wait_status(lambda st: st.status == "completed", 1)
    assert await job.wait_done(0.01)


# --- lifecycle mapping around migrations (events.py) -----------------------------------
def ctx(state: S, reason: str, *pending: ev.Pending) -> ev.Context:
    return ev.Context(state, reason, pending=frozenset(pending))


def test_destination_cont_is_resumed_migrated() -> None:
    out = ev.map_event("RESUME", {}, ctx(S.PAUSED, "migration", ev.Pending.INCOMING))
    assert out.events == (("resumed", "migrated", {}),)
    assert out.state == (S.RUNNING, "migrated") and ev.Pending.INCOMING in out.clear


def test_destination_exit_is_stopped_failed() -> None:
    out = ev.map_exit(ctx(S.PAUSED, "migration", ev.Pending.INCOMING, ev.Pending.DESTROY))
    assert out.events == (("stopped", "failed", {}),) and out.state == (S.SHUTOFF, "failed")


def test_source_stop_for_switchover_is_suspended_migrated() -> None:
    out = ev.map_event("STOP", {}, ctx(S.RUNNING, "booted", ev.Pending.MIGRATING),
                       status_reason=ev.pause_reason("finish-migrate"))  # fmt: skip
    assert out.events == (("suspended", "migrated", {}),)
    assert out.state == (S.PAUSED, "migration")


def test_source_resumed_after_failed_switchover() -> None:
    out = ev.map_event("RESUME", {}, ctx(S.PAUSED, "migration", ev.Pending.MIGRATING))
    assert out.events == (("resumed", "migrated", {}),)
    assert out.state == (S.RUNNING, "migration_canceled")
    # a user's suspend/resume while a (failed) migration is remembered stays "unpaused"
    user = ev.map_event(
        "RESUME", {}, ctx(S.PAUSED, "user", ev.Pending.MIGRATING, ev.Pending.RESUME)
    )
    assert user.events == (("resumed", "unpaused", {}),)


def test_source_confirm_exit_is_stopped_migrated_without_noise() -> None:
    c = ctx(S.PAUSED, "migration", ev.Pending.MIGRATING, ev.Pending.MIGRATED_OUT)
    assert ev.map_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}, c) == ev.NOTHING
    out = ev.map_exit(c)
    assert out.events == (("stopped", "migrated", {}),) and out.state == (S.SHUTOFF, "migrated")


def test_raw_migration_events_are_left_to_the_job() -> None:
    c = ctx(S.RUNNING, "booted", ev.Pending.MIGRATING)
    assert ev.map_event("MIGRATION", {"status": "active"}, c) == ev.NOTHING
    assert ev.map_event("MIGRATION_PASS", {"pass": 2}, c) == ev.NOTHING
