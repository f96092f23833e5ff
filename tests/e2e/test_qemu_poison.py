"""Issue 11, items 4, 5 and 7 against real QEMU, through a real ``virtbus-agent --driver
qemu`` over RabbitMQ: the issue's inputs are refused, the escaped spellings reach QEMU as
the exact paths and addresses they name, and the agent removes nothing it did not
create. After each case the agent still serves (``host.ping``)."""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import BUS_URL, agent_process, unique_host
from virtbus.bus.base import Bus
from virtbus.bus.factory import open_bus
from virtbus.errors import OperationFailed, XMLError
from virtbus.protocol import ops

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
START_TIMEOUT = 60.0


@dataclass
class QemuAgent:
    host: str
    run_dir: Path
    files: Path  # a directory of the test's own for paths named in definitions
    bus: Bus

    async def call(self, op: str, body: dict[str, object]) -> dict[str, object]:
        result = await self.bus.call(ops.agent_route(self.host), op, body, timeout=START_TIMEOUT)
        assert isinstance(result, dict)
        return result

    async def ping(self) -> None:
        assert await self.bus.call(ops.agent_route(self.host), ops.HOST_PING, {}, timeout=1.0)

    async def define(self, devices: str, name: str | None = None) -> tuple[str, str]:
        name = name or f"p-{uuidlib.uuid4().hex[:6]}"
        xml = (
            f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>"
            f"<devices>{devices}</devices></domain>"
        )
        result = await self.call(ops.DOMAIN_DEFINE, {"xml": xml})
        return name, str(result["uuid"])

    def pid(self, uuid: str) -> int:
        return int((self.run_dir / f"{uuid}.pid").read_text().strip())


@pytest.fixture
async def qemu(e2e_root: Path) -> AsyncIterator[QemuAgent]:
    host = unique_host("qp")
    base = Path(tempfile.mkdtemp(prefix="p", dir=e2e_root))
    files = base / "f"
    files.mkdir()
    bus = open_bus(BUS_URL, src="qemu-poison-test")
    await bus.connect()
    try:
        async with agent_process(host, base, driver="qemu"):
            agent = QemuAgent(host, base / "run", files, bus)
            try:
                yield agent
            finally:
                listing = await agent.call(ops.DOMAIN_LIST, {"all": False})
                for dom in listing["domains"]:  # type: ignore[attr-defined]
                    await agent.call(ops.DOMAIN_DESTROY, {"domain": dom["name"]})
    finally:
        await bus.close()


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket QEMU ``pid`` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            raw = bytes.fromhex(addr_hex[:width])
            if width == 8:
                address = ".".join(str(b) for b in raw[::-1])
            else:
                words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                address = ":".join(b"".join(words)[i : i + 2].hex() for i in range(0, 16, 2))
            found.append((address, int(port_hex, 16)))
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ item 4


async def test_item_4_no_option_escapes_from_a_chardev(qemu: QemuAgent) -> None:
    d = qemu.files
    with pytest.raises(XMLError, match="service"):
        await qemu.define(
            "<serial type='tcp'><source mode='bind' host='127.0.0.1' "
            f"service='45991,logfile={d}/tcp-log'/><protocol type='raw'/></serial>"
        )
    await qemu.ping()
    # The same trick in the fields that are escaped, not type-checked: QEMU opens the exact
    # (odd) paths, which lie in directories named "a,logfile=..."; no log file appears.
    port = _free_port()
    file_path = Path(f"{d}/a,logfile={d}/file-log")
    sock_path = Path(f"{d}/s,logfile={d}/unix-log")
    for path in (file_path, sock_path):
        path.parent.mkdir(parents=True)
    name, uuid = await qemu.define(
        f"<serial type='file'><source path='{file_path}'/><target port='0'/></serial>"
        f"<serial type='unix'><source mode='bind' path='{sock_path}'/><target port='1'/>"
        "</serial>"
        f"<serial type='tcp'><source mode='bind' host='127.0.0.1' service='{port}'/>"
        "<protocol type='raw'/><target port='2'/></serial>"
    )
    await qemu.call(ops.DOMAIN_START, {"domain": name})
    assert file_path.is_file()
    assert stat.S_ISSOCK(sock_path.lstat().st_mode)
    assert ("127.0.0.1", port) in _listening(qemu.pid(uuid))
    assert sorted(p.name for p in d.iterdir()) == ["a,logfile=", "s,logfile="]
    await qemu.call(ops.DOMAIN_DESTROY, {"domain": name})
    await qemu.ping()


