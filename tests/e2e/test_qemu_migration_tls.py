"""``virtbus migrate --tls`` of a real QEMU guest between two agents on this machine
(loopback), driven by virtbus-scheduler, with certificates from ``virtbus pki``.

Each agent's host certificate (CN = its host name) is laid out as QEMU's tls-creds-x509
directory (``virtbus pki issue host NAME --qemu-dir``), named by the driver option
``migrate_tls_x509_cert_dir``. That the stream really was TLS is seen on the wire: a
packet socket on ``lo`` (root) records the first bytes each TCP flow carried, and the
migration port's first bytes are a TLS ClientHello; the same capture of a plain migration
back shows QEMU's own stream magic (``QEVM``), so the check can tell the two apart. For
``--copy-storage-all --tls`` the NBD connection (the server greets with ``NBDMAGIC``)
carries a ClientHello after NBD's STARTTLS, and the guest reads its disk back at the
destination. A source whose certificates come from another CA fails and rolls back, the
guest ticking on at the source; hosts with ``migrate_tls_force`` refuse a plain
migration with OPERATION_INVALID before any QEMU starts at the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import json
import os
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from qemu.qmp import QMPClient

from tests.e2e.conftest import enter_together, qemu_pids_under
from tests.e2e.test_migration_qemu import kernel_xml, max_tick, wait_tick
from tests.e2e.test_qemu_copy_storage import (
    Guest,
    qmp_leftovers,
    until,
    wait_pool,
    wait_text,
)
from tests.e2e.test_qemu_copy_storage import guest_xml as disk_guest_xml
from tests.guests import TestGuest, ensure_test_guest
from tests.integration.test_scheduler_cluster import (  # noqa: F401 - the vhost fixture
    URL,
    placed,
    scheduler_process,
    vcli,
    vhost,
    wait_hosts,
)
from tests.procs import AgentProc, agent_process, cli, unique_host
from virtbus.security import pki

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
MIB = 1 << 20
PACKET_OUTGOING = 4  # sll_pkttype: lo shows each packet going out and coming in


class Capture:
    """The first payloads (their first bytes) of every TCP flow on ``lo`` while running,
    by (source port, destination port)."""

    def __init__(self, keep: int = 8, prefix: int = 32) -> None:
        self.keep, self.prefix = keep, prefix
        self.flows: dict[tuple[int, int], list[bytes]] = {}
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(65536)
            except TimeoutError:
                continue
            if addr[2] == PACKET_OUTGOING:
                continue
            ip = frame[14:]  # lo's all-zero Ethernet header
            if len(ip) < 20 or ip[9] != 6:  # TCP only
                continue
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack("!H", ip[2:4])[0]
            tcp = ip[ihl:total]
            sport, dport = struct.unpack("!HH", tcp[:4])
            payload = tcp[(tcp[12] >> 4) * 4 :]
            if not payload:
                continue
            seen = self.flows.setdefault((sport, dport), [])
            if len(seen) < self.keep:
                seen.append(bytes(payload[: self.prefix]))

    def __enter__(self) -> Capture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def to_port(self, port: int) -> list[list[bytes]]:
        """The payloads of each flow towards ``port`` (client to server)."""
        return [p for (_s, d), p in self.flows.items() if d == port]

    def served_by(self, greeting: bytes) -> list[list[bytes]]:
        """The client-to-server payloads of each flow whose server spoke ``greeting`` first."""
        ports = [(s, d) for (s, d), p in self.flows.items() if p[0].startswith(greeting)]
        return [self.flows.get((d, s), []) for s, d in ports]


def client_hello(payload: bytes) -> bool:
    """A TLS record of type handshake (0x16), version 3.x, holding a ClientHello (1)."""
    return len(payload) > 5 and payload[0] == 0x16 and payload[1] == 3 and payload[5] == 1


async def qmp_tls_state(state_dir: Path, uuid: str) -> tuple[list[str], dict[str, Any]]:
    """The QEMU's user-created objects and its migration parameters, on its QMP socket."""
    status = json.loads(next(state_dir.rglob(f"{uuid}.status")).read_text())
    client = QMPClient("tls-test")
    await client.connect(status["qmp_socket"])
    try:
        objects = await client.execute("qom-list", {"path": "/objects"})
        params = await client.execute("query-migrate-parameters")
    finally:
        await client.disconnect()
    assert isinstance(objects, list) and isinstance(params, dict)
    return [str(o["name"]) for o in objects], params


