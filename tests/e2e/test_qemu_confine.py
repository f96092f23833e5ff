"""Issue 13, path confinement through a real agent, the real broker, the CLI and real QEMU:
a definition naming a host path outside the storage pools, the domain's run dir and the
host's allowed dirs is AUTH_DENIED at define, at hot-plug and at start, and nothing is
touched; a domain whose paths are inside boots; the agent keeps serving."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import qemu_pids_under
from tests.e2e.test_qemu_driver import firmware_xml, kernel_xml, wait_serial
from tests.guests import READY_MARKER, TestGuest, build_test_guest
from tests.procs import BUS_URL, agent_process, cli, qemu_allowed_dirs, unique_host
from virtbus.bus.factory import open_bus
from virtbus.errors import VirtbusError
from virtbus.protocol import ops

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]


@dataclass
class Host:
    name: str
    base: Path  # the agent's state dir; its run dir is base/run
    images: Path  # the one allowed dir (besides the guest cache)
    outside: Path  # a directory no rule allows

    async def define(self, name: str, xml: str) -> tuple[int, str]:
        path = self.base / f"{name}.xml"
        path.write_text(xml)
        r = await cli("define", str(path), "--host", self.name)
        return r.code, r.err


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


@pytest.fixture
async def host(e2e_root: Path) -> AsyncIterator[Host]:
    base = Path(tempfile.mkdtemp(prefix="cf", dir=e2e_root))
    images = base / "images"
    images.mkdir()
    outside = Path(tempfile.mkdtemp(prefix="virtbus-outside-"))  # not under e2e_root
    name = unique_host("confine")
    try:
        async with agent_process(name, base, driver="qemu",
                                 allowed_dirs=qemu_allowed_dirs(images)):  # fmt: skip
            yield Host(name, base, images, outside)
            listing = await cli("--json", "list", "--host", name)
            for dom in listing.json():
                await cli("destroy", dom["name"], "--host", name)
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def disk(path: Path | str, dev: str = "vda") -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{path}'/><target dev='{dev}' bus='virtio'/></disk>")  # fmt: skip


async def test_host_paths_outside_are_auth_denied_at_define(host: Host) -> None:
    code, err = await host.define("shadow", firmware_xml("shadow", devices=disk("/etc/shadow")))
    assert code != 0 and "AUTH_DENIED" in err and "'/etc/shadow'" in err, err

    victim = host.outside / "victim"
    victim.write_text("precious")
    serial = f"<serial type='file'><source path='{victim}'/><target port='0'/></serial>"
    code, err = await host.define("ser", firmware_xml("ser", devices=serial))
    assert code != 0 and "AUTH_DENIED" in err and str(victim) in err, err
    log = f"<serial type='pty'><log file='{victim}'/><target port='0'/></serial>"
    code, err = await host.define("serlog", firmware_xml("serlog", devices=log))
    assert code != 0 and "AUTH_DENIED" in err and "<serial> log" in err, err
    assert victim.read_text() == "precious"

    # a socket outside, or in the agent's run dir beside other domains' QMP sockets
    for sock, mode in ((host.outside / "s.sock", "bind"), (host.base / "run" / "x.qmp", "connect")):
        chan = (f"<channel type='unix'><source mode='{mode}' path='{sock}'/>"
                "<target type='virtio' name='x.y'/></channel>")  # fmt: skip
        code, err = await host.define("sock", firmware_xml("sock", devices=chan))
        assert code != 0 and "AUTH_DENIED" in err and str(sock) in err, err
        assert not sock.exists()

    link = host.images / "link.img"
    link.symlink_to("/etc/shadow")
    code, err = await host.define("link", firmware_xml("link", devices=disk(link)))
    assert code != 0 and "resolves to '/etc/shadow'" in err, err
    dotdot = f"{host.images}/../../../../../../../../etc/shadow"
    code, err = await host.define("dots", firmware_xml("dots", devices=disk(dotdot)))
    assert code != 0 and "AUTH_DENIED" in err, err

    listing = await cli("--json", "list", "--all", "--host", host.name)
    assert listing.code == 0 and listing.json() == []  # none defined, the agent serves


async def test_a_domain_inside_boots_and_its_hot_plug_is_confined(
    host: Host, guest: TestGuest
) -> None:
    xml = kernel_xml(guest, "inside", Path("/SERIAL"))
    uuid = re.search(r"<uuid>([^<]+)</uuid>", xml)
    assert uuid is not None
    own = host.base / "run" / uuid.group(1)  # the domain's own run dir
    serial = own / "serial.log"
    data = host.images / "data.img"
    data.write_bytes(bytes(1 << 20))
    xml = xml.replace("/SERIAL", str(serial)).replace("</devices>", disk(data, "vdb")
                                                      + "</devices>")  # fmt: skip
    code, err = await host.define("inside", xml)
    assert code == 0, err
    assert (await cli("start", "inside", "--host", host.name)).code == 0
    await wait_serial(serial, READY_MARKER)

    (host.base / "hp.xml").write_text(disk("/etc/shadow", "vdc"))
    for flag in ("--live", "--config"):
        r = await cli("attach-device", "inside", str(host.base / "hp.xml"), flag,
                      "--host", host.name)  # fmt: skip
        assert r.code != 0 and "AUTH_DENIED" in r.err and "/etc/shadow" in r.err, r.err
    r = await cli("domblklist", "inside", "--host", host.name)
    assert r.code == 0 and "vdb" in r.out and "vdc" not in r.out, r.out


async def test_a_path_that_escapes_after_define_is_refused_at_start(host: Host) -> None:
    late = host.images / "late.img"
    late.write_bytes(bytes(1 << 20))
    code, err = await host.define("late", firmware_xml("late", devices=disk(late)))
    assert code == 0, err
    late.unlink()
    late.symlink_to("/etc/shadow")  # swapped once the definition was accepted
    r = await cli("start", "late", "--host", host.name)
    assert r.code != 0 and "AUTH_DENIED" in r.err and "resolves to '/etc/shadow'" in r.err
    r = await cli("--json", "dominfo", "late", "--host", host.name)
    assert r.code == 0 and r.json()["state"] == "shutoff", r.out


def vnc(extra: str = "") -> str:
    return f"<graphics type='vnc' autoport='yes' {extra}/>"


async def test_listening_is_loopback_unless_the_host_allows_it(host: Host) -> None:
    """Displays, TCP chardevs and the incoming migration refuse a non-loopback address."""
    refused = {
        "v-any": vnc("listen='0.0.0.0'"),
        "v-el": "<graphics type='vnc' autoport='yes'><listen type='address' address='::'/>"
        "</graphics>",
        "s-any": "<graphics type='spice' autoport='yes' listen='192.0.2.1'/>",
        "tcp": "<serial type='tcp'><source mode='bind' host='0.0.0.0' service='4555'/>"
        "<target port='0'/></serial>",
    }
    for name, dev in refused.items():
        code, err = await host.define(name, firmware_xml(name, devices=dev))
        assert code != 0 and "AUTH_DENIED" in err and "may not listen on" in err, err
        assert "listen_allowed" in err, err
    bus = open_bus(BUS_URL, src="confine-test")
    await bus.connect()
    try:
        with pytest.raises(
            VirtbusError, match=re.escape("incoming migration may not listen on '0.0.0.0'")
        ):
            await bus.call(ops.agent_route(host.name), ops.MIGRATION_PREPARE,
                           {"xml": firmware_xml("mig"),
                            "params": {"listen_address": "0.0.0.0"}})  # fmt: skip
    finally:
        await bus.close()
    listing = await cli("--json", "list", "--all", "--host", host.name)
    assert listing.code == 0 and listing.json() == [], listing.out  # nothing left, serves


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} spell them) listening on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                out.append(addr)
    return out


async def _rfb_security_types(port: int) -> list[int]:
    """The security types a VNC server offers (RFB 3.8 handshake)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await reader.readexactly(12)).startswith(b"RFB 003.")
        writer.write(b"RFB 003.008\n")
        await writer.drain()
        count = (await reader.readexactly(1))[0]
        return list(await reader.readexactly(count))
    finally:
        writer.close()


async def test_vnc_listens_on_loopback_and_a_password_is_asked(host: Host) -> None:
    for name, extra in (("v-pw", "passwd='s3cret'"), ("v-open", "")):
        code, err = await host.define(name, firmware_xml(name, devices=vnc(extra)))
        assert code == 0, err
        assert (await cli("start", name, "--host", host.name)).code == 0
    ports = {}
    for name in ("v-pw", "v-open"):
        r = await cli("dumpxml", name, "--host", host.name)
        found = re.search(r"<graphics type='vnc'[^>]* port='(\d+)'", r.out)
        assert found is not None, r.out
        ports[name] = int(found.group(1))
        assert _listening(ports[name]) == ["0100007F"], name  # 127.0.0.1 only
    assert await _rfb_security_types(ports["v-pw"]) == [2]  # VNC authentication
    assert await _rfb_security_types(ports["v-open"]) == [1]  # none
    assert "s3cret" not in Path(f"/proc/{_qemu_of(host, 'v-pw')}/cmdline").read_text()


def _qemu_of(host: Host, name: str) -> int:
    for pid in qemu_pids_under(host.base):
        if f"guest={name}," in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return pid
    raise AssertionError(f"no QEMU for {name}")
