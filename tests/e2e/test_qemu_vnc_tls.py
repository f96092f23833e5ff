"""Issue 13, VNC over x509 TLS through a real agent, the real broker, the CLI and real QEMU.

The agent runs with ``--driver-option vnc_tls=on vnc_tls_dir=DIR vnc_tls_verify=on`` and
a QEMU TLS directory made by ``virtbus pki`` from the host's certificate. A VNC client
speaks RFB 3.8 to the guest's display: the server offers VeNCrypt only (type 19, never
"none"), an x509 sub-type, and after the TLS handshake (the server's certificate checked
against the CA and the host name, the client's certificate checked by QEMU) the RFB
session continues inside TLS up to ServerInit, which names the guest. A client trusting
another CA, or without a certificate, gets no session.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import struct
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from tests.e2e.test_qemu_driver import firmware_xml
from tests.procs import agent_process, cli, unique_host
from virtbus.security import pki

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),  # one agent and one guest for the file
]

VENCRYPT = 19
X509_NONE, X509_VNC = 260, 261  # VeNCrypt sub-types: x509 TLS, then no auth / VNC auth


@dataclass
class Host:
    name: str
    base: Path
    ca: Path  # the CA's certificate
    client: pki.Issued  # a user certificate from the same CA
    stranger: Path  # another CA's certificate


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def host(e2e_root: Path) -> AsyncIterator[Host]:
    base = Path(tempfile.mkdtemp(prefix="vnctls-", dir=e2e_root))  # watched for leftover QEMUs
    name = unique_host("vnctls")
    pki.init_ca(base / "ca")
    issued = pki.issue(base / "ca", pki.Kind.HOST, name)
    tls_dir = pki.qemu_tls_dir(issued, base / "qemu-tls")
    client = pki.issue(base / "ca", pki.Kind.USER, "vnc-viewer", role="viewer")
    pki.init_ca(base / "other-ca")
    state = base / "state"
    state.mkdir()
    options = ("vnc_tls=on", f"vnc_tls_dir={tls_dir}", "vnc_tls_verify=on")
    try:
        async with agent_process(name, state, *(x for o in options for x in ("--driver-option", o)),
                                 driver="qemu"):  # fmt: skip
            yield Host(name, base, issued.ca, client, base / "other-ca" / "ca.crt")
            listing = await cli("--json", "list", "--host", name)
            for dom in listing.json():
                await cli("destroy", dom["name"], "--host", name)
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def started(host: Host, name: str, graphics: str) -> int:
    """Define and start a firmware guest with ``graphics``; its VNC port."""
    path = host.base / f"{name}.xml"
    path.write_text(firmware_xml(name, devices=graphics))
    r = await cli("define", str(path), "--host", host.name)
    assert r.code == 0, r.err
    r = await cli("start", name, "--host", host.name)
    assert r.code == 0, r.err
    r = await cli("dumpxml", name, "--host", host.name)
    found = re.search(r"<graphics type='vnc'[^>]* port='(\d+)'", r.out)
    assert found is not None, r.out
    return int(found.group(1))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def port(host: Host) -> int:
    return await started(host, "tls-vnc", "<graphics type='vnc' autoport='yes'/>")


async def vencrypt(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, list[int]]:
    """RFB 3.8 up to VeNCrypt's sub-type list; asserts VeNCrypt is the only type offered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readexactly(12)).startswith(b"RFB 003.")
    writer.write(b"RFB 003.008\n")
    count = (await reader.readexactly(1))[0]
    types = list(await reader.readexactly(count))
    assert types == [VENCRYPT], types  # TLS or nothing: no "none" (1), no bare VNC auth (2)
    writer.write(bytes([VENCRYPT]))
    assert await reader.readexactly(2) == b"\x00\x02"  # VeNCrypt 0.2
    writer.write(b"\x00\x02")
    assert await reader.readexactly(1) == b"\x00"  # version accepted
    count = (await reader.readexactly(1))[0]
    subtypes = list(struct.unpack(f">{count}I", await reader.readexactly(4 * count)))
    return reader, writer, subtypes


def client_context(host: Host, *, ca: Path | None = None, cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or host.ca))
    if cert:
        context.load_cert_chain(str(host.client.cert), str(host.client.key))
    return context


async def x509_session(host: Host, port: int, context: ssl.SSLContext) -> bytes:
    """Choose x509/no-auth, start TLS, and read RFB's ServerInit: the desktop's name."""
    reader, writer, subtypes = await vencrypt(port)
    try:
        assert subtypes == [X509_NONE], subtypes
        writer.write(struct.pack(">I", X509_NONE))
        assert await reader.readexactly(1) == b"\x01"  # sub-type accepted: TLS follows
        await writer.start_tls(context, server_hostname=host.name)
        assert struct.unpack(">I", await reader.readexactly(4)) == (0,)  # SecurityResult: ok
        writer.write(b"\x01")  # ClientInit: shared
        init = await reader.readexactly(2 + 2 + 16 + 4)
        (length,) = struct.unpack(">I", init[-4:])
        return await reader.readexactly(length)
    finally:
        writer.close()


async def test_vnc_is_tls_with_x509_and_the_session_continues_inside(host: Host, port: int) -> None:
    name = await asyncio.wait_for(x509_session(host, port, client_context(host)), 30)
    assert name == b"QEMU (tls-vnc)", name  # the guest's -name


async def test_a_client_trusting_another_ca_gets_no_session(host: Host, port: int) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.wait_for(x509_session(host, port, client_context(host, ca=host.stranger)), 30)


async def test_a_client_without_a_certificate_is_refused(host: Host, port: int) -> None:
    """``vnc_tls_verify``: QEMU asks for the client's certificate and ends the session."""
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(x509_session(host, port, client_context(host, cert=False)), 30)
    # and the display still serves a client that has one
    name = await asyncio.wait_for(x509_session(host, port, client_context(host)), 30)
    assert name == b"QEMU (tls-vnc)"


async def test_a_password_adds_vnc_auth_inside_tls(host: Host) -> None:
    vnc_port = await started(host, "tls-pw", "<graphics type='vnc' autoport='yes' passwd='pw'/>")
    _reader, writer, subtypes = await vencrypt(vnc_port)
    writer.close()
    assert subtypes == [X509_VNC], subtypes