def migration_port(rec: dict[str, object]) -> int:
    uri = str(rec["uri"])  # tcp:HOST:PORT, as the destination's prepare answered it
    return int(uri.rsplit(":", 1)[1])


async def last_migration(domain: str) -> dict[str, object]:
    recs = [r for r in await vcli("migrations") if r["domain"] == domain]
    assert recs, f"no migration of {domain}"
    return max(recs, key=lambda r: r["created"])  # type: ignore[no-any-return]


def ca_with_hosts(root: Path, *hosts: str) -> dict[str, Path]:
    """A CA in ``root`` and a QEMU TLS directory per host (``virtbus pki``'s functions)."""
    pki.init_ca(root)
    return {h: pki.qemu_tls_dir(pki.issue(root, pki.Kind.HOST, h), root / f"qemu-{h}")
            for h in hosts}  # fmt: skip


@contextlib.asynccontextmanager
async def two_agents(
    base: Path, hosts: tuple[str, str], *options: tuple[str, ...]
) -> AsyncIterator[tuple[AgentProc, AgentProc]]:
    """An agent per host (``options``: each one's extra arguments) and the scheduler."""
    async with some_agents(base, hosts, *options) as started:
        yield started[0], started[1]


@contextlib.asynccontextmanager
async def some_agents(
    base: Path, hosts: tuple[str, ...], *options: tuple[str, ...]
) -> AsyncIterator[list[AgentProc]]:
    async with contextlib.AsyncExitStack() as stack:
        for host in hosts:
            (base / host).mkdir()
        *started, _sched = await enter_together(
            *((stack, agent_process(host, base / host, *extra, driver="qemu", bus=URL,
                                    keep_queue=True))
              for host, extra in zip(hosts, options, strict=True)),
            (stack, scheduler_process(base / "sched")),
        )  # fmt: skip
        await wait_hosts(len(hosts))
        yield started


def tls_dir(path: Path, *more: str) -> tuple[str, ...]:
    return ("--driver-option", f"migrate_tls_x509_cert_dir={path}", *more)


@contextlib.contextmanager
def workdir(e2e_root: Path, name: str) -> Iterator[Path]:
    base = e2e_root / f"{name}{time.monotonic_ns() % 10**6}"
    base.mkdir()
    try:
        yield base
    finally:
        for pid in qemu_pids_under(base):  # never leave a guest behind
            os.kill(pid, 9)


async def boot(guest: TestGuest, base: Path, name: str, host: str) -> tuple[Path, str]:
    serial = base / f"{name}-0.serial"
    xml = base / f"{name}.xml"
    xml.write_text(kernel_xml(guest.kernel, guest.initramfs, guest.cmdline, serial)
                   .replace("mig1", name))  # fmt: skip
    uuid = (await vcli("define", str(xml), "--host", host))["uuid"]
    await vcli("start", name, "--host", host)
    await wait_tick(serial, 2)
    return serial, uuid


def dest_xml(guest: TestGuest, base: Path, name: str, uuid: str, n: int) -> tuple[Path, Path]:
    """The destination's definition (its own console file ``n``) and that file."""
    serial, xml = base / f"{name}-{n}.serial", base / f"{name}-{n}.xml"
    xml.write_text(kernel_xml(guest.kernel, guest.initramfs, guest.cmdline, serial, uuid)
                   .replace("mig1", name))  # fmt: skip
    return xml, serial


async def migrate(name: str, to: str, xml: Path, *flags: str) -> tuple[int, str]:
    r = await cli("migrate", name, "--to", to, "--xml", str(xml), *flags, "--wait", bus=URL,
                  timeout=120)  # fmt: skip
    return r.code, r.err


