"""TLS and certificate identity for the AMQP transports (one home for both).

An ``amqps://`` URL connects with TLS; the CA that signs the broker's certificate, and
our own certificate and key, come from the bus settings (``bus.tls_ca``, ``bus.tls_cert``,
``bus.tls_key``) or from the URL's query (``?cafile=&certfile=&keyfile=``, aiormq's
names, which the CLI's ``--bus``/``VIRTBUS_BUS_URL`` can carry). With a certificate and no
password in the URL, the login is SASL EXTERNAL: RabbitMQ's
``rabbitmq_auth_mechanism_ssl`` makes the certificate's CN the user, so the CN is also
the ``user_id`` every message carries. A URL with a password logs in with PLAIN (over
TLS when amqps): the development setup.

A refused handshake is ``AUTH_FAILED`` naming the certificate and what the broker or we
objected to (expired, unknown CA, ...), not a bare ``BUS_UNAVAILABLE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from virtbus.errors import AuthFailed, InvalidArgument
from virtbus.settings import BusSettings

# Query parameters of a bus URL that name TLS files (aiormq reads the same names).
CA_PARAM, CERT_PARAM, KEY_PARAM, AUTH_PARAM = "cafile", "certfile", "keyfile", "auth"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The files of one TLS connection; ``cert``/``key`` are None without a client cert."""

    ca: Path | None
    cert: Path | None
    key: Path | None

    @property
    def external(self) -> bool:
        """A client certificate is the identity: SASL EXTERNAL (CN = user)."""
        return self.cert is not None


def _query(url: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items() if v}


def tls_files(url: str, settings: BusSettings) -> TlsFiles | None:
    """The TLS files of ``url`` (None unless amqps://); the URL's query wins over settings.

    A certificate without its key, or a key without a certificate, is INVALID_ARG: half a
    client identity would silently log in as somebody else (PLAIN with the URL's user).
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "amqps":
        return None
    query = _query(url)

    def pick(param: str, configured: Path | None) -> Path | None:
        return Path(query[param]) if param in query else configured

    files = TlsFiles(
        ca=pick(CA_PARAM, settings.tls_ca),
        cert=pick(CERT_PARAM, settings.tls_cert),
        key=pick(KEY_PARAM, settings.tls_key),
    )
    if (files.cert is None) != (files.key is None):
        raise InvalidArgument(
            "a client certificate needs both bus.tls_cert and bus.tls_key "
            f"(or ?{CERT_PARAM}=&{KEY_PARAM}= in the bus URL), not one of them"
        )
    if files.external and parts.password:
        raise InvalidArgument(
            "the bus URL has a password and a client certificate: the certificate is the "
            "identity (SASL EXTERNAL), drop the password from the URL"
        )
    return files


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A verifying client context: the broker's certificate must chain to ``files.ca``
    (the system's CAs when None) and name the host we dial. Blocking file reads: call it
    in a thread from the event loop."""
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(files.ca) if files.ca else None
        )
        if files.cert is not None and files.key is not None:
            context.load_cert_chain(str(files.cert), str(files.key))
    except ssl.SSLError as exc:  # an OSError too: first
        raise InvalidArgument(
            f"TLS files (CA {files.ca}, certificate {files.cert}, key {files.key}) "
            f"cannot be loaded: {exc.reason or exc}"
        ) from None
    except OSError as exc:  # ssl names no file: find the one we could not read
        paths = (files.ca, files.cert, files.key)
        unreadable = [p for p in paths if p is not None and not os.access(p, os.R_OK)]
        named = unreadable[0] if unreadable else exc.filename
        raise InvalidArgument(f"TLS file {named}: {exc.strerror or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def certificate_user(cert: Path) -> str:
    """The CN of ``cert``: the user RabbitMQ logs us in as under SASL EXTERNAL
    (``ssl_cert_login_from = common_name``)."""
    from cryptography import x509  # only a certificate login pays for it
    from cryptography.x509.oid import NameOID

    try:
        loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    except OSError as exc:
        raise InvalidArgument(f"TLS certificate {cert}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InvalidArgument(f"TLS certificate {cert} is not a PEM certificate: {exc}") from None
    names = loaded.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise InvalidArgument(f"TLS certificate {cert} has no CN: it names no bus user")
    return str(names[0].value)


def login_user(url: str, files: TlsFiles | None) -> str:
    """The user a bus URL logs in as: the certificate's CN under EXTERNAL (the URL's user
    must then be that CN, or absent), else the URL's user, else ``guest``."""
    named = unquote(urlsplit(url).username or "")
    if files is not None and files.cert is not None:
        cn = certificate_user(files.cert)
        if named and named != cn:
            raise InvalidArgument(
                f"the bus URL names user {named!r} but the certificate {files.cert} is "
                f"{cn!r}: under SASL EXTERNAL the certificate's CN is the user"
            )
        return cn
    return named or "guest"


# OpenSSL's reasons for a handshake the peer (or we) refused, in words for an operator.
_REASONS = {
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the broker refused our certificate: it has expired",
    "TLSV1_ALERT_UNKNOWN_CA": "the broker refused our certificate: it is not signed by a CA "
    "the broker trusts",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the broker refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the broker refused our certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "the broker refused our certificate (bad signature)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the broker refused our certificate: it is revoked",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the broker requires a client certificate "
    "(bus.tls_cert/bus.tls_key)",
}


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The SSLError behind ``exc``: aiormq wraps it (AMQPConnectionError's args)."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()  # causes and contexts can form cycles
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        todo += [a for a in current.args if isinstance(a, BaseException)]
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return None


def handshake_refused(url: str, files: TlsFiles, exc: BaseException) -> AuthFailed | None:
    """AUTH_FAILED for a TLS failure that is a refused identity (either side's certificate),
    else None (then it is a network failure: BUS_UNAVAILABLE)."""
    where = f"the broker at {urlsplit(url).hostname or '127.0.0.1'}"
    ours = f"certificate {files.cert}" if files.cert else "no client certificate"
    exc = _ssl_error(exc) or exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return AuthFailed(
            f"{where} is not trusted: its certificate failed verification against CA "
            f"{files.ca or '(system CAs)'}: {exc.verify_message} — check bus.tls_ca / "
            f"?{CA_PARAM}= and the broker's certificate"
        )
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "")
        said = _REASONS.get(reason)
        if said is not None:
            return AuthFailed(f"{where}: {said} ({ours}, {reason})")
    return None


async def tls_refusal(
    url: str, files: TlsFiles, exc: BaseException, timeout: float
) -> AuthFailed | None:
    """AUTH_FAILED when a failed connect was a refused certificate, else None.

    Under TLS 1.3 the broker checks our certificate only after our side of the handshake
    is done, so its alert can arrive as a bare connection reset. Then one more handshake,
    capped at TLS 1.2 (where the broker's verdict is part of the handshake), learns the
    reason; it sends nothing else and is made only on this failure path.
    """
    refused = handshake_refused(url, files, exc)
    if refused is not None or files.cert is None:
        return refused
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5671
    context = await asyncio.to_thread(client_context, files)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(host, port, ssl=context)
    except (OSError, TimeoutError) as probe:
        return handshake_refused(url, files, probe)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None