# ------------------------------------------------------------------ item 5


async def test_item_5_spice_listens_only_where_it_was_told(qemu: QemuAgent) -> None:
    with pytest.raises(XMLError, match="compression"):
        await qemu.define(
            "<graphics type='spice' autoport='yes' listen='127.0.0.1'>"
            "<image compression='auto_glz,addr=0.0.0.0'/></graphics>"
        )
    await qemu.ping()
    name, uuid = await qemu.define(
        "<graphics type='spice' autoport='yes' listen='127.0.0.1'>"
        "<image compression='auto_glz'/></graphics>"
    )
    await qemu.call(ops.DOMAIN_START, {"domain": name})
    listening = _listening(qemu.pid(uuid))
    assert listening and all(addr == "127.0.0.1" for addr, _ in listening), listening
    await qemu.call(ops.DOMAIN_DESTROY, {"domain": name})
    await qemu.ping()


# ------------------------------------------------------------------ item 7


async def test_item_7_connect_mode_never_removes_the_socket(qemu: QemuAgent) -> None:
    path = qemu.files / "listen.sock"
    connected = asyncio.Event()

    async def accept(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await _r.read()  # until QEMU goes away
        writer.close()

    server = await asyncio.start_unix_server(accept, path=str(path))
    try:
        name, _ = await qemu.define(
            f"<serial type='unix'><source mode='connect' path='{path}'/><target port='0'/></serial>"
        )
        await qemu.call(ops.DOMAIN_START, {"domain": name})
        await asyncio.wait_for(connected.wait(), START_TIMEOUT)  # QEMU reached our socket
        assert stat.S_ISSOCK(path.lstat().st_mode)
        await qemu.call(ops.DOMAIN_DESTROY, {"domain": name})
        assert stat.S_ISSOCK(path.lstat().st_mode)  # still ours, still there
    finally:
        server.close()
        await server.wait_closed()
    await qemu.ping()


async def test_item_7_a_file_at_a_bind_path_is_an_error_not_deleted(qemu: QemuAgent) -> None:
    precious = qemu.files / "precious.txt"
    precious.write_text("keep me")
    name, uuid = await qemu.define(
        f"<serial type='unix'><source mode='bind' path='{precious}'/><target port='0'/></serial>"
    )
    with pytest.raises(OperationFailed, match="not a socket"):
        await qemu.call(ops.DOMAIN_START, {"domain": name})
    assert precious.read_text() == "keep me"
    state = await qemu.call(ops.DOMAIN_STATE, {"domain": name})
    assert state["state"] == "shutoff" and not (qemu.run_dir / f"{uuid}.pid").exists()
    # a free bind path: QEMU creates the socket, and removes it itself when it quits
    fresh = qemu.files / "fresh.sock"
    name, _ = await qemu.define(
        f"<serial type='unix'><source mode='bind' path='{fresh}'/><target port='0'/></serial>"
    )
    await qemu.call(ops.DOMAIN_START, {"domain": name})
    assert stat.S_ISSOCK(fresh.lstat().st_mode)
    await qemu.call(ops.DOMAIN_DESTROY, {"domain": name})
    await qemu.call(ops.DOMAIN_START, {"domain": name})  # the path is free again
    await qemu.call(ops.DOMAIN_DESTROY, {"domain": name})
    await qemu.ping()
