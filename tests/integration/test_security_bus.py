"""Who may say what on the bus: the AMQP user_id of every call is authorised by a real
agent (and the scheduler) against a policy file, on the real broker.

A vhost and users of this module's own on the shared RabbitMQ (created and deleted with
rabbitmqctl): an agent whose bus user is its host name, an admin, an operator scoped to
``web-*`` domains, a viewer and a scheduler. Every op class (read, lifecycle, config,
migrate, admin) is tried by each of them; forged heartbeats and events (a user speaking
for a host it is not) are dropped by the client library and the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.procs import agent_process, cli, scheduler_process
from virtbus.bus.amqp import AmqpBus
from virtbus.bus.definitions import password_hash
from virtbus.bus.topology import EVENTS_EXCHANGE, HOSTS_EXCHANGE, RPC_EXCHANGE
from virtbus.client import Client
from virtbus.client.core import Host
from virtbus.client.storage import Volume, host_jobs
from virtbus.domain import OWNER_NS
from virtbus.errors import AuthDenied, VirtbusError
from virtbus.protocol import ops
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.protocol.migration import (
    MigrationBegin,
    MigrationDomain,
    MigrationEnd,
    MigrationParams,
    MigrationPerform,
    MigrationPrepare,
)
from virtbus.protocol.storage import (
    DownloadChunkRequest,
    TransferTarget,
    UploadChunk,
    UploadRequest,
    VolumeTarget,
)
from virtbus.security.audit import read_log
from virtbus.storage import volume_xml

pytestmark = pytest.mark.rabbitmq
ROOT = Path(__file__).resolve().parents[2]
TAG = uuid.uuid4().hex[:6]


def _ctl(*args: str) -> str:
    run = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


@dataclass(frozen=True)
class Cluster:
    vhost: str
    password: str
    host: str  # the agent's host name = its bus user
    host2: str  # a second agent's (a migration's destination)
    admin: str
    operator: str
    oper2: str  # the built-in operator role (its owner rules)
    oper3: str  # a second one (whose objects oper2 may not remove)
    viewer: str
    scheduler: str
    policy: Path

    def url(self, user: str) -> str:
        return f"amqp://{user}:{self.password}@127.0.0.1:5672/{self.vhost.replace('/', '%2F')}"


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    roles = ("host", "host2", "admin", "operator", "oper2", "oper3", "viewer", "scheduler")
    names = {r: f"{r}-{TAG}" for r in roles}
    vhost, password = f"/virtbus-sec-{TAG}", uuid.uuid4().hex
    defs = {
        "vhosts": [{"name": vhost}],
        "users": [
            {
                "name": n,
                "password_hash": password_hash(password),
                "tags": "",
                "hashing_algorithm": "rabbit_password_hashing_sha256",
            }
            for n in names.values()
        ],
        "permissions": [
            {"user": n, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
            for n in names.values()
        ],
    }
    fd, defs_path = tempfile.mkstemp(prefix="virtbus-sec-", suffix=".json")
    os.write(fd, json.dumps(defs).encode())
    os.close(fd)
    os.chmod(defs_path, 0o644)  # rabbitmqctl reads it as the rabbitmq user
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    policy.write_text(
        f"""
[users]
{names["host"]} = ["agent"]
{names["host2"]} = ["agent"]
{names["admin"]} = ["admin"]
{names["oper2"]} = ["operator"]
{names["oper3"]} = ["operator"]
{names["viewer"]} = ["viewer"]
{names["scheduler"]} = ["scheduler"]

[[rules]]              # the operator: everything but migration and admin, on web-* only
user = "{names["operator"]}"
ops = ["@read", "@lifecycle", "@config"]
targets = ["web-*"]

