"""The 3-node RabbitMQ cluster the cluster tests share (tests/rabbitnode.py): starting one
takes 12-25 s here, so it is started once per session, on first use, and stopped at the
end. Its tests run in the session's event loop (``pytest.mark.asyncio(loop_scope=
"session")``), the loop its node processes belong to."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest_asyncio

from tests.rabbitnode import RabbitCluster, rabbit_cluster


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def three_nodes() -> AsyncIterator[RabbitCluster]:
    async with rabbit_cluster(3) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="session")
async def cluster(three_nodes: RabbitCluster) -> RabbitCluster:
    """The shared cluster with all three nodes running (``start_app`` of a running node
    does nothing): the test before may have stopped one."""
    await asyncio.gather(*(n.start_app() for n in three_nodes.nodes))
    await three_nodes.nodes[0].ctl("await_online_nodes", "3")
    return three_nodes
