"""The scheduler's journal on the bus (scheduler/journal.py BusJournal), over memory://:
a standby with a state dir of its own takes over a migration in flight, the newest entry
per id wins, removals end a record, only the scheduler's own user is believed, and a
replay appends every live record again (compaction); cluster networks likewise, an undefine
a tombstone."""

from __future__ import annotations

import asyncio
from pathlib import Path

from scheduler.journal import BusJournal, Journal, MigrationRecord
from scheduler.service import SchedulerService
from tests.unit.test_scheduler_memory import cluster, scheduler_settings, xml
from virtbus.bus.factory import open_bus
from virtbus.bus.memory import MemoryBus
from virtbus.protocol import ops
from virtbus.protocol.codec import decode
from virtbus.protocol.envelope import Kind
from virtbus.protocol.messages import ClusterNetworkRecord


def record(domain: str, phase: str = "perform") -> MigrationRecord:
    return MigrationRecord(domain, f"uuid-{domain}", "a", "b", {}, 60.0, state="running",
                           phase=phase)  # type: ignore[arg-type]  # fmt: skip


def journal_entries(bus: MemoryBus) -> list[dict[str, object]]:
    return [decode(data).body for _, _, data, _ in bus.broker.journal]


async def test_a_standby_with_its_own_state_dir_takes_over(tmp_path: Path) -> None:
    async with cluster(tmp_path, migration_time=1.5) as c:
        await c.agent("a", ops.DOMAIN_DEFINE, {"xml": xml("vm1")})
        await c.agent("a", ops.DOMAIN_START, {"domain": "vm1"})
        await c.call(ops.SCHEDULER_MIGRATE, {"domain": "vm1", "to": "b"})
        await c.wait_phase("vm1", "progress")
        await c.scheduler.stop()  # "killed" mid-migration, its machine gone with its disk
        elsewhere = tmp_path / "another-machine"
        c.scheduler = SchedulerService(scheduler_settings(elsewhere), open_bus(c.url, src="s2"))
        await c.scheduler.start()
        done = await c.wait_migration("vm1")
        assert done["state"] == "completed", done
        assert await c.where("vm1") == [("b", "running")]
        assert await Journal(elsewhere).load() == []  # its cache: nothing left in flight


async def test_newest_entry_wins_and_removal_ends_a_record(tmp_path: Path) -> None:
    url = f"memory://journal-{tmp_path.name}"
    writer = open_bus(url, src="s1")
    await writer.connect()
    first = BusJournal(writer, Journal(tmp_path / "one"))
    await first.open()
    one, two = record("vm1", "prepare"), record("vm2")
    await first.save(one)
    one.phase = "perform"  # type: ignore[assignment]
    await first.save(one)
    await first.save(two)
    await first.remove(two)
    await first.save_draining({"a"})
    await first.save_draining({"a", "c"})
    reader = open_bus(url, src="s2")
    await reader.connect()
    second = BusJournal(reader, Journal(tmp_path / "two"))  # no shared directory
    await second.open()
    assert await second.load_draining() == {"a", "c"}
    [got] = await second.load()
    assert (got.id, got.phase) == (one.id, "perform")
    assert [r.id for r in await Journal(tmp_path / "two").load()] == [one.id]  # the cache
    await writer.close()
    await reader.close()


async def test_only_the_schedulers_own_user_is_believed(tmp_path: Path) -> None:
    name = f"forged-{tmp_path.name}"
    intruder = open_bus(f"memory://mallory@{name}", src="agent-x")
    await intruder.connect()
    forger = BusJournal(intruder, Journal(tmp_path / "x"))
    await forger.open()
    await forger.save(record("vm9"))
    scheduler_bus = open_bus(f"memory://scheduler@{name}", src="s")
    await scheduler_bus.connect()
    journal = BusJournal(scheduler_bus, Journal(tmp_path / "s"))
    await journal.open()
    assert await journal.load() == []
    await intruder.close()
    await scheduler_bus.close()


