"""Forensic replay: capture files → engine → SQLite, with a summary of what was found.

Files are checked before any is read (a file that is not a capture stops the run with a
ConfigError-style one-line message), then replayed in order through one engine, so a flow that
continues from one rotated file into the next stays one flow. With `--workers N` the files are
replayed in parallel instead, one engine per file (sensor/replay_workers.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .capture.pcap import CaptureFormatError, CaptureReader, open_capture
from .config import SensorConfig
from .detect.detector import Detector
from .detect.rules import load_rules
from .engine import Engine
from .records import Anomaly, Finding, Transaction
from .sinks.sqlite import SqliteSink
from .state import load_or_create_key

log = logging.getLogger("registry-sensor")
PROGRESS_EVERY = 2048  # packets between progress updates


class UsageError(Exception):
    """Bad input from the user (exit 2): one line."""


@dataclass
class FindingCollector:
    """Keeps the findings of a run for the report printed at its end."""

    findings: list[Finding] = field(default_factory=list)

    def transaction(self, txn: Transaction) -> None:
        pass

    def finding(self, finding: Finding) -> None:
        self.findings.append(finding)

    def anomaly(self, anomaly: Anomaly) -> None:
        pass


class Tee:
    """Hands each record to several sinks."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    def transaction(self, txn: Transaction) -> None:
        for sink in self.sinks:
            sink.transaction(txn)

    def finding(self, finding: Finding) -> None:
        for sink in self.sinks:
            sink.finding(finding)

    def anomaly(self, anomaly: Anomaly) -> None:
        for sink in self.sinks:
            sink.anomaly(anomaly)


def build_detector(config: SensorConfig) -> Detector:
    return Detector(load_rules(config.rule_paths, config.networks, config.rule_overrides))


def build_alert_sink(config: SensorConfig, detector: Detector, db_path: Path) -> Any:
    """The apprise alert sink for this run (`--alert`); a usage error when none is configured."""
    if not config.alerts.targets:
        raise UsageError(f"--alert: no alert targets configured (alerts.targets in "
                         f"{config.source})")
    from .sinks.alerts import AlertSink

    try:
        return AlertSink(config.alerts, db_path=str(db_path),
                         descriptions={r.id: r.description for r in detector.rules})
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def open_captures(paths: Sequence[str], warnings: list[str]) -> list[CaptureReader]:
    readers = []
    try:
        for path in paths:
            try:
                readers.append(open_capture(path, on_warning=warnings.append))
            except FileNotFoundError:
                raise UsageError(f"{path}: no such file") from None
            except IsADirectoryError:
                raise UsageError(f"{path}: is a directory, not a capture file") from None
            except PermissionError:
                raise UsageError(f"{path}: permission denied") from None
            except CaptureFormatError as exc:
                raise UsageError(str(exc)) from None
    except UsageError:
        for reader in readers:
            reader.close()
        raise
    return readers


def _reporting(reader: CaptureReader, progress: Callable[[int, int, float], None],
               done_before: int, total: int, started: float) -> Iterator[tuple[float, int, bytes]]:
    """The reader's frames, calling `progress` every PROGRESS_EVERY of them."""
    countdown = PROGRESS_EVERY
    for frame in reader:
        yield frame
        countdown -= 1
        if not countdown:
            countdown = PROGRESS_EVERY
            progress(done_before + reader.bytes_read, total, time.monotonic() - started)


def run_replay(paths: Sequence[str], config: SensorConfig, db_path: Path,
               progress: Callable[[int, int, float], None] | None = None,
               extra_sinks: Sequence[Any] = (),
               alert: bool = False, workers: int = 1) -> tuple[dict[str, Any], list[Finding]]:
    """Replay the captures; return the summary and the findings.

    With `workers` > 1 and several files, the files are replayed in parallel, each through an
    engine of its own (sensor.replay_workers: flows that continue across files are split).

    With `alert`, findings also go to the configured apprise targets (sinks.alerts, its own
    thread); the run drains them within alerts.drain_timeout and reports in summary["alerts"].
    """
    if workers > 1 and len(paths) > 1:
        from .replay_workers import run_parallel_replay

        return run_parallel_replay(paths, config, db_path, workers, progress, extra_sinks, alert)
    warnings: list[str] = []
    detector = build_detector(config)
    alert_sink = build_alert_sink(config, detector, db_path) if alert else None
    try:
        readers = open_captures(paths, warnings)
    except UsageError:
        if alert_sink is not None:
            alert_sink.close(0)
        raise
    if alert_sink is not None:
        extra_sinks = (*extra_sinks, alert_sink)
    key = load_or_create_key(config.key_path())
    sink = SqliteSink(db_path)
    collector = FindingCollector()
    engine = Engine(config.engine, key, detector, Tee(sink, collector, *extra_sinks))
    total = sum(r.size for r in readers)
    done_before = 0
    started = time.monotonic()
    interrupted = False
    try:
        for reader in readers:
            with reader:
                if progress is None:
                    engine.run(reader)
                else:
                    engine.run(_reporting(reader, progress, done_before, total, started))
                done_before += reader.size
    except KeyboardInterrupt:
        interrupted = True
    finally:
        engine.finish()
        sink.close()
        alerts = alert_sink.close(config.alerts.drain_timeout) if alert_sink else None
    for message in warnings:
        log.warning("%s", message)
    summary = engine.summary()
    summary.update(files=list(paths), database=str(db_path), warnings=warnings,
                   seconds=round(time.monotonic() - started, 3), interrupted=interrupted)
    if alerts is not None:
        summary["alerts"] = alerts
    return summary, collector.findings
