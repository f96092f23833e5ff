"""Define a guest where the scheduler places it, start it, live-migrate it, clean up.

    python docs/examples/migrate_guest.py [--name N] [--to HOST] [--keep]

Needs virtbus-scheduler and two agents or more (`deploy/local-cluster start`). Each
change of the migration record is printed as the scheduler reports it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from virtbus.client import Client
from virtbus.errors import MigrateFailed, VirtbusError
from virtbus.protocol.migration import MigrationParams, RecordState

XML = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"""


async def run(args: argparse.Namespace) -> None:
    async with await Client.connect() as c:
        placed = await c.scheduler.define(XML.format(name=args.name))
        print(f"defined {placed.name} on {placed.host}")
        dom = c.host(placed.host).domain(placed.name)
        await dom.start()
        started = await dom.migrate(args.to, MigrationParams(auto_converge=True))
        print(f"migration {started.id}: {started.source} -> {started.destination}")
        record = started
        async for record in c.scheduler.follow(started.id):
            done = record.progress.get("transferred", 0)
            print(f"  {record.state:9} {record.phase:9} {done} bytes", flush=True)
        if record.state is not RecordState.COMPLETED:
            raise MigrateFailed(f"{record.state}: {record.error}")
        moved = c.host(record.destination).domain(placed.name)
        info = await moved.info()
        print(f"{info.name} is {info.state} on {record.destination}")
        if not args.keep:
            await moved.destroy()
            await moved.undefine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="mover")
    parser.add_argument("--to", help="destination host (default: placed by the scheduler)")
    parser.add_argument("--keep", action="store_true", help="leave the guest running")
    try:
        asyncio.run(run(parser.parse_args()))
    except VirtbusError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
