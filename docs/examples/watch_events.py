"""Follow domain events, one JSON line each, with the async client.

    python docs/examples/watch_events.py [--host H] [--domain D] [--since SEQ|TIME] [--count N]

``--since`` replays the kept history first (a sequence number, epoch seconds or an ISO
time), then follows live events with no gap and no duplicate. "listening" goes to stderr
once subscribed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from virtbus.client import Client
from virtbus.client.events import parse_since
from virtbus.errors import VirtbusError
from virtbus.protocol.base import to_wire


async def watch(args: argparse.Namespace) -> None:
    async with await Client.connect() as c:
        since = parse_since(args.since) if args.since else None
        async with await c.subscribe(host=args.host, domain=args.domain, since=since) as events:
            print("listening", file=sys.stderr, flush=True)
            seen = 0
            async for ev in events:
                print(json.dumps(to_wire(ev), sort_keys=True), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host")
    parser.add_argument("--domain")
    parser.add_argument("--since", help="a sequence number, epoch seconds or an ISO time")
    parser.add_argument("--count", type=int, default=0, help="stop after N events")
    args = parser.parse_args()
    try:
        asyncio.run(watch(args))
    except VirtbusError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
