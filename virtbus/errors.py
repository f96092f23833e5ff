"""Typed errors with libvirt-style codes.

Every error that crosses the bus is a :class:`VirtbusError` carrying a stable ``code``
string; the code travels in a reply's ``error`` map and is turned back into the same
class on the caller's side by :func:`error_from_wire`. Third-party exceptions are
wrapped at the boundary where they occur.

Tree::

    VirtbusError                    INTERNAL_ERROR      (root; never raised bare)
    ├── NoDomainError               NO_DOMAIN
    ├── NoHostError                 NO_HOST             no such host / no host fits
    ├── NoConnect                   NO_CONNECT          nothing serves the route (no agent)
    ├── NoStoragePool               NO_STORAGE_POOL
    ├── NoStorageVol                NO_STORAGE_VOL
    ├── NoDomainSnapshot            NO_DOMAIN_SNAPSHOT  no snapshot of that name (of that domain)
    ├── NoDomainCheckpoint          NO_DOMAIN_CHECKPOINT no checkpoint of that name (of that domain)
    ├── NoNetwork                   NO_NETWORK          no such virtual network
    ├── NoNetworkPort               NO_NETWORK_PORT     no port of that uuid on the network
    ├── OperationInvalid            OPERATION_INVALID   wrong state for the command
    ├── InvalidArgument             INVALID_ARG
    ├── XMLError                    XML_ERROR           bad or unsafe domain XML
    ├── ConfigUnsupported           CONFIG_UNSUPPORTED  valid XML the driver cannot honour
    ├── NoSupport                   NO_SUPPORT          unknown op / not implemented by driver
    ├── OperationFailed             OPERATION_FAILED
    │   └── MigrateFailed           MIGRATE_FAILED
    ├── AuthDenied                  AUTH_DENIED         the policy refuses the call
    ├── AuthFailed                  AUTH_FAILED         the broker refused the login
    ├── ProtocolError               RPC_ERROR           malformed / oversized / wrong version
    └── RetryableError                                  (transient: may succeed if retried)
        ├── OperationTimeout        OPERATION_TIMEOUT
        │   └── NoReply             OPERATION_TIMEOUT   no reply within the caller's deadline
        └── BusUnavailable          BUS_UNAVAILABLE     broker unreachable
"""

from __future__ import annotations

from typing import Any, ClassVar


class VirtbusError(Exception):
    """Root of every virtbus error; ``code`` is what travels on the wire."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InternalError(VirtbusError):
    code = "INTERNAL_ERROR"


class NoDomainError(VirtbusError):
    code = "NO_DOMAIN"


class NoHostError(VirtbusError):
    """No such host, or no host can run the domain (placement says which filter)."""

    code = "NO_HOST"


class NoConnect(VirtbusError):
    """Nothing serves the route a call was sent to: no agent (or scheduler) queue exists
    (libvirt's VIR_ERR_NO_CONNECT)."""

    code = "NO_CONNECT"


class NoStoragePool(VirtbusError):
    code = "NO_STORAGE_POOL"


class NoStorageVol(VirtbusError):
    code = "NO_STORAGE_VOL"


class NoDomainSnapshot(VirtbusError):
    code = "NO_DOMAIN_SNAPSHOT"


class NoDomainCheckpoint(VirtbusError):
    code = "NO_DOMAIN_CHECKPOINT"


class NoNetwork(VirtbusError):
    code = "NO_NETWORK"


class NoNetworkPort(VirtbusError):
    code = "NO_NETWORK_PORT"


class OperationInvalid(VirtbusError):
    code = "OPERATION_INVALID"


class InvalidArgument(VirtbusError):
    code = "INVALID_ARG"


class XMLError(VirtbusError):
    code = "XML_ERROR"


class ConfigUnsupported(VirtbusError):
    code = "CONFIG_UNSUPPORTED"


class NoSupport(VirtbusError):
    code = "NO_SUPPORT"


class OperationFailed(VirtbusError):
    code = "OPERATION_FAILED"


class MigrateFailed(OperationFailed):
    code = "MIGRATE_FAILED"


class AuthDenied(VirtbusError):
    code = "AUTH_DENIED"


class AuthFailed(VirtbusError):
    """The broker refused the credentials or the vhost (libvirt's VIR_ERR_AUTH_FAILED)."""

    code = "AUTH_FAILED"


class ProtocolError(VirtbusError):
    code = "RPC_ERROR"


class RetryableError(VirtbusError):
    """A transient failure: the same request may succeed later."""

    retryable = True


class OperationTimeout(RetryableError):
    code = "OPERATION_TIMEOUT"


class NoReply(OperationTimeout):
    """The caller's own deadline passed with no reply at all (same wire code). A peer that
    answered OPERATION_TIMEOUT (its QMP or job wait timed out) decodes as OperationTimeout:
    only this one means the peer itself may be gone."""


class BusUnavailable(RetryableError):
    code = "BUS_UNAVAILABLE"


_BY_CODE: dict[str, type[VirtbusError]] = {
    cls.code: cls
    for cls in (
        InternalError,
        NoDomainError,
        NoHostError,
        NoConnect,
        NoStoragePool,
        NoStorageVol,
        NoDomainSnapshot,
        NoDomainCheckpoint,
        NoNetwork,
        NoNetworkPort,
        OperationInvalid,
        InvalidArgument,
        XMLError,
        ConfigUnsupported,
        NoSupport,
        OperationFailed,
        MigrateFailed,
        AuthDenied,
        AuthFailed,
        ProtocolError,
        OperationTimeout,
        BusUnavailable,
    )
}

ERROR_CODES: frozenset[str] = frozenset(_BY_CODE)


def error_from_wire(error: Any) -> VirtbusError:
    """Rebuild a typed error from a reply's ``error`` map (unknown codes keep their code)."""
    if not isinstance(error, dict):
        return ProtocolError(f"malformed error in reply: {error!r}"[:200])
    code = str(error.get("code", "INTERNAL_ERROR"))
    message = str(error.get("message", ""))
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    err = InternalError(message)
    err.code = code  # type: ignore[misc]  # keep a code from a newer peer verbatim
    return err
