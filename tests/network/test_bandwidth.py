"""A network's ``<bandwidth>`` through a real agent process and a real tc on its bridge,
in the fixture's namespaces: TCP from the upstream namespace to a client on the network
(inbound: the bridge's HTB class) and back (outbound: an nftables policer on its ingress)
carries
clearly fewer bytes in a window than on the same network without limits; the premise
(unlimited is fast) is asserted, and the comparison is a ratio with a wide margin, not a
rate. Stopping the network removes its shaping with its bridge; bad <bandwidth> is
XML_ERROR and the agent still serves."""

from __future__ import annotations

import asyncio
import sys

import pytest

from tests.network.conftest import UPSTREAM, Client, Topology, nat_xml
from tests.network.test_networks import Env, env, validates  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.network]

WINDOW = 1.5  # s the receiving side counts bytes
LIMIT = 250  # kilobytes/s, each direction (a few hundred KB in a window vs. many MB)
_METER = """
import signal, socket, sys, time
role, mode, window = sys.argv[1], sys.argv[2], float(sys.argv[3])
signal.alarm(int(window) + 10)  # never outlive the test's wait, whatever the network does
if role == "serve":
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 5999)); srv.listen(1); print("ready", flush=True)
    conn, _ = srv.accept()
else:
    conn = socket.create_connection((sys.argv[4], 5999), timeout=10)
conn.settimeout(window + 5)
chunk, got, end = b"x" * 65536, 0, time.monotonic() + window
if mode == "recv":
    first = conn.recv(65536); got = len(first); end = time.monotonic() + window
    while time.monotonic() < end:
        data = conn.recv(65536)
        if not data:
            break
        got += len(data)
    print(got, flush=True)
else:
    try:
        while time.monotonic() < end + 3:
            conn.sendall(chunk)
    except OSError:
        pass
conn.close()
"""


async def transfer(topo: Topology, client: Client, direction: str) -> int:
    """Bytes the receiver counted in WINDOW: ``down`` upstream -> client, ``up`` back."""
    meter = topo.dir / "meter.py"
    meter.write_text(_METER)
    up_mode, client_mode = ("send", "recv") if direction == "down" else ("recv", "send")
    server = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", topo.upstream, sys.executable, str(meter), "serve", up_mode,
        str(WINDOW), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert (await asyncio.wait_for(server.stdout.readline(), 20)).strip() == b"ready"
        done = await asyncio.to_thread(client.run, sys.executable, str(meter), "connect",
                                       client_mode, str(WINDOW), UPSTREAM)  # fmt: skip
        out, err = await asyncio.wait_for(server.communicate(), 30)
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    assert done.returncode == 0 and server.returncode == 0, (done.stderr, err)
    return int((done.stdout if direction == "down" else out.decode()).strip())


async def test_network_bandwidth_limits_both_directions_and_goes_at_stop(env: Env) -> None:  # noqa: F811
    topo = env.topo
    await env.ok("net-create", env.file("free.xml", nat_xml("free", "10.93.0")))
    # each client is plugged as soon as its bridge is up, and both are leased together:
    # each new bridge port's STP listening/learning (2 x 2 s) and each dnsmasq's ping check
    # of the address it offers (3 s) run side by side, not one network after the other
    free = topo.client(str((await env.info("free"))["bridge"]))
    shaped = (f"<bandwidth><inbound average='{LIMIT}' peak='{LIMIT}' burst='32'/>"
              f"<outbound average='{LIMIT}' burst='32'/></bandwidth>")  # fmt: skip
    xml = nat_xml("slow", "10.94.0", extra=shaped)
    assert await validates(env.file("slow.xml", xml))
    await env.ok("net-define", env.file("slow.xml", xml))
    await env.ok("net-start", "slow")
    bridge = str((await env.info("slow"))["bridge"])
    slow = topo.client(bridge)
    await asyncio.gather(free.dhcp(), slow.dhcp())
    fast_down, fast_up = await transfer(topo, free, "down"), await transfer(topo, free, "up")
    # the premise: without limits a window carries many megabytes each way
    assert fast_down > 20 * LIMIT * 1024 * WINDOW and fast_up > 20 * LIMIT * 1024 * WINDOW, (
        fast_down, fast_up)  # fmt: skip

    qdiscs = topo.host_run("tc", "qdisc", "show", "dev", bridge).stdout
    assert "htb" in qdiscs, qdiscs
    assert "virtbus_bw_" in " ".join(topo.host_run("nft", "list", "tables").stdout.split())
    slow_down, slow_up = await transfer(topo, slow, "down"), await transfer(topo, slow, "up")
    assert 0 < slow_down * 5 < fast_down, (slow_down, fast_down)
    assert 0 < slow_up * 5 < fast_up, (slow_up, fast_up)
    # and roughly the rate asked for (generous: the burst, TCP's ramp, the window's edges)
    assert slow_down < 4 * LIMIT * 1024 * WINDOW, slow_down
    assert slow_up < 4 * LIMIT * 1024 * WINDOW, slow_up
    assert "<bandwidth>" in await env.ok("net-dumpxml", "slow")

    await env.ok("net-destroy", "slow", "--force")
    assert topo.ifindex(bridge) is None  # the shaping went with the bridge
    assert "virtbus_bw_" not in topo.host_run("nft", "list", "tables").stdout  # policing too
    for bad in ("<bandwidth><inbound peak='10'/></bandwidth>",
                "<bandwidth><inbound average='-5'/></bandwidth>",
                "<bandwidth><outbound average='10' floor='5'/></bandwidth>",
                "<bandwidth><inbound average='100' peak='50'/></bandwidth>",
                "<bandwidth><sideways average='1'/></bandwidth>"):  # fmt: skip
        path = env.file("bad.xml", nat_xml("bad", "10.95.0", extra=bad))
        err = await env.fails("XML_ERROR", "net-define", path)
        assert "bandwidth" in err or "inbound" in err or "outbound" in err, err