[[rules]]              # ... and the listings, which name no domain
user = "{names["operator"]}"
ops = ["domain.list", "host.*", "scheduler.ping", "scheduler.hosts"]
except = ["host.set_draining"]
"""
    )
    try:
        _ctl("import_definitions", defs_path)
        yield Cluster(vhost, password, policy=policy, **names)
    finally:
        os.unlink(defs_path)
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=120)
        for name in names.values():
            subprocess.run(["rabbitmqctl", "delete_user", name], capture_output=True, timeout=120)


def _xml(name: str) -> str:
    return (ROOT / "deploy/examples/minimal.xml").read_text().replace("minimal", name)


@pytest.fixture
async def agent(users: Cluster, tmp_path: Path) -> AsyncIterator[str]:
    url = users.url(users.host)
    async with agent_process(users.host, tmp_path, "--policy", str(users.policy), bus=url):
        yield users.host


async def _outcome(action: Any) -> str:
    """``ok``, or the error code of the call."""
    try:
        await action
    except VirtbusError as exc:
        return exc.code
    return "ok"


async def test_three_user_matrix_over_every_op_class(users: Cluster, agent: str) -> None:
    admin = await Client.connect(users.url(users.admin), oneshot=True)
    oper = await Client.connect(users.url(users.operator), oneshot=True)
    viewer = await Client.connect(users.url(users.viewer), oneshot=True)
    sched = await Client.connect(users.url(users.scheduler), oneshot=True)
    try:
        a, o, v = admin.host(agent), oper.host(agent), viewer.host(agent)
        await a.define(_xml("web-1"))
        await a.define(_xml("db-1"))
        await a.domain("db-1").start()

        def migrate(c: Client, dom: str) -> Any:
            return c.host(agent).call(ops.MIGRATION_STATUS, MigrationDomain(domain=dom))

        # (who, what, expected): every op class, each user.
        matrix: list[tuple[str, Any, str]] = [
            # read
            ("admin", a.domain("db-1").info(), "ok"),
            ("operator", o.domain("web-1").info(), "ok"),
            ("operator", o.domain("db-1").info(), "AUTH_DENIED"),
            ("operator", o.domains(), "ok"),
            ("viewer", v.domain("db-1").info(), "ok"),
            ("viewer", v.domains(), "ok"),
            # lifecycle
            ("operator", o.domain("web-1").start(), "ok"),
            ("operator", o.domain("web-1").suspend(), "ok"),
            ("operator", o.domain("db-1").destroy(), "AUTH_DENIED"),
            ("viewer", v.domain("web-1").resume(), "AUTH_DENIED"),
            ("admin", a.domain("web-1").resume(), "ok"),
            # config
            ("operator", o.define(_xml("web-2")), "ok"),
            ("operator", o.define(_xml("db-2")), "AUTH_DENIED"),
            ("operator", o.domain("web-2").undefine(), "ok"),
            ("viewer", v.define(_xml("web-3")), "AUTH_DENIED"),
            ("viewer", v.domain("db-1").undefine(), "AUTH_DENIED"),
            # admin
            ("operator", o.set_draining(False), "AUTH_DENIED"),
            ("viewer", v.set_draining(False), "AUTH_DENIED"),
            ("admin", a.set_draining(False), "ok"),
            # migrate: the scheduler role only, even for an admin
            ("admin", migrate(admin, "db-1"), "AUTH_DENIED"),
            ("operator", migrate(oper, "web-1"), "AUTH_DENIED"),
            ("viewer", migrate(viewer, "db-1"), "AUTH_DENIED"),
        ]
        got = [(who, await _outcome(action)) for who, action, _ in matrix]
        assert got == [(who, want) for who, _, want in matrix]
        # The scheduler role passes the policy.
        assert await _outcome(migrate(sched, "db-1")) != "AUTH_DENIED"
        # A denial names the user, the op, the host and the target.
        with pytest.raises(AuthDenied) as denied:
            await o.domain("db-1").destroy()
        for word in (users.operator, "domain.destroy", agent, "db-1"):
            assert word in denied.value.message
        assert (await o.domain("web-1").info()).state == "running"  # still serving
    finally:
        for c in (admin, oper, viewer, sched):
            await c.close()


async def test_dumpxml_hides_graphics_passwords_unless_security_info_is_granted(
    users: Cluster, agent: str
) -> None:
    """libvirt's VIR_DOMAIN_XML_SECURE: ``dumpxml`` leaves ``<graphics passwd>`` out;
    ``--security-info`` is ``domain.read_secure``, which the viewer role is not granted."""
    secret = f"pw-{TAG}"
    graphics = f"<graphics type='vnc' port='-1' autoport='yes' passwd='{secret}'/>"
    xml = _xml("web-pw").replace("</devices>", f"{graphics}</devices>")
    admin = await Client.connect(users.url(users.admin), oneshot=True)
    try:
        await admin.host(agent).define(xml)
    finally:
        await admin.close()
    try:

        async def dump(user: str, *flags: str) -> Any:
            return await cli("dumpxml", "--host", agent, *flags, "web-pw", bus=users.url(user))

        for user in (users.viewer, users.admin):  # nobody sees it without asking
            plain = await dump(user)
            assert plain.code == 0, plain.err
            assert "<graphics type='vnc'" in plain.out and "autoport='yes'" in plain.out
            assert secret not in plain.out and "passwd" not in plain.out
        denied = await dump(users.viewer, "--security-info")
        assert denied.code != 0 and "AUTH_DENIED" in denied.err, denied.err
        assert secret not in denied.out + denied.err
        assert "domain.read_secure" in denied.err
        granted = await dump(users.admin, "--security-info")
        assert granted.code == 0, granted.err
        assert f"passwd='{secret}'" in granted.out
        assert (await dump(users.viewer)).code == 0  # the agent still serves the viewer
    finally:
        admin = await Client.connect(users.url(users.admin), oneshot=True)
        try:
            await admin.host(agent).domain("web-pw").undefine()
        finally:
            await admin.close()


async def test_snapshot_xml_hides_the_domains_passwords_unless_read_secure_is_granted(
    users: Cluster, agent: str
) -> None:
    """The ``<domain>`` inside a ``<domainsnapshot>`` is hidden as dumpxml hides it
    (libvirt's VIR_DOMAIN_SNAPSHOT_XML_SECURE): snapshot-dumpxml and snapshot-current
    leave ``<graphics passwd>`` out, and their ``--security-info`` needs
    ``domain.read_secure`` besides reading: the viewer is refused, an admin sees it, the
    built-in operator sees it on its own domain only (the owner rule, checked as the call
    runs)."""
    secret = f"snap-pw-{TAG}"
    graphics = f"<graphics type='vnc' port='-1' autoport='yes' passwd='{secret}'/>"

    def with_pw(name: str) -> str:  # a qcow2 disk holds the (test driver's) snapshot
        disk = (
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='/var/lib/virtbus-test/{name}.qcow2'/>"
            "<target dev='vda' bus='virtio'/></disk>"
        )
        return _xml(name).replace("</devices>", f"{disk}{graphics}</devices>")

    admin = await Client.connect(users.url(users.admin), oneshot=True)
    oper = await Client.connect(users.url(users.oper2), oneshot=True)
    try:
        await admin.host(agent).define(with_pw("web-snap"))
        await (
            admin.host(agent)
            .domain("web-snap")
            .snapshot_create("<domainsnapshot><name>s1</name></domainsnapshot>")
        )
        await oper.host(agent).define(with_pw("own-snap"))  # the operator owns this one
        await (
            oper.host(agent)
            .domain("own-snap")
            .snapshot_create("<domainsnapshot><name>s1</name></domainsnapshot>")
        )
    finally:
        await oper.close()
    try:

        async def run(user: str, verb: str, domain: str, *flags: str) -> Any:
            args = (verb, "--host", agent, domain, *(("s1",) if verb == "snapshot-dumpxml" else ()))
            return await cli(*args, *flags, bus=users.url(user))

        verbs = ("snapshot-dumpxml", "snapshot-current")
        for verb in verbs:
            for user in (users.viewer, users.admin, users.oper2):  # hidden unless asked
                plain = await run(user, verb, "web-snap")
                assert plain.code == 0, plain.err
                assert "<domainsnapshot>" in plain.out and "<name>web-snap</name>" in plain.out
                assert "<graphics type='vnc'" in plain.out and "autoport='yes'" in plain.out
                assert secret not in plain.out and "passwd" not in plain.out
            for user in (users.viewer, users.oper2):  # read, but not read_secure, on it
                denied = await run(user, verb, "web-snap", "--security-info")
                assert denied.code != 0 and "AUTH_DENIED" in denied.err, denied.err
                assert "domain.read_secure" in denied.err and user in denied.err
                assert secret not in denied.out + denied.err
            granted = await run(users.admin, verb, "web-snap", "--security-info")
            assert granted.code == 0, granted.err
            assert f"passwd='{secret}'" in granted.out and "<domainsnapshot>" in granted.out
            own = await run(users.oper2, verb, "own-snap", "--security-info")
            assert own.code == 0, own.err
            assert f"passwd='{secret}'" in own.out
            assert "passwd" not in (await run(users.oper2, verb, "own-snap")).out
        # The agent still serves the refused viewer.
        after = await run(users.viewer, "snapshot-dumpxml", "web-snap")
        assert after.code == 0 and "<domainsnapshot>" in after.out, after.err
    finally:
        try:
            for name in ("web-snap", "own-snap"):
                dom = admin.host(agent).domain(name)
                await dom.snapshot_delete("s1")
                await dom.undefine()
        finally:
            await admin.close()


async def test_perform_streams_only_to_the_uri_the_destinations_prepare_answered(
    users: Cluster, agent: str, tmp_path: Path
) -> None:
    """A user with the scheduler role cannot send a guest's memory to a listener of its
    own: the source asks the named destination which URI its prepare answered."""
    thief_calls = asyncio.Event()

    def stolen(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        thief_calls.set()
        w.close()

    thief_server = await asyncio.start_server(stolen, "127.0.0.1", 0)
    thief = f"tcp:127.0.0.1:{thief_server.sockets[0].getsockname()[1]}"
    policy, state = ("--policy", str(users.policy)), tmp_path / "b"
    state.mkdir()
    async with agent_process(users.host2, state, *policy, bus=users.url(users.host2)):
        admin = await Client.connect(users.url(users.admin), oneshot=True)
        sched = await Client.connect(users.url(users.scheduler), oneshot=True)
        try:
            await admin.host(agent).define(_xml("db-mig"))
            await admin.host(agent).domain("db-mig").start()
            src, dst = sched.host(agent), sched.host(users.host2)
            begun = await src.call(ops.MIGRATION_BEGIN, MigrationBegin(domain="db-mig"))
            mid = f"mig-{TAG}"
            prepare = MigrationPrepare(xml=begun.xml, migration=mid)
            prepared = (await dst.call(ops.MIGRATION_PREPARE, prepare)).uri
            assert prepared != thief

            def perform(uri: str, migration: str | None, destination: str | None) -> Any:
                req = MigrationPerform(
                    domain="db-mig", uri=uri, migration=migration, destination=destination
                )
                return src.call(ops.MIGRATION_PERFORM, req)

            cases = [
                (thief, mid, users.host2),  # another address than the prepare answered
                (thief, None, None),  # no migration named: nothing to check against
                (thief, f"other-{TAG}", users.host2),  # a migration nobody prepared
                (prepared, mid, agent),  # a host that did not prepare it does not vouch
            ]
            got = [await _outcome(perform(*case)) for case in cases]
            assert got == ["AUTH_DENIED"] * len(cases)
            with pytest.raises(AuthDenied) as denied:
                await perform(thief, mid, users.host2)
            assert thief in denied.value.message and prepared in denied.value.message
            assert not thief_calls.is_set()  # not one byte went to the thief
            info = await admin.host(agent).domain("db-mig").info()
            assert info.state == "running"
            # The URI the destination prepared is accepted (then the migration is undone).
            await perform(prepared, mid, users.host2)
            await _outcome(src.call(ops.MIGRATION_CANCEL, MigrationDomain(domain="db-mig")))
            undo = MigrationEnd(domain="db-mig", success=False)
            await _outcome(dst.call(ops.MIGRATION_FINISH, undo))
            await _outcome(src.call(ops.MIGRATION_CONFIRM, undo))
            # The real scheduler names the migration and its destination: it still migrates.
            sched_dir = tmp_path / "sched"
            async with scheduler_process(sched_dir, *policy, bus=users.url(users.scheduler)):
                async with asyncio.timeout(30):
                    while {agent, users.host2} - {h.host for h in await admin.scheduler.hosts()}:
                        await asyncio.sleep(0.2)
                    started = await admin.scheduler.migrate("db-mig", to=users.host2)
                    record = [r async for r in admin.scheduler.follow(started.id)][-1]
            assert (record.state, record.error) == ("completed", None)
            moved = await admin.host(users.host2).domain("db-mig").info()
            assert moved.state == "running"
        finally:
            thief_server.close()
            for c in (admin, sched):
                await c.close()


def _qemu_xml(name: str) -> str:
    return (
        f"<domain type='qemu'><name>{name}</name><uuid>{uuid.uuid5(uuid.NAMESPACE_DNS, name)}"
        "</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
    )


@pytest.mark.qemu
async def test_operators_may_not_define_over_or_undefine_others_domains(
    users: Cluster, tmp_path: Path
) -> None:
    """libvirt's "no define/undefine of others' domains": the owner (the user that defined
    it) is in the definition's virtbus metadata, kept across an agent restart; the
    built-in operator role configures only what it owns (or what nobody owns yet)."""
    host, oper = users.host2, users.oper2
    forged = _qemu_xml("own-forged").replace(
        "</vcpu>",
        f"</vcpu><metadata><virtbus:owner xmlns:virtbus='{OWNER_NS}'>{users.admin}"
        "</virtbus:owner></metadata>",
    )
    bus = users.url(host)
    policy = ("--policy", str(users.policy))
    async with agent_process(host, tmp_path, *policy, driver="qemu", bus=bus):
        admin = await Client.connect(users.url(users.admin), oneshot=True)
        op = await Client.connect(users.url(oper), oneshot=True)
        viewer = await Client.connect(users.url(users.viewer), oneshot=True)
        try:
            a, o, v = admin.host(host), op.host(host), viewer.host(host)
            await a.define(_qemu_xml("own-admin"))
            matrix: list[tuple[str, Any, str]] = [
                ("operator", o.define(_qemu_xml("own-op")), "ok"),  # a new domain: its own
                ("operator", o.define(_qemu_xml("own-op")), "ok"),  # redefining its own
                ("operator", o.define(_qemu_xml("own-admin")), "AUTH_DENIED"),  # over another's
                ("operator", o.domain("own-admin").undefine(), "AUTH_DENIED"),
                ("operator", o.domain("own-admin").set_autostart(True), "AUTH_DENIED"),
                ("operator", o.domain("own-admin").info(), "ok"),  # reading is not owning
                ("viewer", v.domain("own-op").undefine(), "AUTH_DENIED"),
                ("viewer", v.define(_qemu_xml("own-v")), "AUTH_DENIED"),
                ("admin", a.define(_qemu_xml("own-op")), "ok"),  # the owner stays the operator
                ("operator", o.define(forged), "ok"),  # an owner in the XML is not believed
            ]
            got = [(who, await _outcome(action)) for who, action, _ in matrix]
            assert got == [(who, want) for who, _, want in matrix]
            with pytest.raises(AuthDenied) as denied:
                await o.domain("own-admin").undefine()
            assert oper in denied.value.message and "owned by another user" in denied.value.message
        finally:
            for c in (admin, op, viewer):
                await c.close()

    async def owner(name: str) -> str:
        shown = await cli("dominfo", "--host", host, name, bus=users.url(users.viewer))
        assert shown.code == 0, shown.err
        return next(ln.split()[-1] for ln in shown.out.splitlines() if ln.startswith("Owner"))

    async with agent_process(host, tmp_path, *policy, driver="qemu", bus=bus):  # restarted
        assert [await owner(n) for n in ("own-admin", "own-op", "own-forged")] == [
            users.admin,
            oper,
            oper,
        ]
        dumped = await cli("dumpxml", "--host", host, "own-op", bus=users.url(users.viewer))
        assert f">{oper}</virtbus:owner>" in dumped.out and OWNER_NS in dumped.out
        op = await Client.connect(users.url(oper), oneshot=True)
        try:
            o = op.host(host)
            assert await _outcome(o.domain("own-admin").undefine()) == "AUTH_DENIED"
            assert await _outcome(o.domain("own-op").undefine()) == "ok"
            assert await _outcome(o.domain("own-forged").undefine()) == "ok"
        finally:
            await op.close()
        admin = await Client.connect(users.url(users.admin), oneshot=True)
        try:
            await admin.host(host).domain("own-admin").undefine()
        finally:
            await admin.close()


def _pool_xml(name: str, root: Path) -> str:
    return (
        f"<pool type='dir'><name>{name}</name><uuid>{uuid.uuid5(uuid.NAMESPACE_DNS, name)}</uuid>"
        f"<target><path>{root / name}</path></target></pool>"
    )


def _net_xml(name: str) -> str:
    bridge = "vb" + name.replace("-", "")  # at most 15 characters
    return (
        f"<network><name>{name}</name><uuid>{uuid.uuid5(uuid.NAMESPACE_DNS, name)}</uuid>"
        f"<bridge name='{bridge}'/></network>"
    )


async def _connect(users: Cluster, *names: str) -> list[Client]:
    """One one-shot client per user name, in order (the caller closes them)."""
    return [await Client.connect(users.url(n), oneshot=True) for n in names]


def _storage_agent(users: Cluster, tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    """A directory storage may use and the agent options for it under the test's policy."""
    root = tmp_path / "images"
    root.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f'[storage]\nroots = ["{root}"]\n')
    return root, ("--policy", str(users.policy), "--config", str(config))


