"""vol-upload and vol-download below the bus: chunks, flow control, cut-off clients."""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path

import pytest

from agent.jobs import JobState
from tests.storage.conftest import Storage, dir_pool_xml, need_tools, open_storage
from virtbus.errors import AuthDenied, InvalidArgument, OperationFailed, OperationInvalid
from virtbus.storage import volume_xml

MiB = 1 << 20


@pytest.fixture
async def st(workdir: Path) -> Storage:
    need_tools()
    root = workdir / "images"
    root.mkdir()
    s = await open_storage(workdir / "state", root, transfer_idle_timeout=0.5)
    await s.pools.define(dir_pool_xml("p", root / "p"))
    await s.pools.start("p", build=True)
    return s


async def upload(st: Storage, name: str, data: bytes, *, shuffle: bool = False) -> None:
    job = await st.pools.upload_begin("p", name, len(data))
    offsets = list(range(0, len(data), MiB))
    if shuffle:  # out of order within the window, as concurrent calls may arrive
        random.Random(7).shuffle(offsets[:4])
        offsets[:4] = sorted(offsets[:4], reverse=True)
    await asyncio.gather(*(st.pools.upload_chunk(job.id, o, data[o : o + MiB]) for o in offsets))
    facts = await st.pools.upload_finish(job.id)
    assert facts.physical == len(data)
    assert st.jobs.get(job.id).state is JobState.COMPLETED


async def test_upload_and_download_round_trip(st: Storage) -> None:
    vol = await st.pools.create_volume("p", volume_xml("u.raw", MiB, format="raw"))
    data = os.urandom(5 * MiB + 123) + bytes(3 * MiB)  # a hole at the end stays sparse
    await upload(st, "u.raw", data, shuffle=True)
    assert Path(vol.path).read_bytes() == data
    job, length = await st.pools.download_begin("p", "u.raw")
    assert length == len(data)
    got = b"".join([await st.pools.download_chunk(job.id, o) for o in range(0, length, MiB)])
    assert got == data
    await st.pools.download_finish(job.id)
    assert st.jobs.get(job.id).state is JobState.COMPLETED
    assert [e for e in st.rec.jobs(job.id) if e != "progress"] == ["started", "completed"]


async def test_cut_off_upload_keeps_the_previous_content(st: Storage) -> None:
    vol = await st.pools.create_volume("p", volume_xml("keep.raw", 2 * MiB, format="raw"))
    before = os.urandom(2 * MiB)
    Path(vol.path).write_bytes(before)
    job = await st.pools.upload_begin("p", "keep.raw", 4 * MiB)
    await st.pools.upload_chunk(job.id, 0, os.urandom(MiB))
    assert any(n.startswith(".keep.raw.upload-") for n in os.listdir(st.root / "p"))
    # the client is killed: no more chunks; the idle timeout (0.5 s here) ends the job
    done = await st.jobs.wait(job.id, timeout=30)
    assert done.state is JobState.FAILED and done.error
    assert done.error["code"] == "OPERATION_TIMEOUT"
    assert Path(vol.path).read_bytes() == before
    assert os.listdir(st.root / "p") == ["keep.raw"]
    with pytest.raises(OperationInvalid):
        await st.pools.upload_chunk(job.id, MiB, b"x")
    await upload(st, "keep.raw", b"new" * 1000)  # a restarted upload starts over cleanly
    assert Path(vol.path).read_bytes() == b"new" * 1000


async def test_agent_death_mid_upload_leaves_no_half_volume(st: Storage) -> None:
    vol = await st.pools.create_volume("p", volume_xml("d.raw", MiB, format="raw"))
    before = Path(vol.path).read_bytes()
    job = await st.pools.upload_begin("p", "d.raw", 2 * MiB)
    await st.pools.upload_chunk(job.id, 0, os.urandom(MiB))
    await st.jobs.cancel(job.id)  # nothing of the old agent may run on: stop its task
    # the temporary of a dead agent (written again here, as a crash would leave it)
    (st.root / "p" / ".d.raw.upload-0123456789ab").write_bytes(b"half")
    again = await open_storage(st.state, st.root)
    assert again.pools.get("p").active
    await again.pools.destroy("p")
    await again.pools.start("p")  # pool start sweeps temporaries
    assert os.listdir(st.root / "p") == ["d.raw"] and Path(vol.path).read_bytes() == before


async def test_abort_and_bad_chunks(st: Storage) -> None:
    await st.pools.create_volume("p", volume_xml("a.raw", MiB, format="raw"))
    job = await st.pools.upload_begin("p", "a.raw", 20 * MiB)
    with pytest.raises(InvalidArgument, match="outside"):
        await st.pools.upload_chunk(job.id, 20 * MiB, b"x")
    with pytest.raises(InvalidArgument, match="at most"):
        await st.pools.upload_chunk(job.id, 0, bytes(MiB + 1))
    with pytest.raises(InvalidArgument, match="window"):
        await st.pools.upload_chunk(job.id, 9 * MiB, b"x")  # 8 chunks may be in flight
    with pytest.raises(InvalidArgument, match="incomplete"):
        await st.pools.upload_finish(job.id)
    with pytest.raises((OperationInvalid, OperationFailed), match=r"busy|uploading"):
        await st.pools.delete_volume("p", "a.raw")
    await st.pools.transfer_abort(job.id)
    assert st.jobs.get(job.id).state is JobState.CANCELLED
    assert os.listdir(st.root / "p") == ["a.raw"]
    await st.pools.delete_volume("p", "a.raw")  # no longer busy


async def test_a_transfer_is_bound_to_the_user_that_began_it(st: Storage) -> None:
    vol = await st.pools.create_volume("p", volume_xml("b.raw", MiB, format="raw"))
    data = os.urandom(2 * MiB)
    job = await st.pools.upload_begin("p", "b.raw", len(data), owner="alice")
    await st.pools.upload_chunk(job.id, 0, data[:MiB], user="alice")
    for refused in (
        st.pools.upload_chunk(job.id, MiB, bytes(MiB), user="bob"),
        st.pools.upload_chunk(job.id, MiB, bytes(MiB)),  # no user is not the owner either
        st.pools.upload_finish(job.id, user="bob"),
    ):
        with pytest.raises(AuthDenied, match=job.id):
            await refused
    await st.pools.upload_chunk(job.id, MiB, data[MiB:], user="alice")
    await st.pools.upload_finish(job.id, user="alice")
    assert Path(vol.path).read_bytes() == data
    record = json.loads((st.jobs.directory / f"{job.id}.json").read_text())
    assert (record["owner"], record["bound"]) == ("alice", True)  # kept across a restart
    with pytest.raises(AuthDenied):  # over, and still not his
        await st.pools.upload_chunk(job.id, 0, b"x", user="bob")
    down, _ = await st.pools.download_begin("p", "b.raw", owner="alice")
    with pytest.raises(AuthDenied, match=down.id):
        await st.pools.download_chunk(down.id, 0, user="bob")
    with pytest.raises(AuthDenied, match=down.id):
        await st.pools.download_finish(down.id, user="bob")
    assert await st.pools.download_chunk(down.id, 0, user="alice") == data[:MiB]
    await st.pools.download_finish(down.id, user="alice")
