"""The same client without asyncio, for scripts: connect_sync runs it on its own loop."""

import os

from virtbus.client import connect_sync

HOST = os.environ.get("VIRTBUS_HOST", "local-a")
XML = """<domain type='qemu'><name>sync1</name><memory unit='MiB'>64</memory>
<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"""

with connect_sync() as c:
    for name, inventory in sorted(c.heartbeats().items()):  # hosts heard within 2.5 s
        print(f"host {name}: {inventory.driver}, {inventory.domains} domains")
    dom = c.host(HOST).define(XML)
    print(dom.start().state)  # running
    for info in c.host(HOST).domains():
        print(f"{info.name:12} {info.state}")
    dom.destroy()
    dom.undefine()