@dataclass
class Pair:
    """Two agents with certificates of one CA, the scheduler, and one guest that the tests
    of :class:`TestOnePair` move back and forth: each finds it where the last one left it
    (:meth:`ready` asserts that premise) instead of starting agents and a guest of its own."""

    base: Path
    guest: TestGuest
    dirs: dict[str, Path]
    agents: dict[str, AgentProc]
    stack: contextlib.AsyncExitStack
    uuid: str
    consoles: dict[str, Path]  # by host: the console file of its latest QEMU of the guest
    hops: int = 0  # destination definitions made
    name = "tls1"

    async def ready(self) -> tuple[AgentProc, AgentProc, Path]:
        """The premise: the guest runs at one host of the pair and nowhere else (one QEMU
        there, the last source's gone), ticking on that host's console.
        (that host's agent, the other one's, that console)"""
        where = await placed(self.name)
        assert len(where) == 1 and where[0][1] == "running", f"premise: {where}"
        at = where[0][0]
        (other,) = (h for h in self.agents if h != at)
        last = max_tick(self.consoles[at])
        assert await wait_tick(self.consoles[at], last) > last, "premise: it ticks"
        assert len(qemu_pids_under(self.agents[at].state_dir)) == 1
        async with asyncio.timeout(30):  # the last source's QEMU has quit (confirm)
            while qemu_pids_under(self.agents[other].state_dir):
                await asyncio.sleep(0.05)
        return self.agents[at], self.agents[other], self.consoles[at]

    def dest(self, host: str) -> tuple[Path, Path]:
        """A definition for ``host`` with a console file of its own, and that file."""
        self.hops += 1
        xml, serial = dest_xml(self.guest, self.base, self.name, self.uuid, self.hops)
        self.consoles[host] = serial
        return xml, serial

    async def restart(self, host: str) -> AgentProc:
        """A new agent process for ``host`` (its own state dir; the old one is dead)."""
        self.agents[host] = await self.stack.enter_async_context(agent_process(
            host, self.agents[host].state_dir, *tls_dir(self.dirs[host]), driver="qemu",
            bus=URL, keep_queue=True,
        ))  # fmt: skip
        return self.agents[host]


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def pair(vhost: str, e2e_root: Path) -> AsyncIterator[Pair]:  # noqa: F811
    """Class-scoped: torn down before the module's other tests start agents and a
    scheduler of their own in the same vhost."""
    guest = await ensure_test_guest()
    with workdir(e2e_root, "mpair") as base:
        hosts = (unique_host("pa"), unique_host("pb"))
        dirs = ca_with_hosts(base / "pki", *hosts)
        async with contextlib.AsyncExitStack() as stack:
            a, b = await stack.enter_async_context(
                two_agents(base, hosts, tls_dir(dirs[hosts[0]]), tls_dir(dirs[hosts[1]]))
            )
            serial, uuid = await boot(guest, base, Pair.name, a.host)
            p = Pair(base, guest, dirs, {a.host: a, b.host: b}, stack, uuid, {a.host: serial})
            try:
                yield p
            finally:  # the QEMU is killed by workdir() if this cannot reach it
                await asyncio.gather(*(cli("destroy", p.name, "--host", host, bus=URL)
                                       for host in p.agents))  # fmt: skip


