"""The ``domain.*`` ops an agent serves, and what they answer (libvirt's virDomain API).

A ``domain`` argument is a name or a UUID. Lifecycle ops answer the state the domain is
in once the op is done, as ``virsh domstate --reason`` shows it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from msgspec import Meta
from msgspec import field as default

from virtbus.protocol.base import (
    Accepted,
    Message,
    Name,
    NonNegInt,
    NonNegSeconds,
    XmlText,
)
from virtbus.protocol.events import DomainState
from virtbus.protocol.registry import Access, Op, Req, Service, Target, field, op


class StateName(StrEnum):
    """libvirt's state names, as they travel (``DomainState`` has their numbers)."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    @classmethod
    def of(cls, state: DomainState) -> StateName:
        return cls(state.label)


# --- requests ------------------------------------------------------------------------
class DomainTarget(Message):
    """``{domain}``: the domain an op acts on (name or UUID)."""

    domain: Name


class DomainShutdown(DomainTarget):
    """``timeout``: wait that long for the guest to power off (default: return at once)."""

    timeout: NonNegSeconds | None = None


class DomainDefine(Message):
    xml: XmlText


class DomainUndefine(DomainTarget):
    """``remove_all_storage``: also delete the domain's storage volumes (virsh undefine
    --remove-all-storage), each reported in the answer."""

    remove_all_storage: bool = False


class DomainAutostart(DomainTarget):
    """``autostart``: start the domain when its host's agent starts (once per boot)."""

    autostart: bool


class DomainMemoryRequest(DomainTarget):
    """setmem / setmaxmem: ``kib`` is the new current memory (the balloon's target when
    live) or, with ``maximum``, the new ``<memory>``. ``live``/``config`` as virsh's flags;
    neither means the domain's current state."""

    kib: Annotated[int, Meta(gt=0, le=1 << 42)]  # 4 PiB, past any host
    maximum: bool = False
    live: bool = False
    config: bool = False


class DomainListRequest(Message):
    """``all``: include shut-off domains (the agent's default)."""

    all: bool = True


STATS_GROUPS = ("state", "cpu-total", "balloon", "vcpu", "interface", "block")
StatsGroup = Literal["state", "cpu-total", "balloon", "vcpu", "interface", "block"]


class DomainStatsRequest(Message):
    """libvirt's domstats: ``domains`` (default all), ``groups`` (default all)."""

    domains: list[Name] | None = None
    groups: list[StatsGroup] | None = None


# --- results -------------------------------------------------------------------------
class RemovedVolume(Message):
    pool: str
    volume: str
    error: dict[str, str] | None = None  # {code, message} when it could not be deleted


class Undefined(Message):
    """What ``domain.undefine`` did: the volumes it deleted (remove_all_storage)."""

    volumes: list[RemovedVolume] = default(default_factory=list)


class DomainStatus(Message):
    """``{state, reason}`` as ``virsh domstate --reason``."""

    state: StateName
    reason: str


class DefinedDomain(Message):
    name: str
    uuid: str


class DomainInfo(Message):
    """What ``virsh dominfo`` shows (an agent sends every field; a reader needs only the
    first three)."""

    name: str
    uuid: str
    state: StateName
    id: int | None = None
    state_code: Annotated[int, Meta(ge=0, le=7)] = 0
    reason: str = "unknown"
    max_memory_kib: NonNegInt = 0
    memory_kib: NonNegInt = 0
    vcpus: NonNegInt = 0
    cpu_time_ns: NonNegInt = 0
    persistent: bool = True
    autostart: bool = False
    type: str = ""
    managed_save: bool = False  # a managed save image waits for the next start
    owner: str | None = None  # the bus user that defined it (its virtbus metadata)
    # its anti-affinity groups (virtbus placement metadata); None from an agent too old to say
    groups: list[str] | None = None


class DomainXml(Message):
    xml: str


class AutostartFlag(Message):
    autostart: bool


class DomainList(Message):
    domains: list[DomainInfo]


StatValue = int | float | str


class DomainStats(Message):
    """Per domain *name*: libvirt's domstats fields (``{"state.state": 1, ...}``)."""

    domains: dict[str, dict[str, StatValue]]


# --- the ops -------------------------------------------------------------------------
_A, _D = Service.AGENT, Target.DOMAIN
_ref = field("domain")


def _lifecycle(
    name: str,
    summary: str,
    request: type[Req] = DomainTarget,  # type: ignore[assignment]
) -> Op[Req, DomainStatus]:
    return op(
        name, request, DomainStatus, _A, summary,
        access=Access.LIFECYCLE, target=_D, target_of=_ref, serial=True,
    )  # fmt: skip


DOMAIN_DEFINE = op(
    "domain.define", DomainDefine, DefinedDomain, _A,
    "define (or redefine) a domain from libvirt domain XML",
    access=Access.CONFIG, target=_D, serial=True,
)  # fmt: skip  # its target is the name inside the XML: the agent parses it
DOMAIN_UNDEFINE = op(
    "domain.undefine", DomainUndefine, Undefined, _A,
    "remove a shut-off domain's definition (and with remove_all_storage its volumes)",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_START = _lifecycle("domain.start", "boot a defined domain", DomainTarget)
DOMAIN_SHUTDOWN = _lifecycle("domain.shutdown", "ask the guest to power off (ACPI)", DomainShutdown)
DOMAIN_DESTROY = _lifecycle("domain.destroy", "power off at once", DomainTarget)
DOMAIN_REBOOT = _lifecycle("domain.reboot", "ask the guest to reboot", DomainTarget)
DOMAIN_RESET = _lifecycle("domain.reset", "hard reset", DomainTarget)
DOMAIN_SUSPEND = _lifecycle("domain.suspend", "pause the vCPUs", DomainTarget)
DOMAIN_RESUME = _lifecycle("domain.resume", "continue the vCPUs", DomainTarget)
DOMAIN_INFO = op(
    "domain.info", DomainTarget, DomainInfo, _A, "a domain's information (dominfo)",
    access=Access.READ, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_STATE = op(
    "domain.state", DomainTarget, DomainStatus, _A, "a domain's state and reason",
    access=Access.READ, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_XML = op(
    "domain.xml", DomainTarget, DomainXml, _A,
    "the domain XML, runtime values filled in, secrets (graphics passwords) left out",
    access=Access.READ, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
# libvirt's domain:read_secure: its own op, so the policy grants it apart from reading
# (a config-class op: the viewer role reads, it does not see passwords).
DOMAIN_READ_SECURE = op(
    "domain.read_secure", DomainTarget, DomainXml, _A,
    "the domain XML with its secrets (dumpxml --security-info)",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_SET_AUTOSTART = op(
    "domain.set_autostart", DomainAutostart, AutostartFlag, _A,
    "start the domain with its host's agent, once per boot (NO_SUPPORT where the driver has no"
    " autostart)", access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_SET_MEMORY = op(
    "domain.set_memory", DomainMemoryRequest, Accepted, _A,
    "change a domain's memory (setmem: live through the balloon; setmaxmem: the definition)",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_LIST = op(
    "domain.list", DomainListRequest, DomainList, _A, "the host's domains",
    access=Access.READ, target=Target.HOST,
)  # fmt: skip
DOMAIN_STATS = op(
    "domain.stats", DomainStatsRequest, DomainStats, _A,
    "libvirt domain statistics, collected now (never queued behind lifecycle commands)",
    access=Access.READ, target=Target.HOST,
)  # fmt: skip
