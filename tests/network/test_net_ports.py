"""Network ports (net-port-list, net-port-dumpxml) through a real agent process (the test
driver: its simulated guests' live definitions are what the ports come from, as the QEMU
driver's are), the real CLI and RabbitMQ, on a real NAT network started inside a namespace
the fixture made: a running guest's network NIC is a port with its MAC and owner, a guest
that stops takes its ports with it, and bad input is answered with its code by an agent
that still serves afterwards. net-port-create makes a port by hand (kept while the network
runs, across an agent restart, gone at net-destroy) and net-port-delete removes it, never a
running guest's NIC's port."""

from __future__ import annotations

import json
import uuid as uuidlib
from pathlib import Path

import pytest
from lxml import etree

from tests.network.conftest import Topology, nat_xml
from tests.network.test_networks import Env, agent, env  # noqa: F401  # the fixture
from tests.procs import unique_host
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


OWNER = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


WEB1 = f"<owner><name>web1</name><uuid>{OWNER}</uuid></owner>"


def port_xml(*, uuid: str = "", mac: str = "52:54:00:bb:00:01", extra: str = "",
             owner: str = WEB1) -> str:  # fmt: skip
    return (f"<networkport>{f'<uuid>{uuid}</uuid>' if uuid else ''}{owner}<group>web</group>"
            f"<mac address='{mac}'/><bandwidth><inbound average='100'/></bandwidth>{extra}"
            "</networkport>")  # fmt: skip


async def test_net_port_create_and_delete(rabbitmq: None, topo: Topology, tmp_path: Path) -> None:
    host = unique_host("netp")
    async with agent(host, tmp_path, topo):
        e = Env(host, tmp_path, topo)
        await e.ok("net-define", e.file("p2.xml", nat_xml("ports2", "10.78.0")))
        await e.fails("OPERATION_INVALID", "net-port-create", "ports2", e.file("a.xml", port_xml()))
        await e.ok("net-start", "ports2")
        bridge = str((await e.info("ports2"))["bridge"])
        out = await e.ok("net-port-create", "ports2", e.file("a.xml", port_xml()))
        made = out.split()[2]
        assert out == f"Network port {made} created from {e.file('a.xml', port_xml())}\n"
        fixed = str(uuidlib.uuid4())
        plug = f"<plug type='network' bridge='{bridge}'/>"  # the network's own: accepted
        got = json.loads(await e.ok("--json", "net-port-create", "ports2", e.file(
            "b.xml", port_xml(uuid=fixed, mac="52:54:00:bb:00:02", extra=plug))))  # fmt: skip
        assert (got["uuid"], got["domain"], got["domain_uuid"], got["plug"], got["bridge"]) == (
            fixed, "web1", OWNER, "network", bridge)  # fmt: skip
        assert [p["uuid"] for p in await ports(e, "ports2")] == [made, fixed]
        root = etree.fromstring(await e.ok("net-port-dumpxml", "ports2", fixed))
        assert [c.tag for c in root] == ["uuid", "owner", "group", "mac", "bandwidth", "plug"]
        assert dict(root.find("plug").attrib) == {"type": "network", "bridge": bridge}
        assert root.find("bandwidth/inbound").get("average") == "100"

        # bad input: a clear code each, nothing made, and the agent still serves
        for code, xml in (
            ("OPERATION_INVALID", port_xml(uuid=fixed)),  # that uuid is taken
            ("XML_ERROR", port_xml(owner="<owner><name>x</name></owner>")),
            ("XML_ERROR", port_xml(mac="zz:54:00:bb:00:09")),
            ("XML_ERROR", port_xml(extra="<plug type='bridge' bridge='br9'/>")),
            ("XML_ERROR", port_xml().replace("average='100'", "average='0'")),
            ("XML_ERROR", "<networkport><owner>"),
            ("CONFIG_UNSUPPORTED", port_xml(extra="<virtualport type='openvswitch'/>")),
        ):
            await e.fails(code, "net-port-create", "ports2", e.file("bad.xml", xml))
        await e.fails("NO_NETWORK", "net-port-create", "nosuch", e.file("a.xml", port_xml()))
        await e.fails("INVALID_ARG", "net-port-delete", "ports2", "not-a-uuid")
        unknown = str(uuidlib.uuid4())
        assert unknown in await e.fails("NO_NETWORK_PORT", "net-port-delete", "ports2", unknown)
        assert [p["uuid"] for p in await ports(e, "ports2")] == [made, fixed]

        # a running guest's NIC's port is not deleted by hand (and its uuid is taken)
        dom = str(uuidlib.uuid4())
        await e.ok("define", e.file("g.xml", guest_xml("pg2", dom).replace("ports1", "ports2")))
        await e.ok("start", "pg2")
        info = await e.info("ports2")
        nic = port_uuid(str(info["uuid"]), dom, MAC1)
        err = await e.fails("OPERATION_INVALID", "net-port-delete", "ports2", nic)
        assert "detach-interface" in err and MAC1 in err, err
        await e.fails("OPERATION_INVALID", "net-port-create", "ports2",
                      e.file("c.xml", port_xml(uuid=nic)))  # fmt: skip
        await e.ok("destroy", "pg2")
        assert await e.ok("net-port-delete", "ports2", made) == f"Network port {made} deleted\n"
        await e.fails("NO_NETWORK_PORT", "net-port-dumpxml", "ports2", made)
    # a restarted agent still has the port it made (the network was adopted running)
    async with agent(host, tmp_path, topo):
        e = Env(host, tmp_path, topo)
        assert [p["uuid"] for p in await ports(e, "ports2")] == [fixed]
        await e.ok("net-destroy", "ports2")  # its ports go with the run
        await e.ok("net-start", "ports2")
        assert await ports(e, "ports2") == []
        await e.ok("net-destroy", "ports2")
        await e.ok("net-undefine", "ports2")
