"""CLI start-up: whole-process times of ``virtbus`` commands next to their floors.

In the same run, rounds alternating, medians of:

- ``virtbus --version``;
- ``virtbus list --host H`` against a live agent (test driver);
- a bare one-shot Python script that connects with pika's BlockingConnection, sends the
  same ``domain.list`` call to the same agent (a hand-built msgpack envelope, direct
  reply-to) and prints the names: the floor of "a Python program that asks once";
- ``virsh -c test:///default list``.

    .venv/bin/python -m tests.bench.cli_startup [-n 20] [--force]

virtbus's bytecode is compiled first, as ``pip install`` does: in a checkout with
``PYTHONDONTWRITEBYTECODE=1`` every run would otherwise compile virtbus's sources again
(some 40 ms here), while pika, from site-packages, comes compiled.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.common import add_force, check_load, compile_tree, median_ms
from tests.procs import BUS_URL, agent_process, unique_host

VIRTBUS = str(Path(sys.executable).with_name("virtbus"))
BARE = r"""
import sys, time, uuid
import msgpack, pika
host = sys.argv[1]
conn = pika.BlockingConnection(pika.URLParameters(sys.argv[2]))
ch = conn.channel()
got = []
ch.basic_consume("amq.rabbitmq.reply-to", lambda c, m, p, b: got.append(b), auto_ack=True)
cid = uuid.uuid4().hex
now = time.time()
env = {"v": 1, "id": cid, "kind": "call", "op": "domain.list", "ts": now, "src": "bare",
       "body": {"all": True}}
ch.basic_publish("virtbus.rpc", "agent." + host, msgpack.packb(env),
                 pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id=cid,
                                      expiration="30000",
                                      user_id=pika.URLParameters(sys.argv[2]).credentials.username,
                                      headers={"x-deadline": int((now + 30) * 1000)}))
while not got:
    conn.process_data_events(time_limit=1)
reply = msgpack.unpackb(got[0])
for d in reply["body"]["result"]["domains"]:
    print(d["name"])
conn.close()
"""
XML = (
    "<domain type='test'><name>startup</name><memory>65536</memory>"
    "<os><type>hvm</type></os></domain>"
)


VIRSH = "virsh -c test:///default list"


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, timeout=60)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed: {run.stderr.decode()[-400:]}")
    return elapsed


def rounds(commands: dict[str, list[str]], n: int) -> dict[str, list[float]]:
    """Alternating rounds (in a thread: the agent serves from its own process)."""
    for argv in commands.values():  # warm-up: page cache, the broker's first queue
        timed(argv)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(n):
        for name, argv in commands.items():
            samples[name].append(timed(argv))
    return samples


async def main(n: int) -> None:
    compile_tree()
    host = unique_host("startup")
    with tempfile.TemporaryDirectory() as tmp:
        async with agent_process(host, Path(tmp)):
            define = await asyncio.create_subprocess_exec(
                VIRTBUS, "define", "-", "--host", host, stdin=subprocess.PIPE
            )
            await define.communicate(XML.encode())
            assert define.returncode == 0
            commands = {
                "virtbus --version": [VIRTBUS, "--version"],
                "virtbus list --host H": [VIRTBUS, "list", "--all", "--host", host],
                "bare pika one-shot": [sys.executable, "-c", BARE, host, BUS_URL],
            }
            if shutil.which("virsh"):
                commands[VIRSH] = ["virsh", "-c", "test:///default", "list"]
            samples = await asyncio.to_thread(rounds, commands, n)
    med = {name: median_ms(s) for name, s in samples.items()}
    for name, value in med.items():
        print(f"{name:34s} median {value:7.1f} ms  (min {min(samples[name]) * 1e3:.1f})")
    listing = med["virtbus list --host H"]
    print(f"virtbus list / bare one-shot       {listing / med['bare pika one-shot']:.2f} (<= 1.3)")
    print(f"virtbus --version                  {med['virtbus --version']:.1f} ms (<= 40)")
    if VIRSH in med:
        print(f"virtbus list / virsh list          {listing / med[VIRSH]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="rounds (default %(default)s)")
    add_force(parser)
    args = parser.parse_args()
    check_load(args.force)
    asyncio.run(main(args.n))
