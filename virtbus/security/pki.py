"""A small certificate authority for a virtbus cluster (``virtbus pki``).

Every daemon and user connects to RabbitMQ with TLS and a client certificate; the
broker's ``rabbitmq_auth_mechanism_ssl`` makes the certificate's CN the AMQP user (SASL
EXTERNAL), so the CN is who the caller is:

- ``server`` certificates for broker nodes (CN and subjectAltNames = the node's names);
- ``host`` certificates for agents: CN = the host name (its queue and routing keys); they
  serve QEMU's migrations over TLS too (server and client use, subjectAltName = the name),
  laid out as QEMU's ``tls-creds-x509`` directory by :func:`qemu_tls_dir`;
- ``user`` certificates for people and services: CN = the user, OU = the role it is
  meant for (the policy file is what grants roles; ``issue`` prints the line to add).

Keys are EC P-256, written 0600. The CA key never leaves the CA directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from virtbus.errors import InvalidArgument, OperationInvalid

CA_KEY, CA_CERT = "ca.key", "ca.crt"
# A CN is an AMQP user name and, for hosts, a routing-key word and a queue name.
_CN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_DAYS = 365
CA_DAYS = 3650


class Kind(StrEnum):
    SERVER = "server"
    HOST = "host"
    USER = "user"


@dataclass(frozen=True, slots=True)
class Issued:
    kind: Kind
    name: str
    key: Path
    cert: Path
    ca: Path
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init_ca(directory: Path, name: str = "virtbus CA", days: int = CA_DAYS) -> Path:
    """A new CA in ``directory`` (refused when one is there already)."""
    if (directory / CA_KEY).exists():
        raise OperationInvalid(f"{directory} already holds a CA ({CA_KEY})")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write(directory / CA_KEY, _key_pem(key), private=True)
    _write(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return directory / CA_CERT


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    except FileNotFoundError:
        raise InvalidArgument(f"no CA in {directory}: run `virtbus pki init` first") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(f"{directory / CA_KEY} is not an EC key")
    return key, cert


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def issue(
    directory: Path,
    kind: Kind,
    name: str,
    *,
    role: str | None = None,
    alt_names: list[str] | None = None,
    days: int = DEFAULT_DAYS,
    out: Path | None = None,
    not_before: dt.datetime | None = None,
) -> Issued:
    """A key and certificate for ``name`` signed by the CA in ``directory``."""
    if not _CN.match(name):
        raise InvalidArgument(
            f"{kind} name {name!r}: 1-64 of letters, digits, '.', '_', '-' (not first)"
        )
    if days < 1:
        raise InvalidArgument(f"days must be >= 1, not {days}")
    ca_key, ca_cert = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if kind is Kind.USER:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role or "viewer"))
    elif kind is Kind.HOST:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "agent"))
    start = not_before or (_now() - dt.timedelta(minutes=5))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if kind is Kind.SERVER:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    elif kind is Kind.HOST:  # a migration's destination QEMU serves with it
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if kind in (Kind.SERVER, Kind.HOST):  # the name a TLS peer checks (QEMU's tls-hostname)
        builder = builder.add_extension(_san([name, *(alt_names or [])]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    target = out or directory / f"{kind}s"
    key_path, cert_path = target / f"{name}.key", target / f"{name}.crt"
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return Issued(kind, name, key_path, cert_path, directory / CA_CERT, cert.not_valid_after_utc)


#: QEMU's tls-creds-x509 directory (libvirt's migrate_tls_x509_cert_dir): file -> source
QEMU_FILES = {
    "ca-cert.pem": "ca",
    "server-cert.pem": "cert",
    "server-key.pem": "key",
    "client-cert.pem": "cert",
    "client-key.pem": "key",
}


def qemu_tls_dir(issued: Issued, out: Path) -> Path:
    """Lay a host certificate out as QEMU's ``tls-creds-x509`` wants a directory: the CA,
    and the host's key and certificate as both server (a migration's destination) and
    client (its source). Keys 0600; the directory must be readable by the user QEMU runs
    as (``qemu_user``: give it the group, e.g. ``chgrp -R virtbus-qemu DIR``)."""
    if issued.kind is not Kind.HOST:
        raise InvalidArgument(
            f"a QEMU TLS directory is made from a host certificate, not {issued.kind}"
        )
    sources = {"ca": issued.ca, "cert": issued.cert, "key": issued.key}
    for name, what in QEMU_FILES.items():
        _write(out / name, sources[what].read_bytes(), private=what == "key")
    return out
