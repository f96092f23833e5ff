"""The cluster CA: what it issues verifies against it, and nothing else does."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from virtbus.errors import InvalidArgument, OperationInvalid
from virtbus.security.pki import Kind, init_ca, issue, qemu_tls_dir


def _subject(cert: Path, oid: x509.ObjectIdentifier) -> str:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    return str(loaded.subject.get_attributes_for_oid(oid)[0].value)


def test_issued_certificates_carry_the_identity(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    host = issue(tmp_path / "ca", Kind.HOST, "node-7")
    user = issue(tmp_path / "ca", Kind.USER, "alice", role="operator")
    server = issue(tmp_path / "ca", Kind.SERVER, "mq1", alt_names=["127.0.0.1", "mq1.lan"])
    assert _subject(host.cert, NameOID.COMMON_NAME) == "node-7"
    assert _subject(user.cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == "operator"
    assert oct(host.key.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "ca" / "ca.key").stat().st_mode & 0o777) == "0o600"
    # Python's own TLS stack accepts each as a client/server certificate of this CA.
    for issued in (host, user, server):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(issued.ca))
        ctx.load_cert_chain(str(issued.cert), str(issued.key))
    loaded = x509.load_pem_x509_certificate(server.cert.read_bytes())
    san = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mq1.lan" in san.get_values_for_type(x509.DNSName)


def test_a_second_ca_and_bad_names_are_refused(tmp_path: Path) -> None:
    init_ca(tmp_path)
    with pytest.raises(OperationInvalid, match="already holds a CA"):
        init_ca(tmp_path)
    for bad in ("", "-x", "a/b", "x" * 65, "é"):
        with pytest.raises(InvalidArgument):
            issue(tmp_path, Kind.HOST, bad)
    with pytest.raises(InvalidArgument, match="no CA"):
        issue(tmp_path / "nowhere", Kind.HOST, "h")


def test_validity_can_be_placed_in_the_past(tmp_path: Path) -> None:
    init_ca(tmp_path)
    old = issue(tmp_path, Kind.USER, "old", days=1,
                not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))  # fmt: skip
    assert old.not_after < dt.datetime.now(dt.UTC)


def test_a_host_certificate_makes_a_qemu_tls_directory(tmp_path: Path) -> None:
    """``virtbus pki issue host NAME --qemu-dir``: QEMU's tls-creds-x509 files, the host's
    certificate usable as a TLS server (a migration's destination) and client, named by
    its subjectAltName too (what QEMU's tls-hostname is checked against)."""
    init_ca(tmp_path / "ca")
    host = issue(tmp_path / "ca", Kind.HOST, "node-7")
    out = qemu_tls_dir(host, tmp_path / "qemu")
    assert sorted(p.name for p in out.iterdir()) == [
        "ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem",
    ]  # fmt: skip
    assert (out / "server-cert.pem").read_bytes() == host.cert.read_bytes()
    assert (out / "ca-cert.pem").read_bytes() == host.ca.read_bytes()
    for key in ("server-key.pem", "client-key.pem"):
        assert oct((out / key).stat().st_mode & 0o777) == "0o600"
    loaded = x509.load_pem_x509_certificate(host.cert.read_bytes())
    usage = loaded.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-7"]
    # Python's TLS stack serves with it and a client of the CA checks the name
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(out / "server-cert.pem"), str(out / "server-key.pem"))
    user = issue(tmp_path / "ca", Kind.USER, "alice")
    with pytest.raises(InvalidArgument, match="host certificate"):
        qemu_tls_dir(user, tmp_path / "nope")
