"""The forensic record: transactions, events and anomalies in SQLite (sqlite-utils, WAL mode).

Rows are batched and committed together; the file (and its WAL) is created with mode 0600.
Column names are an interface: people write queries and dashboards against them.

Several processes may write to one database (`live --workers`, `replay --workers`): the schema is
created once, by the parent, before they start (`open_database`); each writer commits a batch
in one `BEGIN IMMEDIATE` transaction, so it waits for the write lock (busy timeout) instead of
failing when a read snapshot goes stale, and retries a batch that still met SQLITE_BUSY.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

# sqlite-utils imports numpy when it is installed, only to store numpy values (the sensor has
# none); numpy's OpenBLAS then starts a thread (the live supervisor forks its workers after
# this import) and calls mbind(2), which the unit's SystemCallFilter refuses. So not here.
_numpy_blocked = "numpy" not in sys.modules
if _numpy_blocked:
    sys.modules["numpy"] = None  # type: ignore[assignment]  # `import numpy` -> ImportError
try:
    import sqlite_utils
finally:
    if _numpy_blocked:
        del sys.modules["numpy"]

from ..records import Anomaly, Finding, Transaction  # noqa: E402

TRANSACTION_COLUMNS: dict[str, type] = {
    "ts": float, "flow_id": int, "community_id": str, "src_ip": str, "src_port": int,
    "dest_ip": str, "dest_port": int, "transport": str, "method": str, "uri": str, "host": str,
    "user_agent": str, "status": int, "auth_scheme": str, "username": str, "operation": str,
    "repository": str, "reference": str, "digest": str, "request_body_bytes": int,
    "response_body_bytes": int, "partial": int,
    # beyond the interface
    "action": str, "credential_fingerprint": str, "mount_from": str, "content_type": str,
    "response_ts": float, "tls_sni": str, "tls_version": str, "api_version": str,
}
EVENT_COLUMNS: dict[str, type] = {
    "ts": float, "rule": str, "severity": str, "title": str, "src_ip": str, "dest_ip": str,
    "dest_port": int, "community_id": str, "username": str, "repository": str, "count": int,
    "details": str,
    "first_ts": float,
}
ANOMALY_COLUMNS: dict[str, type] = {
    "ts": float, "kind": str, "detail": str, "flow_id": int, "community_id": str,
    "src_ip": str, "src_port": int, "dest_ip": str, "dest_port": int,
}
# One row per capture interface per stats interval of `registry-sensor live`. The kernel
# counters and the sensor's own are totals since `started` (the sensor's start time).
STATS_COLUMNS: dict[str, type] = {
    "ts": float, "started": float, "interface": str, "mechanism": str,
    "kernel_received": int, "kernel_dropped": int,
    "packets": int, "bytes": int, "flows_open": int, "flows": int, "transactions": int,
    "findings": int, "anomalies": int, "rss_bytes": int,
    "worker": int,  # with live.workers > 1: the worker process (counters are per worker)
}
BUSY_TIMEOUT_MS = 30_000  # how long a writer waits for another one's commit
BUSY_RETRIES = 5  # then a batch that met SQLITE_BUSY anyway is tried again this many times


def transaction_row(t: Transaction) -> dict[str, Any]:
    key = t.flow.key
    op = t.op
    return {
        "ts": t.ts, "flow_id": t.flow.flow_id, "community_id": t.flow.community_id,
        "src_ip": key.src_ip, "src_port": key.src_port, "dest_ip": key.dest_ip,
        "dest_port": key.dest_port, "transport": t.transport, "method": t.method, "uri": t.uri,
        "host": t.host, "user_agent": t.user_agent, "status": t.status,
        "auth_scheme": t.credential.scheme, "username": t.credential.username,
        "operation": op.operation if op else None, "repository": op.repository if op else None,
        "reference": op.reference if op else None, "digest": op.digest if op else None,
        "request_body_bytes": t.request_body_bytes, "response_body_bytes": t.response_body_bytes,
        "partial": int(t.partial), "action": op.action if op else None,
        "credential_fingerprint": t.credential.fingerprint,
        "mount_from": op.mount_from if op else None, "content_type": t.content_type,
        "response_ts": t.response_ts, "tls_sni": t.tls_sni, "tls_version": t.tls_version,
        "api_version": t.api_version,
    }


def finding_row(f: Finding) -> dict[str, Any]:
    return {
        "ts": f.ts, "rule": f.rule, "severity": f.severity, "title": f.title,
        "src_ip": f.src_ip, "dest_ip": f.dest_ip, "dest_port": f.dest_port,
        "community_id": f.community_id, "username": f.username, "repository": f.repository,
        "count": f.count, "details": json.dumps(f.details, sort_keys=True, default=str),
        "first_ts": f.first_ts,
    }


def anomaly_row(a: Anomaly) -> dict[str, Any]:
    row: dict[str, Any] = {"ts": a.ts, "kind": a.kind, "detail": a.detail}
    if a.flow is not None:
        key = a.flow.key
        row.update(flow_id=a.flow.flow_id, community_id=a.flow.community_id,
                   src_ip=key.src_ip, src_port=key.src_port, dest_ip=key.dest_ip,
                   dest_port=key.dest_port)
    return row


def create_private_file(path: Path) -> None:
    """Make sure `path` exists with mode 0600 (an existing file is tightened, not replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)