def _forget_owner(record: Path) -> None:
    """Rewrite a state record as an agent before owners were recorded wrote it."""
    body = json.loads(record.read_text())
    assert "owner" in body, record
    del body["owner"]
    record.write_text(json.dumps(body))


def _network_state(state: Path, name: str) -> Path:
    xml = next(p for p in (state / "networks").glob("*.xml") if f"<name>{name}<" in p.read_text())
    return xml.with_suffix(".json")


def _volume_record(state: Path, name: str) -> Path:
    records = (state / "storage" / "volumes").glob("*/*.json")
    return next(p for p in records if json.loads(p.read_text())["name"] == name)


async def _wipe(volume: Volume) -> None:
    await (await volume.wipe()).wait()


async def test_operators_may_not_remove_others_pools_volumes_and_networks(
    users: Cluster, tmp_path: Path
) -> None:
    """Pools, volumes and networks have owners as domains do (agent/owners.py): the user
    that made one, kept in its state file or volume record across an agent restart. The
    built-in operator removes only its own; what nobody owns (made before owners were
    recorded) keeps the old rule: configurable, not removable; an admin removes all."""
    alice, bob, admin_user = users.oper2, users.oper3, users.admin
    root, args = _storage_agent(users, tmp_path)
    host, bus = users.host, users.url(users.host)
    net, old_net, spare_net = f"on-{TAG}", f"oo-{TAG}", f"os-{TAG}"

    async with agent_process(host, tmp_path, *args, bus=bus):
        ca, cb, cadm = await _connect(users, alice, bob, admin_user)
        try:
            a, b, adm = ca.host(host), cb.host(host), cadm.host(host)
            pool = await a.define_pool(_pool_xml("own-pool", root))
            await pool.start(build=True)
            for vol in ("v1", "v2", "v-old"):
                assert (await pool.create_volume(volume_xml(vol, 1 << 20))).owner == alice
            for name in (net, old_net, spare_net):
                await a.define_network(_net_xml(name))
            bp, bn = b.pool("own-pool"), b.network(net)
            matrix: list[tuple[str, Any, str]] = [
                ("bob", bp.volume("v1").delete(), "AUTH_DENIED"),
                ("bob", bp.volume("v1").wipe(), "AUTH_DENIED"),
                ("bob", bp.volume("v1").resize(2 << 20), "AUTH_DENIED"),
                ("bob", bp.undefine(), "AUTH_DENIED"),
                ("bob", bp.delete(), "AUTH_DENIED"),
                ("bob", bp.set_autostart(True), "AUTH_DENIED"),
                ("bob", b.define_pool(_pool_xml("own-pool", root)), "AUTH_DENIED"),  # redefine
                ("bob", bn.undefine(), "AUTH_DENIED"),
                ("bob", bn.set_autostart(True), "AUTH_DENIED"),
                ("bob", b.define_network(_net_xml(net)), "AUTH_DENIED"),  # redefine
                ("bob", bp.info(), "ok"),  # reading is not owning
                ("bob", bp.create_volume(volume_xml("bobs", 1 << 20)), "ok"),  # a new volume
                ("bob", bp.volume("bobs").delete(), "ok"),  # ... is his own
                ("alice", a.define_network(_net_xml(net)), "ok"),  # redefining her own
                ("admin", adm.define_network(_net_xml(net)), "ok"),  # hers still
                ("alice", _wipe(a.pool("own-pool").volume("v2")), "ok"),  # hers still
            ]
            got = [(who, await _outcome(action)) for who, action, _ in matrix]
            assert got == [(who, want) for who, _, want in matrix]
            with pytest.raises(AuthDenied) as denied:
                await bp.volume("v1").delete()
            message = denied.value.message
            assert bob in message and "volume 'own-pool/v1'" in message
            assert "owned by another user" in message
            assert (await bp.info()).owner == alice and (await bn.info()).owner == alice
            # undefine --remove-all-storage deletes only the volumes he could vol-delete
            await bp.create_volume(volume_xml("bobs2", 1 << 20))
            disks = "".join(
                f"<disk type='volume' device='disk'><source pool='own-pool' volume='{v}'/>"
                f"<target dev='vd{d}' bus='virtio'/></disk>"
                for v, d in (("v1", "a"), ("bobs2", "b"))
            )
            await b.define(_xml("own-dom").replace("<devices>", f"<devices>{disks}"))
            removed = await b.domain("own-dom").undefine(remove_all_storage=True)
            assert [(r.volume, (r.error or {}).get("code")) for r in removed] == [
                ("v1", "AUTH_DENIED"),
                ("bobs2", None),
            ]
            assert (await bp.volume("v1").info()).owner == alice  # still there
            assert await b.ping()  # the agent serves on after the denials
        finally:
            for c in (ca, cb, cadm):
                await c.close()
    # As an agent before owners were recorded left them: no owner in their records.
    _forget_owner(_network_state(tmp_path, old_net))
    _forget_owner(_volume_record(tmp_path, "v-old"))

    async with agent_process(host, tmp_path, *args, bus=bus):  # restarted
        info = await cli("pool-info", "--host", host, "own-pool", bus=users.url(users.viewer))
        assert info.code == 0, info.err
        assert [ln.split() for ln in info.out.splitlines() if ln.startswith("Owner")] == [
            ["Owner:", alice]
        ]
        ca, cb, cadm = await _connect(users, alice, bob, admin_user)
        try:
            a, b, adm = ca.host(host), cb.host(host), cadm.host(host)
            ap, bp = a.pool("own-pool"), b.pool("own-pool")
            assert (await bp.volume("v1").info()).owner == alice
            assert (await b.network(net).info()).owner == alice
            assert (await b.network(old_net).info()).owner is None
            assert (await bp.volume("v-old").info()).owner is None
            matrix = [
                ("bob", bp.volume("v1").delete(), "AUTH_DENIED"),
                ("bob", b.network(net).undefine(), "AUTH_DENIED"),
                ("bob", bp.volume("v2").resize(2 << 20), "AUTH_DENIED"),  # wiped: still hers
                ("bob", b.network(net).set_autostart(True), "AUTH_DENIED"),  # hers, restarted
                # nobody's: configurable, not removable (the rules before owners)
                ("bob", b.network(old_net).set_autostart(True), "ok"),
                ("bob", b.network(old_net).undefine(), "AUTH_DENIED"),
                ("bob", bp.volume("v-old").resize(2 << 20), "ok"),
                ("bob", bp.volume("v-old").delete(), "AUTH_DENIED"),
                # the owner removes her own, the admin anyone's
                ("alice", ap.volume("v1").delete(), "ok"),
                ("alice", a.network(net).undefine(), "ok"),
                ("admin", adm.pool("own-pool").volume("v2").delete(), "ok"),
                ("admin", adm.pool("own-pool").volume("v-old").delete(), "ok"),
                ("admin", adm.network(spare_net).undefine(), "ok"),
                ("admin", adm.network(old_net).undefine(), "ok"),
                ("bob", bp.destroy(), "ok"),  # lifecycle: any operator's
                ("admin", adm.define_pool(_pool_xml("own-pool", root)), "ok"),  # hers still
            ]
            got = [(who, await _outcome(action)) for who, action, _ in matrix]
            assert got == [(who, want) for who, _, want in matrix]
            assert (await bp.info()).owner == alice
            assert await _outcome(bp.undefine()) == "AUTH_DENIED"
            assert await _outcome(ap.undefine()) == "ok"
            assert await b.ping()
        finally:
            for c in (ca, cb, cadm):
                await c.close()


