"""The libvirt half of tests/bench/networks.py (run with Debian's python3 + python3-libvirt).

One connection for the whole run, so each round times only the call, as the virtbus side
does: it defines the network from the XML file once, then answers ``start`` and ``destroy``
lines on stdin with the seconds ``virNetworkCreate`` (net-start) and ``virNetworkDestroy``
took, one JSON line each; at EOF (or on any error) it destroys and undefines the network,
so no libvirt network outlives the run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import libvirt


def main() -> None:
    uri, xml_file = sys.argv[1], sys.argv[2]
    conn = libvirt.open(uri)
    net = conn.networkDefineXML(Path(xml_file).read_text())
    try:
        for line in sys.stdin:
            t = time.perf_counter()
            if line.strip() == "start":
                net.create()
            else:
                net.destroy()
            print(json.dumps({line.strip(): time.perf_counter() - t}), flush=True)
    finally:
        if net.isActive():
            net.destroy()
        net.undefine()
        conn.close()


if __name__ == "__main__":
    main()
