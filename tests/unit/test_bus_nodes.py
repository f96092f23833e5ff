"""Bus URLs naming a cluster's nodes, and the connection moving from node to node."""

from __future__ import annotations

import time

import pytest

from virtbus.bus.nodes import bus_nodes, join_bus_urls, redacted
from virtbus.bus.reconnect import connection_class
from virtbus.config import ConfigError, Key, check_value
from virtbus.errors import InvalidArgument
from virtbus.settings import Backoff


def test_one_url_with_a_list_of_hosts_is_one_url_per_node() -> None:
    assert bus_nodes("amqp://u:p@mq1,mq2:5673,mq3/vh?heartbeat=30") == (
        "amqp://u:p@mq1/vh?heartbeat=30",
        "amqp://u:p@mq2:5673/vh?heartbeat=30",
        "amqp://u:p@mq3/vh?heartbeat=30",
    )


def test_repeated_urls_are_alternatives_in_order_without_duplicates() -> None:
    joined = join_bus_urls(["amqp://a@mq1/v", " amqps://b@mq2:5671/v ", "amqp://a@mq1/v"])
    assert bus_nodes(joined) == ("amqp://a@mq1/v", "amqps://b@mq2:5671/v")
    assert bus_nodes("amqp://guest:guest@127.0.0.1:5672/") == (
        "amqp://guest:guest@127.0.0.1:5672/",
    )


def test_an_empty_host_in_a_list_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="empty host"):
        bus_nodes("amqp://u:secret@mq1,,mq3/")


def test_passwords_are_redacted_on_every_node() -> None:
    text = redacted("amqp://u:s1@mq1,mq2/v,amqp://w:s2@mq3/v")
    assert "s1" not in text and "s2" not in text and text.count("***") == 2


def test_a_daemon_flag_checks_every_node() -> None:
    key = Key(name="bus.url", kind="bus_url", help="bus URL", dest="bus", path=("bus", "url"))
    assert check_value(key, "amqp://a@mq1,mq2/") == "amqp://a@mq1,mq2/"
    with pytest.raises(ConfigError, match="must start with"):
        check_value(key, "amqp://a@mq1/,http://mq2/")


async def test_every_failure_moves_the_connection_to_the_next_node() -> None:
    nodes = ("amqp://g:g@127.0.0.1:1/", "amqp://g:g@127.0.0.1:2/", "amqp://g:g@127.0.0.1:3/")
    cls = connection_class(Backoff(initial=0.1, maximum=0.8, factor=2.0, jitter=0.5), nodes)
    conn = cls(nodes[0])
    assert conn.url.port == 1  # the first node first
    ports = []
    for _ in range(4):  # a failure: aio-pika reads the interval to log it, then to sleep
        first = conn.reconnect_interval
        assert conn.reconnect_interval == first
        ports.append(conn.url.port)
        conn._read_at = time.monotonic() - 1  # the next failure
    assert ports == [2, 3, 1, 2]
    conn._connected_since_draw = True  # a connection was made: the read after it ...
    conn.reconnect_interval  # noqa: B018
    assert conn.url.port == 2  # ... does not move it away from the node that works