@pytest.mark.asyncio(loop_scope="class")  # the pair's loop
class TestOnePair:
    """TLS migrations that need nothing but two agents of one CA: one guest, moved on."""

    async def test_tls_migration_is_tls_on_the_wire_and_the_guest_runs_there(
        self, pair: Pair
    ) -> None:
        a, b, serial = await pair.ready()
        xml, dst_serial = pair.dest(b.host)
        with Capture() as cap:
            code, err = await migrate(pair.name, b.host, xml, "--tls")
        assert code == 0, err
        rec = await last_migration(pair.name)
        assert rec["params"]["tls"] is True  # type: ignore[index]
        flows = cap.to_port(migration_port(rec))
        assert flows, f"nothing captured towards {rec['uri']}"
        assert all(client_hello(f[0]) for f in flows), [f[0][:8] for f in flows]
        assert await placed(pair.name) == [(b.host, "running")]
        last = max_tick(serial)
        assert await wait_tick(dst_serial, last + 2) > last + 2  # it runs at B
        async with asyncio.timeout(30):  # confirm quit the source's QEMU
            while qemu_pids_under(a.state_dir):
                await asyncio.sleep(0.05)

        # the same capture of a plain migration back sees QEMU's stream in the clear
        xml, back_serial = pair.dest(a.host)
        with Capture() as cap:
            code, err = await migrate(pair.name, a.host, xml)
        assert code == 0, err
        flows = cap.to_port(migration_port(await last_migration(pair.name)))
        assert flows and all(f[0].startswith(b"QEVM") for f in flows), flows
        assert await placed(pair.name) == [(a.host, "running")]
        last = max_tick(dst_serial)
        assert await wait_tick(back_serial, last + 2) > last + 2

    async def test_tls_with_multifd_and_postcopy(self, pair: Pair) -> None:
        """``--tls --parallel 2``: every multifd channel is a TLS connection of its own;
        ``--tls --postcopy`` back (the return path inside the same TLS stream)."""
        a, b, serial = await pair.ready()
        xml, dst_serial = pair.dest(b.host)
        with Capture() as cap:
            code, err = await migrate(pair.name, b.host, xml, "--tls", "--parallel", "2")
        assert code == 0, err
        flows = cap.to_port(migration_port(await last_migration(pair.name)))
        assert len(flows) >= 3, flows  # the main channel and two multifd channels
        assert all(client_hello(f[0]) for f in flows), [f[0][:8] for f in flows]
        assert await placed(pair.name) == [(b.host, "running")]
        last = max_tick(serial)
        assert await wait_tick(dst_serial, last + 2) > last + 2
        xml, back_serial = pair.dest(a.host)
        with Capture() as cap:
            code, err = await migrate(pair.name, a.host, xml, "--tls", "--postcopy")
        assert code == 0, err
        rec = await last_migration(pair.name)
        flows = cap.to_port(migration_port(rec))
        assert flows and all(client_hello(f[0]) for f in flows), [f[0][:8] for f in flows]
        assert await placed(pair.name) == [(a.host, "running")]
        last = max_tick(dst_serial)
        assert await wait_tick(back_serial, last + 2) > last + 2

    async def test_tls_migration_survives_a_source_agent_restart(self, pair: Pair) -> None:
        """The source agent SIGKILLed while memory is sent over TLS (``--bandwidth 8``,
        as in test_migration_agent_restart: the ~90 MiB last ~11 s): QEMU keeps its TLS
        session and streams on; the restarted agent reattaches the job while it is still
        active (checked), the scheduler completes the migration and the guest runs at the
        destination."""
        a, b, serial = await pair.ready()
        xml, dst_serial = pair.dest(b.host)
        r = await cli("--json", "migrate", pair.name, "--to", b.host, "--xml", str(xml),
                      "--tls", "--bandwidth", "8", bus=URL)  # fmt: skip
        assert r.code == 0, r.err
        mid = json.loads(r.out)["id"]
        await until(mid, lambda m: m.phase == "progress"
                    and m.progress.get("status") == "active")  # fmt: skip
        a.proc.kill()
        await a.proc.wait()
        log_at = (a.state_dir / f"agent-{a.host}.log").stat().st_size
        await pair.restart(a.host)
        with (a.state_dir / f"agent-{a.host}.log").open("rb") as log:
            log.seek(log_at)  # the restarted agent's own lines
            assert b"outgoing migration reattached (active)" in log.read(), "premise: streaming"
        rec = await until(mid, lambda m: m.state != "running", timeout=120)
        assert rec.state == "completed", rec
        assert rec.params.tls
        assert await placed(pair.name) == [(b.host, "running")]
        last = max_tick(serial)
        assert await wait_tick(dst_serial, last + 2) > last + 2


