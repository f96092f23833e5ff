"""setmem and setmaxmem, as libvirt's QEMU driver decides them (qemuDomainSetMemoryFlags):
the checks and the new definition, shared by the drivers that simulate or run QEMU."""

from __future__ import annotations

from virtbus.domain import DomainDefinition
from virtbus.errors import InvalidArgument, OperationInvalid


def has_balloon(defn: DomainDefinition) -> bool:
    """A virtio balloon QEMU gets (libvirt adds one where ``<memballoon>`` is absent)."""
    return defn.memballoon is None or defn.memballoon.model != "none"


def check_live_memory(live: DomainDefinition, kib: int, maximum: bool) -> None:
    """A running domain's memory may move only through its balloon, up to ``<memory>``."""
    if maximum:
        raise OperationInvalid("cannot resize the maximum memory on an active domain")
    _below_maximum(live, kib)
    if not has_balloon(live):
        raise OperationInvalid("Unable to change memory of active domain without the balloon"
                               " device and guest OS balloon driver")  # fmt: skip


def with_memory(defn: DomainDefinition, kib: int, maximum: bool) -> DomainDefinition:
    """A copy of the definition with ``<currentMemory>`` (or, with ``maximum``, ``<memory>``,
    current lowered to it) set to ``kib``."""
    out = defn.copy()
    if maximum:
        if defn.element("cpu/numa/cell") is not None:
            raise OperationInvalid("initial memory size of a domain with NUMA nodes cannot be"
                                   " modified with this API")  # fmt: skip
        out.set_memory_kib(kib)
    else:
        _below_maximum(defn, kib)
        out.set_current_memory_kib(kib)
    return out


def _below_maximum(defn: DomainDefinition, kib: int) -> None:
    if kib > defn.memory_kib:
        raise InvalidArgument(f"cannot set memory higher than max memory"
                              f" ({kib} KiB > {defn.memory_kib} KiB)")  # fmt: skip
