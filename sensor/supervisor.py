"""`registry-sensor live --workers N`: N capture processes under one supervisor.

Start-up, in order (the supervisor is the process systemd started, its MAINPID):
1. For every interface, N AF_PACKET sockets join one PACKET_FANOUT group in hash mode: the
   kernel sends each frame to one member, chosen by a flow hash that is the same for both
   directions of a connection, so each worker sees whole TCP connections. The sockets accept
   nothing until the whole group has formed (no frame is seen twice at start-up).
2. Privileges are dropped (as in `live` with one process); the fingerprint key and the
   database's schema are created once, by the supervisor.
3. N workers are forked. Worker k keeps socket k of every interface and closes the others; it
   runs the same packet loop as a single-process sensor (daemon.serve): its own engine,
   detector, alert sink and SQLite connection to the one database (WAL, busy timeout, retried
   batches: sinks/sqlite.py), and `stats` rows with `worker` = k.
4. The supervisor speaks to systemd: READY=1 once every worker is capturing; WATCHDOG=1 only
   while every worker is alive and its packet loop keeps turning (each worker sends a heartbeat
   over a datagram socket from that loop); STATUS= with every worker's counters.

Signals: SIGTERM/SIGINT are forwarded to the workers, which drain, close their flows, flush and
exit; the supervisor waits for them (bounded), and exits 0 only if every worker did. SIGHUP is
forwarded: every worker reloads configuration and rules (RELOADING=1, then READY=1 once all of
them are done). A worker that exits on its own (a bug, the interface gone) stops the others and
the supervisor exits 1: systemd's Restart=on-failure starts everything again, because the
kernel would otherwise re-spread that worker's flows over the others mid-connection.

What differs from one process: rule windows (thresholds, suppression) and alert noise control
are per worker, since one client's connections hash to different workers; live.buffer_size is
per interface per worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .capture.afpacket import AfPacketSource, CaptureError
from .config import SensorConfig
from .daemon import (
    STOP_DEADLINE,
    Notifier,
    SignalFlags,
    _preload,
    drop_privileges,
    serve,
    start_failure,
)
from .replay import UsageError
from .sinks.sqlite import SqliteSink, open_database
from .state import load_or_create_key

log = logging.getLogger("registry-sensor")
PR_SET_PDEATHSIG = 1
TICK = 0.25  # seconds: the supervisor's loop comes round at least this often
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class WorkerLink:
    """A worker's notifier: sd_notify's words, sent to the supervisor instead of systemd.

    Signals stay blocked in a new worker until its packet loop sends its first message
    (READY=1): by then the loop's handlers are in place, and a SIGTERM that came during
    start-up is delivered to them."""

    def __init__(self, sock: socket.socket, heartbeat: float | None) -> None:
        self.sock = sock
        self.watchdog_interval = heartbeat  # the loop sends WATCHDOG=1 this often
        self._unblocked = False

    def send(self, *lines: str) -> None:
        with contextlib.suppress(OSError):  # the supervisor is gone or not reading
            self.sock.send("\n".join(lines).encode())
        if not self._unblocked:
            self._unblocked = True
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)

    def close(self) -> None:
        self.sock.close()


@dataclass
class _Worker:
    n: int
    pid: int
    sock: socket.socket
    last_beat: float
    ready: bool = False
    status: str = "starting"
    exit_code: int | None = None
    reloading: bool = False


def run_supervised(config: SensorConfig, config_path: str | None, names: list[str],
                   db_path: Path, key_path: Path, detector: Any, mechanism: str | None,
                   workers: int) -> int:
    """`live` with `workers` processes. Returns the exit code."""
    live = config.live
    notifier = Notifier()
    per_worker: list[list[AfPacketSource]] = [[] for _ in range(workers)]
    opened: list[AfPacketSource] = []
    try:
        for name in names:
            group = None
            for n in range(workers):
                src = AfPacketSource(name, config.engine.ports, promiscuous=live.promiscuous,
                                     buffer_bytes=live.buffer_size,
                                     mechanism=mechanism or live.capture, snaplen=live.snaplen,
                                     paused=True)
                opened.append(src)
                per_worker[n].append(src)
                group = src.join_fanout(group)
            for n in range(workers):  # the group is whole: now the real filter, everywhere
                per_worker[n][-1].set_ports(config.engine.ports)
            src = per_worker[0][-1]
            log.info("%s: %s capture, %d workers in fanout group %d (flow hash), %d-byte %s "
                     "each, promiscuous %s", name, src.mechanism, workers, group, src.rcvbuf,
                     "ring" if src.mechanism == "ring" else "receive buffer",
                     "on" if live.promiscuous else "off")
        if os.geteuid() == 0:
            _preload()
            drop_privileges(live.user, (db_path.parent, key_path.parent))
        load_or_create_key(key_path)  # once, here: the workers read it
        open_database(db_path).close()  # the schema, once, before any worker writes
    except (CaptureError, UsageError, OSError) as exc:
        raise start_failure(exc, opened) from None

    started = time.time()
    ping = notifier.watchdog_interval if live.watchdog else None
    heartbeat = min(1.0, ping / 2) if ping else (1.0 if live.watchdog else None)
    log.info("database %s; starting %d workers", db_path, workers)
    pool: list[_Worker] = []
    me = os.getpid()
    for n in range(workers):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)  # the child starts with them blocked
        pid = os.fork()
        if pid == 0:  # the worker
            mine.close()
            for w in pool:
                w.sock.close()
            notifier.close()
            keep = per_worker[n]
            for src in opened:
                if src not in keep:
                    src.close()
            rc = _worker_main(n, config, config_path, keep, detector, key_path, db_path,
                              WorkerLink(theirs, heartbeat), started, me)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        theirs.close()
        mine.setblocking(False)
        pool.append(_Worker(n, pid, mine, last_beat=time.monotonic()))
    for src in opened:  # the workers hold the sockets now
        src.close()
    return Supervisor(pool, notifier, ping, live.stats_interval).run()


def _worker_main(n: int, config: SensorConfig, config_path: str | None, sources: list,
                 detector: Any, key_path: Path, db_path: Path, link: WorkerLink,
                 started: float, supervisor: int) -> int:
    """A worker's life after the fork: the packet loop of a one-process sensor."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the supervisor dies: stop too
        if os.getppid() != supervisor:  # it died before the line above
            return 1
        for handler in logging.getLogger().handlers:
            fmt = getattr(handler.formatter, "_fmt", None) or "%(message)s"
            handler.setFormatter(logging.Formatter(
                fmt.replace("registry-sensor:", f"registry-sensor[worker {n}]:", 1)
                if "registry-sensor:" in fmt else f"[worker {n}] {fmt}"))
        key = load_or_create_key(key_path)
        sink = SqliteSink(db_path, create=False)
        return serve(config, config_path, sources, detector, key, sink, db_path, link,
                     worker=n, started=started)
    except UsageError as exc:
        log.error("%s", exc)
        return 2
    except BaseException:
        log.exception("worker %d failed", n)
        return 1


