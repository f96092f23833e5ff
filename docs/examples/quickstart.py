"""virtbus.client in one screen: define, start, suspend, inspect, follow the events.

Run it against `deploy/local-cluster start` (hosts local-a and local-b), or any agent:
VIRTBUS_BUS_URL picks the broker, VIRTBUS_HOST the host.
"""

import asyncio
import os
import sys

from virtbus.client import Client
from virtbus.errors import NoDomainError, VirtbusError

HOST = os.environ.get("VIRTBUS_HOST", "local-a")
XML = """<domain type='qemu'>
  <name>quickstart</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
</domain>"""


async def main() -> None:
    async with await Client.connect() as c:  # $VIRTBUS_BUS_URL, else the local RabbitMQ
        # subscribed before anything happens, so no event is missed
        events = await c.subscribe(host=HOST, domain="quickstart")
        dom = await c.host(HOST).define(XML)
        await dom.start()
        status = await dom.suspend()
        print(f"{dom.ref}: {status.state} ({status.reason})")
        info = await dom.info()
        print(f"uuid {info.uuid}, {info.vcpus} vCPU, {info.max_memory_kib} KiB")
        await dom.destroy()
        await dom.undefine()
        async with events:
            async for ev in events:
                print(f"event #{ev.seq}: {ev.event} ({ev.detail})")
                if ev.event == "undefined":
                    break
        try:
            await c.host(HOST).domain("quickstart").start()
        except NoDomainError as exc:  # every error has libvirt's code
            print(f"gone: {exc.code}")


try:
    asyncio.run(main())
except VirtbusError as exc:
    sys.exit(f"error: {exc.code}: {exc.message}")