async def test_a_transfer_is_driven_by_the_user_that_began_it_only(
    users: Cluster, tmp_path: Path
) -> None:
    """vol-upload/vol-download chunks, finish and cancel name a job id, which every
    user sees (job.list, job events): like libvirt's stream, which belongs to the
    connection that opened it, a transfer is driven by the user that began it only (no
    other operator, nor an admin), whatever the policy grants on the volume."""
    alice, bob, admin_user = users.oper2, users.oper3, users.admin
    root, args = _storage_agent(users, tmp_path)
    host, bus = users.host, users.url(users.host)
    mib = 1 << 20
    data = os.urandom(3 * mib + 77)
    async with agent_process(host, tmp_path, *args, bus=bus):
        ca, cb, cadm = await _connect(users, alice, bob, admin_user)
        try:
            a, b, adm = ca.host(host), cb.host(host), cadm.host(host)
            pool = await a.define_pool(_pool_xml("xfer-pool", root))
            await pool.start(build=True)
            await pool.create_volume(volume_xml("up", mib, format="raw"))
            start = await a.call(
                ops.STORAGE_VOL_UPLOAD,
                UploadRequest(pool="xfer-pool", volume="up", length=len(data)),
            )
            job, size = start.job.id, start.chunk_size
            assert start.job.owner == alice
            assert job in [j.id for j in await host_jobs(b)]  # the id is no secret
            ack = await a.call(ops.STORAGE_VOL_UPLOAD_CHUNK,
                               UploadChunk(job=job, offset=0, data=data[:size]))  # fmt: skip
            assert ack.offset == size

            def chunk(c: Host, offset: int) -> Any:
                bad = UploadChunk(job=job, offset=offset, data=b"\xff" * size)
                return c.call(ops.STORAGE_VOL_UPLOAD_CHUNK, bad)

            finish = TransferTarget(job=job)
            matrix: list[tuple[str, Any, str]] = [
                ("bob", chunk(b, size), "AUTH_DENIED"),  # where alice's next one goes
                ("bob", chunk(b, 0), "AUTH_DENIED"),  # over what she sent
                ("admin", chunk(adm, size), "AUTH_DENIED"),  # the stream is not the admin's
                ("bob", b.call(ops.STORAGE_VOL_UPLOAD_FINISH, finish), "AUTH_DENIED"),
                ("bob", b.call(ops.JOB_CANCEL, finish), "AUTH_DENIED"),
                ("admin", adm.call(ops.JOB_CANCEL, finish), "AUTH_DENIED"),
                ("bob", b.call(ops.JOB_INFO, finish), "ok"),  # reading it is not driving it
            ]
            got = [(who, await _outcome(action)) for who, action, _ in matrix]
            assert got == [(who, want) for who, _, want in matrix]
            with pytest.raises(AuthDenied) as denied:
                await chunk(b, size)
            assert job in denied.value.message and bob in denied.value.message
            assert (await a.call(ops.JOB_INFO, finish)).state == "running"
            for offset in range(size, len(data), size):  # alice's upload goes on
                await a.call(ops.STORAGE_VOL_UPLOAD_CHUNK,
                             UploadChunk(job=job, offset=offset,
                                         data=data[offset : offset + size]))  # fmt: skip
            await a.call(ops.STORAGE_VOL_UPLOAD_FINISH, finish)
            assert (await a.call(ops.JOB_INFO, finish)).state == "completed"
            assert (root / "xfer-pool" / "up").read_bytes() == data  # byte-exact
            # a download alike: bob reads no chunk of it, nor ends it
            down = await a.call(ops.STORAGE_VOL_DOWNLOAD, VolumeTarget(pool="xfer-pool",
                                                                       volume="up"))  # fmt: skip
            read = DownloadChunkRequest(job=down.job.id, offset=0)
            dfinish = TransferTarget(job=down.job.id)
            matrix = [
                ("bob", b.call(ops.STORAGE_VOL_DOWNLOAD_CHUNK, read), "AUTH_DENIED"),
                ("admin", adm.call(ops.STORAGE_VOL_DOWNLOAD_CHUNK, read), "AUTH_DENIED"),
                ("bob", b.call(ops.STORAGE_VOL_DOWNLOAD_FINISH, dfinish), "AUTH_DENIED"),
                ("bob", b.call(ops.JOB_CANCEL, dfinish), "AUTH_DENIED"),
            ]
            got = [(who, await _outcome(action)) for who, action, _ in matrix]
            assert got == [(who, want) for who, _, want in matrix]
            assert (await a.call(ops.STORAGE_VOL_DOWNLOAD_CHUNK, read)).data == data[:size]
            await a.call(ops.STORAGE_VOL_DOWNLOAD_FINISH, dfinish)
            # bob's own upload into a volume he may configure is his to drive
            await b.pool("xfer-pool").create_volume(volume_xml("bobs", mib, format="raw"))
            src = tmp_path / "bobs.bin"
            src.write_bytes(b"bob" * 1000)
            await b.pool("xfer-pool").volume("bobs").upload(src)
            assert (root / "xfer-pool" / "bobs").read_bytes() == b"bob" * 1000
            assert await b.ping()  # the agent serves on after the denials
        finally:
            for c in (ca, cb, cadm):
                await c.close()


