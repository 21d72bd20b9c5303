#!/usr/bin/env python3
"""What a user's scapy script would do: dissect every packet, find HTTP request/status lines.

    python bench/scapy_http.py CAPTURE [--port 5000]

PcapReader (each record dissected into Ether/IP/TCP/Raw), then a regex over the TCP payload of
port-5000 packets for request lines and status lines. No reassembly, as in most such scripts: a
request line split across two segments is missed. Prints JSON: packets, requests
[[method, uri], ...], statuses [code, ...], seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from scapy.layers.inet import TCP
from scapy.utils import PcapReader

REQUEST_LINE = re.compile(
    rb"(?:^|\r\n)(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) (\S+) HTTP/1\.[01]\r\n")
STATUS_LINE = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ")


def main(path: str, port: int) -> dict:
    started = time.perf_counter()
    packets = 0
    requests: list[list[str]] = []
    statuses: list[int] = []
    with PcapReader(path) as reader:
        for pkt in reader:
            packets += 1
            if TCP not in pkt:
                continue
            tcp = pkt[TCP]
            payload = bytes(tcp.payload)
            if not payload:
                continue
            if tcp.dport == port:
                for m in REQUEST_LINE.finditer(payload):
                    requests.append([m.group(1).decode(), m.group(2).decode("latin-1")])
            elif tcp.sport == port:
                statuses.extend(int(m.group(1)) for m in STATUS_LINE.finditer(payload))
    return {"packets": packets, "requests": requests, "statuses": statuses,
            "seconds": round(time.perf_counter() - started, 3)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("capture")
    ap.add_argument("--port", type=int, default=5000)
    args = ap.parse_args()
    json.dump(main(args.capture, args.port), sys.stdout)
    sys.stdout.write("\n")