class Supervisor(SignalFlags):
    """The supervisor's loop: worker messages, exits, signals, sd_notify."""

    def __init__(self, pool: list[_Worker], notifier: Notifier, ping: float | None,
                 status_every: float) -> None:
        self.pool = pool
        self.notifier = notifier
        self.ping = ping  # seconds between WATCHDOG=1 (None: no watchdog)
        self.status_every = status_every
        self.stop_reason: str | None = None
        self.reload_requested = False
        self.rc = 0
        self.ready_sent = False
        self.reloading = False

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        for s in (wake_r, wake_w):
            s.setblocking(False)
        old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the poll
        try:
            self._loop(wake_r)
        finally:
            self._stop_all(signal.SIGTERM)
            self._reap(block_until=time.monotonic() + STOP_DEADLINE + 5)
            self._stop_all(signal.SIGKILL)
            self._reap(block_until=time.monotonic() + 5)
            signal.set_wakeup_fd(old_fd)
            wake_r.close()
            wake_w.close()
            for w in self.pool:
                w.sock.close()
            self.notifier.close()
        codes = {w.n: w.exit_code for w in self.pool}
        if any(c != 0 for c in codes.values()):
            self.rc = 1
        log.info("stopped (%s): worker exit codes %s", self.stop_reason,
                 ", ".join(f"{n}: {c}" for n, c in codes.items()))
        return self.rc

    def _loop(self, wake_r: socket.socket) -> None:
        poller = select.poll()
        poller.register(wake_r.fileno(), select.POLLIN)
        by_fd = {}
        for w in self.pool:
            poller.register(w.sock.fileno(), select.POLLIN)
            by_fd[w.sock.fileno()] = w
        next_ping = time.monotonic()
        next_status = time.monotonic() + self.status_every
        while True:
            with contextlib.suppress(InterruptedError):
                poller.poll(int(TICK * 1000))
            try:
                while wake_r.recv(64):
                    pass
            except BlockingIOError:
                pass
            now = time.monotonic()
            for w in self.pool:
                self._read(w, now)
            self._reap()
            dead = [w for w in self.pool if w.exit_code is not None]
            if dead and self.stop_reason is None:
                for w in dead:
                    log.error("worker %d (pid %d) exited with %s: stopping the others (its "
                              "flows cannot move to them mid-connection)", w.n, w.pid,
                              w.exit_code)
                self.stop_reason = f"worker {dead[0].n} exited"
                self.rc = 1
            if self.stop_reason is not None:
                return
            if self.reload_requested:
                self.reload_requested = False
                self.reloading = True
                self.notifier.send("RELOADING=1",
                                   f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
                for w in self.pool:
                    w.reloading = True
                    _kill(w.pid, signal.SIGHUP)
            if not self.ready_sent and all(w.ready for w in self.pool):
                self.ready_sent = True
                self.notifier.send("READY=1", "STATUS=" + self.status_line())
                log.info("all %d workers capturing", len(self.pool))
            if self.reloading and not any(w.reloading for w in self.pool):
                self.reloading = False
                self.notifier.send("READY=1", "STATUS=reloaded; " + self.status_line())
            if (self.ping and now >= next_ping and self.ready_sent
                    and all(now - w.last_beat <= self.ping for w in self.pool)):
                self.notifier.send("WATCHDOG=1")  # only while every worker's loop turns
                next_ping = now + self.ping
            if now >= next_status:
                next_status = now + self.status_every
                self.notifier.send("STATUS=" + self.status_line())

    def _read(self, w: _Worker, now: float) -> None:
        while True:
            try:
                data = w.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            w.last_beat = now
            for line in data.decode(errors="replace").splitlines():
                if line == "READY=1":
                    w.ready = True
                    w.reloading = False
                elif line.startswith("STATUS="):
                    w.status = line[7:]

    def status_line(self) -> str:
        alive = sum(1 for w in self.pool if w.exit_code is None)
        return (f"{alive}/{len(self.pool)} workers; "
                + "; ".join(f"worker {w.n}: {w.status}" for w in self.pool))

    def _stop_all(self, sig: int) -> None:
        if sig == signal.SIGTERM:
            self.notifier.send("STOPPING=1", f"STATUS=stopping ({self.stop_reason})")
        for w in self.pool:
            if w.exit_code is None:
                _kill(w.pid, sig)

    def _reap(self, block_until: float | None = None) -> None:
        """Collect the exit codes of workers that ended; with block_until, wait for all of
        them until then."""
        while True:
            for w in self.pool:
                if w.exit_code is not None:
                    continue
                try:
                    pid, status = os.waitpid(w.pid, os.WNOHANG)
                except ChildProcessError:
                    w.exit_code = -1
                    continue
                if pid:
                    w.exit_code = os.waitstatus_to_exitcode(status)
            if block_until is None or all(w.exit_code is not None for w in self.pool):
                return
            if time.monotonic() >= block_until:
                return
            time.sleep(0.02)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
