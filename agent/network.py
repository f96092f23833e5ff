"""The host's virtual networks: libvirt's network driver, composed from backends.

:class:`Networks` owns what the backends (drivers/network) do not: definitions and their
files, names, the checks between networks (no two on one subnet or one bridge), generated
bridge names and MACs, the networks' runtime state, autostart, lifecycle events, the
supervision of each network's dnsmasq (restarted when it dies, within
``network.dnsmasq_restart_limit`` a minute) and its watched lease file.

Files: ``<state-dir>/networks/<uuid>.xml`` (the definition, with what define generated;
``<uuid>.live.xml`` the running one while a net-update made them differ)
and ``<uuid>.json`` ``{autostart, active, persistent, index, owner}`` (``index``: the
bridge's ifindex when it started, the mark that a bridge of that name is this network's;
``owner``: the bus user that defined or created it, see :mod:`agent.owners`);
``<run-dir>/networks/<uuid>/`` dnsmasq's config, pid file, hosts files and leases, and
``ports.json`` the ports made by net-port-create (``{"ports": [<networkport> XML, ...]}``:
they last while the network runs, across agent restarts, and go at net-destroy).

A restarted agent adopts a running network without touching it: the bridge with the
recorded ifindex is still there, so it stays (a missing firewall table is added back), a
dnsmasq found by its pid file is watched again (one that died meanwhile is started). It
never tears down and rebuilds a network whose guests may be running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles.os

from agent.owners import stored_owner
from drivers.network import HostNet, NetworkBackend, backend_for, dnsmasq, dnsmasq_files, nft
from drivers.network.dnsmasq import DnsmasqFiles
from drivers.network.watch import ExitWatch, FileWatch
from virtbus.errors import (
    InvalidArgument,
    NoNetwork,
    NoSupport,
    OperationFailed,
    OperationInvalid,
    VirtbusError,
)
from virtbus.netaddr import is_ip
from virtbus.network import Lease, NetworkDefinition, overlaps, parse_leases, parse_network_xml
from virtbus.network.ports import Port, parse_port_xml
from virtbus.network.update import Update, apply_update, check_update
from virtbus.settings import NetworkSettings
from virtbus.store import atomic_write, quarantine, read_bytes

log = logging.getLogger(__name__)

BRIDGE_PREFIX = "virbr"


@dataclass(frozen=True, slots=True)
class NetworkEvent:
    network: str
    uuid: str
    event: str  # defined, undefined, started, stopped, dhcp-restarted
    detail: str | None = None
    reconciled: bool = False
    data: dict[str, Any] = field(default_factory=dict)


NetworkSink = Callable[[NetworkEvent], None]


@dataclass(slots=True)
class Network:
    defn: NetworkDefinition  # what runs (or would run at the next start)
    backend: NetworkBackend
    support: str | None  # why this host cannot run it (NO_SUPPORT), or None
    files: DnsmasqFiles
    persistent: bool = True
    autostart: bool = False
    active: bool = False
    owner: str | None = None  # the bus user that defined or created it (agent/owners.py)
    index: int | None = None  # the bridge's ifindex while active
    dhcp_pid: int | None = None
    leases: list[Lease] = field(default_factory=list)
    restarts: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    exit_watch: ExitWatch | None = None
    lease_watch: FileWatch | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: the persistent definition when a live-only or config-only net-update made it
    #: differ from the running one (the next start runs it); None: they are the same
    config: NetworkDefinition | None = None
    #: ports made by net-port-create while it runs, by uuid (virtbus/network/ports.py)
    created: dict[str, Port] = field(default_factory=dict)
    #: a running cluster network's VXLAN peers, as programmed (read back at adoption)
    peers: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.defn.name


class Networks:
    """Every virtual network of this host (see module docstring)."""

    def __init__(
        self, state_dir: Path, run_dir: Path, settings: NetworkSettings, sink: NetworkSink
    ) -> None:
        self.dir = state_dir / "networks"
        self.run_dir = run_dir / "networks"
        self.settings = settings
        self.net = HostNet(settings.namespace)
        self._sink = sink
        self._networks: dict[str, Network] = {}  # by uuid
        self._by_name: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # ================================================================== lifecycle
    async def open(self) -> None:
        """Load every network and adopt what still runs (see module docstring)."""
        await aiofiles.os.makedirs(self.dir, exist_ok=True)
        await aiofiles.os.makedirs(self.run_dir, exist_ok=True)
        for entry in sorted(await aiofiles.os.listdir(self.dir)):
            if not entry.endswith(".xml") or entry.endswith(".live.xml"):
                continue
            path = self.dir / entry
            try:
                defn = parse_network_xml((await read_bytes(path)) or b"")
                state = json.loads((await read_bytes(path.with_suffix(".json"))) or b"{}")
            except (VirtbusError, ValueError) as exc:
                await quarantine(path, str(exc))
                continue
            config = None
            live_path = path.with_name(f"{path.stem}.live.xml")
            if state.get("active") and await aiofiles.os.path.exists(live_path):
                try:  # a net-update changed the running network only
                    defn, config = parse_network_xml((await read_bytes(live_path)) or b""), defn
                except VirtbusError as exc:
                    await quarantine(live_path, str(exc))
            net = self._add(defn)
            net.config = config
            net.persistent = bool(state.get("persistent", True))
            net.autostart = bool(state.get("autostart", False))
            net.owner = stored_owner(state)
            index = state.get("index")
            index = index if isinstance(index, int) else None
            await self._adopt(net, bool(state.get("active")), index)
        for net in self.networks():
            if net.autostart and not net.active and net.support is None:
                try:
                    await self.start(net.name)
                except VirtbusError as exc:
                    log.error("network %s could not be autostarted: %s", net.name, exc)

    async def _adopt(self, net: Network, was_active: bool, index: int | None) -> None:
        if not was_active:
            return
        try:
            if index is not None and await net.backend.adopt(net.defn, index):
                net.active, net.index = True, index
                if net.backend.dhcp(net.defn):
                    pid = await asyncio.to_thread(dnsmasq.read_pid, net.files)
                    if pid is None:
                        log.warning("network %s: its dnsmasq is gone; starting it", net.name)
                        await self._start_dhcp(net)
                        self._emit(net, "dhcp-restarted", reconciled=True,
                                   data={"pid": net.dhcp_pid})  # fmt: skip
                    else:
                        net.dhcp_pid = pid
                        self._watch(net)
                await self._load_ports(net)
                net.peers = await net.backend.flood_peers(net.defn)
                log.info("network %s adopted (bridge %s)", net.name, net.defn.bridge)
                return
        except VirtbusError as exc:
            log.error("network %s could not be adopted: %s", net.name, exc)
        # gone: clean what is ours (never a link that is not: its ifindex differs)
        with contextlib.suppress(VirtbusError):
            await dnsmasq.stop(net.files)
            await nft.remove(self.net, net.defn)
        await self._drop_ports(net)
        net.active, net.index = False, None
        self._emit(net, "stopped", reconciled=True)
        if net.persistent:
            await self._save_state(net)
        else:
            await self._forget(net)

    async def close(self) -> None:
        """Stop watching; networks and their dnsmasq keep running for the guests."""
        self._closed = True
        for net in self._networks.values():
            self._unwatch(net)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, VirtbusError):
                await task

    def _emit(self, net: Network, event: str, detail: str | None = None, *,
              reconciled: bool = False, data: dict[str, Any] | None = None) -> None:  # fmt: skip
        self._sink(NetworkEvent(net.name, net.defn.uuid, event, detail, reconciled, data or {}))

    # ================================================================== files
    def _path(self, uuid: str, suffix: str) -> Path:
        return self.dir / f"{uuid}{suffix}"

    async def _save_definition(self, net: Network) -> None:
        """``.xml``: the persistent definition; ``.live.xml``: the running one, while
        they differ."""
        live = self._path(net.defn.uuid, ".live.xml")
        if net.config is not None:
            await atomic_write(live, net.defn.to_xml().encode())
        with contextlib.suppress(FileNotFoundError):
            if net.config is None:
                await aiofiles.os.remove(live)
        await atomic_write(self._path(net.defn.uuid, ".xml"),
                           (net.config or net.defn).to_xml().encode())  # fmt: skip

    async def _save_state(self, net: Network) -> None:
        state = {"autostart": net.autostart, "active": net.active,
                 "persistent": net.persistent, "index": net.index,
                 "owner": net.owner}  # fmt: skip
        await atomic_write(self._path(net.defn.uuid, ".json"), json.dumps(state).encode())

    async def _forget(self, net: Network) -> None:
        for suffix in (".xml", ".json", ".live.xml"):
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(self._path(net.defn.uuid, suffix))
        self._networks.pop(net.defn.uuid, None)
        if self._by_name.get(net.name) == net.defn.uuid:
            del self._by_name[net.name]

    # ================================================================== lookups
    def _add(self, defn: NetworkDefinition) -> Network:
        backend = backend_for(defn, self.net, self.settings.underlay_address)
        support = None
        try:
            backend.check(defn)
        except NoSupport as exc:
            support = exc.message
        net = Network(defn, backend, support, dnsmasq_files(self.run_dir, defn))
        self._networks[defn.uuid] = net
        self._by_name[defn.name] = defn.uuid
        return net

    def get(self, ref: str) -> Network:
        """A network by name or uuid; NO_NETWORK naming it."""
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument("a network name or uuid is required")
        net = self._find(ref)
        if net is None:
            raise NoNetwork(f"Network not found: no network with matching name '{ref}'")
        return net

    def _find(self, ref: str) -> Network | None:
        """A network by uuid or name, None when none is defined here."""
        return self._networks.get(ref) or self._networks.get(self._by_name.get(ref, ""))

    def networks(self) -> list[Network]:
        return sorted(self._networks.values(), key=lambda n: n.name)

    async def owner(self, ref: str) -> str | None:
        """The owner lookup of networks (agent/owners.py): None for one not defined here."""
        net = self._find(ref)
        return net.owner if net is not None else None

    def active_bridges(self) -> dict[str, str]:
        """bridge name -> network name, of the active networks."""
        return {n.defn.bridge: n.name for n in self._networks.values()
                if n.active and n.defn.bridge}  # fmt: skip

    # ================================================================== define
    async def _parse_new(self, xml: str) -> tuple[NetworkDefinition, Network | None]:
        defn = parse_network_xml(xml)
        existing = self._networks.get(defn.uuid)
        by_name = self._by_name.get(defn.name)
        if by_name is not None and by_name != defn.uuid:
            raise OperationFailed(f"network '{defn.name}' already exists with uuid {by_name}")
        if existing is not None and existing.name != defn.name:
            raise OperationFailed(f"network '{existing.name}' is already defined with uuid"
                                  f" {defn.uuid}")  # fmt: skip
        others = [n for n in self._networks.values() if n.defn.uuid != defn.uuid]
        if defn.bridge is not None and defn.managed:
            for other in others:
                if other.defn.bridge == defn.bridge and other.defn.managed:
                    raise OperationFailed(
                        f"bridge name '{defn.bridge}' is already in use by network '{other.name}'"
                    )
        for ip in defn.ips:
            for other in others:
                for theirs in other.defn.ips:
                    if overlaps(ip.network, theirs.network):
                        raise OperationFailed(
                            f"subnet {ip.network} of network '{defn.name}' overlaps subnet"
                            f" {theirs.network} of network '{other.name}'"
                        )
        if defn.managed:
            if existing is not None:  # a redefinition keeps what was generated
                defn.fill(bridge=existing.defn.bridge, mac=existing.defn.mac)
            if defn.bridge is None:
                defn.fill(bridge=await self._free_bridge(others), mac=None)
            defn.fill(bridge=None, mac=_random_mac())
        return defn, existing

    async def _free_bridge(self, others: list[Network]) -> str | None:
        taken = {n.defn.bridge for n in others} | {link.name for link in await self.net.links()}
        for n in range(4096):
            name = f"{BRIDGE_PREFIX}{n}"
            if name not in taken:
                return name
        raise OperationFailed("no free bridge name virbr0..virbr4095")

    async def define(self, xml: str, owner: str | None = None) -> Network:
        """net-define: a persistent network owned by ``owner`` (or a new definition of one,
        which keeps its owner: an active network keeps running with the old one until it
        is restarted, as in libvirt)."""
        defn, existing = await self._parse_new(xml)
        if existing is not None and existing.active:
            raise OperationInvalid(f"cannot redefine network '{existing.name}' while it is active")
        net = self._add(defn)
        net.owner = owner
        if existing is not None:
            net.autostart = existing.autostart
            net.owner = existing.owner or owner
        await self._save_definition(net)
        await self._save_state(net)
        self._emit(net, "defined")
        return net

    async def create(self, xml: str, owner: str | None = None) -> Network:
        """net-create: a transient network owned by ``owner``, started at once."""
        defn, existing = await self._parse_new(xml)
        if existing is not None:
            raise OperationFailed(f"network '{defn.name}' already exists")
        net = self._add(defn)
        net.persistent, net.owner = False, owner
        try:
            await self._start(net)
        except BaseException:
            await self._forget(net)
            raise
        await self._save_definition(net)
        await self._save_state(net)
        self._emit(net, "started")
        return net

    async def undefine(self, ref: str) -> None:
        """net-undefine: an active network becomes transient (it runs until destroyed)."""
        net = self.get(ref)
        async with net.lock:
            if not net.persistent:
                raise OperationInvalid(f"network '{net.name}' is transient: nothing to undefine")
            if net.active:
                net.persistent = False
                net.autostart = False
                net.config = None  # a transient network has its running definition only
                await self._save_definition(net)
                await self._save_state(net)
            else:
                await self._forget(net)
        self._emit(net, "undefined")

    async def set_autostart(self, ref: str, autostart: bool) -> Network:
        net = self.get(ref)
        if not net.persistent:
            raise OperationInvalid(f"cannot set autostart for transient network '{net.name}'")
        async with net.lock:
            net.autostart = autostart
            await self._save_state(net)
        return net

    # ================================================================== start/stop
    async def start(self, ref: str) -> Network:
        net = self.get(ref)
        async with net.lock:
            if net.active:
                raise OperationInvalid(f"network '{net.name}' is already active")
            await self._start(net)
            await self._save_state(net)
        self._emit(net, "started")
        return net

    async def _start(self, net: Network) -> None:
        if net.support is not None:
            raise NoSupport(net.support)
        for other in self._networks.values():  # a foreign bridge may have appeared since
            if other is not net and other.active and other.defn.bridge == net.defn.bridge:
                raise OperationFailed(
                    f"bridge '{net.defn.bridge}' is in use by network '{other.name}'"
                )
        await self._drop_ports(net)  # a run's ports are its own
        net.peers = []  # a new VXLAN device floods to no one until the scheduler says
        net.index = await net.backend.start(net.defn)
        try:
            if net.backend.dhcp(net.defn):
                await self._start_dhcp(net)
        except BaseException:
            await net.backend.stop(net.defn)
            net.index = None
            raise
        net.active = True

    async def _start_dhcp(self, net: Network) -> None:
        assert net.defn.bridge is not None
        self._unwatch(net)  # the one stopped here is not "died": no restart of the new one
        await dnsmasq.stop(net.files)  # a stray one of this network (pid file checked)
        net.dhcp_pid = await dnsmasq.start(
            self.net,
            net.defn,
            net.defn.bridge,
            net.files,
            timeout=self.settings.dnsmasq_start_timeout,
        )
        self._watch(net)

    def _watch(self, net: Network) -> None:
        self._unwatch(net)
        assert net.dhcp_pid is not None
        pid = net.dhcp_pid
        net.exit_watch = ExitWatch(pid, lambda: self._spawn(self._dhcp_died(net, pid)))
        net.exit_watch.start()
        net.lease_watch = FileWatch(net.files.leases, lambda: self._read_leases(net))
        net.lease_watch.start()
        self._read_leases(net)

    def _unwatch(self, net: Network) -> None:
        for watch in (net.exit_watch, net.lease_watch):
            if watch is not None:
                watch.close()
        net.exit_watch = net.lease_watch = None

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _read_leases(self, net: Network) -> None:
        v4 = next((ip for ip in net.defn.ips if ip.family == "ipv4"), None)
        try:
            text = net.files.leases.read_text(errors="replace")  # a few KiB, page-cached
        except OSError:
            text = ""
        net.leases = parse_leases(text, v4.network.prefixlen if v4 else 0)

    async def _dhcp_died(self, net: Network, pid: int) -> None:
        """dnsmasq exited while the network runs: start it again (bounded), say so."""
        async with net.lock:
            if self._closed or not net.active or not net.backend.dhcp(net.defn):
                return
            if net.dhcp_pid != pid:  # one the agent replaced itself (a net-update)
                return
            old = net.dhcp_pid
            now = time.monotonic()
            recent = [t for t in net.restarts if now - t < 60.0]
            if len(recent) >= self.settings.dnsmasq_restart_limit:
                log.error("network %s: dnsmasq (pid %s) died %d times within a minute; not"
                          " restarting it", net.name, old, len(recent))  # fmt: skip
                net.dhcp_pid = None
                self._unwatch(net)
                return
            net.restarts.append(now)
            log.warning("network %s: dnsmasq (pid %s) died; restarting it", net.name, old)
            try:
                await self._start_dhcp(net)
            except VirtbusError as exc:
                log.error("network %s: dnsmasq could not be restarted: %s", net.name, exc)
                net.dhcp_pid = None
                return
        log.warning("network %s: dnsmasq restarted (pid %s)", net.name, net.dhcp_pid)
        self._emit(net, "dhcp-restarted", data={"old_pid": old, "pid": net.dhcp_pid})

    async def destroy(self, ref: str, *, force: bool = False) -> None:
        """net-destroy: refused while interfaces are on the bridge, unless ``force``."""
        net = self.get(ref)
        async with net.lock:
            if not net.active:
                raise OperationInvalid(f"network '{net.name}' is not active")
            ports = await net.backend.ports(net.defn)
            if ports and not force:
                raise OperationInvalid(
                    f"network '{net.name}' is in use by interface(s) {', '.join(ports)};"
                    " destroy it with force to cut them off"
                )
            self._unwatch(net)
            await dnsmasq.stop(net.files)
            net.dhcp_pid = None
            await net.backend.stop(net.defn)
            net.active, net.index = False, None
            net.leases = []
            await self._drop_ports(net)
            if net.config is not None:  # the persistent definition runs at the next start
                net.defn, net.config = net.config, None
                await self._save_definition(net)
            if net.persistent:
                await self._save_state(net)
            else:
                await self._forget(net)
        self._emit(net, "stopped", "forced" if ports else None)

    # ================================================================== ports
    def _ports_file(self, net: Network) -> Path:
        return net.files.run / "ports.json"

    async def _save_ports(self, net: Network) -> None:
        body = {"ports": [p.to_xml() for p in net.created.values()]}
        await aiofiles.os.makedirs(net.files.run, exist_ok=True)
        await atomic_write(self._ports_file(net), json.dumps(body).encode())

    async def _load_ports(self, net: Network) -> None:
        """The created ports of a network adopted running; a corrupt file is set aside."""
        path = self._ports_file(net)
        data = await read_bytes(path)
        if data is None:
            return
        try:
            ports = [parse_port_xml(x, net.defn) for x in json.loads(data)["ports"]]
        except (ValueError, KeyError, TypeError, VirtbusError) as exc:
            log.error("network %s: unreadable %s (%s); set aside", net.name, path, exc)
            await quarantine(path, str(exc))
            return
        net.created = {p.uuid: p for p in ports}

    async def _drop_ports(self, net: Network) -> None:
        net.created = {}
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(self._ports_file(net))

    async def create_port(self, ref: str, xml: str, taken: set[str]) -> Port:
        """net-port-create on the running network; ``taken``: the uuids of its guests'
        ports (computed by the caller from the running domains)."""
        net = self.get(ref)
        async with net.lock:
            if not net.active:
                raise OperationInvalid(f"network '{net.name}' is not active")
            port = parse_port_xml(xml, net.defn)
            if port.uuid in taken or port.uuid in net.created:
                raise OperationInvalid(f"network port with uuid '{port.uuid}' already exists"
                                       f" on network '{net.name}'")  # fmt: skip
            net.created[port.uuid] = port
            try:
                await self._save_ports(net)
            except BaseException:
                del net.created[port.uuid]
                raise
            return port

    async def delete_port(self, ref: str, uuid: str) -> bool:
        """net-port-delete of a created port; False when the network has no such one."""
        net = self.get(ref)
        async with net.lock:
            if not net.active:
                raise OperationInvalid(f"network '{net.name}' is not active")
            port = net.created.pop(uuid, None)
            if port is None:
                return False
            try:
                await self._save_ports(net)
            except BaseException:
                net.created[uuid] = port
                raise
            return True

    # ================================================================== net-update
    async def update(self, ref: str, update: Update, *, live: bool, config: bool
                     ) -> tuple[bool, bool, str | None]:  # fmt: skip
        """net-update: ``update`` applied to the running network (``live``: its dnsmasq
        re-reads its hosts files, or is started again when its config changes) and/or its
        persistent definition (``config``); neither: the live one when active, else the
        persistent one (libvirt's --current). Checked whole before anything changes.
        (live, config, how dnsmasq took it: "sighup", "restart" or None)."""
        net = self.get(ref)
        check_update(update)
        async with net.lock:
            if not live and not config:
                live, config = net.active, not net.active
            if live and not net.active:
                raise OperationInvalid(f"network '{net.name}' is not running: cannot update"
                                       " its live state")  # fmt: skip
            if config and not net.persistent:
                raise OperationInvalid(f"cannot change the persistent config of transient"
                                       f" network '{net.name}'")  # fmt: skip
            base = net.config or net.defn
            new_config = apply_update(base, update) if config else None
            new_live = apply_update(net.defn, update) if live else None
            dhcp = None
            if new_live is not None:
                dhcp = await self._update_live(net, new_live)
                if net.config is None and not config and net.persistent:
                    net.config = net.defn  # the persistent one stays as it was
                net.defn = new_live
            if new_config is not None:
                if net.active:  # the next start runs it (the same as new_live: merged below)
                    net.config = new_config
                else:
                    net.defn = new_config
            if net.config is not None and net.config.to_xml() == net.defn.to_xml():
                net.config = None
            if net.persistent or new_live is not None:
                await self._save_definition(net)
        self._emit(net, "updated", update.section,
                   data={"command": update.command, "live": live, "config": config})  # fmt: skip
        return live, config, dhcp

    async def _update_live(self, net: Network, new: NetworkDefinition) -> str | None:
        if not net.backend.dhcp(new) or net.defn.bridge is None:
            return None
        if dnsmasq.needs_restart(net.defn, new, net.defn.bridge, net.files):
            old = net.defn
            net.defn = new
            try:
                await self._start_dhcp(net)
            except BaseException:
                net.defn = old
                with contextlib.suppress(VirtbusError):
                    await self._start_dhcp(net)  # the old one back
                raise
            return "restart"
        if net.dhcp_pid is None:  # not running (gave up after restarts): files only
            await dnsmasq.write_hosts(new, net.files)
            return None
        await dnsmasq.refresh(new, net.files, net.dhcp_pid)
        return "sighup"

    # ================================================================== cluster
    async def set_flood_peers(self, ref: str, peers: list[str]) -> list[str]:
        """A running cluster network's VXLAN peers become ``peers`` (the scheduler's
        list of the other hosts' underlay addresses); the peers now programmed."""
        net = self.get(ref)
        for peer in peers:
            if not is_ip(peer):
                raise InvalidArgument(f"invalid VXLAN peer address '{peer}'")
        async with net.lock:
            if not net.active:
                raise OperationInvalid(f"network '{net.name}' is not active")
            await net.backend.set_flood_peers(net.defn, peers)
            net.peers = await net.backend.flood_peers(net.defn)
        return net.peers

    # ================================================================== information
    async def info(self, net: Network) -> dict[str, Any]:
        ports = await net.backend.ports(net.defn) if net.active else []
        return {
            "name": net.name, "uuid": net.defn.uuid, "active": net.active,
            "persistent": net.persistent, "autostart": net.autostart,
            "bridge": net.defn.bridge or net.defn.forward_dev, "forward": net.defn.mode,
            "ports": ports, "supported": net.support is None, "owner": net.owner,
        }  # fmt: skip

    def dhcp_leases(self, ref: str, mac: str | None = None) -> list[Lease]:
        net = self.get(ref)
        if not net.active:
            raise OperationInvalid(f"network '{net.name}' is not active")
        wanted = mac.lower() if mac else None
        return [lease for lease in net.leases if wanted is None or lease.mac == wanted]

    def summaries(self) -> list[dict[str, Any]]:
        """What heartbeats carry: a cluster network's VNI and peers, and every network's
        subnets (the scheduler refuses a cluster network overlapping one)."""
        return [
            {"name": n.name, "uuid": n.defn.uuid, "active": n.active,
             "bridge": n.defn.bridge or n.defn.forward_dev, "forward": n.defn.mode,
             "subnets": [str(ip.network) for ip in n.defn.ips],
             "vni": n.defn.cluster.vni if n.defn.cluster else None,
             "peers": list(n.peers) if n.active else []}
            for n in self.networks()
        ]  # fmt: skip


def _random_mac() -> str:
    """A locally administered address in QEMU's 52:54:00 range, as libvirt generates."""
    tail = os.urandom(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)
