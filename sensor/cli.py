"""Command line: argv → config → one of replay, events, rules. The only reader of argv.

Exit codes: 0 ok (findings are not failures), 1 runtime failure, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from . import __version__
from .config import SensorConfig, load_config
from .detect.rules import load_rules
from .records import Finding
from .replay import UsageError, run_replay
from .yamlfile import ConfigError

log = logging.getLogger("registry-sensor")
MAX_PRINTED_FINDINGS = 200


def _fmt_ts(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def parse_since(text: str, now: float | None = None) -> float:
    """`--since`: epoch seconds, an ISO-8601 time, or a duration back from now (30m, 2h, 7d)."""
    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * units[text[-1]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r}: expected epoch seconds, an ISO time "
                         f"(2026-12-01T10:00Z) or a duration (30m, 2h, 7d)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


# -- progress ---------------------------------------------------------------------------------

class ProgressBar:
    """bytes read, rate and time left, on one terminal line (stderr)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else 0.0
        frac = done / total if total else 1.0
        width = 30
        bar = "#" * int(frac * width)
        self.stream.write(f"\r[{bar:<{width}}] {done / 1e6:,.1f}/{total / 1e6:,.1f} MB "
                          f"{rate / 1e6:,.1f} MB/s {left:,.0f}s left ")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()


# -- replay -----------------------------------------------------------------------------------

def _finding_line(f: Finding) -> str:
    who = f.username if f.username else "-"
    count = f" x{f.count}" if f.count > 1 else ""
    return (f"{_fmt_ts(f.ts)}  {f.severity:<8} {f.rule:<24} {f.src_ip} -> "
            f"{f.dest_ip}:{f.dest_port}  user={who}  repo={f.repository or '-'}{count}  "
            f"{f.title}")


def cmd_replay(args: argparse.Namespace, config: SensorConfig) -> int:
    db_path = config.database_path(args.db)
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.json else None
    summary, findings = run_replay(args.pcap, config, db_path, progress=bar, alert=args.alert,
                                   workers=args.workers)
    if bar is not None:
        bar.clear()
    if args.json:
        json.dump(summary, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    out = sys.stdout
    if findings:
        out.write(f"findings ({len(findings)}):\n")
        for f in sorted(findings, key=lambda f: f.ts)[:MAX_PRINTED_FINDINGS]:
            out.write("  " + _finding_line(f) + "\n")
        if len(findings) > MAX_PRINTED_FINDINGS:
            out.write(f"  ... {len(findings) - MAX_PRINTED_FINDINGS} more: "
                      f"registry-sensor events --db {db_path}\n")
    else:
        out.write("findings: none\n")
    out.write(f"files:        {len(summary['files'])} ({summary['bytes']:,} bytes of packets)"
              + (f", {summary['workers']} workers\n" if "workers" in summary else "\n"))
    out.write(f"packets:      {summary['packets']:,} ({summary['tcp_packets']:,} TCP)\n")
    skipped = summary["skipped"]
    if skipped:
        out.write("skipped:      " + ", ".join(f"{k} {v:,}" for k, v in skipped.items()) + "\n")
    out.write(f"flows:        {summary['flows']:,}\n")
    out.write(f"transactions: {summary['transactions']:,}\n")
    by_rule = summary["findings"]
    out.write("findings:     " + (", ".join(f"{k} {v}" for k, v in by_rule.items()) or "none")
              + "\n")
    anomalies = summary["anomalies"]
    out.write("anomalies:    " + (", ".join(f"{k} {v}" for k, v in anomalies.items()) or "none")
              + "\n")
    out.write(f"database:     {db_path}\n")
    if "alerts" in summary:
        _write_alert_summary(out, summary["alerts"])
    if summary["interrupted"]:
        out.write("interrupted:  the replay was stopped; what was read before is recorded\n")
    return 130 if summary["interrupted"] else 0


def _write_alert_summary(out, alerts: dict) -> None:
    """The alerts part of a replay summary: per target delivered/failed/retried/dropped."""
    dropped = alerts["queue_dropped"]
    out.write(f"alerts:       {alerts['findings_accepted']} findings to alert on"
              + (", queue dropped " + ", ".join(f"{n} {s}" for s, n in dropped.items())
                 if dropped else "")
              + f", drained in {alerts['drain_seconds']} s\n")
    from .sinks.alerts import describe_counts

    for name, t in alerts["targets"].items():
        out.write(f"  {name} ({t['target']}): {describe_counts(t)}"
                  + (f"; last error: {t['last_error']}" if t["last_error"] else "") + "\n")


# -- alert ------------------------------------------------------------------------------------

def cmd_alert(args: argparse.Namespace, config: SensorConfig) -> int:
    """`alert test`: one test message to each target; 0 all delivered, 1 any failed."""
    from .sinks.alerts import send_test

    if not config.alerts.targets:
        raise UsageError(f"no alert targets configured (alerts.targets in {config.source})")
    try:
        results = send_test(config.alerts)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    rows = [[target.name, target.display, f"{r.seconds:.2f}s",
             "delivered" if r.ok else f"failed: {r.reason}"] for target, r in results]
    _print_table(("target", "where", "time", "result"), rows)
    return 0 if all(r.ok for _, r in results) else 1


# -- events -----------------------------------------------------------------------------------

EVENT_TABLE_COLUMNS = ("ts", "severity", "rule", "src_ip", "dest_ip", "dest_port", "username",
                       "repository", "count", "title")


def cmd_events(args: argparse.Namespace, config: SensorConfig) -> int:
    db_path = config.database_path(args.db)
    if not db_path.exists():
        raise UsageError(f"{db_path}: no database (run registry-sensor replay or live first)")
    where, params = [], []
    if args.since:
        where.append("ts >= ?")
        params.append(parse_since(args.since))
    if args.rule:
        where.append(f"rule IN ({','.join('?' * len(args.rule))})")
        params.extend(args.rule)
    if args.severity:
        from .records import SEVERITIES, SEVERITY_RANK

        allowed = [s for s in SEVERITIES if SEVERITY_RANK[s] >= SEVERITY_RANK[args.severity]]
        where.append(f"severity IN ({','.join('?' * len(allowed))})")
        params.extend(allowed)
    sql = "SELECT * FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts, rowid LIMIT ?"
    params.append(args.limit)
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute(sql, params)]
        conn.close()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"{db_path}: cannot read events: {exc}") from None
    if args.format == "json":
        for row in rows:
            row["details"] = json.loads(row["details"]) if row.get("details") else {}
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    table = [[_fmt_ts(r["ts"]) if c == "ts" else ("" if r.get(c) is None else str(r[c]))
              for c in EVENT_TABLE_COLUMNS] for r in rows]
    _print_table(EVENT_TABLE_COLUMNS, table)
    return 0


