"""The live daemon's parts that need no network: sd_notify, the watchdog tied to the packet
loop, idle expiry on the wall clock, capture-loss, and the `live:` configuration."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from sensor.capture.afpacket import KernelStats
from sensor.config import LiveConfig, SensorConfig, load_config
from sensor.daemon import LiveSensor, Notifier
from sensor.detect.detector import Detector
from sensor.engine import Engine, EngineSettings
from sensor.yamlfile import ConfigError


def test_notifier_speaks_to_notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(2)
    n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "3000000"})
    assert n.watchdog_interval == 1.5
    n.send("READY=1", "STATUS=capturing")
    assert server.recv(100) == b"READY=1\nSTATUS=capturing"
    n.close()
    server.close()
    assert Notifier({}).sock is None  # outside systemd: nothing
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"
    other = Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # meant for another process


class FakeSource:
    """read() returns nothing, or blocks while `stall` is set: a stuck packet loop."""

    interface = "fake0"
    mechanism = "recv"

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.stall = threading.Event()
        self.release = threading.Event()
        self.dropped = 0

    def fileno(self) -> int:
        return self.r.fileno()

    def read(self, limit: int = 512):
        if self.stall.is_set():
            self.release.wait(10)
            self.stall.clear()
        return []

    def stats(self) -> KernelStats:
        return KernelStats(100 + self.dropped, self.dropped)


class FakeSink:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.findings: list = []
        self.flushes = 0

    def transaction(self, txn) -> None:
        pass

    def anomaly(self, anomaly) -> None:
        pass

    def finding(self, finding) -> None:
        self.findings.append(finding)

    def stats(self, row: dict) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        pass


class RecordingNotifier(Notifier):
    def __init__(self, interval: float) -> None:
        super().__init__({})
        self.watchdog_interval = interval
        self.sent: list[tuple[float, str]] = []

    def send(self, *lines: str) -> None:
        for line in lines:
            self.sent.append((time.monotonic(), line))

    def pings(self, start: float = 0, end: float = float("inf")) -> int:
        return sum(1 for t, m in self.sent if m == "WATCHDOG=1" and start <= t < end)


def _sensor(interval: float = 0.05, idle_timeout: float = 300.0, stats_interval: float = 0.1):
    config = SensorConfig(live=LiveConfig(stats_interval=stats_interval, flush_interval=0.05))
    sink = FakeSink()
    engine = Engine(EngineSettings(idle_timeout=idle_timeout), b"k" * 32, Detector([]), sink)
    source = FakeSource()
    notifier = RecordingNotifier(interval)
    return LiveSensor(config, None, [source], engine, sink, notifier), source, sink, notifier


def test_watchdog_is_fed_only_while_the_packet_loop_runs():
    sensor, source, sink, notifier = _sensor()
    thread = threading.Thread(target=sensor.run, daemon=True)
    thread.start()
    time.sleep(0.4)
    assert notifier.pings() >= 4 and notifier.sent[0][1] == "READY=1"
    source.stall.set()  # the loop is stuck inside read()
    time.sleep(0.1)
    stalled_from = time.monotonic()
    time.sleep(0.6)
    stalled_to = time.monotonic()
    assert notifier.pings(stalled_from, stalled_to) == 0
    source.release.set()
    time.sleep(0.3)
    assert notifier.pings(stalled_to) >= 2  # back to normal
    sensor.stop_reason = "test"
    thread.join(2)
    assert not thread.is_alive()
    assert sink.flushes > 0 and sink.rows and sink.rows[-1]["interface"] == "fake0"


def test_capture_loss_raised_when_drops_start():
    sensor, source, sink, _notifier = _sensor()
    sensor.write_stats()
    assert not sink.findings
    source.dropped = 7
    sensor.write_stats()
    sensor.write_stats()  # a clean interval, then drops again: the same episode
    source.dropped = 9
    sensor.write_stats()
    assert [f.rule for f in sink.findings] == ["capture-loss"]
    sensor.ifaces["fake0"].last_drop -= 301  # after five quiet minutes: a new episode
    source.dropped = 10
    sensor.write_stats()
    assert [f.rule for f in sink.findings] == ["capture-loss"] * 2
    assert sink.findings[0].details["dropped"] == 7
    assert sink.rows[-1]["kernel_dropped"] == 10 and sink.rows[-1]["rss_bytes"] > 0


def test_idle_flows_expire_without_packets():
    """A flow left open expires on the wall clock although no packet arrives after it."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    sensor, _source, _sink, _notifier = _sensor(idle_timeout=5)
    syn = bytes(Ether() / IP(src="192.0.2.1", dst="192.0.2.2") / TCP(dport=5000, flags="S"))
    sensor.engine.packet(time.time() - 10, 1, syn)
    assert sensor.engine.open_flows == 1
    thread = threading.Thread(target=sensor.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 3
    while sensor.engine.open_flows and time.monotonic() < deadline:
        time.sleep(0.05)
    sensor.stop_reason = "test"
    thread.join(2)
    assert sensor.engine.open_flows == 0


def test_live_config_errors(tmp_path):
    cases = {
        "live: {capture: mmap}": "live.capture",
        "live: {buffer_size: 12}": "live.buffer_size",
        "live: {buffer_size: lots}": "live.buffer_size",
        "live: {interfaces: [1]}": "live.interfaces",
        "live: {promiscuous: maybe}": "live.promiscuous",
        "live: {stats_interval: 0}": "live.stats_interval",
        "live: {user: ''}": "live.user",
        "live: {colour: blue}": "live.colour",
        "live: [eth0]": "live",
    }
    for text, key in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text + "\n")
        with pytest.raises(ConfigError) as err:
            load_config(path)
        message = str(err.value)
        assert "\n" not in message and key in message and str(path) in message, message
    path.write_text("live: {interfaces: eth1, buffer_size: 8MiB, capture: recv}\n")
    live = load_config(path).live
    assert live.interfaces == ("eth1",) and live.buffer_size == 8 << 20
    assert live.capture == "recv"
    assert load_config(None).live == LiveConfig()
