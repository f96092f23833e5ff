"""Virtual networks in the client: one host's networks (``Host.network(name)``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtbus.protocol import ops
from virtbus.protocol.network import (
    DhcpLease,
    NetworkAutostart,
    NetworkDestroy,
    NetworkInfo,
    NetworkLeasesRequest,
    NetworkPort,
    NetworkPortCreate,
    NetworkPortTarget,
    NetworkTarget,
    NetworkUpdated,
    NetworkUpdateRequest,
)

if TYPE_CHECKING:
    from virtbus.client.core import Host


class Network:
    """One virtual network of one host (``ref``: name or UUID)."""

    def __init__(self, host: Host, ref: str) -> None:
        self.host = host
        self.ref = ref

    def __repr__(self) -> str:
        return f"Network({self.ref!r} on {self.host.name!r})"

    @property
    def _target(self) -> NetworkTarget:
        return NetworkTarget(network=self.ref)

    async def info(self) -> NetworkInfo:
        return await self.host.call(ops.NETWORK_INFO, self._target)

    async def xml(self) -> str:
        return (await self.host.call(ops.NETWORK_XML, self._target)).xml

    async def start(self) -> NetworkInfo:
        return await self.host.call(ops.NETWORK_START, self._target)

    async def destroy(self, force: bool = False) -> None:
        """Stop it; refused (OPERATION_INVALID) while interfaces are on its bridge unless
        ``force``."""
        await self.host.call(ops.NETWORK_DESTROY, NetworkDestroy(network=self.ref, force=force))

    async def undefine(self) -> None:
        await self.host.call(ops.NETWORK_UNDEFINE, self._target)

    async def set_autostart(self, autostart: bool = True) -> NetworkInfo:
        request = NetworkAutostart(network=self.ref, autostart=autostart)
        return await self.host.call(ops.NETWORK_AUTOSTART, request)

    async def dhcp_leases(self, mac: str | None = None) -> list[DhcpLease]:
        request = NetworkLeasesRequest(network=self.ref, mac=mac)
        return (await self.host.call(ops.NETWORK_DHCP_LEASES, request)).leases

    async def ports(self) -> list[NetworkPort]:
        """net-port-list: the running guests' NICs plugged into it and the ports
        net-port-create made (OPERATION_INVALID when it is not active)."""
        return (await self.host.call(ops.NETWORK_PORT_LIST, self._target)).ports

    async def port_xml(self, port: str) -> str:
        """net-port-dumpxml: the ``<networkport>`` of the port with that uuid
        (NO_NETWORK_PORT when there is none)."""
        request = NetworkPortTarget(network=self.ref, port=port)
        return (await self.host.call(ops.NETWORK_PORT_XML, request)).xml

    async def port_create(self, xml: str) -> NetworkPort:
        """net-port-create: a port from ``<networkport>`` XML on the running network."""
        request = NetworkPortCreate(network=self.ref, xml=xml)
        return await self.host.call(ops.NETWORK_PORT_CREATE, request)

    async def port_delete(self, port: str) -> None:
        """net-port-delete: a port net-port-create made (a running guest's NIC's port:
        OPERATION_INVALID, detach the NIC instead)."""
        request = NetworkPortTarget(network=self.ref, port=port)
        await self.host.call(ops.NETWORK_PORT_DELETE, request)

    async def update(self, command: str, section: str, xml: str, *,
                     parent_index: int | None = None, live: bool = False,
                     config: bool = False) -> NetworkUpdated:  # fmt: skip
        """net-update: ``command`` (add, add-first, add-last, delete, modify) on
        ``section`` (ip-dhcp-host, ip-dhcp-range, dns-host) with its element ``xml``;
        neither ``live`` nor ``config``: the live state when active, else the config."""
        request = NetworkUpdateRequest(network=self.ref, command=command, section=section,
                                       xml=xml, parent_index=parent_index, live=live,
                                       config=config)  # fmt: skip
        return await self.host.call(ops.NETWORK_UPDATE, request)
