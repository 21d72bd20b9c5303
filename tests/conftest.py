"""Shared fixtures: the CLI as a subprocess, temp paths, a config that keeps the fingerprint key
in the test's directory, and what tshark (through pyshark) reads from a capture.

Tests run as root, whose default state directory is /var/lib/registry-sensor: never write
there. Every run gets --db and a config with key_file under tmp_path, and STATE_DIRECTORY
points into a temp dir in case something forgets.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PCAPS = REPO / "pcaps"
SAMPLE_CAPTURES = sorted(PCAPS.glob("*.pcap"))
TSHARK = shutil.which("tshark")
REGISTRY_PORT = 5000


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory):
    old = os.environ.get("STATE_DIRECTORY")
    os.environ["STATE_DIRECTORY"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("STATE_DIRECTORY", None)
    else:
        os.environ["STATE_DIRECTORY"] = old


def run_cli(args, *, env=None, timeout=120):
    """Run `python -m sensor.cli ARGS`; return (returncode, stdout, stderr) as text."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "sensor.cli", *[str(a) for a in args]],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """A config with nothing but the fingerprint key, placed inside tmp_path."""
    path = tmp_path / "sensor.yaml"
    path.write_text("key_file: fingerprint.key\n")
    return path


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sensor.db"


@pytest.fixture
def replay(tmp_path: Path, config_path: Path):
    """replay(pcap, ..., json=False, extra=()) → (rc, stdout, stderr, db); a new db each call."""
    counter = iter(range(1_000_000))

    def _replay(*pcaps, json=False, extra=(), db=None):
        db = db or tmp_path / f"replay-{next(counter)}.db"
        args = ["replay", *pcaps, "--db", db, "--config", config_path, *extra]
        if json:
            args.append("--json")
        rc, out, err = run_cli(args)
        return rc, out, err, db

    return _replay


# -- tshark -------------------------------------------------------------------------------------

requires_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")


@dataclass
class TsharkView:
    """What tshark's dissectors report for one capture (port 5000 decoded explicitly)."""

    frames: int = 0
    # tcp.stream → (client ip, client port, server ip, server port), from the SYNs
    streams: dict[int, tuple[str, int, str, int]] = field(default_factory=dict)
    # one dict per HTTP request: frame, stream, method, uri, authorization, authbasic, status
    # (None when tshark paired no response with it), response_frame
    requests: list[dict] = field(default_factory=list)
    # HTTP responses tshark paired with no request: frame, stream, status
    orphan_responses: list[dict] = field(default_factory=list)
    # TLS ClientHellos (decoded as TLS): frame, stream, sni, versions offered, payload length
    client_hellos: list[dict] = field(default_factory=list)


def _layers(pkt, name):
    return pkt.get_multiple_layers(name)


@functools.cache
def tshark_view(pcap: Path) -> TsharkView:
    import pyshark  # only where tshark is used

    view = TsharkView()
    by_frame: dict[int, dict] = {}
    cap = pyshark.FileCapture(str(pcap), keep_packets=False,
                              decode_as={f"tcp.port=={REGISTRY_PORT}": "http"})
    try:
        for pkt in cap:
            view.frames += 1
            if "TCP" not in pkt or "IP" not in pkt:
                continue
            tcp = pkt.tcp
            flags = int(tcp.flags, 16)
            if flags & 0x02 and not flags & 0x10:  # SYN without ACK: a new connection
                view.streams[int(tcp.stream)] = (pkt.ip.src, int(tcp.srcport),
                                                 pkt.ip.dst, int(tcp.dstport))
            for http in _layers(pkt, "http"):
                method = http.get_field("request_method")
                code = http.get_field("response_code")
                if method is not None:
                    by_frame[int(pkt.number)] = {
                        "frame": int(pkt.number), "stream": int(tcp.stream),
                        "src_ip": pkt.ip.src, "src_port": int(tcp.srcport),
                        "dest_ip": pkt.ip.dst, "dest_port": int(tcp.dstport),
                        "ts": float(pkt.sniff_timestamp), "method": str(method),
                        "uri": str(http.get_field("request_uri")),
                        "authorization": _opt(http.get_field("authorization")),
                        "authbasic": _opt(http.get_field("authbasic")),
                        "status": None, "response_frame": None,
                    }
                    view.requests.append(by_frame[int(pkt.number)])
                elif code is not None:
                    request_in = http.get_field("request_in")
                    req = by_frame.get(int(request_in)) if request_in is not None else None
                    if req is None:
                        view.orphan_responses.append({
                            "frame": int(pkt.number), "stream": int(tcp.stream),
                            "status": int(code),
                            "client_ip": pkt.ip.dst, "client_port": int(tcp.dstport)})
                    else:
                        req["status"] = int(code)
                        req["response_frame"] = int(pkt.number)
    finally:
        cap.close()

    cap = pyshark.FileCapture(str(pcap), keep_packets=False,
                              display_filter="tls.handshake.type == 1",
                              decode_as={f"tcp.port=={REGISTRY_PORT}": "tls"})
    try:
        for pkt in cap:
            tls = pkt.tls
            versions = tls.get_field("handshake_extensions_supported_version")
            offered = ([int(f.show, 16) for f in versions.all_fields]
                       if versions is not None else [])
            view.client_hellos.append({
                "frame": int(pkt.number), "stream": int(pkt.tcp.stream),
                "src_ip": pkt.ip.src, "src_port": int(pkt.tcp.srcport),
                "sni": _opt(tls.get_field("handshake_extensions_server_name")),
                "versions": offered, "payload_len": int(pkt.tcp.len),
            })
    finally:
        cap.close()
    return view


def _opt(value):
    return None if value is None else str(value)