async def test_a_replay_appends_every_live_record_again(tmp_path: Path) -> None:
    url = f"memory://compact-{tmp_path.name}"
    bus = open_bus(url, src="s1")
    await bus.connect()
    assert isinstance(bus, MemoryBus)
    old = BusJournal(bus, Journal(tmp_path / "one"))
    await old.open()
    live = record("vm1")
    await old.save(live)
    before = len(bus.broker.journal)
    new = BusJournal(bus, Journal(tmp_path / "two"))
    await new.open()
    await new.load()
    after = journal_entries(bus)[before:]
    assert [e["entry"] for e in after] == ["mark", "migration", "draining"]
    assert after[1]["id"] == live.id  # the live record, now at the stream's head
    assert {kind for _, _, data, _ in bus.broker.journal for kind in [decode(data).kind]} == {
        Kind.JOURNAL
    }
    await bus.close()


async def test_cluster_networks_replay_newest_wins_tombstones_and_compaction(
    tmp_path: Path,
) -> None:
    url = f"memory://nets-{tmp_path.name}"
    bus = open_bus(url, src="s1")
    await bus.connect()
    assert isinstance(bus, MemoryBus)
    old = BusJournal(bus, Journal(tmp_path / "one"))
    await old.open()
    net = ClusterNetworkRecord(name="cn", uuid="u1", vni=7, dhcp_host="a", xml="<network/>")
    await old.save_network(net)
    await old.save_network(ClusterNetworkRecord(name="cn", uuid="u1", vni=7, dhcp_host="b",
                                                xml="<network/>"))  # fmt: skip
    await old.save_network(ClusterNetworkRecord(name="gone", uuid="u2", vni=8, dhcp_host="a",
                                                xml="<network/>"))  # fmt: skip
    await old.remove_network("gone")
    before = len(bus.broker.journal)
    new = BusJournal(bus, Journal(tmp_path / "two"))
    await new.open()
    [got] = await new.load_networks()
    assert (got.name, got.dhcp_host) == ("cn", "b")  # the newest; 'gone' is tombstoned
    after = journal_entries(bus)[before:]
    assert [(e["entry"], e["id"]) for e in after] == [
        ("mark", after[0]["id"]), ("network", "cn"), ("draining", "draining")
    ]  # fmt: skip  # the live network re-appended: retention never drops it
    await bus.close()


class SlowCache(Journal):
    """A cache whose writes wait for ``go``: how far ``save`` got meanwhile is seen."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.go = asyncio.Event()
        self.writing = asyncio.Event()

    async def write(self, record: MigrationRecord) -> None:
        self.writing.set()
        await self.go.wait()
        await super().write(record)


async def test_a_save_appends_while_the_cache_is_written_and_returns_after_both(
    tmp_path: Path,
) -> None:
    bus = open_bus(f"memory://journal-{tmp_path.name}", src="s1")
    await bus.connect()
    cache = SlowCache(tmp_path / "one")
    journal = BusJournal(bus, cache)
    await journal.open()
    assert isinstance(bus, MemoryBus)
    rec = record("vm1", "prepare")
    saving = asyncio.create_task(journal.save(rec))
    await cache.writing.wait()
    async with asyncio.timeout(5):  # on the stream while the cache write is held up
        while not [e for e in journal_entries(bus) if e.get("entry") == "migration"]:
            await asyncio.sleep(0.01)
    assert not saving.done()  # the step it guards waits for the cache too
    cache.go.set()
    await saving
    assert [r.id for r in await Journal(tmp_path / "one").load()] == [rec.id]
    await bus.close()


async def test_followers_hear_a_completed_migration_before_its_last_journal_entry(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path) as c:
        journal = c.scheduler.coordinator.journal
        save, released = journal.save, asyncio.Event()

        async def held_at_done(rec: MigrationRecord) -> None:
            if rec.phase == "done":
                await released.wait()
            await save(rec)

        journal.save = held_at_done  # type: ignore[method-assign]
        await c.agent("a", ops.DOMAIN_DEFINE, {"xml": xml("vm1")})
        await c.agent("a", ops.DOMAIN_START, {"domain": "vm1"})
        rec = await c.call(ops.SCHEDULER_MIGRATE, {"domain": "vm1", "to": "b"})
        async with asyncio.timeout(5):  # long polls of 10 s: answered by changes only
            while rec["state"] != "completed":
                query = {"id": rec["id"], "wait": 10.0, "seen": rec}
                rec = await c.call(ops.SCHEDULER_MIGRATION, query, timeout=15)
        assert rec["phase"] == "done" and await c.where("vm1") == [("b", "running")]
        released.set()
        done = await c.wait_migration("vm1")
        assert done["state"] == "completed"
