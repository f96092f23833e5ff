"""The network namespace an agent's networks live in: links through netlink (pyroute2),
tools (nft, dnsmasq, sysctl) through ``ip netns exec``.

An agent is given one namespace (``network.namespace``; None is the host's own), and every
object a network backend makes is made there, so tests run whole networks inside
namespaces they create and nothing touches the machine's own interfaces. Netlink calls
block, so they run in a worker thread; tools are argv lists with timeouts whose failures
are OPERATION_FAILED with the tool's own words.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import re
import signal
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from virtbus.errors import OperationFailed, OperationTimeout, VirtbusError

TOOL_TIMEOUT = 30.0  # s; nft and sysctl answer in milliseconds
VXLAN_PORT = 4789  # IANA's VXLAN port
_ZERO_MAC = "00:00:00:00:00:00"  # an fdb entry for every MAC not learnt: flooding
_CLONE_NEWNET = 0x40000000
# <linux/if_tun.h>: a tap (no packet info; virtio-net headers, QEMU probes them)
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
_IFREQ_SIZE = 40
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    """Move the calling thread (only) into the network namespace ``fd`` refers to."""
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OperationFailed(f"setns: {os.strerror(err)}")


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """End a tool we started (its own process group), and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await proc.wait()


@dataclass(frozen=True, slots=True)
class Link:
    name: str
    index: int
    kind: str | None
    mac: str
    master: int | None
    up: bool