@pytest.mark.parametrize("user", ["qemu_user=virtbus-qemu", "qemu_uid_range=233000-233009"])
async def test_tls_migration_of_an_unprivileged_qemu(vhost: str, user: str) -> None:  # noqa: F811
    """QEMU as ``virtbus-qemu`` (qemu_user) or a uid of its own (qemu_uid_range) cannot
    read the host's keys (root's, 0600 here): the agent hands it a copy of its side's
    files in its own run dir for the moment it loads them, and the TLS migration works."""
    guest = await ensure_test_guest()
    base = Path(tempfile.mkdtemp(prefix="virtbus-mtlsdac-"))  # searchable by the QEMU user
    try:
        base.chmod(0o755)
        kernel, initrd = base / "vmlinuz", base / "initrd"
        shutil.copyfile(guest.kernel, kernel)
        shutil.copyfile(guest.initramfs, initrd)
        copied = TestGuest(kernel=kernel, initramfs=initrd, cmdline=guest.cmdline,
                           disk=guest.disk)  # fmt: skip
        hosts = (unique_host("da"), unique_host("db"))
        dirs = ca_with_hosts(base / "pki", *hosts)
        for d in dirs.values():
            assert oct((d / "server-key.pem").stat().st_mode & 0o777) == "0o600"
        opt = ("--driver-option", user)
        async with two_agents(base, hosts, tls_dir(dirs[hosts[0]], *opt),
                              tls_dir(dirs[hosts[1]], *opt)) as (a, b):  # fmt: skip
            serial, uuid = await boot(copied, base, "tls5", a.host)
            xml, dst_serial = dest_xml(copied, base, "tls5", uuid, 1)
            with Capture() as cap:
                code, err = await migrate("tls5", b.host, xml, "--tls")
            assert code == 0, err
            flows = cap.to_port(migration_port(await last_migration("tls5")))
            assert flows and all(client_hello(f[0]) for f in flows), flows
            assert await placed("tls5") == [(b.host, "running")]
            (pid,) = qemu_pids_under(b.state_dir)
            uids = Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split("\n")[0]
            (uid,) = {int(x) for x in uids.split()}
            if user.startswith("qemu_user"):
                assert uid == pwd.getpwnam("virtbus-qemu").pw_uid
            else:
                assert 233000 <= uid <= 233009
            # the copy of the keys is gone from the QEMU's run dir
            assert not list(b.state_dir.rglob("migrate-tls")), list(b.state_dir.rglob("*tls*"))
            last = max_tick(serial)
            assert await wait_tick(dst_serial, last + 2) > last + 2
            await vcli("destroy", "tls5", "--host", b.host)
    finally:
        for pid in qemu_pids_under(base):  # never leave a guest behind
            os.kill(pid, 9)
        shutil.rmtree(base, ignore_errors=True)


