"""Storage benchmarks below the op layer (the StoragePools manager, real qemu-img):

- clone of a 1 GiB qcow2 (full of data) through ``clone_volume`` (a job: qemu-img convert
  with progress) next to a bare ``qemu-img convert`` of the same file, rounds alternating;
  target ratio <= 1.05;
- create + delete of N qcow2 volumes (definition files written atomically each time):
  operations per second, one at a time and 8 at once.

- vol-upload of a file through RabbitMQ into a real agent (the client's 1 MiB chunks, 8 in
  flight) next to a bare aio-pika producer and consumer moving the same chunks with the
  same window (the consumer answers each with a small ack); target >= 0.7x the bare
  throughput; the agent's peak RSS (VmHWM) after uploads of two sizes shows it bounded.

    .venv/bin/python -m tests.bench.storage [--size-mib 1024] [--rounds 3] [-n 1000] [--force]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from agent.jobs import JobManager, JobState
from agent.storage import StoragePools
from tests.bench.common import add_force, check_load
from tests.procs import BUS_URL, agent_process, unique_host
from virtbus.client import Client
from virtbus.settings import StorageSettings
from virtbus.storage import volume_xml

MiB = 1 << 20


def make_source(path: Path, size_mib: int) -> None:
    """A qcow2 whose every cluster holds data (random bytes, written once)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as fh:
        for _ in range(size_mib):
            fh.write(os.urandom(MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True)  # fmt: skip
    raw.unlink()


def drop_caches_hint() -> None:
    os.sync()


async def bare_convert(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(src), str(dst)
    )
    assert await proc.wait() == 0
    return time.perf_counter() - start


async def virtbus_clone(pools: StoragePools, jobs: JobManager, name: str) -> float:
    start = time.perf_counter()
    job = await pools.clone_volume("bench", volume_xml(name, None, format="qcow2"), "bench",
                                   "src.qcow2")  # fmt: skip
    done = await jobs.wait(job.id, timeout=3600)
    elapsed = time.perf_counter() - start
    assert done.state is JobState.COMPLETED, done.error
    return elapsed


async def create_delete(pools: StoragePools, n: int, parallel: int) -> tuple[float, float]:
    sem = asyncio.Semaphore(parallel)

    async def one(i: int, create: bool) -> None:
        async with sem:
            if create:
                await pools.create_volume("bench", volume_xml(f"v{i}.qcow2", 1 << 30,
                                                              format="qcow2"))  # fmt: skip
            else:
                await pools.delete_volume("bench", f"v{i}.qcow2")

    start = time.perf_counter()
    await asyncio.gather(*(one(i, True) for i in range(n)))
    created = time.perf_counter() - start
    start = time.perf_counter()
    await asyncio.gather(*(one(i, False) for i in range(n)))
    deleted = time.perf_counter() - start
    return n / created, n / deleted


async def bare_upload(path: Path, chunk: int, window: int) -> float:
    """Seconds to move ``path`` in chunks to a consumer that acks each with a reply."""
    queue_name = f"bench-upload-{uuid.uuid4().hex[:8]}"
    server = await aio_pika.connect(BUS_URL)
    client = await aio_pika.connect(BUS_URL)
    try:
        sch = await server.channel(publisher_confirms=False)
        queue = await sch.declare_queue(queue_name, auto_delete=True)

        async def on_chunk(message: AbstractIncomingMessage) -> None:
            assert message.reply_to is not None
            await sch.default_exchange.publish(
                aio_pika.Message(b"ok", correlation_id=message.correlation_id),
                routing_key=message.reply_to,
                mandatory=False,
            )
            await message.ack()

        await queue.consume(on_chunk)
        cch = await client.channel(publisher_confirms=False)
        pending: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(message: AbstractIncomingMessage) -> None:
            fut = pending.pop(message.correlation_id or "", None)
            if fut is not None:
                fut.set_result(message.body)

        reply_queue = await cch.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await reply_queue.consume(on_reply, no_ack=True)
        start = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            size, offset = os.fstat(fd).st_size, 0
            inflight: set[asyncio.Future[bytes]] = set()
            while offset < size or inflight:
                while offset < size and len(inflight) < window:
                    data = await asyncio.to_thread(os.pread, fd, chunk, offset)
                    cid = uuid.uuid4().hex
                    fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                    pending[cid] = fut
                    await cch.default_exchange.publish(
                        aio_pika.Message(data, correlation_id=cid,
                                         reply_to="amq.rabbitmq.reply-to"),
                        routing_key=queue_name, mandatory=False,
                    )  # fmt: skip
                    inflight.add(fut)
                    offset += len(data)
                _done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
        finally:
            os.close(fd)
        return time.perf_counter() - start
    finally:
        await client.close()
        await server.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def make_random(path: Path, size_mib: int) -> None:
    with open(path, "wb") as fh:
        for _ in range(size_mib):
            fh.write(os.urandom(MiB))


async def upload_bench(args: argparse.Namespace, base: Path) -> None:
    images = base / "up-images"
    images.mkdir()
    config = base / "agent.toml"
    config.write_text(f'[storage]\nroots = ["{images}"]\nchunk_size = {MiB}\n'
                      "transfer_window = 8\n")  # fmt: skip
    small = base / "small.bin"
    big = base / "big.bin"
    await asyncio.to_thread(make_random, small, max(16, args.size_mib // 4))
    await asyncio.to_thread(make_random, big, args.size_mib)
    host = unique_host("bench-up")
    async with (
        agent_process(host, base, "--config", str(config)) as agent,
        await Client.connect(BUS_URL) as client,
    ):
        h = client.host(host)
        await h.define_pool(f"<pool type='dir'><name>up</name><target><path>{images / 'p'}"
                                "</path></target></pool>")  # fmt: skip
        pool = h.pool("up")
        await pool.start(build=True)
        await pool.create_volume(volume_xml("target.raw", MiB, format="raw"))
        vol = pool.volume("target.raw")
        await vol.upload(small)
        rss_small = peak_rss_kib(agent.proc.pid)
        ours: list[float] = []
        bare: list[float] = []
        cpu: dict[str, list[float]] = {"agent": [], "client": [], "bare": []}
        me = os.getpid()
        for r in range(args.rounds):
            for side in ("ours", "bare") if r % 2 == 0 else ("bare", "ours"):
                cpu0, agent0 = cpu_seconds(me), cpu_seconds(agent.proc.pid)
                if side == "ours":
                    start = time.perf_counter()
                    await vol.upload(big)
                    ours.append(time.perf_counter() - start)
                    cpu["agent"].append(cpu_seconds(agent.proc.pid) - agent0)
                    cpu["client"].append(cpu_seconds(me) - cpu0)
                else:
                    bare.append(await bare_upload(big, MiB, 8))
                    cpu["bare"].append(cpu_seconds(me) - cpu0)
            print(
                f"upload round {r + 1}: virtbus {args.size_mib / ours[-1]:.0f} MiB/s, "
                f"bare {args.size_mib / bare[-1]:.0f} MiB/s",
                flush=True,
            )
        rss_big = peak_rss_kib(agent.proc.pid)
    mo, mb = statistics.median(ours), statistics.median(bare)
    print(
        f"vol-upload {args.size_mib} MiB: virtbus median {args.size_mib / mo:.0f} MiB/s, bare"
        f" aio-pika median {args.size_mib / mb:.0f} MiB/s, ratio {mb / mo:.2f} of bare"
        " (target >= 0.7)"
    )
    per = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        f"CPU seconds per upload: agent {per['agent']:.2f}, virtbus client {per['client']:.2f};"
        f" bare producer+consumer {per['bare']:.2f}"
    )
    print(
        f"agent peak RSS: {rss_small // 1024} MiB after a {max(16, args.size_mib // 4)} MiB"
        f" upload, {rss_big // 1024} MiB after {args.rounds} of {args.size_mib} MiB"
    )


async def main(args: argparse.Namespace) -> int:
    check_load(args.force)
    base = Path(tempfile.mkdtemp(prefix="virtbus-bench-storage-", dir=args.dir))
    if args.only_upload:
        try:
            await upload_bench(args, base)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        return 0
    try:
        images = base / "images"
        images.mkdir()
        jobs = JobManager(base / "state" / "jobs", lambda _job, _event: None)
        pools = StoragePools(base / "state", StorageSettings(roots=(images,)), jobs,
                             lambda _event: None)  # fmt: skip
        await pools.open()
        await pools.define(f"<pool type='dir'><name>bench</name><target><path>{images / 'p'}"
                           "</path></target></pool>")  # fmt: skip
        await pools.start("bench", build=True)
        src = images / "p" / "src.qcow2"
        print(f"making a {args.size_mib} MiB qcow2 full of data ...", flush=True)
        await asyncio.to_thread(make_source, src, args.size_mib)
        await pools.refresh("bench")
        bare: list[float] = []
        ours: list[float] = []
        for r in range(args.rounds):  # ABBA: each side goes first every other round
            for side in ("bare", "ours") if r % 2 == 0 else ("ours", "bare"):
                drop_caches_hint()
                if side == "bare":
                    bare.append(await bare_convert(src, images / f"bare{r}.qcow2"))
                    (images / f"bare{r}.qcow2").unlink()
                else:
                    ours.append(await virtbus_clone(pools, jobs, f"clone{r}.qcow2"))
                    await pools.delete_volume("bench", f"clone{r}.qcow2")
            print(f"round {r + 1}: bare {bare[-1]:.2f} s, virtbus {ours[-1]:.2f} s", flush=True)
        mb, mo = statistics.median(bare), statistics.median(ours)
        per_round = statistics.median(o / b for o, b in zip(ours, bare, strict=True))
        print(
            f"clone {args.size_mib} MiB qcow2: bare qemu-img convert median {mb:.2f} s, "
            f"virtbus clone_volume median {mo:.2f} s, ratio {mo / mb:.3f} (median of per-round"
            f" ratios {per_round:.3f}; target <= 1.05)"
        )
        for parallel in (1, 8):
            c, d = await create_delete(pools, args.n, parallel)
            print(
                f"{args.n} qcow2 volumes, {parallel} at a time: create {c:.0f} ops/s, "
                f"delete {d:.0f} ops/s"
            )
        if not args.no_upload:
            await upload_bench(args, base)
        print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--dir", default=None, help="where the pool lives (default: $TMPDIR)")
    p.add_argument("--no-upload", action="store_true", help="skip the vol-upload benchmark")
    p.add_argument("--only-upload", action="store_true", help="only the vol-upload benchmark")
    add_force(p)
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse())))
