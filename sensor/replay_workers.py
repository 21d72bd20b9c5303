"""`registry-sensor replay --workers N`: capture files replayed in parallel by N processes.

Each file goes through an engine (and a detector) of its own, in whichever worker takes it next
(the biggest files first, so the last to finish is a small one); every worker writes to the one
database, whose schema the parent created before they started (sinks.sqlite: WAL, a busy
timeout, one IMMEDIATE transaction a batch). What differs from one process reading the files in
order (`--workers 1`, the default):
- a connection that continues from one rotated file into the next is two flows, each picked up
  mid-stream where it starts or ends in the middle of a file (`midstream-pickup` anomalies,
  partial transactions);
- thresholds and suppression count within one file, never across files.
The summary adds up the files' summaries; `per_file` has each file's own. With `--alert`, the
findings are alerted by the parent, one alert sink for the whole run (its noise control sees
every file), as each file's results come back. Ctrl-C stops every worker at its next batch of
packets; what was read is kept, and files not started yet are not read.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from .capture.pcap import open_capture
from .config import SensorConfig
from .detect.detector import Detector
from .engine import Engine
from .records import Finding
from .replay import (
    FindingCollector,
    Tee,
    UsageError,
    build_alert_sink,
    build_detector,
    open_captures,
)
from .sinks.sqlite import SqliteSink, open_database
from .state import load_or_create_key

log = logging.getLogger("registry-sensor")
CHUNK = 8192  # packets fed to the engine between looks at the stop flag and progress
_WAIT, _GO, _STOP = 0, 1, 2


def run_parallel_replay(paths: Sequence[str], config: SensorConfig, db_path: Path, workers: int,
                        progress: Callable[[int, int, float], None] | None = None,
                        extra_sinks: Sequence[Any] = (),
                        alert: bool = False) -> tuple[dict[str, Any], list[Finding]]:
    """Like replay.run_replay, with the files spread over `workers` processes. extra_sinks
    receive the findings only, in the parent, as each file's results arrive."""
    detector = build_detector(config)  # rule errors now, once, in the parent
    rules = detector.rules  # compiled predicates without state: each file's detector shares them
    if alert and not config.alerts.targets:
        build_alert_sink(config, detector, db_path)  # raises the usage error
    for reader in open_captures(paths, []):  # every file checked before any is read
        reader.close()
    sizes = [os.stat(p).st_size for p in paths]
    key = load_or_create_key(config.key_path())
    open_database(db_path).close()  # the schema, once, before the workers start
    ctx = multiprocessing.get_context("fork")
    order = sorted(range(len(paths)), key=lambda i: (-sizes[i], i))
    state = ctx.RawValue("b", _WAIT)
    next_task = ctx.Value("i", 0)
    done_bytes = ctx.RawArray("q", len(paths))
    procs = []
    conns: dict[multiprocessing.connection.Connection, int] = {}
    for n in range(min(workers, len(paths))):
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, name=f"registry-sensor replay worker {n}",
                           args=(n, paths, order, config, rules, key, db_path, state, next_task,
                                 done_bytes, sender), daemon=True)
        proc.start()
        sender.close()  # the worker holds the only writing end: EOF when it exits
        procs.append(proc)
        conns[receiver] = n
    alert_sink = None
    try:
        if alert:
            alert_sink = build_alert_sink(config, detector, db_path)  # after the forks: a thread
    except UsageError:
        state.value = _STOP
        for proc in procs:
            proc.join()
        raise
    state.value = _GO

    interrupted = False

    def on_sigint(_signum: int, _frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        state.value = _STOP

    sinks = (*extra_sinks, *([alert_sink] if alert_sink is not None else []))
    results: dict[int, dict[str, Any]] = {}
    errors: list[str] = []
    total = sum(sizes)
    started = time.monotonic()
    old_sigint = signal.signal(signal.SIGINT, on_sigint)
    try:
        while conns:
            for conn in multiprocessing.connection.wait(list(conns), timeout=0.2):
                try:
                    kind, *payload = conn.recv()
                except EOFError:
                    conn.close()
                    del conns[conn]
                    continue
                if kind == "file":
                    index, result = payload
                    results[index] = result
                    for finding in result["findings_list"]:
                        for sink in sinks:
                            sink.finding(finding)
                elif kind == "error":
                    errors.append(payload[0])
                    state.value = _STOP
            if progress is not None:
                progress(sum(done_bytes), total, time.monotonic() - started)
    finally:
        signal.signal(signal.SIGINT, old_sigint)
        for proc in procs:
            proc.join()
        alerts = alert_sink.close(config.alerts.drain_timeout) if alert_sink else None
    failed = [p for p in procs if p.exitcode != 0]
    if errors or failed:
        detail = errors[0] if errors else f"{failed[0].name} exited with {failed[0].exitcode}"
        raise RuntimeError(f"a replay worker failed:\n{detail}")

    summary, findings = _merge([results[i] for i in sorted(results)])
    warnings = summary["warnings"]
    for message in warnings:
        log.warning("%s", message)
    summary.update(files=list(paths), database=str(db_path), workers=len(procs),
                   seconds=round(time.monotonic() - started, 3),
                   interrupted=interrupted or summary["interrupted"])
    if alerts is not None:
        summary["alerts"] = alerts
    return summary, findings


def _merge(results: list[dict[str, Any]]) -> tuple[dict[str, Any], list[Finding]]:
    """The files' summaries added up; findings in file order."""
    out: dict[str, Any] = {"packets": 0, "bytes": 0, "tcp_packets": 0, "flows": 0,
                           "transactions": 0, "gaps": 0}
    counters: dict[str, Counter[str]] = {"skipped": Counter(), "findings": Counter(),
                                         "anomalies": Counter()}
    findings: list[Finding] = []
    warnings: list[str] = []
    per_file = []
    interrupted = False
    for r in results:
        s = r["summary"]
        for k in out:
            out[k] += s[k]
        for k, counter in counters.items():
            counter.update(s[k])
        findings.extend(r["findings_list"])
        warnings.extend(r["warnings"])
        interrupted |= r["interrupted"]
        per_file.append({"file": r["file"], "worker": r["worker"],
                         "seconds": r["seconds"], "interrupted": r["interrupted"], **s})
    out.update({k: dict(sorted(c.items())) for k, c in counters.items()})
    out.update(warnings=warnings, interrupted=interrupted, per_file=per_file)
    return out, findings


# -- the worker process -----------------------------------------------------------------------

def _worker(n: int, paths: Sequence[str], order: list[int], config: SensorConfig,
            rules: Sequence[Any], key: bytes, db_path: Path, state: Any, next_task: Any,
            done_bytes: Any, conn: multiprocessing.connection.Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides, through `state`
    try:
        while state.value == _WAIT:
            time.sleep(0.005)
        if state.value == _STOP:
            return
        sink = SqliteSink(db_path, create=False)
        try:
            while state.value != _STOP:
                with next_task.get_lock():
                    i = next_task.value
                    next_task.value += 1
                if i >= len(order):
                    break
                index = order[i]
                conn.send(("file", index, _replay_file(n, index, paths[index], config, rules,
                                                       key, sink, state, done_bytes)))
        finally:
            sink.close()
    except BaseException:
        conn.send(("error", f"worker {n}: {traceback.format_exc()}"))
    finally:
        conn.close()


def _replay_file(n: int, index: int, path: str, config: SensorConfig, rules: Sequence[Any],
                 key: bytes, sink: SqliteSink, state: Any, done_bytes: Any) -> dict[str, Any]:
    """One file through a fresh engine and detector; its rows committed before returning."""
    warnings: list[str] = []
    collector = FindingCollector()
    engine = Engine(config.engine, key, Detector(rules), Tee(sink, collector))
    started = time.monotonic()
    interrupted = False
    with open_capture(path, on_warning=warnings.append) as reader:
        frames = iter(reader)
        run = engine.run
        while True:
            before = engine.packets
            run(islice(frames, CHUNK))
            done_bytes[index] = reader.bytes_read
            if engine.packets - before < CHUNK:
                break
            if state.value == _STOP:
                interrupted = True
                break
        if not interrupted:
            done_bytes[index] = reader.size
    engine.finish()
    sink.flush()
    return {"file": path, "worker": n, "summary": engine.summary(),
            "findings_list": collector.findings, "warnings": warnings,
            "interrupted": interrupted, "seconds": round(time.monotonic() - started, 3)}