async def test_a_clone_or_wipe_is_cancelled_by_its_starter_or_who_may_change_the_volume(
    users: Cluster, tmp_path: Path
) -> None:
    """job.cancel is a host op, but cancelling a clone removes the volume it was making
    and cancelling a wipe leaves the volume part-wiped: another operator needs the right
    to do that to the volume (vol-delete, vol-wipe), which the built-in operator has on
    its own volumes only; the job's starter and an admin may."""
    alice, bob, admin_user = users.oper2, users.oper3, users.admin
    root, args = _storage_agent(users, tmp_path)
    host, bus = users.host, users.url(users.host)
    mib = 1 << 20
    async with agent_process(host, tmp_path, *args, bus=bus):
        ca, cb, cadm = await _connect(users, alice, bob, admin_user)
        held: int | None = None
        try:
            a, b, adm = ca.host(host), cb.host(host), cadm.host(host)
            pool = await a.define_pool(_pool_xml("cancel-pool", root))
            await pool.start(build=True)
            # 35 passes over 4 GiB: running for minutes unless cancelled
            for name in ("w1", "w2"):
                await pool.create_volume(volume_xml(name, 4096 * mib, format="raw"))
            src = await pool.create_volume(volume_xml("src", 256 * mib, format="raw"))
            with open(src.path, "r+b") as fh:  # data everywhere: the convert takes a while
                block = os.urandom(mib)
                for _ in range(256):
                    fh.write(block)
            wipe1 = await pool.volume("w1").wipe("gutmann")
            wipe2 = await pool.volume("w2").wipe("gutmann")
            clone = await pool.create_volume_from(
                volume_xml("copy", None, format="qcow2"), "cancel-pool", "src"
            )
            # the clone's qemu-img is held stopped until its cancel (which SIGKILLs it): on a
            # quiet machine the 256 MiB convert finished before the denials were checked
            held = await _stop_tool("convert", root / "cancel-pool")
            assert {wipe1.last.owner, wipe2.last.owner, clone.last.owner} == {alice}

            def cancel(c: Host, job: Any) -> Any:
                return c.call(ops.JOB_CANCEL, TransferTarget(job=job.id))

            matrix: list[tuple[str, Any, str]] = [
                ("bob", cancel(b, wipe1), "AUTH_DENIED"),  # her volume, part-wiped
                ("bob", cancel(b, clone), "AUTH_DENIED"),  # her copy, removed
            ]
            got = [(who, await _outcome(action)) for who, action, _ in matrix]
            assert got == [(who, want) for who, _, want in matrix]
            for job in (wipe1, wipe2, clone):  # the premise: the denials stopped nothing
                assert (await job.info()).state == "running", job.last
            with pytest.raises(AuthDenied) as denied:
                await cancel(b, wipe1)
            assert "storage.vol.wipe" in denied.value.message, denied.value.message
            assert (await cancel(a, wipe1)).state == "cancelled"  # the starter's own
            assert (await cancel(adm, wipe2)).state == "cancelled"  # an admin's right
            assert (await cancel(a, clone)).state == "cancelled"
            held = None  # killed by the cancel
            assert sorted(p.name for p in (root / "cancel-pool").iterdir()) == [
                "src",
                "w1",
                "w2",
            ]
            assert await b.ping()  # the agent serves on after the denials
        finally:
            if held is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(held, signal.SIGCONT)
            for c in (ca, cb, cadm):
                await c.close()


