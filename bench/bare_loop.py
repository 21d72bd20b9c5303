#!/usr/bin/env python3
"""The Python floor: read every record with the sensor's own reader and look up its flow.

    python bench/bare_loop.py CAPTURE

Per packet: one record from `sensor.capture.pcap.open_capture` (the same mmap reader the replay
uses), the IPv4 addresses and TCP ports unpacked with one precompiled struct (Ethernet, IHL 5
assumed), one dict lookup. Nothing else: no TCP state, no HTTP. A real sensor cannot go faster
than this in pure Python, so the benchmark reports registry-sensor's rate as a fraction of it.
Prints JSON: packets, flows, seconds (inside the loop).
"""

from __future__ import annotations

import json
import struct
import sys
import time

from sensor.capture.pcap import open_capture

FLOW_KEY = struct.Struct("!4s4sHH").unpack_from  # src, dst at 26..33, ports at 34..37


def main(path: str) -> dict:
    started = time.perf_counter()
    flows: dict[tuple, list[int]] = {}
    get = flows.get
    packets = 0
    with open_capture(path) as reader:
        for _ts, _linktype, buf in reader:
            key = FLOW_KEY(buf, 26)
            entry = get(key)
            if entry is None:
                flows[key] = entry = [0]
            entry[0] += 1
            packets += 1
    return {"packets": packets, "flows": len(flows),
            "seconds": round(time.perf_counter() - started, 3)}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: bare_loop.py CAPTURE")
    json.dump(main(sys.argv[1]), sys.stdout)
    sys.stdout.write("\n")