def _print_table(headers: Sequence[str], rows: list[list[str]]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    widths[-1] = len(headers[-1])  # the last column is not padded
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    sys.stdout.write(line.rstrip() + "\n")
    for row in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                         + "\n")
    if not rows:
        sys.stdout.write("(no events)\n")


# -- rules ------------------------------------------------------------------------------------

def cmd_rules(args: argparse.Namespace, config: SensorConfig) -> int:
    paths = [Path(p) for p in args.paths] if getattr(args, "paths", None) else config.rule_paths
    rules = load_rules(paths, config.networks, config.rule_overrides)
    if args.rules_command == "check":
        sys.stdout.write(f"ok: {len(rules)} rules in {', '.join(str(p) for p in paths)}\n")
        return 0
    rows = [[r.id, r.severity, "enabled" if r.enabled else "disabled", r.source, r.title]
            for r in rules]
    _print_table(("id", "severity", "status", "source", "title"), rows)
    return 0


# -- main -------------------------------------------------------------------------------------

def _workers(text: str) -> int:
    from .config import MAX_WORKERS

    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of processes, 1 to {MAX_WORKERS}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-sensor",
        description="Passive monitor for Docker Registry traffic: replay captures, record "
                    "registry API transactions and findings in SQLite.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    replay = sub.add_parser("replay", help="replay pcap/pcapng files")
    replay.add_argument("pcap", nargs="+", metavar="PCAP", help="capture files, read in order")
    replay.add_argument("--db", help="SQLite database (default: under the state directory)")
    replay.add_argument("--config", help="YAML configuration file")
    replay.add_argument("--json", action="store_true", help="print the summary as JSON")
    replay.add_argument("--alert", action="store_true",
                        help="also send findings to the configured alert targets (off by "
                             "default: a forensic replay is quiet)")
    replay.add_argument("--workers", type=_workers, default=1, metavar="N",
                        help="replay the files in parallel in N processes, each file through "
                             "its own engine: a connection that continues into the next "
                             "rotated file is split in two, and rule thresholds count within "
                             "a file; --alert alerts from the parent, once for the run "
                             "(default 1: one engine reads the files in order)")

    events = sub.add_parser("events", help="show recorded findings")
    events.add_argument("--db", help="SQLite database (default: under the state directory)")
    events.add_argument("--config", help="YAML configuration file")
    events.add_argument("--since", help="epoch seconds, ISO time, or a duration back (2h, 7d)")
    events.add_argument("--rule", action="append", help="only this rule id (repeatable)")
    events.add_argument("--severity", choices=("info", "low", "medium", "high", "critical"),
                        help="only this severity and above")
    events.add_argument("--format", choices=("table", "json"), default="table")
    events.add_argument("--limit", type=int, default=1000, help="at most this many (1000)")

    rules = sub.add_parser("rules", help="check or list detection rules")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    check = rules_sub.add_parser("check", help="validate rule files")
    check.add_argument("paths", nargs="*", metavar="PATH", help="rule files or directories")
    check.add_argument("--config", help="YAML configuration file")
    listing = rules_sub.add_parser("list", help="show the rules that are loaded")
    listing.add_argument("--config", help="YAML configuration file")

    alert = sub.add_parser("alert", help="alert targets (apprise URLs)")
    alert_sub = alert.add_subparsers(dest="alert_command", required=True, metavar="ACTION")
    alert_test = alert_sub.add_parser("test", help="send a test message to every target")
    alert_test.add_argument("--config", help="YAML configuration file")

    live = sub.add_parser("live", help="capture from network interfaces (AF_PACKET) and record")
    live.add_argument("--interface", "-i", action="append", metavar="IF",
                      help="capture interface, repeatable (default: live.interfaces)")
    live.add_argument("--config", help="YAML configuration file (reloaded on SIGHUP)")
    live.add_argument("--db", help="SQLite database (default: under the state directory)")
    live.add_argument("--capture", choices=("ring", "recv"),
                      help="capture mechanism (default: live.capture, ring)")
    live.add_argument("--workers", type=_workers, metavar="N",
                      help="capture processes, flows spread over them by the kernel "
                           "(PACKET_FANOUT_HASH); rule windows are then per worker "
                           "(default: live.workers, 1)")

    status = sub.add_parser("status", help="show the live sensor's latest capture statistics")
    status.add_argument("--db", help="SQLite database (default: under the state directory)")
    status.add_argument("--config", help="YAML configuration file")
    status.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


