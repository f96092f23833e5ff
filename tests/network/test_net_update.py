"""net-update through a real agent process, the real CLI and RabbitMQ, on a network whose
bridge and dnsmasq run in the fixture's namespaces: a DHCP reservation added live is what a
client's udhcpc gets (dnsmasq re-read its hosts file on SIGHUP, same pid), deleted live it
is gone while the persistent definition keeps it; a range added and one deleted restart
dnsmasq and the client gets an address from the new range; a DNS host added live is
answered; every bad input has libvirt's code, and the agent still serves afterwards."""

from __future__ import annotations

import json

import pytest

from tests.network.conftest import nat_xml
from tests.network.test_networks import Env, env, validates  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.network]

HOST = "<host mac='02:00:00:aa:bb:01' name='pinned' ip='10.91.0.20'/>"


async def update(e: Env, *args: str) -> dict[str, object]:
    return dict(json.loads(await e.ok("--json", "net-update", "upd", *args)))


def last_octet(ip: str) -> int:
    return int(ip.rsplit(".", 1)[1])


async def test_live_dhcp_host_range_and_dns_updates_reach_dnsmasq(env: Env) -> None:  # noqa: F811
    await env.ok("net-define", env.file("u.xml", nat_xml("upd", "10.91.0")))
    await env.ok("net-start", "upd")
    uuid = (await env.ok("net-uuid", "upd")).strip()
    pid = env.dnsmasq_pid(uuid)
    bridge = str((await env.info("upd"))["bridge"])
    # both clients are plugged now: a new bridge port's STP listening/learning (2 x 2 s)
    # passes while the updates run, not before each one's first lease
    client = env.topo.client(bridge, mac="02:00:00:aa:bb:01")
    fresh = env.topo.client(bridge)

    # a reservation, live and persistent: dnsmasq re-reads its hosts file (same process)
    out = await env.ok("net-update", "upd", "add", "ip-dhcp-host", HOST, "--live", "--config")
    assert out.strip() == "Updated network upd persistent config and live state"
    assert env.dnsmasq_pid(uuid) == pid
    assert await client.dhcp() == "10.91.0.20"
    xml = await env.ok("net-dumpxml", "upd")
    assert "name='pinned'" in xml and await validates(env.file("d.xml", xml)), xml

    # deleted from the live state only (--current on an active network)
    done = await update(env, "delete", "ip-dhcp-host", "<host mac='02:00:00:aa:bb:01'/>")
    assert done == {"network": "upd", "live": True, "config": False, "dhcp": "sighup"}
    assert "pinned" not in await env.ok("net-dumpxml", "upd")
    again = await client.dhcp()
    assert 100 <= last_octet(again) <= 150, again  # no reservation: from the range

    # a range added first, the old one deleted: dnsmasq's config changes, it is restarted
    done = await update(env, "add-first", "ip-dhcp-range",
                        "<range start='10.91.0.200' end='10.91.0.210'/>")  # fmt: skip
    assert done["dhcp"] == "restart" and env.dnsmasq_pid(uuid) != pid
    await update(env, "delete", "ip-dhcp-range", "<range start='10.91.0.100' end='10.91.0.150'/>")
    xml = await env.ok("net-dumpxml", "upd")
    assert "10.91.0.200" in xml and "10.91.0.100" not in xml
    assert await validates(env.file("d2.xml", xml)), xml
    got = await fresh.dhcp()
    assert 200 <= last_octet(got) <= 210, got

    # a DNS host, live: answered by dnsmasq on the bridge
    dns = "<host ip='10.91.0.77'><hostname>added.test</hostname></host>"
    assert (await update(env, "add", "dns-host", dns))["dhcp"] == "sighup"
    answer = fresh.run("busybox", "nslookup", "added.test", "10.91.0.1").stdout
    assert "10.91.0.77" in answer, answer

    # stopped: the persistent definition comes back (the reservation, the old range)
    await env.ok("net-destroy", "upd", "--force")
    xml = await env.ok("net-dumpxml", "upd")
    assert "name='pinned'" in xml and "10.91.0.100" in xml and "10.91.0.200" not in xml
    assert "added.test" not in xml
    out = await env.ok("net-update", "upd", "delete", "ip-dhcp-host", HOST)  # inactive: config
    assert out.strip() == "Updated network upd persistent config"
    assert "pinned" not in await env.ok("net-dumpxml", "upd")