def open_database(path: Path, create: bool = True) -> sqlite_utils.Database:
    """The database at `path`, created private, in WAL mode, with the tables in place.
    With create=False (a worker: its parent made the schema) it is only opened."""
    if not create:
        db = sqlite_utils.Database(path)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return db
    create_private_file(path)
    old_umask = os.umask(0o077)  # the -wal and -shm files follow the database's mode too
    try:
        db = sqlite_utils.Database(path)
        db.enable_wal()
    finally:
        os.umask(old_umask)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    for name, columns in (("transactions", TRANSACTION_COLUMNS), ("events", EVENT_COLUMNS),
                          ("anomalies", ANOMALY_COLUMNS), ("stats", STATS_COLUMNS)):
        table = db.table(name)
        if not table.exists():
            table.create(columns)
        else:
            missing = {c: t for c, t in columns.items() if c not in table.columns_dict}
            for column, kind in missing.items():
                table.add_column(column, kind)
    for name, cols in (("transactions", ["ts"]), ("transactions", ["community_id"]),
                       ("events", ["ts"]), ("events", ["rule"]), ("anomalies", ["ts"]),
                       ("stats", ["ts"])):
        db.table(name).create_index(cols, if_not_exists=True)
    return db


class SqliteSink:
    """Receives records from the engine and writes them in batches."""

    def __init__(self, path: Path, batch: int = 1000, create: bool = True) -> None:
        self.path = path
        self.db = open_database(path, create)
        self.batch = batch
        self.pending: dict[str, list[dict[str, Any]]] = {
            "transactions": [], "events": [], "anomalies": [], "stats": []}
        self.pending_rows = 0
        self.written = 0

    def transaction(self, txn: Transaction) -> None:
        self._add("transactions", transaction_row(txn))

    def finding(self, finding: Finding) -> None:
        self._add("events", finding_row(finding))

    def anomaly(self, anomaly: Anomaly) -> None:
        self._add("anomalies", anomaly_row(anomaly))

    def stats(self, row: dict[str, Any]) -> None:
        """A capture-statistics row (STATS_COLUMNS), committed with the next flush."""
        self._add("stats", row)

    def _add(self, table: str, row: dict[str, Any]) -> None:
        self.pending[table].append(row)
        self.pending_rows += 1
        if self.pending_rows >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Commit every pending row in one transaction."""
        if not self.pending_rows:
            return
        conn = self.db.conn
        for attempt in range(BUSY_RETRIES + 1):
            try:
                conn.execute("BEGIN IMMEDIATE")  # the write lock now, waiting for it if need be
                try:
                    for table, rows in self.pending.items():
                        if rows:
                            self.db.table(table).insert_all(rows, batch_size=500)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                break
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or attempt == BUSY_RETRIES:
                    raise
                time.sleep(0.05 * 2 ** attempt)
        for rows in self.pending.values():
            rows.clear()
        self.written += self.pending_rows
        self.pending_rows = 0

    def close(self) -> None:
        self.flush()
        self.db.close()