async def test_tls_migration_of_qemus_with_their_own_uids(vhost: str) -> None:  # noqa: F811
    """Both agents give each QEMU a uid of its own (disjoint ``qemu_uid_range``s) and
    ``qemu_user``'s group as a supplementary one: the certificate directory given to that
    group is readable by every QEMU, and the TLS migration works, the destination's QEMU
    under a uid of the destination's range."""
    group = grp.getgrnam("virtbus-qemu")  # made by deploy/setup-dev
    guest = await ensure_test_guest()
    base = Path(tempfile.mkdtemp(prefix="virtbus-mtlsuid-"))  # searchable by every uid
    try:
        base.chmod(0o755)
        kernel, initrd = base / "vmlinuz", base / "initrd"
        shutil.copyfile(guest.kernel, kernel)
        shutil.copyfile(guest.initramfs, initrd)
        copied = TestGuest(kernel=kernel, initramfs=initrd, cmdline=guest.cmdline,
                           disk=guest.disk)  # fmt: skip
        hosts = (unique_host("ua"), unique_host("ub"))
        dirs = ca_with_hosts(base / "pki", *hosts)
        for d in dirs.values():
            for path in (d.parent, d, *d.iterdir()):
                os.chown(path, 0, group.gr_gid)
                path.chmod(0o750 if path.is_dir() else 0o640)
        ranges = ("233000-233009", "233100-233109")
        options = [tls_dir(dirs[host], "--driver-option", "qemu_user=virtbus-qemu",
                           "--driver-option", f"qemu_uid_range={uids}")
                   for host, uids in zip(hosts, ranges, strict=True)]  # fmt: skip
        async with two_agents(base, hosts, *options) as (a, b):
            serial, uuid = await boot(copied, base, "tls6", a.host)
            (pid,) = qemu_pids_under(a.state_dir)
            assert ids(pid, "Uid") == ids(pid, "Gid") == {233000}
            xml, dst_serial = dest_xml(copied, base, "tls6", uuid, 1)
            with Capture() as cap:
                code, err = await migrate("tls6", b.host, xml, "--tls")
            assert code == 0, err
            flows = cap.to_port(migration_port(await last_migration("tls6")))
            assert flows and all(client_hello(f[0]) for f in flows), flows
            assert await placed("tls6") == [(b.host, "running")]
            (pid,) = qemu_pids_under(b.state_dir)
            assert ids(pid, "Uid") == ids(pid, "Gid") == {233100}
            assert group.gr_gid in ids(pid, "Groups")
            last = max_tick(serial)
            assert await wait_tick(dst_serial, last + 2) > last + 2
            await vcli("destroy", "tls6", "--host", b.host)
    finally:
        for pid in qemu_pids_under(base):  # never leave a guest behind
            os.kill(pid, 9)
        shutil.rmtree(base, ignore_errors=True)


def ids(pid: int, field: str) -> set[int]:
    """The ids of a /proc/PID/status line (Uid, Gid: real, effective, saved, fs; Groups)."""
    line = Path(f"/proc/{pid}/status").read_text().split(f"\n{field}:")[1].split("\n")[0]
    return {int(x) for x in line.split()}


async def test_a_source_of_another_ca_fails_and_the_guest_stays(
    vhost: str,  # noqa: F811
    e2e_root: Path,
) -> None:
    guest = await ensure_test_guest()
    with workdir(e2e_root, "mca") as base:
        hosts = (unique_host("ca"), unique_host("cb"))
        other = ca_with_hosts(base / "pki-other", hosts[0])  # the source's CA is not B's
        dirs = ca_with_hosts(base / "pki", hosts[1])
        async with two_agents(base, hosts, tls_dir(other[hosts[0]]),
                              tls_dir(dirs[hosts[1]])) as (a, b):  # fmt: skip
            serial, uuid = await boot(guest, base, "tls2", a.host)
            xml, dst_serial = dest_xml(guest, base, "tls2", uuid, 1)
            code, err = await migrate("tls2", b.host, xml, "--tls")
            assert code == 1, err
            rec = await last_migration("tls2")
            assert rec["state"] == "failed", rec
            assert "rollback" in [p for p, _t in rec["history"]], rec  # type: ignore[union-attr]
            assert await placed("tls2") == [(a.host, "running")]
            last = max_tick(serial)
            assert await wait_tick(serial, last + 2) > last + 2  # it ticks on at the source
            assert max_tick(dst_serial) == -1
            async with asyncio.timeout(30):  # the incoming QEMU was killed
                while qemu_pids_under(b.state_dir):
                    await asyncio.sleep(0.05)
            # the rollback took the credentials back out of the source QEMU (asked on its
            # QMP socket with the agent gone: QEMU serves one monitor client at a time)
            a.proc.kill()
            await a.proc.wait()
            objects, params = await qmp_tls_state(a.state_dir, uuid)
            assert "virtbus-migrate-tls" not in objects, objects
            assert (params.get("tls-creds"), params.get("tls-hostname")) == ("", ""), params


