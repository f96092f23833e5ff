"""Issue 13, path confinement through a real agent, the real broker, the CLI and real QEMU:
a definition naming a host path outside the storage pools, the domain's run dir and the
host's allowed dirs is AUTH_DENIED at define, at hot-plug and at start, and nothing is
touched; a domain whose paths are inside boots; the agent keeps serving."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_qemu_driver import firmware_xml, kernel_xml, wait_serial
from tests.guests import READY_MARKER, TestGuest, build_test_guest
from tests.procs import agent_process, cli, qemu_allowed_dirs, unique_host

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