async def test_bad_updates_are_refused_with_their_codes(env: Env) -> None:  # noqa: F811
    await env.ok("net-define", env.file("u.xml", nat_xml("upd", "10.92.0")))
    await env.ok("net-start", "upd")
    fixed = "<host mac='52:54:00:00:00:09' name='other' ip='10.92.0.30'/>"
    cases = [
        ("OPERATION_INVALID", "add", "ip-dhcp-host", fixed),  # that MAC is reserved already
        ("OPERATION_INVALID", "add", "ip-dhcp-host", "<host name='fixed' ip='10.92.0.31'/>"),
        ("OPERATION_INVALID", "delete", "ip-dhcp-host", "<host mac='02:00:00:00:00:77'/>"),
        ("OPERATION_INVALID", "modify", "ip-dhcp-host",
         "<host mac='02:00:00:00:00:77' ip='10.92.0.40'/>"),
        ("OPERATION_INVALID", "add", "ip-dhcp-range",
         "<range start='10.92.0.100' end='10.92.0.150'/>"),  # the same range
        ("OPERATION_INVALID", "add", "dns-host",
         "<host ip='10.92.0.9'><hostname>x.test</hostname></host>"),  # that IP has one
        ("NO_SUPPORT", "add", "bogus-section", "<host/>"),
        ("NO_SUPPORT", "add", "bridge", "<bridge name='x'/>"),
        ("NO_SUPPORT", "modify", "ip-dhcp-range", "<range start='10.92.0.1' end='10.92.0.2'/>"),
        ("INVALID_ARG", "frobnicate", "ip-dhcp-host", fixed),
        ("XML_ERROR", "add", "ip-dhcp-host", "<range start='10.92.0.1' end='10.92.0.2'/>"),
        ("XML_ERROR", "add", "ip-dhcp-host", "<host mac='01:00:00:00:00:01' ip='10.92.0.5'/>"),
        ("XML_ERROR", "add", "ip-dhcp-host", "<host mac='02:00:00:00:00:05'"),
        ("OPERATION_INVALID", "add", "ip-dhcp-host",
         "<host mac='02:00:00:00:00:05' ip='10.99.0.5'/>"),  # no <ip> has that subnet
    ]  # fmt: skip
    for code, *args in cases:
        await env.fails(code, "net-update", "upd", *args)
    # a subnet forced by --parent-index is checked whole: outside it
    add = ("net-update", "upd", "add", "ip-dhcp-host")
    await env.fails("XML_ERROR", *add, "<host mac='02:00:00:00:00:05' ip='10.99.0.5'/>",
                    "--parent-index", "0")  # fmt: skip
    await env.fails("OPERATION_INVALID", *add, "<host mac='02:00:00:00:00:05' ip='10.92.0.5'/>",
                    "--parent-index", "3")  # fmt: skip
    await env.fails("NO_NETWORK", "net-update", "nosuch", "add", "ip-dhcp-host", fixed)
    await env.ok("net-destroy", "upd")
    await env.fails("OPERATION_INVALID", "net-update", "upd", "add", "ip-dhcp-host",
                    "<host mac='02:00:00:00:00:05' ip='10.92.0.5'/>", "--live")  # fmt: skip
    # nothing was changed by any of them
    xml = await env.ok("net-dumpxml", "upd")
    assert xml.count("<host ") == 2 and "10.92.0.5'" not in xml
