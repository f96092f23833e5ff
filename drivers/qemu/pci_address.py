"""libvirt's PCI address set (``domain_addr.c``): buses, their connect rules, and the
search for the next free slot that grows the topology when it runs out.

Kept faithful to libvirt, because a guest's PCI layout is ABI: the same XML must give the
same slots, the same auto-added ``pcie-root-port``\\ s and bridges as under libvirt, or a
guest moved from libvirt to virtbus sees its devices move (NIC names change, Windows
re-detects hardware). A *dry run* set grows new buses instead of failing; the caller then
adds the matching controllers and assigns for real with a fixed set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from virtbus.errors import ConfigUnsupported, XMLError


class F:
    """``virDomainPCIConnectFlags``: what a device needs, or what a bus accepts (plain
    ints: enum.IntFlag arithmetic costs a define of a 100-disk guest tens of ms)."""

    AUTOASSIGN = 1 << 0
    HOTPLUGGABLE = 1 << 1
    INTEGRATED = 1 << 2
    AGGREGATE_SLOT = 1 << 3
    PCI_DEVICE = 1 << 4
    PCIE_DEVICE = 1 << 5
    PCIE_ROOT_PORT = 1 << 6
    PCIE_SWITCH_UPSTREAM_PORT = 1 << 7
    PCIE_SWITCH_DOWNSTREAM_PORT = 1 << 8
    DMI_TO_PCI_BRIDGE = 1 << 9
    PCI_EXPANDER_BUS = 1 << 10
    PCIE_EXPANDER_BUS = 1 << 11
    PCI_BRIDGE = 1 << 12
    PCIE_TO_PCI_BRIDGE = 1 << 13


#: every connect type flag (from PCI_DEVICE up)
TYPES = sum(value for name, value in vars(F).items() if name.isupper() and value >= F.PCI_DEVICE)
ENDPOINT = F.PCI_DEVICE | F.PCIE_DEVICE
NONE = 0
SLOT_LAST = 0x1F
FUNCTION_LAST = 7

#: controller model -> the connect type it needs upstream
CONTROLLER_CONNECT = {
    "pci-bridge": F.PCI_BRIDGE,
    "pci-expander-bus": F.PCI_EXPANDER_BUS,
    "pcie-expander-bus": F.PCIE_EXPANDER_BUS,
    "dmi-to-pci-bridge": F.DMI_TO_PCI_BRIDGE,
    "pcie-to-pci-bridge": F.PCIE_TO_PCI_BRIDGE,
    "pcie-root-port": F.PCIE_ROOT_PORT | F.AGGREGATE_SLOT,
    "pcie-switch-upstream-port": F.PCIE_SWITCH_UPSTREAM_PORT,
    "pcie-switch-downstream-port": F.PCIE_SWITCH_DOWNSTREAM_PORT,
}
_CONNECT_NAMES = (
    (F.PCI_DEVICE, "standard PCI device"),
    (F.PCIE_DEVICE, "PCI Express device"),
    (F.PCIE_ROOT_PORT, "pcie-root-port"),
    (F.PCIE_SWITCH_UPSTREAM_PORT, "pcie-switch-upstream-port"),
    (F.PCIE_SWITCH_DOWNSTREAM_PORT, "pcie-switch-downstream-port"),
    (F.DMI_TO_PCI_BRIDGE, "dmi-to-pci-bridge"),
    (F.PCIE_TO_PCI_BRIDGE, "pcie-to-pci-bridge"),
    (F.PCI_EXPANDER_BUS, "pci-expander-bus"),
    (F.PCIE_EXPANDER_BUS, "pcie-expander-bus"),
    (F.PCI_BRIDGE, "pci-bridge"),
)


@dataclass(slots=True)
class Addr:
    domain: int = 0
    bus: int = 0
    slot: int = 0
    function: int = 0
    multi: bool | None = None

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    def same(self, other: Addr) -> bool:
        return (self.domain, self.bus, self.slot, self.function) == (
            other.domain, other.bus, other.slot, other.function
        )  # fmt: skip


@dataclass(slots=True)
class Bus:
    model: str | None = None
    flags: int = NONE
    min_slot: int = 0
    max_slot: int = SLOT_LAST
    functions: list[int] = field(default_factory=lambda: [0] * (SLOT_LAST + 1))
    aggregate: list[bool] = field(default_factory=lambda: [False] * (SLOT_LAST + 1))

    def set_model(self, model: str, hotplug: bool = True) -> None:
        """What may be plugged *downstream* of a controller of this model."""
        hp = F.HOTPLUGGABLE if hotplug else NONE
        if model == "pci-root":
            self.flags = F.AUTOASSIGN | F.PCI_DEVICE | F.PCI_BRIDGE | F.PCI_EXPANDER_BUS | hp
            self.min_slot, self.max_slot = 1, SLOT_LAST
        elif model == "pci-bridge" or model == "pcie-to-pci-bridge":
            self.flags = F.AUTOASSIGN | F.PCI_DEVICE | F.PCI_BRIDGE | hp
            self.min_slot, self.max_slot = 1, SLOT_LAST
        elif model == "pci-expander-bus":
            self.flags = F.AUTOASSIGN | F.PCI_DEVICE | F.PCI_BRIDGE | hp
            self.min_slot, self.max_slot = 0, SLOT_LAST
        elif model == "pcie-root":
            self.flags = (
                F.PCIE_DEVICE | F.PCIE_ROOT_PORT | F.DMI_TO_PCI_BRIDGE | (F.PCIE_EXPANDER_BUS)
            )
            self.min_slot, self.max_slot = 1, SLOT_LAST
        elif model == "dmi-to-pci-bridge":
            self.flags = F.PCI_DEVICE | F.PCI_BRIDGE
            self.min_slot, self.max_slot = 0, SLOT_LAST
        elif model in ("pcie-root-port", "pcie-switch-downstream-port"):
            self.flags = (
                F.AUTOASSIGN | F.PCIE_DEVICE | F.PCIE_SWITCH_UPSTREAM_PORT
                | F.PCIE_TO_PCI_BRIDGE | hp
            )  # fmt: skip
            self.min_slot, self.max_slot = 0, 0
        elif model == "pcie-switch-upstream-port":
            self.flags = F.PCIE_SWITCH_DOWNSTREAM_PORT
            self.min_slot, self.max_slot = 0, SLOT_LAST
        elif model == "pcie-expander-bus":
            self.flags = F.PCIE_ROOT_PORT | F.DMI_TO_PCI_BRIDGE
            self.min_slot, self.max_slot = 0, SLOT_LAST
        else:
            raise ConfigUnsupported(f"unsupported <controller type='pci' model='{model}'>")
        self.model = model

    def fully_reserved(self) -> bool:
        return all(self.functions[s] for s in range(self.min_slot, self.max_slot + 1))

    def empty(self) -> bool:
        return not any(self.functions[s] for s in range(self.min_slot, self.max_slot + 1))


def _compatible(addr: Addr, bus_flags: int, dev_flags: int, from_config: bool) -> str | None:
    """None if a device with ``dev_flags`` may sit at ``addr`` on that bus, else why not."""
    if dev_flags & F.INTEGRATED:
        if addr.bus != 0:
            return f"The device at PCI address {addr} needs to be an integrated device (bus=0)"
        bus_flags |= F.PCI_DEVICE | F.AUTOASSIGN
    if from_config:
        if bus_flags & ENDPOINT:
            bus_flags |= ENDPOINT
        if dev_flags & F.PCI_BRIDGE:
            dev_flags |= F.PCI_DEVICE
    elif dev_flags & F.AUTOASSIGN and not bus_flags & F.AUTOASSIGN:
        return (
            f"The device at PCI address {addr} was auto-assigned this address, but the PCI "
            f"controller with index='{addr.bus}' doesn't allow auto-assignment"
        )
    if dev_flags & F.HOTPLUGGABLE and not bus_flags & F.HOTPLUGGABLE:
        return (
            f"The device at PCI address {addr} requires hotplug capability, but the PCI "
            f"controller with index='{addr.bus}' doesn't support hotplug"
        )
    if not dev_flags & bus_flags & TYPES:
        what = next((name for flag, name in _CONNECT_NAMES if dev_flags & flag), "device")
        return (
            f"The device at PCI address {addr} cannot be plugged into the PCI controller "
            f"with index='{addr.bus}'. It requires a controller that accepts a {what}."
        )
    return None


class AddressSet:
    """The PCI buses of one domain and which slot functions are taken."""

    def __init__(self, nbuses: int, *, dry_run: bool) -> None:
        self.buses = [Bus() for _ in range(nbuses)]
        self.dry_run = dry_run

    def grow(self, addr: Addr, flags: int) -> int:
        """Add buses so that ``addr.bus`` exists (dry runs only); how many were added."""
        add = addr.bus - len(self.buses) + 1
        if add <= 0:
            return 0
        need_bridge = False
        if flags & F.PCI_DEVICE:
            model = "pci-bridge"
            # a pure PCIe guest has nowhere to plug a pci-bridge: a pcie-root-port with a
            # pcie-to-pci-bridge provides the legacy PCI slots instead
            need_bridge = not any(b.flags & F.PCI_BRIDGE for b in self.buses)
            if need_bridge and add == 1:
                add += 1
                addr.bus += 1
        elif flags & (F.PCIE_DEVICE | F.PCIE_SWITCH_UPSTREAM_PORT):
            model = "pcie-root-port"
        else:
            name = next((m for m, f in CONTROLLER_CONNECT.items() if flags & f & TYPES), None)
            if name is not None:
                raise ConfigUnsupported(
                    f"a PCI slot is needed to connect a PCI controller model='{name}', but "
                    "none is available, and it cannot be automatically added"
                )
            raise ConfigUnsupported(
                f"cannot automatically add a new PCI bus for a device with connect flags "
                f"{int(flags):#04x}"
            )
        start = len(self.buses)
        self.buses += [Bus() for _ in range(add)]
        i = start
        if need_bridge:
            self.buses[i].set_model("pcie-root-port")
            self.buses[i].flags = F.PCIE_TO_PCI_BRIDGE  # only the bridge plugs in there
            self.buses[i + 1].set_model("pcie-to-pci-bridge")
            i += 2
        for bus in self.buses[i:]:
            bus.set_model(model)
        return add

    def validate(self, addr: Addr, flags: int, from_config: bool) -> None:
        err = XMLError if from_config else ConfigUnsupported
        if not self.buses:
            raise err("No PCI buses available")
        if addr.domain != 0:
            raise err(f"Invalid PCI address {addr}. Only PCI domain 0 is available")
        if addr.bus >= len(self.buses):
            raise err(
                f"Invalid PCI address {addr}. Only PCI buses up to {len(self.buses) - 1} "
                "are available"
            )
        bus = self.buses[addr.bus]
        why = _compatible(addr, bus.flags, flags, from_config)
        if why is not None:
            raise err(why)
        if bus.min_slot and addr.slot < bus.min_slot:
            raise err(f"Invalid PCI address {addr}. slot must be >= {bus.min_slot}")
        if addr.slot > bus.max_slot:
            raise err(f"Invalid PCI address {addr}. slot must be <= {bus.max_slot}")
        if addr.function > FUNCTION_LAST:
            raise err(f"Invalid PCI address {addr}. function must be <= {FUNCTION_LAST}")

    def in_use(self, addr: Addr) -> bool:
        return bool(self.buses[addr.bus].functions[addr.slot])

    def reserve(self, addr: Addr, flags: int, *, from_config: bool = True) -> None:
        if self.dry_run:
            self.grow(addr, flags)
        self.validate(addr, flags, from_config)
        bus = self.buses[addr.bus]
        if bus.functions[addr.slot] & (1 << addr.function):
            err = XMLError if from_config else ConfigUnsupported
            raise err(f"Attempted double use of PCI Address {addr}")
        if not bus.functions[addr.slot] and flags & F.AGGREGATE_SLOT:
            bus.aggregate[addr.slot] = True
        bus.functions[addr.slot] |= 1 << addr.function

    def next_addr(self, flags: int, function: int = -1) -> Addr:
        if not self.buses:
            raise XMLError("No PCI buses available")
        for index, bus in enumerate(self.buses):
            a = Addr(bus=index, slot=bus.min_slot, function=max(function, 0))
            if self._find_on_bus(bus, a, function, flags):
                return a
        if self.dry_run:
            a = Addr(bus=len(self.buses), function=max(function, 0))
            self.grow(a, flags)
            a.slot = self.buses[a.bus].min_slot
            return a
        raise ConfigUnsupported("No more available PCI slots")

    @staticmethod
    def _find_on_bus(bus: Bus, a: Addr, function: int, flags: int) -> bool:
        if _compatible(a, bus.flags, flags, False) is not None:
            return False
        while a.slot <= bus.max_slot:
            used = bus.functions[a.slot]
            if not used:
                return True
            if flags & F.AGGREGATE_SLOT and bus.aggregate[a.slot]:
                if not used & (1 << a.function):
                    return True
                if function == -1:
                    for fn in range(a.function, FUNCTION_LAST + 1):
                        if not used & (1 << fn):
                            a.function = fn
                            return True
                    a.function = 0
            a.slot += 1
        return False

    def reserve_next(self, flags: int, function: int = -1) -> Addr:
        addr = self.next_addr(flags, function)
        self.reserve(addr, flags, from_config=False)
        return addr
