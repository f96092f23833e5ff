"""The saved-state ops (libvirt's virDomainSave/Restore/ManagedSave): a guest's memory
and device state in a file on the agent's host, and back.

``file`` is a path on the agent's host (absolute). ``running``/``paused`` choose the
state after a restore (default: the state the guest was saved in).
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from virtbus.protocol.base import Message
from virtbus.protocol.domain import DefinedDomain, DomainStatus, DomainTarget
from virtbus.protocol.registry import Access, Service, Target, field, op

FilePath = Annotated[str, Meta(min_length=1, max_length=4096)]


class SaveRequest(DomainTarget):
    file: FilePath
    running: bool = False
    paused: bool = False


class RestoreRequest(Message):
    file: FilePath
    running: bool = False
    paused: bool = False


class ManagedSaveRequest(DomainTarget):
    running: bool = False
    paused: bool = False


class Restored(DefinedDomain):
    """The domain the file held, and its state once restored."""

    state: DomainStatus


_A, _D = Service.AGENT, Target.DOMAIN
_ref = field("domain")

DOMAIN_SAVE = op(
    "domain.save", SaveRequest, DomainStatus, _A,
    "save the guest's state to a file on the host and stop it (stopped(saved))",
    access=Access.LIFECYCLE, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_RESTORE = op(
    "domain.restore", RestoreRequest, Restored, _A,
    "start a domain from a save file (started(restored)); the file is kept",
    access=Access.LIFECYCLE, target=Target.HOST,
)  # fmt: skip
DOMAIN_MANAGED_SAVE = op(
    "domain.managed_save", ManagedSaveRequest, DomainStatus, _A,
    "save the guest's state where the next start resumes it (managedsave)",
    access=Access.LIFECYCLE, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_MANAGED_SAVE_REMOVE = op(
    "domain.managed_save_remove", DomainTarget, DomainStatus, _A,
    "drop the managed save image: the next start boots afresh",
    access=Access.LIFECYCLE, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