class HostNet:
    """One network namespace (see module docstring)."""

    def __init__(self, namespace: str | None) -> None:
        self.namespace = namespace

    def __repr__(self) -> str:
        return f"HostNet({self.namespace or 'host'})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        if self.namespace is None:
            return list(argv)
        return ["ip", "netns", "exec", self.namespace, *argv]

    async def run(
        self, argv: Sequence[str], *, what: str, stdin: bytes | None = None,
        ok_codes: tuple[int, ...] = (0,), timeout: float = TOOL_TIMEOUT,
    ) -> tuple[int, str]:  # fmt: skip
        """Run a tool in the namespace: (exit code, stdout); OPERATION_FAILED otherwise."""
        full = self.argv(argv)
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, "LC_ALL": "C"},
        )
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            await _kill(proc)
            raise OperationTimeout(
                f"{what}: {argv[0]} did not finish within {timeout:g} s"
            ) from None
        except BaseException:
            await _kill(proc)
            raise
        code = proc.returncode if proc.returncode is not None else -1
        if code not in ok_codes:
            text = err.decode(errors="replace").strip()[-2000:]
            raise OperationFailed(f"{what}: {argv[0]} failed: {text or code}")
        return code, out.decode(errors="replace")

    # ------------------------------------------------------------------ netlink
    @contextlib.contextmanager
    def _ipr(self) -> Iterator[Any]:
        """An IPRoute whose netlink socket lives in the namespace (a worker thread only).

        The calling thread enters the namespace with setns(2) while it opens and uses the
        socket, then returns to its own: pyroute2's own ``netns=`` forks a copy of the
        agent per socket (which shares the agent's signal wake-up fd, and creates missing
        namespaces), so it is not used.
        """
        from pyroute2 import IPRoute  # imported by agents only (costs the CLI nothing)

        with self._entered():
            ipr = IPRoute()
            try:
                yield ipr
            finally:
                ipr.close()

    @contextlib.contextmanager
    def _entered(self) -> Iterator[None]:
        if self.namespace is None:
            yield
            return
        try:
            target = os.open(f"/run/netns/{self.namespace}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OperationFailed(
                f"network namespace '{self.namespace}' does not exist: {exc.strerror}"
            ) from None
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except VirtbusError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyroute2's NetlinkError is no OSError
            raise OperationFailed(f"netlink ({self.namespace or 'host'}): {exc}") from None

    async def links(self) -> list[Link]:
        def read() -> list[Link]:
            with self._ipr() as ipr:
                out = []
                for msg in ipr.get_links():
                    info = msg.get_attr("IFLA_LINKINFO")
                    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                    out.append(Link(
                        name=msg.get_attr("IFLA_IFNAME"), index=int(msg["index"]), kind=kind,
                        mac=str(msg.get_attr("IFLA_ADDRESS") or ""),
                        master=msg.get_attr("IFLA_MASTER"), up=bool(msg["flags"] & 1),
                    ))  # fmt: skip
                return out

        result: list[Link] = await self._call(read)
        return result

    async def link(self, name: str) -> Link | None:
        return next((link for link in await self.links() if link.name == name), None)

    async def ports(self, bridge: str) -> list[str]:
        """The interfaces enslaved to ``bridge`` (taps, veths)."""
        links = await self.links()
        br = next((link for link in links if link.name == bridge), None)
        if br is None:
            return []
        return sorted(link.name for link in links if link.master == br.index)

    async def add_bridge(
        self, name: str, *, mac: str | None, stp: bool, delay: int, mtu: int | None,
        addresses: Sequence[tuple[str, int, str | None]],
    ) -> int:  # fmt: skip
        """Create bridge ``name`` with ``addresses`` ((address, prefix, broadcast)), up;
        its ifindex. Removed again when any step fails."""

        def make() -> int:
            with self._ipr() as ipr:
                spec: dict[str, Any] = {"ifname": name, "kind": "bridge",
                                        "br_stp_state": 1 if stp else 0,
                                        "br_forward_delay": delay * 100}  # fmt: skip
                if mac:
                    spec["address"] = mac
                if mtu:
                    spec["mtu"] = mtu
                ipr.link("add", **spec)
                (index,) = ipr.link_lookup(ifname=name)
                try:
                    for address, prefix, broadcast in addresses:
                        extra = {"broadcast": broadcast} if broadcast else {}
                        ipr.addr("add", index=index, address=address, prefixlen=prefix, **extra)
                    ipr.link("set", index=index, state="up")
                except BaseException:
                    with contextlib.suppress(Exception):
                        ipr.link("del", index=index)
                    raise
                return int(index)

        index: int = await self._call(make)
        return index

    async def add_vxlan(self, name: str, *, vni: int, local: str, bridge: str) -> None:
        """A kernel VXLAN device ``name`` (VNI ``vni``, UDP 4789 from ``local``) on
        ``bridge``, up. Its remote ends are head-end replication entries
        (:meth:`set_flood_peers`); MACs behind them are learnt from what arrives."""

        def make() -> None:
            with self._ipr() as ipr:
                (master,) = ipr.link_lookup(ifname=bridge) or (None,)
                if master is None:
                    raise OperationFailed(f"bridge '{bridge}' does not exist")
                ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_local=local,
                         vxlan_port=VXLAN_PORT, vxlan_learning=1)  # fmt: skip
                (index,) = ipr.link_lookup(ifname=name)
                try:
                    ipr.link("set", index=index, master=master, state="up")
                except BaseException:
                    with contextlib.suppress(Exception):
                        ipr.link("del", index=index)
                    raise

        await self._call(make)

    async def flood_peers(self, dev: str) -> list[str]:
        """The underlay addresses ``dev`` replicates broadcast and unknown frames to (its
        all-zero fdb entries)."""

        def read() -> list[str]:
            with self._ipr() as ipr:
                (index,) = ipr.link_lookup(ifname=dev) or (None,)
                if index is None:
                    return []
                return sorted(
                    str(m.get_attr("NDA_DST")) for m in ipr.fdb("dump", ifindex=index)
                    if m.get_attr("NDA_LLADDR") == _ZERO_MAC and m.get_attr("NDA_DST")
                    and m["ifindex"] == index
                )  # fmt: skip

        result: list[str] = await self._call(read)
        return result

    async def set_flood_peers(self, dev: str, peers: Sequence[str]) -> None:
        """Make ``dev``'s head-end replication list exactly ``peers`` (bridge fdb
        ``00:00:00:00:00:00 dst PEER``): missing ones appended, gone ones deleted."""
        have = set(await self.flood_peers(dev))

        def change() -> None:
            with self._ipr() as ipr:
                (index,) = ipr.link_lookup(ifname=dev) or (None,)
                if index is None:
                    raise OperationFailed(f"VXLAN device '{dev}' does not exist")
                for peer in sorted(set(peers) - have):
                    ipr.fdb("append", ifindex=index, lladdr=_ZERO_MAC, dst=peer)
                for peer in sorted(have - set(peers)):
                    ipr.fdb("del", ifindex=index, lladdr=_ZERO_MAC, dst=peer)

        await self._call(change)

    async def delete_link(self, name: str) -> None:
        def drop() -> None:
            with self._ipr() as ipr:
                found = ipr.link_lookup(ifname=name)
                if found:
                    ipr.link("del", index=found[0])

        await self._call(drop)

    async def sysctl(self, key: str, value: str) -> None:
        await self.run(["sysctl", "-qw", f"{key}={value}"], what=f"sysctl {key}")

    # ------------------------------------------------------------------ taps
    async def open_tap(self, template: str, bridge: str, mac: str) -> tuple[int, str]:
        """A new tap named after ``template`` (``%d``: the kernel picks the number) on
        ``bridge``, with ``mac``, up: (its open descriptor, its name).

        TUNSETIFF makes the tap in the calling thread's namespace, so it is made in the
        worker thread that entered ours. Not persistent: it goes when the last copy of
        the descriptor is closed; on any failure here it is closed (and the tap gone).
        """

        def make() -> tuple[int, str]:
            from pyroute2 import IPRoute

            with self._entered():
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
                try:
                    flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR
                    req = struct.pack("16sH", template.encode(), flags).ljust(_IFREQ_SIZE, b"\0")
                    got = fcntl.ioctl(fd, _TUNSETIFF, req)
                    name = got[:16].split(b"\0", 1)[0].decode()
                    ipr = IPRoute()
                    try:
                        (master,) = ipr.link_lookup(ifname=bridge) or (None,)
                        if master is None:
                            raise OperationFailed(f"bridge '{bridge}' does not exist")
                        (index,) = ipr.link_lookup(ifname=name)
                        ipr.link("set", index=index, address=mac)
                        ipr.link("set", index=index, master=master, state="up")
                    finally:
                        ipr.close()
                except BaseException:
                    os.close(fd)
                    raise
                return fd, name

        result: tuple[int, str] = await self._call(make)
        return result

    async def delete_links_matching(self, pattern: str) -> list[str]:
        """Delete every link whose whole name matches the regex ``pattern``; their names."""
        wanted = re.compile(pattern)

        def drop() -> list[str]:
            gone = []
            with self._ipr() as ipr:
                for msg in ipr.get_links():
                    name = str(msg.get_attr("IFLA_IFNAME"))
                    if wanted.fullmatch(name):
                        with contextlib.suppress(Exception):  # gone meanwhile (QEMU exited)
                            ipr.link("del", index=msg["index"])
                            gone.append(name)
            return gone

        result: list[str] = await self._call(drop)
        return result
