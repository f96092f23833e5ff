"""The QEMU driver's domains: one registry owns the uuid and name maps and every lookup.

The driver, the launcher, the migration steps and the reattach logic all find, add and
drop domains here and nowhere else, so a name always maps to the uuid it belongs to. It
also hands out the hypervisor ids of runs (libvirt's ``<domain id='N'>``) and keeps the
QEMUs seen at open that no status file accounts for (``strays``: never started twice).
"""

from __future__ import annotations

from collections.abc import Iterator

from drivers.qemu.domain import Domain, Runtime
from drivers.qemu.state import UnknownQemu
from virtbus.domain import DomainDefinition
from virtbus.errors import NoDomainError, OperationFailed


class DomainRegistry:
    """Every domain of one driver, by uuid and by name (see module docstring)."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._by_uuid: dict[str, Domain] = {}
        self._by_name: dict[str, str] = {}  # name -> uuid
        self._next_id = 1
        self.strays: list[UnknownQemu] = []  # QEMUs seen at open that are not ours

    def __iter__(self) -> Iterator[Domain]:
        return iter(list(self._by_uuid.values()))  # a copy: callers may add or remove

    def find(self, ref: str) -> Domain | None:
        """The domain of a name, a uuid (any case) or a uuid without dashes; None if unknown."""
        dom = self._by_uuid.get(ref) or self._by_uuid.get(ref.lower())
        if dom is None and (uuid := self._by_name.get(ref)):
            dom = self._by_uuid.get(uuid)
        if dom is None and len(ref) == 32:
            dom = self._by_uuid.get(f"{ref[:8]}-{ref[8:12]}-{ref[12:16]}-{ref[16:20]}-{ref[20:]}")
        return dom

    def get(self, ref: str) -> Domain:
        dom = self.find(ref)
        if dom is None:
            raise NoDomainError(f"domain not found: no domain with matching name or uuid '{ref}'")
        return dom

    def by_uuid(self, uuid: str) -> Domain | None:
        return self._by_uuid.get(uuid)

    def name_taken(self, name: str) -> bool:
        return name in self._by_name

    def check_free(self, defn: DomainDefinition) -> None:
        """OPERATION_FAILED when the name belongs to another uuid or the uuid to another name."""
        other = self._by_name.get(defn.name)
        if other is not None and other != defn.uuid:
            raise OperationFailed(f"domain '{defn.name}' already exists with uuid {other}")
        existing = self._by_uuid.get(defn.uuid)
        if existing is not None and existing.defn.name != defn.name:
            raise OperationFailed(
                f"domain '{existing.defn.name}' is already defined with uuid {defn.uuid}"
            )

    def add(self, defn: DomainDefinition) -> Domain:
        dom = Domain(defn, self._rt)
        self._by_uuid[defn.uuid] = dom
        self._by_name[defn.name] = defn.uuid
        return dom

    def remove(self, dom: Domain) -> None:
        """Forget ``dom`` (a no-op when another object holds its uuid by now)."""
        uuid = dom.defn.uuid
        if self._by_uuid.get(uuid) is not dom:
            return
        del self._by_uuid[uuid]
        if self._by_name.get(dom.defn.name) == uuid:
            del self._by_name[dom.defn.name]

    # --- hypervisor ids of runs -----------------------------------------------------------
    def new_run_id(self) -> int:
        run_id, self._next_id = self._next_id, self._next_id + 1
        return run_id

    def seen_run_id(self, run_id: int) -> None:
        """A reattached run keeps its id: later runs get higher ones."""
        self._next_id = max(self._next_id, run_id + 1)
