"""Every op declared once: its name, request and result types, and what it touches.

An :class:`Op` *is* its name (a ``str`` subclass), so the low-level bus, dict lookups and
comparisons with ``call.op`` keep working on plain strings, while typed code reads the
request and result types from the same object::

    DOMAIN_START = op("domain.start", DomainTarget, DomainStatus, Service.AGENT, ...)
    await client.call(route, DOMAIN_START, DomainTarget(domain="web1"))  # -> DomainStatus

Each op module (``protocol/domain.py``, ``host.py``, ``migration.py``, ``scheduler.py``,
later ``storage.py``, ``network.py``, ...) declares its ops with :func:`op`, which
registers them in :data:`REGISTRY`; the agent, the scheduler, the client, the security
policy, the README tables and the AsyncAPI document all read the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, Generic, TypeVar

from virtbus.errors import NoSupport
from virtbus.protocol.base import Message, decode, decode_reply

Req = TypeVar("Req", bound=Message)
Res = TypeVar("Res", bound=Message)


class Service(StrEnum):
    """Who serves an op: an agent (route ``agent.<host>``) or the scheduler."""

    AGENT = "agent"
    SCHEDULER = "scheduler"


class Access(StrEnum):
    """What an op may do, the classes the security policy grants by role."""

    READ = "read"  # changes nothing
    LIFECYCLE = "lifecycle"  # start/stop/suspend ... an existing object
    CONFIG = "config"  # define, undefine, edit, create, delete
    MIGRATE = "migrate"  # the steps of a live migration (the scheduler's own)
    ADMIN = "admin"  # host-wide administration (draining, ...)


class Target(StrEnum):
    """The kind of object an op acts on (the policy matches its name)."""

    HOST = "host"
    DOMAIN = "domain"
    POOL = "pool"
    VOLUME = "volume"
    NETWORK = "network"
    MIGRATION = "migration"


TargetOf = Callable[[Any], str | None]


class Op(str, Generic[Req, Res]):
    """An op name carrying its declaration (see the module docstring)."""

    request: type[Req]
    result: type[Res]
    service: Service
    summary: str
    access: Access
    target: Target
    target_of: TargetOf
    serial: bool
    idempotent: bool
    # request flag -> the op whose permission the call needs as well when the flag is set
    # (libvirt's flag-dependent ACLs: snapshot XML with VIR_DOMAIN_SNAPSHOT_XML_SECURE
    # needs domain:read_secure); the agent checks both, on the same target.
    flag_requires: dict[str, Op[Any, Any]]

    def __new__(
        cls,
        name: str,
        request: type[Req],
        result: type[Res],
        service: Service,
        summary: str,
        *,
        access: Access,
        target: Target,
        target_of: TargetOf | None = None,
        serial: bool = False,
        idempotent: bool = False,
        flag_requires: dict[str, Op[Any, Any]] | None = None,
    ) -> Op[Req, Res]:
        self = super().__new__(cls, name)
        self.request = request
        self.result = result
        self.service = service
        self.summary = summary
        self.access = access
        self.target = target
        self.target_of = target_of or (lambda _req: None)
        self.serial = serial
        self.idempotent = idempotent
        self.flag_requires = dict(flag_requires or {})
        for flag in self.flag_requires:
            if flag not in request.__struct_fields__:
                raise ValueError(f"op {name!r}: flag_requires names {flag!r}, no request field")
        return self

    @property
    def name(self) -> str:
        return str.__str__(self)

    @property
    def mutating(self) -> bool:
        """Changes something (the security policy's view)."""
        return self.access is not Access.READ

    def required(self, request: Any) -> list[Op[Any, Any]]:
        """The ops whose permission ``request`` needs besides this one's (its set flags')."""
        return [o for flag, o in self.flag_requires.items() if getattr(request, flag, False)]

    @property
    def journaled(self) -> bool:
        """A redelivery must be answered from the reply log: it changes something and
        running it twice would not give the same result (``idempotent`` ops, such as an
        upload chunk written at its offset, are simply run again)."""
        return self.mutating and not self.idempotent

    def decode_request(self, body: Any) -> Req:
        """The request of a call body (INVALID_ARG naming the field)."""
        return decode(body, self.request)

    def decode_result(self, result: Any) -> Res:
        """The result of a reply (RPC_ERROR when the peer sent a malformed one)."""
        return decode_reply(result, self.result, self.name)

    def __reduce__(self) -> tuple[Any, ...]:  # pragma: no cover - copy/pickle as a name
        return (str, (self.name,))


REGISTRY: dict[str, Op[Any, Any]] = {}


def field(name: str) -> TargetOf:
    """The target is the request's attribute ``name``."""
    return lambda req: getattr(req, name, None)


def op(
    name: str,
    request: type[Req],
    result: type[Res],
    service: Service,
    summary: str,
    *,
    access: Access,
    target: Target,
    target_of: TargetOf | None = None,
    serial: bool = False,
    idempotent: bool = False,
    flag_requires: dict[str, Op[Any, Any]] | None = None,
) -> Op[Req, Res]:
    """Declare and register an op; a name is declared once."""
    if name in REGISTRY:
        raise ValueError(f"op {name!r} is declared twice")
    declared: Op[Req, Res] = Op(
        name,
        request,
        result,
        service,
        summary,
        access=access,
        target=target,
        target_of=target_of,
        serial=serial,
        idempotent=idempotent,
        flag_requires=flag_requires,
    )
    REGISTRY[name] = declared
    return declared


def lookup(name: str) -> Op[Any, Any]:
    """The declared op named ``name`` (NO_SUPPORT when there is none)."""
    found = REGISTRY.get(name)
    if found is None:
        raise NoSupport(f"unknown op '{name}'")
    return found


def ops_of(service: Service) -> list[Op[Any, Any]]:
    return [o for o in REGISTRY.values() if o.service is service]
