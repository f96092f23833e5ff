"""The scheduler's limits and the migrate verb's options, with real processes: agents on
the test driver (a simulated live migration lasts ``migration_time``), virtbus-scheduler
and the CLI, in the private vhost of test_scheduler_cluster.py.

Overlap is read from the scheduler's own records (each phase's time in ``history``), not
from the test's clock: a loaded machine slows everything down but cannot make two
migrations overlap that the limit keeps apart.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_scheduler_cluster import (  # noqa: F401 - the vhost fixture
    URL,
    XML,
    agents,
    define_running,
    scheduler_call,
    scheduler_process,
    vcli,
    vhost,
    wait_hosts,
    wait_migration,
)
from tests.procs import cli
from virtbus.protocol import ops

pytestmark = pytest.mark.rabbitmq


def running_interval(record: dict[str, Any]) -> tuple[float, float]:
    """From taking its slot (entering ``prepare``) to ``done`` (entered before the slot is
    given back), by the scheduler's clock."""
    at = {phase: ts for phase, ts in record["history"]}
    return at["prepare"], at["done"]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    now = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        now += step
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("limit", [1, 2])
async def test_max_migrations_bounds_the_migrations_in_flight(
    vhost: str,  # noqa: F811
    tmp_path: Path,
    limit: int,
) -> None:
    async with (
        agents(tmp_path, 2, "--driver-option", "migration_time=1") as (a, b),
        scheduler_process(
            tmp_path / "sched", "--max-migrations", str(limit), "--max-outbound", "4"
        ),
    ):
        await wait_hosts(2)
        names = [f"mm{i}" for i in range(4)]
        await asyncio.gather(*(define_running(tmp_path, name, a.host) for name in names))
        # all four at once: only the limit keeps them apart (one source allows four). Sent
        # from this process, not four CLI processes: those start up staggered on a loaded
        # machine, and a 1 s migration could end before the next one is even asked for.
        migrate = ops.SCHEDULER_MIGRATE
        await asyncio.gather(*(scheduler_call(migrate, {"domain": n, "to": b.host}) for n in names))
        records = [await wait_migration(name, timeout=60) for name in names]
        why = [(r["domain"], r["state"], r["error"], r["history"]) for r in records]
        assert [r["state"] for r in records] == ["completed"] * len(names), why
        assert most_at_once([running_interval(r) for r in records]) == limit, records


async def test_drain_no_wait_returns_at_once_and_the_drain_goes_on(
    vhost: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with (
        agents(tmp_path, 2, "--driver-option", "migration_time=0.5") as (a, b),
        scheduler_process(tmp_path / "sched", "--max-migrations", "1"),
    ):
        await wait_hosts(2)
        await asyncio.gather(*(define_running(tmp_path, f"nw{i}", a.host) for i in range(3)))
        r = await cli("--json", "drain", a.host, "--no-wait", bus=URL, timeout=60)
        assert r.code == 0, r.err
        job = r.json()
        # answered when the drain started: three moves, one slot, none finished yet
        assert not job["done"] and sorted(job["domains"]) == ["nw0", "nw1", "nw2"], job
        assert all(row["state"] != "completed" for row in job["domains"].values()), job
        records = [await wait_migration(f"nw{i}", timeout=60) for i in range(3)]
        assert [rec["state"] for rec in records] == ["completed"] * 3, records
        assert all(rec["drain"] == a.host for rec in records), records
        listing = await vcli("list", "--all")
        assert {d["name"]: d["host"] for d in listing} == dict.fromkeys(
            ("nw0", "nw1", "nw2"), b.host
        )
        assert {h["host"]: h["draining"] for h in await vcli("hosts")}[a.host] is True


async def test_migrate_xml_gives_the_destination_its_definition(
    vhost: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``virtbus migrate --xml FILE``: a definition for another domain, or a broken file,
    is refused with its code before anything moves; the scheduler serves on, and a good
    file is what the destination runs."""
    async with (
        agents(tmp_path, 2) as (a, b),
        scheduler_process(tmp_path / "sched"),
    ):
        await wait_hosts(2)
        await define_running(tmp_path, "mx", a.host)
        uuid = (await vcli("dominfo", "mx", "--host", a.host))["uuid"]
        wrong_name = tmp_path / "other.xml"
        wrong_name.write_text(XML.format(name="other", mem=128))
        wrong_uuid = tmp_path / "uuid.xml"
        wrong_uuid.write_text(
            XML.format(name="mx", mem=128).replace(
                "</name>", "</name><uuid>0f0f0f0f-0000-4000-8000-000000000000</uuid>"
            )
        )
        broken = tmp_path / "broken.xml"
        broken.write_text("<domain type='test'><name>mx</name")
        for path, code, words in (
            (wrong_name, "CONFIG_UNSUPPORTED", "target domain name 'other' does not match"),
            (wrong_uuid, "CONFIG_UNSUPPORTED", "does not match source " + uuid),
            (broken, "XML_ERROR", ""),
            (tmp_path / "missing.xml", "INVALID_ARG", "cannot read"),
        ):
            r = await cli("migrate", "mx", "--to", b.host, "--xml", str(path), bus=URL)
            assert r.code != 0 and code in r.err and words in r.err, (path.name, r.err)
        assert (await vcli("migrations")) == []  # nothing was started
        good = tmp_path / "dst.xml"
        described = f"</name><uuid>{uuid}</uuid><description>at the destination</description>"
        good.write_text(XML.format(name="mx", mem=128).replace("</name>", described))
        r = await cli("migrate", "mx", "--to", b.host, "--xml", str(good), "--wait", bus=URL)
        assert r.code == 0, r.err
        moved = await cli("dumpxml", "mx", "--host", b.host, bus=URL)
        assert "<description>at the destination</description>" in moved.out, moved.out