async def test_verify_makes_the_destination_ask_for_the_source_certificate(
    vhost: str,  # noqa: F811
    e2e_root: Path,
) -> None:
    """migrate_tls_x509_verify: a source that trusts the destination's CA but shows no
    certificate of its own is refused by a verifying destination, let in by one that
    does not verify (the source checks the destination either way: its certificate must
    carry the name asked, the host's unless --tls-destination names another)."""
    guest = await ensure_test_guest()
    with workdir(e2e_root, "mver") as base:
        hosts = (unique_host("va"), unique_host("vb"), unique_host("vc"))
        dirs = ca_with_hosts(base / "pki", *hosts)
        for name in ("client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem"):
            (dirs[hosts[0]] / name).unlink()  # the source: the CA only
        verify = ("--driver-option", "migrate_tls_x509_verify=on")
        lenient = ("--driver-option", "migrate_tls_x509_verify=off")
        async with some_agents(base, hosts, tls_dir(dirs[hosts[0]]),
                               tls_dir(dirs[hosts[1]], *verify),
                               tls_dir(dirs[hosts[2]], *lenient)) as (a, b, c):  # fmt: skip
            serial, uuid = await boot(guest, base, "tls4", a.host)
            xml, _ = dest_xml(guest, base, "tls4", uuid, 1)
            code, err = await migrate("tls4", b.host, xml, "--tls")
            assert code == 1, err
            assert await placed("tls4") == [(a.host, "running")]
            last = max_tick(serial)
            assert await wait_tick(serial, last + 1) > last
            xml, dst_serial = dest_xml(guest, base, "tls4", uuid, 2)
            # the name checked is the host's (or --tls-destination's): another one fails
            code, err = await migrate("tls4", c.host, xml, "--tls", "--tls-destination",
                                      "not-" + c.host)  # fmt: skip
            assert code == 1, err
            assert await placed("tls4") == [(a.host, "running")]
            code, err = await migrate("tls4", c.host, xml, "--tls")
            assert code == 0, err
            assert await placed("tls4") == [(c.host, "running")]
            last = max_tick(serial)
            assert await wait_tick(dst_serial, last + 2) > last + 2
            await vcli("destroy", "tls4", "--host", c.host)


async def test_force_refuses_a_plain_migration_and_lets_tls_through(
    vhost: str,  # noqa: F811
    e2e_root: Path,
) -> None:
    guest = await ensure_test_guest()
    with workdir(e2e_root, "mforce") as base:
        hosts = (unique_host("fa"), unique_host("fb"))
        dirs = ca_with_hosts(base / "pki", *hosts)
        force = ("--driver-option", "migrate_tls_force=on")
        async with two_agents(base, hosts, tls_dir(dirs[hosts[0]], *force),
                              tls_dir(dirs[hosts[1]], *force)) as (a, b):  # fmt: skip
            serial, uuid = await boot(guest, base, "tls3", a.host)
            xml, dst_serial = dest_xml(guest, base, "tls3", uuid, 1)
            code, err = await migrate("tls3", b.host, xml)
            assert code == 1 and "OPERATION_INVALID" in err and "only over TLS" in err, err
            assert await placed("tls3") == [(a.host, "running")]
            assert qemu_pids_under(b.state_dir) == []  # refused before any QEMU started
            last = max_tick(serial)
            assert await wait_tick(serial, last + 1) > last
            code, err = await migrate("tls3", b.host, xml, "--tls")
            assert code == 0, err
            assert await placed("tls3") == [(b.host, "running")]
            last = max_tick(serial)
            assert await wait_tick(dst_serial, last + 2) > last + 2
            # the destination, running the guest now, took the credentials back out
            b.proc.kill()
            await b.proc.wait()
            objects, params = await qmp_tls_state(b.state_dir, uuid)
            assert "virtbus-migrate-tls" not in objects, objects
            assert params.get("tls-creds") == "", params


async def dir_pool(host: str, path: Path) -> None:
    """Pool ``cs`` in ``path`` on ``host``, once the scheduler sees it running."""
    await vcli("pool-create-as", "cs", "dir", "--target", str(path), "--host", host)
    await wait_pool(host, "cs")


