"""Storage benchmarks below the op layer (the StoragePools manager, real qemu-img):

- clone of a 1 GiB qcow2 (full of data) through ``clone_volume`` (a job: qemu-img convert
  with progress) next to a bare ``qemu-img convert`` of the same file, rounds alternating;
  target ratio <= 1.05;
- create + delete of N qcow2 volumes (definition files written atomically each time):
  operations per second, one at a time and 8 at once.

The vol-upload benchmark through RabbitMQ needs the storage ops on the bus (issue 12's
typed protocol) and is not here yet.

    .venv/bin/python -m tests.bench.storage [--size-mib 1024] [--rounds 3] [-n 1000]
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
from pathlib import Path

from agent.jobs import JobManager, JobState
from agent.storage import StoragePools
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


async def main(args: argparse.Namespace) -> int:
    base = Path(tempfile.mkdtemp(prefix="virtbus-bench-storage-", dir=args.dir))
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
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse())))