# -- live and status --------------------------------------------------------------------------

def cmd_live(args: argparse.Namespace, config: SensorConfig) -> int:
    from .daemon import run_live

    return run_live(config, args.config, args.interface or (), args.db, args.capture,
                    workers=args.workers)


def cmd_status(args: argparse.Namespace, config: SensorConfig) -> int:
    db_path = config.database_path(args.db)
    if not db_path.exists():
        raise UsageError(f"{db_path}: no database (run registry-sensor live first)")
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        by_worker = any(r[1] == "worker" for r in conn.execute("PRAGMA table_info(stats)"))
        same_worker = "AND s2.worker IS stats.worker " if by_worker else ""
        rows = [dict(r) for r in conn.execute(
            "SELECT * FROM stats WHERE started = (SELECT max(started) FROM stats) "
            "AND ts = (SELECT max(ts) FROM stats s2 WHERE s2.interface = stats.interface "
            f"{same_worker}AND s2.started = stats.started) ORDER BY interface"
            + (", worker" if by_worker else ""))]
        loss = conn.execute("SELECT ts, title FROM events WHERE rule = 'capture-loss' "
                            "ORDER BY ts DESC LIMIT 1").fetchone()
        conn.close()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"{db_path}: cannot read stats: {exc}") from None
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not rows:
        sys.stdout.write(f"{db_path}: no stats yet (registry-sensor live writes them)\n")
        return 0
    out = sys.stdout
    first = dict(rows[0])
    workers = {r.get("worker"): r for r in rows}  # with live.workers > 1, counters per worker
    for key in ("packets", "bytes", "flows_open", "flows", "transactions", "findings",
                "anomalies", "rss_bytes"):
        first[key] = sum(r[key] or 0 for r in workers.values())
    first["ts"] = max(r["ts"] for r in rows)
    age = time.time() - first["ts"]
    out.write(f"sensor started {_fmt_ts(first['started'])}, last stats {_fmt_ts(first['ts'])} "
              f"({age:,.0f} s ago)\n")
    for r in rows:
        received, dropped = r["kernel_received"] or 0, r["kernel_dropped"] or 0
        share = f" ({100 * dropped / received:.2f}%)" if received else ""
        worker = "" if r.get("worker") is None else f" (worker {r['worker']})"
        out.write(f"{r['interface']}{worker}: {r['mechanism']} capture, kernel received "
                  f"{received:,}, "
                  f"dropped {dropped:,}{share}\n")
    out.write(f"packets:      {first['packets']:,} ({first['bytes']:,} bytes)\n")
    out.write(f"flows:        {first['flows_open']:,} open, {first['flows']:,} in all\n")
    out.write(f"transactions: {first['transactions']:,}\n")
    out.write(f"findings:     {first['findings']:,}\n")
    out.write(f"anomalies:    {first['anomalies']:,}\n")
    out.write(f"memory:       {first['rss_bytes'] / 1e6:,.1f} MB resident"
              + (f" ({len(workers)} workers)\n" if len(workers) > 1 else "\n"))
    if loss is not None:
        out.write(f"last capture loss: {_fmt_ts(loss['ts'])} {loss['title']}\n")
    return 0


COMMANDS = {"replay": cmd_replay, "events": cmd_events, "rules": cmd_rules, "live": cmd_live,
            "status": cmd_status, "alert": cmd_alert}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="registry-sensor: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        config = load_config(getattr(args, "config", None))
        return COMMANDS[args.command](args, config)
    except (ConfigError, UsageError) as exc:
        sys.stderr.write(f"registry-sensor: error: {exc}\n")
        return 2
    except BrokenPipeError:
        return 0
    except OSError as exc:
        sys.stderr.write(f"registry-sensor: error: {exc.strerror or exc}"
                         f"{': ' + str(exc.filename) if exc.filename else ''}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