async def _stop_tool(verb: str, under: Path, wait: float = 10.0) -> int:
    """SIGSTOP the agent's ``qemu-img VERB`` that writes under ``under``, once it runs; its
    pid. A stopped tool holds its job at 'running' for as long as a test needs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while loop.time() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                len(argv) > 1
                and os.path.basename(argv[0]) == b"qemu-img"
                and argv[1] == verb.encode()
                and any(a.startswith(str(under).encode()) for a in argv)
            ):
                os.kill(int(proc.name), signal.SIGSTOP)
                return int(proc.name)
        await asyncio.sleep(0.005)
    raise AssertionError(f"no qemu-img {verb} under {under} within {wait:g} s")


def _test_xml(name: str, pool: str) -> str:
    """A test-driver domain whose one disk is volume ``NAME.raw`` of ``pool``."""
    return (
        f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64'>hvm</type></os><devices><disk type='volume' device='disk'>"
        f"<driver name='qemu' type='raw'/><source pool='{pool}' volume='{name}.raw'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )


async def test_volumes_a_copy_storage_migration_makes_are_the_domains_owners(
    users: Cluster, tmp_path: Path
) -> None:
    """The destination's agent makes a copy-storage migration's volumes itself: they get
    the migrated domain's owner (its definition's virtbus metadata), so its operator can
    still remove them there, and another operator cannot."""
    alice, bob = users.oper2, users.oper3
    pool, dom = f"cs-{TAG}", f"mig-{TAG}"
    policy = ("--policy", str(users.policy))
    roots: dict[str, Path] = {}
    for host, sub in ((users.host, "a"), (users.host2, "b")):
        (tmp_path / sub / "images").mkdir(parents=True)
        roots[host] = tmp_path / sub / "images"
        (tmp_path / sub / "agent.toml").write_text(f'[storage]\nroots = ["{roots[host]}"]\n')
    content = os.urandom(2 << 20)

    def agent(host: str, sub: str) -> Any:
        config = ("--config", str(tmp_path / sub / "agent.toml"))
        return agent_process(host, tmp_path / sub, *policy, *config, bus=users.url(host))

    async with agent(users.host, "a"), agent(users.host2, "b"):
        admin, ca, cb = [
            await Client.connect(users.url(n), oneshot=True) for n in (users.admin, alice, bob)
        ]
        try:
            for host in (users.host, users.host2):
                await (await admin.host(host).define_pool(_pool_xml(pool, roots[host]))).start(
                    build=True
                )
            src = ca.host(users.host)
            made = await src.pool(pool).create_volume(volume_xml(f"{dom}.raw", 2 << 20,
                                                                 format="raw"))  # fmt: skip
            Path(made.path).write_bytes(content)
            await src.define(_test_xml(dom, pool))
            await src.domain(dom).start()
            sched_dir = tmp_path / "sched"
            async with scheduler_process(sched_dir, *policy, bus=users.url(users.scheduler)):
                async with asyncio.timeout(30):
                    while True:  # both hosts up, the destination's pool in its heartbeat
                        seen = {h.host: h for h in await admin.scheduler.hosts()}
                        if users.host in seen and any(
                            p.name == pool and p.state == "running"
                            for p in getattr(seen.get(users.host2), "pools", [])
                        ):
                            break
                        await asyncio.sleep(0.2)
                    started = await admin.scheduler.migrate(
                        dom, to=users.host2, params=MigrationParams(copy_storage_all=True)
                    )
                    record = [r async for r in admin.scheduler.follow(started.id)][-1]
            assert (record.state, record.error) == ("completed", None)
            dst_a, dst_b = ca.host(users.host2), cb.host(users.host2)
            assert (await dst_a.domain(dom).info()).owner == alice  # premise: it migrated
            moved = dst_b.pool(pool).volume(f"{dom}.raw")
            assert (await moved.info()).owner == alice
            assert (roots[users.host2] / pool / f"{dom}.raw").read_bytes() == content
            await dst_a.domain(dom).destroy()
            await dst_a.domain(dom).undefine()
            assert await _outcome(moved.delete()) == "AUTH_DENIED"  # bob's it is not
            await dst_a.pool(pool).volume(f"{dom}.raw").delete()  # alice's it is
            assert await dst_b.ping()
        finally:
            for c in (admin, ca, cb):
                await c.close()


async def _raw_call(url: str, host: str, **props: Any) -> dict[str, Any]:
    """A call published by hand (aio-pika), with the AMQP properties given."""
    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel()
        replies = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_reply(message: AbstractIncomingMessage) -> None:
            got.set_result(message.body)

        await replies.consume(on_reply, no_ack=True)
        cid = uuid.uuid4().hex
        env = {"v": 1, "id": cid, "kind": "call", "op": "host.ping", "ts": 0.0, "src": "raw",
               "body": {}}  # fmt: skip
        exchange = await ch.get_exchange(RPC_EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(msgpack.packb(env), correlation_id=cid,
                             reply_to="amq.rabbitmq.reply-to", **props),
            routing_key=f"agent.{host}",
        )  # fmt: skip
        async with asyncio.timeout(20):
            reply: dict[str, Any] = msgpack.unpackb(await got)["body"]
        return reply


async def test_calls_without_or_with_a_forged_user_id_are_refused(
    users: Cluster, agent: str
) -> None:
    url = users.url(users.viewer)
    reply = await _raw_call(url, agent)  # no user_id at all
    assert reply["ok"] is False and reply["error"]["code"] == "AUTH_DENIED", reply
    assert "user_id" in reply["error"]["message"]
    # Another user's name as user_id: the broker itself refuses the publish.
    with pytest.raises((aio_pika.exceptions.ChannelPreconditionFailed, TimeoutError)):
        await _raw_call(url, agent, user_id=users.admin)
    ok = await _raw_call(url, agent, user_id=users.viewer)
    assert ok["ok"] is True, ok  # the same agent still serves, the viewer may ping


async def _forge(url: str, stop: asyncio.Event, *messages: tuple[str, str, Envelope]) -> None:
    """Publish ``messages`` (exchange, key, envelope) as the user of ``url`` until ``stop``."""
    bus = AmqpBus(url, src="forger")
    await bus.connect()
    try:
        while not stop.is_set():
            for exchange, key, env in messages:
                await bus.publish(exchange, key, env, confirm=True)
            try:
                async with asyncio.timeout(0.1):
                    await stop.wait()
            except TimeoutError:
                pass
    finally:
        await bus.close()


def _heartbeat(host: str, cpus: int) -> Envelope:
    body = {"host": host, "cpus": cpus, "memory_total_kib": 1 << 30, "memory_free_kib": 1 << 30}
    return Envelope(kind=Kind.HEARTBEAT, op=ops.HEARTBEAT, body=body, src=host)


def _event(host: str, domain: str, seq: int) -> Envelope:
    body = {"host": host, "seq": seq, "domain": domain, "uuid": str(uuid.uuid4()),
            "event": "stopped", "detail": "forged", "ts": 0.0}  # fmt: skip
    return Envelope(kind=Kind.EVENT, op=ops.EVENT_DOMAIN, body=body, src=host)


async def test_forged_heartbeats_and_events_are_not_believed(
    users: Cluster, agent: str, tmp_path: Path
) -> None:
    ghost = f"ghost-{TAG}"
    forged = (
        (HOSTS_EXCHANGE, f"{ghost}.heartbeat", _heartbeat(ghost, 4096)),
        (HOSTS_EXCHANGE, f"{agent}.heartbeat", _heartbeat(agent, 4096)),
    )
    stop = asyncio.Event()
    forger = asyncio.create_task(_forge(users.url(users.viewer), stop, *forged))
    oper = await Client.connect(users.url(users.operator))
    try:
        async with scheduler_process(
            tmp_path / "sched", "--policy", str(users.policy), bus=users.url(users.scheduler)
        ):
            # The client library: the real agent is heard, the ghost and the lie are not.
            heard = await oper.heartbeats(wait=2.0)
            assert agent in heard and ghost not in heard, sorted(heard)
            assert heard[agent].cpus != 4096
            # The scheduler: the same (it places and migrates only onto what it believes).
            async with asyncio.timeout(20):
                while agent not in {h.host for h in await oper.scheduler.hosts()}:
                    await asyncio.sleep(0.2)
            view = {h.host: h for h in await oper.scheduler.hosts()}
            assert ghost not in view and view[agent].cpus != 4096
            # The scheduler authorises its own ops too: draining is an admin op.
            assert await _outcome(oper.scheduler.undrain(agent)) == "AUTH_DENIED"
        # Events: one forged for the agent's host, then a real one; only the real one counts,
        # live and replayed from the history stream.
        began = time.time()  # the replay starts here: earlier tests had an agent of this name
        stream = await oper.subscribe(host=agent)
        await _forge_once(users.url(users.viewer), _event(agent, "web-9", 1_000_000))
        await oper.host(agent).define(_xml("web-9"))
        async with asyncio.timeout(20):
            event = await anext(stream)
        assert (event.domain, event.event, event.detail != "forged") == ("web-9", "defined", True)
        assert stream.forged == 1
        await stream.aclose()
        replay = await oper.subscribe(host=agent, since=began - 1)
        async with asyncio.timeout(20):
            while (ev := await anext(replay)).domain != "web-9":
                assert ev.detail != "forged"
        assert ev.event == "defined" and replay.forged == 1
        await replay.aclose()
    finally:
        stop.set()
        await forger
        await oper.close()


async def _forge_once(url: str, env: Envelope) -> None:
    bus = AmqpBus(url, src="forger")
    await bus.connect()
    try:
        key = f"{env.body['host']}.{env.body['domain']}.{env.body['event']}"
        await bus.publish(EVENTS_EXCHANGE, key, env, confirm=True)
    finally:
        await bus.close()


async def test_every_call_is_audited_on_its_daemon_and_on_the_audit_stream(
    users: Cluster, tmp_path: Path
) -> None:
    began = time.time()
    admin = await Client.connect(users.url(users.admin), oneshot=True)
    oper = await Client.connect(users.url(users.operator), oneshot=True)
    viewer = await Client.connect(users.url(users.viewer), oneshot=True)
    url = users.url(users.host)
    try:
        async with agent_process(users.host, tmp_path, "--policy", str(users.policy), bus=url):
            h = users.host
            calls = [
                (admin.host(h).define(_xml("web-a")), users.admin, "domain.define", "OK"),
                (oper.host(h).domain("web-a").start(), users.operator, "domain.start", "OK"),
                (viewer.host(h).domain("web-a").destroy(), users.viewer, "domain.destroy",
                 "AUTH_DENIED"),
                (oper.host(h).domain("db-zz").info(), users.operator, "domain.info",
                 "AUTH_DENIED"),
                (admin.host(h).domain("nope").info(), users.admin, "domain.info", "NO_DOMAIN"),
            ]  # fmt: skip
            for action, *_ in calls:
                await _outcome(action)
            assert (await _raw_call(users.url(users.viewer), h))["ok"] is False  # no user_id
    finally:
        for c in (admin, oper, viewer):
            await c.close()
    want = [(u, op, code) for _, u, op, code in calls] + [(None, "host.ping", "AUTH_DENIED")]
    # The agent's own log (flushed at stop): every call, in order, denials included.
    logged = read_log(tmp_path / "audit" / "audit.log")
    assert [(r.user, r.op, r.code) for r in logged] == want
    assert [r.target for r in logged] == ["web-a", "web-a", "web-a", "db-zz", "nope", None]
    assert all(r.daemon == users.host and r.ms >= 0 and r.ts >= began - 1 for r in logged)
    # The audit stream, through the CLI, read by the admin; published by the agent's user.
    read = await cli("--json", "audit", "--host", users.host, "--since", str(began),
                     bus=users.url(users.admin))  # fmt: skip
    assert read.code == 0, read.err
    streamed = [json.loads(line) for line in read.out.splitlines()]
    assert [(r["user"], r["op"], r["code"]) for r in streamed] == want
    assert {r["publisher"] for r in streamed} == {users.host}
    denied = await cli("--json", "audit", "--user", users.viewer, "--denied", "--since",
                       str(began), bus=users.url(users.admin))  # fmt: skip
    assert [json.loads(x)["op"] for x in denied.out.splitlines()] == ["domain.destroy"]
    text = await cli("audit", "--file", str(tmp_path / "audit" / "audit.log"), "--since", "0")
    assert text.code == 0 and "AUTH_DENIED" in text.out and users.operator in text.out