async def test_copy_storage_over_tls_moves_the_disk_through_tls(
    vhost: str,  # noqa: F811
    e2e_root: Path,
) -> None:
    guest = await ensure_test_guest()
    with workdir(e2e_root, "mcs") as base:
        hosts = (unique_host("sa"), unique_host("sb"))
        dirs = ca_with_hosts(base / "pki", *hosts)
        pool_a, pool_b = base / "pool-a", base / "pool-b"
        pool_a.mkdir()
        pool_b.mkdir()
        raw = base / "disk.raw"
        raw.write_bytes(guest.disk.read_bytes()[: 8 * MIB] + b"\x5a" * (8 * MIB))
        expected = hashlib.md5(raw.read_bytes()).hexdigest()
        convert = ["qemu-img", "convert", "-O", "qcow2", str(raw), str(pool_a / "disk.qcow2")]
        await asyncio.to_thread(subprocess.run, convert, check=True)
        config = base / "agent.toml"  # the pools live under the test's directory
        config.write_text(f"[storage]\nroots = [{json.dumps(str(base))}]\n")
        cfg = ("--config", str(config))
        args = (guest.kernel, guest.initramfs, guest.cmdline)
        serial, dst_serial = base / "cs1-src.serial", base / "cs1-dst.serial"
        (base / "cs1.xml").write_text(disk_guest_xml(*args, serial, "cs"))
        async with (
            two_agents(base, hosts, tls_dir(dirs[hosts[0]], *cfg),
                       tls_dir(dirs[hosts[1]], *cfg)) as (a, b),
            contextlib.AsyncExitStack() as restarted,  # the source agent after its kill
        ):  # fmt: skip
            await asyncio.gather(dir_pool(a.host, pool_a), dir_pool(b.host, pool_b))
            uuid = (await vcli("define", str(base / "cs1.xml"), "--host", a.host))["uuid"]
            await vcli("start", "cs1", "--host", a.host)
            await wait_text(serial, "VIRTBUS-GUEST-READY")
            dst = base / "cs1-dst.xml"
            dst.write_text(disk_guest_xml(*args, dst_serial, "cs", uuid))
            # a destination whose certificate does not carry the name asked: the NBD
            # client's handshake fails, everything is rolled back, the guest stays
            code, err = await migrate("cs1", b.host, dst, "--copy-storage-all", "--tls",
                                      "--tls-destination", "not-" + b.host)  # fmt: skip
            assert code == 1, err
            assert await placed("cs1") == [(a.host, "running")]
            assert os.listdir(pool_b) == []  # the volume made for the copy is gone
            assert qemu_pids_under(b.state_dir) == []
            a.proc.kill()  # the source QEMU keeps no credentials and no NBD node
            await a.proc.wait()
            objects, params = await qmp_tls_state(a.state_dir, uuid)
            assert "virtbus-migrate-tls" not in objects and params.get("tls-creds") == ""
            assert (await qmp_leftovers(a.state_dir, uuid)) == ([], [])
            await restarted.enter_async_context(agent_process(
                a.host, a.state_dir, *tls_dir(dirs[a.host], *cfg), driver="qemu", bus=URL,
                keep_queue=True,
            ))  # fmt: skip
            with Capture() as cap:
                code, err = await migrate("cs1", b.host, dst, "--copy-storage-all", "--tls")
            assert code == 0, err
            nbd = cap.served_by(b"NBDMAGIC")
            assert len(nbd) == 1, f"NBD connections seen: {nbd}"
            starttls = b"IHAVEOPT\x00\x00\x00\x05"  # NBD_OPT_STARTTLS, the first option
            assert any(p.startswith(starttls) for p in nbd[0][:3]), nbd[0]
            assert any(client_hello(p) for p in nbd[0]), nbd[0]
            flows = cap.to_port(migration_port(await last_migration("cs1")))
            assert flows and all(client_hello(f[0]) for f in flows), flows
            assert await placed("cs1") == [(b.host, "running")]
            g = await Guest.connect(b.state_dir, uuid)
            try:
                assert await g.ask("disk-md5 16", "VIRTBUS-DISK-MD5") == f"16 {expected}"
            finally:
                await g.close()
            await vcli("destroy", "cs1", "--host", b.host)
