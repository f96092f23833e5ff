"""Network ports (net-port-list, net-port-dumpxml) through a real agent process (the test
driver: its simulated guests' live definitions are what the ports come from, as the QEMU
driver's are), the real CLI and RabbitMQ, on a real NAT network started inside a namespace
the fixture made: a running guest's network NIC is a port with its MAC and owner, a guest
that stops takes its ports with it, and bad input is answered with its code by an agent
that still serves afterwards."""

from __future__ import annotations

import json
import uuid as uuidlib

import pytest
from lxml import etree

from tests.network.conftest import nat_xml
from tests.network.test_networks import Env, env  # noqa: F401  # the fixture
from virtbus.network.ports import port_uuid

pytestmark = [pytest.mark.rabbitmq, pytest.mark.network]

MAC1, MAC2, OTHER = "52:54:00:aa:00:01", "52:54:00:aa:00:02", "52:54:00:aa:00:03"


def guest_xml(name: str, uuid: str) -> str:
    """Two NICs on ``ports1`` (one in a portgroup, shaped), one on another network, one
    user-mode NIC: only the first two are ports of ``ports1``."""
    return f"""<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>
<memory>65536</memory><os><type>hvm</type></os><devices>
<interface type='network'><mac address='{MAC1}'/><source network='ports1'/></interface>
<interface type='network'><mac address='{MAC2}'/>
  <source network='ports1' portgroup='web'/>
  <bandwidth><inbound average='1000' peak='2000'/></bandwidth></interface>
<interface type='network'><mac address='{OTHER}'/><source network='elsewhere'/></interface>
<interface type='user'><mac address='52:54:00:aa:00:04'/></interface>
</devices></domain>"""


async def ports(bed: Env, net: str) -> list[dict[str, object]]:
    return list(json.loads(await bed.ok("--json", "net-port-list", net)))


async def test_net_ports(env: Env) -> None:  # noqa: F811
    await env.ok("net-define", env.file("p1.xml", nat_xml("ports1", "10.79.0")))
    await env.fails("OPERATION_INVALID", "net-port-list", "ports1")  # not active yet
    await env.ok("net-start", "ports1")
    info = await env.info("ports1")
    net_uuid, bridge = str(info["uuid"]), str(info["bridge"])
    dom = str(uuidlib.uuid4())
    await env.ok("define", env.file("g.xml", guest_xml("pg", dom)))
    assert await ports(env, "ports1") == []  # defined, not running: nothing plugged

    await env.ok("start", "pg")
    got = await ports(env, "ports1")
    assert [(p["mac"], p["domain"], p["domain_uuid"], p["plug"], p["bridge"]) for p in got] == [
        (MAC1, "pg", dom, "network", bridge), (MAC2, "pg", dom, "network", bridge),
    ]  # fmt: skip
    first, second = (str(p["uuid"]) for p in got)
    assert first == port_uuid(net_uuid, dom, MAC1) and got[1]["group"] == "web"
    assert (await env.ok("net-port-list", "ports1", "--uuid")).split() == [first, second]
    table = (await env.ok("net-port-list", "ports1")).splitlines()
    assert table[0].split() == ["UUID"] and [r.strip() for r in table[2:]] == [first, second]
    assert await ports(env, "ports1") == got  # the same uuids while plugged

    root = etree.fromstring(await env.ok("net-port-dumpxml", "ports1", first))
    assert root.tag == "networkport" and root.findtext("uuid") == first
    assert (root.findtext("owner/name"), root.findtext("owner/uuid")) == ("pg", dom)
    assert root.find("mac").get("address") == MAC1 and root.find("group") is None
    assert dict(root.find("plug").attrib) == {"type": "network", "bridge": bridge}
    assert [c.tag for c in root] == ["uuid", "owner", "mac", "plug"]
    root = etree.fromstring(await env.ok("net-port-dumpxml", "ports1", second))
    assert [c.tag for c in root] == ["uuid", "owner", "group", "mac", "bandwidth", "plug"]
    assert root.findtext("group") == "web" and root.find("mac").get("address") == MAC2
    assert dict(root.find("bandwidth/inbound").attrib) == {"average": "1000", "peak": "2000"}

    # bad input: a clear code each, and the agent still serves (fails() checks)
    unknown = str(uuidlib.uuid4())
    err = await env.fails("NO_NETWORK_PORT", "net-port-dumpxml", "ports1", unknown)
    assert unknown in err
    await env.fails("INVALID_ARG", "net-port-dumpxml", "ports1", "not-a-uuid")
    await env.fails("NO_NETWORK", "net-port-list", "nosuch")
    await env.fails("NO_NETWORK", "net-port-dumpxml", "nosuch", first)
    await env.fails("INVALID_ARG", "net-port-list", "ports1", "--uuid", "--table")

    await env.ok("destroy", "pg")  # unplugged: its ports are gone
    assert await ports(env, "ports1") == []
    await env.fails("NO_NETWORK_PORT", "net-port-dumpxml", "ports1", first)
    await env.ok("start", "pg")  # plugged again: the same derived uuids
    assert [p["uuid"] for p in await ports(env, "ports1")] == [first, second]
    await env.ok("destroy", "pg")
    await env.ok("undefine", "pg")
    await env.ok("net-destroy", "ports1")
    await env.ok("net-undefine", "ports1")
