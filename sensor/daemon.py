"""`registry-sensor live`: the long-running sensor on a span port.

Lifecycle, in order:
1. Configuration and rules are loaded (a problem is a one-line error, exit 2).
2. One AF_PACKET source per interface is opened: this is the only step that needs privilege
   (CAP_NET_RAW; CAP_NET_ADMIN lets the receive buffer pass net.core.rmem_max).
3. Started as root, the process drops to `live.user` (supplementary groups, real, effective and
   saved ids), which clears every capability: nothing privileged is kept. Started as that user
   with ambient capabilities (systemd's AmbientCapabilities=), there is nothing to drop.
4. The fingerprint key and the SQLite database are opened as the unprivileged user.
5. The packet loop: poll the sockets and a signal wake-up fd, feed every frame to the engine,
   and between batches run the timers: SQLite commit (flush_interval), kernel statistics and the
   `stats` table (stats_interval), idle-flow expiry on the wall clock (so memory stays flat when
   no packets come), systemd's watchdog. The watchdog is fed only from this loop: if the loop
   stalls, the pings stop and systemd restarts the service.

Signals: SIGTERM/SIGINT drain what the kernel has queued, close every open flow (its pending
transactions are recorded), flush the detector and SQLite, and exit 0 — bounded by
STOP_DEADLINE seconds. SIGHUP reloads the configuration and rules without touching the capture;
a broken file keeps the previous rules and logs why.

sd_notify is spoken directly over $NOTIFY_SOCKET (a unix datagram socket): READY=1 once
capturing, STATUS= with the counters, WATCHDOG=1, RELOADING=1/READY=1 around a reload, and
STOPPING=1.
"""

from __future__ import annotations

import logging
import os
import pwd
import select
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .capture.afpacket import AfPacketSource, CaptureError, KernelStats, wait_readable
from .config import SensorConfig, load_config
from .detect.rules import load_rules
from .engine import Engine
from .records import Anomaly, Finding, Transaction
from .replay import Tee, UsageError, build_alert_sink, build_detector
from .sinks.sqlite import SqliteSink
from .state import load_or_create_key
from .yamlfile import ConfigError

log = logging.getLogger("registry-sensor")

STOP_DEADLINE = 20.0  # seconds from SIGTERM to exit, whatever happens (TimeoutStopSec=30)
DRAIN_LIMIT = 2.0  # seconds spent reading what the kernel still holds at shutdown
MAX_POLL = 0.25  # seconds: the loop comes round at least this often
ROUND_LIMIT = 0.2  # seconds of reading per source before the timers get their turn
CAPTURE_LOSS_RULE = "capture-loss"
CAPTURE_LOSS_DESCRIPTION = (
    "The kernel dropped packets on the capture interface because the sensor did not read them "
    "in time: transactions and findings may be missing. Raise live.buffer_size, give the "
    "sensor a CPU of its own, or narrow the monitored ports.")
CAPTURE_LOSS_QUIET = 300.0  # seconds without drops before new drops are a new capture-loss


class Notifier:
    """sd_notify(3) over $NOTIFY_SOCKET, without libsystemd. Does nothing outside systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        self.sock: socket.socket | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # WatchdogSec=: ping at half the interval, if the watchdog is meant for this process
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6
        self._warned = False

    def send(self, *lines: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
                self._warned = True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class LogFindings:
    """Findings to the log (the journal, under systemd), one line each."""

    def transaction(self, txn: Transaction) -> None:
        pass

    def anomaly(self, anomaly: Anomaly) -> None:
        pass

    def finding(self, f: Finding) -> None:
        log.warning("finding %s (%s): %s%s", f.rule, f.severity, f.title,
                    f" x{f.count}" if f.count > 1 else "")


# -- privileges -------------------------------------------------------------------------------

def drop_privileges(user: str, keep_dirs: Sequence[Path] = ()) -> None:
    """Root → `user`: no supplementary groups, all ids switched, every capability gone.

    Directories in keep_dirs that do not exist yet are created (0700) for the user first, so
    the database and the key can be created after the drop.
    """
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"live.user {user!r}: no such user (create it, e.g. with "
                         f"systemd-sysusers, or set live.user)") from None
    if pw.pw_uid == 0:
        raise UsageError(f"live.user {user!r} is root: the sensor does not keep running as root")
    for directory in keep_dirs:
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o700)
            os.chown(directory, pw.pw_uid, pw.pw_gid)
    os.setgroups([])
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel would have to be broken
        raise RuntimeError("privileges could not be dropped")
    caps = _capabilities()
    if caps and any(int(caps.get(k, "0"), 16) for k in ("CapEff", "CapPrm", "CapAmb")):
        raise RuntimeError(f"capabilities survived the drop to {user}: {caps}")
    log.info("dropped privileges to %s (uid %d, gid %d); no capabilities kept", user,
             pw.pw_uid, pw.pw_gid)


def _capabilities() -> dict[str, str]:
    try:
        with open("/proc/self/status") as fh:
            return dict(line.rstrip("\n").split(":\t", 1) for line in fh
                        if line.startswith("Cap"))
    except OSError:
        return {}


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# -- the daemon -------------------------------------------------------------------------------

class SignalFlags:
    """What the signal handlers set, for the loop to act on: why to stop, whether to reload."""

    stop_reason: str | None = None
    reload_requested: bool = False

    def _on_stop(self, signum: int, _frame: Any) -> None:
        if self.stop_reason is None:
            self.stop_reason = signal.Signals(signum).name

    def _on_hup(self, _signum: int, _frame: Any) -> None:
        self.reload_requested = True


@dataclass
class _IfaceState:
    last: KernelStats
    dropping: bool = False
    last_drop: float | None = None  # wall-clock time of the last interval with drops


class LiveSensor(SignalFlags):
    """The packet loop and its housekeeping. `sources` need fileno(), read(), stats()."""

    def __init__(self, config: SensorConfig, config_path: str | None, sources: list,
                 engine: Engine, sink: Any, notifier: Notifier) -> None:
        self.config = config
        self.config_path = config_path
        self.sources = sources
        self.engine = engine
        self.sink = sink
        self.notifier = notifier
        self.started = time.time()
        self.stop_reason: str | None = None
        self.reload_requested = False
        self.ifaces = {src.interface: _IfaceState(KernelStats(0, 0)) for src in sources}
        self.stats_rows = 0
        self.worker: int | None = None  # with live.workers > 1: which worker (stats rows)
        self._wake_r: socket.socket | None = None
        self._error_logged: dict[str, float] = {}

    # -- signals ----------------------------------------------------------------------------

    def install_signals(self) -> None:
        self._wake_r, wake_w = socket.socketpair()
        self._wake_w = wake_w
        for s in (self._wake_r, wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        live = self.config.live
        engine = self.engine
        run = engine.run
        now = time.monotonic()
        next_flush = now + live.flush_interval
        next_stats = now + live.stats_interval
        expiry_every = max(1.0, min(30.0, engine.settings.idle_timeout / 10))
        next_expiry = now + expiry_every
        wd = self.notifier.watchdog_interval if live.watchdog else None
        next_wd = now
        extra = [self._wake_r.fileno()] if self._wake_r is not None else []
        self.notifier.send("READY=1", "STATUS=" + self.status_line())
        log.info("capturing on %s (%s), ports %s", ", ".join(self.ifaces),
                 self.sources[0].mechanism if self.sources else "-",
                 ",".join(str(p) for p in sorted(engine.settings.ports)))
        while self.stop_reason is None:
            now = time.monotonic()
            wait = min(MAX_POLL, next_flush - now, next_stats - now,
                       (next_wd - now) if wd else MAX_POLL)
            if not any(getattr(src, "ready", _never)() for src in self.sources):
                events = wait_readable(self.sources, extra, max(0.0, wait))
                if any(ev & _POLL_ERRORS for _, ev in events):
                    self._socket_errors(events)
            if self._wake_r is not None:
                try:
                    while self._wake_r.recv(64):
                        pass
                except BlockingIOError:
                    pass
            for src in self.sources:
                round_end = time.monotonic() + ROUND_LIMIT
                while True:
                    batch = src.read()
                    if not batch:
                        break
                    run(batch)
                    if time.monotonic() > round_end:
                        break
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
                live = self.config.live
                wd = self.notifier.watchdog_interval if live.watchdog else None
            now = time.monotonic()
            if wd and now >= next_wd:
                self.notifier.send("WATCHDOG=1")
                next_wd = now + wd
            if now >= next_expiry:
                engine.expire(max(time.time(), engine.last_ts))
                next_expiry = now + expiry_every
            if now >= next_stats:
                self.write_stats()
                self.notifier.send("STATUS=" + self.status_line())
                next_stats = now + live.stats_interval
            if now >= next_flush:
                self.sink.flush()
                next_flush = now + live.flush_interval

    def _socket_errors(self, events: list[tuple[int, int]]) -> None:
        """A source in error (link down, interface gone): clear it, log it, rate-limited;
        a vanished interface ends the run (exit 1; systemd restarts the service)."""
        bad = {fd for fd, ev in events if ev & _POLL_ERRORS}
        for src in self.sources:
            if src.fileno() not in bad or not hasattr(src, "check_error"):
                continue
            err = src.check_error()  # raises CaptureError when the interface is gone
            now = time.monotonic()
            if err and now - self._error_logged.get(src.interface, -60.0) >= 60:
                self._error_logged[src.interface] = now
                log.warning("%s: %s (capture goes on when it comes back)", src.interface,
                            os.strerror(err))
            elif not err:
                time.sleep(0.05)  # an error with no errno: do not spin

    def shutdown(self) -> None:
        """Drain the kernel's queue, close every flow, write everything, bounded in time."""
        self.notifier.send("STOPPING=1", f"STATUS=stopping ({self.stop_reason})")
        deadline = time.monotonic() + DRAIN_LIMIT
        drained = 0
        for src in self.sources:
            while time.monotonic() < deadline:
                try:
                    batch = src.read()
                except (OSError, CaptureError):
                    break
                if not batch:
                    break
                drained += len(batch)
                for ts, linktype, buf in batch:
                    self.engine.packet(ts, linktype, buf)
        self.engine.finish()
        self.write_stats()
        self.sink.close()
        for src in self.sources:
            src.close()
        summary = self.engine.summary()
        log.info("stopped (%s): %d packets (%d drained at exit), %d flows, %d transactions, "
                 "findings %s", self.stop_reason, summary["packets"], drained, summary["flows"],
                 summary["transactions"], summary["findings"] or "none")

    # -- housekeeping -----------------------------------------------------------------------

    def write_stats(self) -> None:
        now = time.time()
        e = self.engine
        common = {
            "ts": now, "started": self.started, "packets": e.packets, "bytes": e.bytes,
            "flows_open": e.open_flows, "flows": e.flows_seen, "transactions": e.transactions,
            "findings": sum(e.findings.values()), "anomalies": sum(e.anomalies.values()),
            "rss_bytes": rss_bytes(),
        }
        for src in self.sources:
            if hasattr(src, "check_alive"):
                src.check_alive()  # CaptureError: the interface is gone or was replaced
            try:
                ks = src.stats()
            except OSError as exc:
                log.error("%s: cannot read capture statistics: %s", src.interface, exc)
                continue
            state = self.ifaces[src.interface]
            new_drops = ks.dropped - state.last.dropped
            new_received = ks.received - state.last.received
            if new_drops > 0:
                log.warning("%s: the kernel dropped %d of %d packets since the last check "
                            "(%d dropped in all): the sensor is not keeping up",
                            src.interface, new_drops, new_received, ks.dropped)
                if state.last_drop is None or now - state.last_drop >= CAPTURE_LOSS_QUIET:
                    self.engine.finding(self._capture_loss(src, ks, new_drops, new_received))
                state.dropping = True
                state.last_drop = now
            elif state.dropping:
                log.info("%s: no more kernel drops", src.interface)
                state.dropping = False
            state.last = ks
            self.sink.stats({**common, "interface": src.interface, "worker": self.worker,
                             "mechanism": getattr(src, "mechanism", None),
                             "kernel_received": ks.received, "kernel_dropped": ks.dropped})
        self.stats_rows += 1
        self.sink.flush()

    def _capture_loss(self, src: Any, ks: KernelStats, dropped: int, received: int) -> Finding:
        return Finding(
            ts=time.time(), rule=CAPTURE_LOSS_RULE, severity="high",
            title=f"Capture loss on {src.interface}: the kernel dropped {dropped} packets",
            src_ip=None, dest_ip=None, dest_port=None, community_id=None, username=None,
            repository=None, count=1,
            details={"interface": src.interface, "dropped": dropped, "received": received,
                     "dropped_total": ks.dropped, "received_total": ks.received,
                     "mechanism": getattr(src, "mechanism", None),
                     "what_to_do": "transactions and findings may be missing: raise "
                                   "live.buffer_size, give the sensor a core of its own, or "
                                   "narrow the monitored ports"})

    def status_line(self) -> str:
        e = self.engine
        dropped = sum(s.last.dropped for s in self.ifaces.values())
        return (f"{e.packets} packets, {e.open_flows} open flows, {e.transactions} "
                f"transactions, {sum(e.findings.values())} findings, {dropped} kernel drops")

    def reload(self) -> None:
        """SIGHUP: new configuration and rules, or the old ones and a logged reason."""
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = load_config(self.config_path)
            rules = load_rules(new.rule_paths, new.networks, new.rule_overrides)
        except (ConfigError, OSError) as exc:
            log.error("reload failed, keeping the previous configuration and rules: %s", exc)
            self.notifier.send("READY=1", "STATUS=reload failed: " + str(exc)[:200])
            return
        old = self.config
        self.engine.detector.replace_rules(rules)
        if new.engine.ports != old.engine.ports:
            for src in self.sources:
                if hasattr(src, "set_ports"):
                    src.set_ports(new.engine.ports)
        self.engine.settings = new.engine  # flows opened from now on use the new limits
        restart_needed = [k for k in ("interfaces", "capture", "buffer_size", "snaplen",
                                      "promiscuous", "user", "workers")
                          if getattr(new.live, k) != getattr(old.live, k)]
        restart_needed += [k for k in ("database", "key_file", "alerts")
                           if getattr(new, k) != getattr(old, k)]
        if restart_needed:
            log.warning("reload: %s changed; that takes a restart (systemctl restart "
                        "registry-sensor)", ", ".join(restart_needed))
        self.config = new
        enabled = sum(1 for r in rules if r.enabled)
        log.info("reloaded %s: %d rules (%d enabled), ports %s", self.config_path or "defaults",
                 len(rules), enabled, ",".join(str(p) for p in sorted(new.engine.ports)))
        self.notifier.send("READY=1", "STATUS=reloaded; " + self.status_line())


def _preload() -> None:
    """Import now what would otherwise be imported lazily after the privilege drop, when the
    interpreter's own files may no longer be readable (a Python under /root, a sandbox)."""
    import importlib.metadata  # noqa: F401 - sqlite-utils finds its plugins through it

    import sqlite_utils.plugins

    sqlite_utils.plugins.ensure_plugins_loaded()


_POLL_ERRORS = select.POLLERR | select.POLLHUP | select.POLLNVAL


def _never() -> bool:
    return False


def _on_deadline(_signum: int, _frame: Any) -> None:
    log.error("shutdown took longer than %.0f s: exiting without finishing", STOP_DEADLINE)
    os._exit(1)


def start_failure(exc: Exception, sources: list) -> UsageError:
    """A capture start-up that failed: close what was opened, say why in one line."""
    for src in sources:
        src.close()
    if isinstance(exc, OSError):
        return UsageError(f"{exc.filename or ''}{': ' if exc.filename else ''}"
                          f"{exc.strerror or exc} (as uid {os.geteuid()})")
    return UsageError(str(exc))


def run_live(config: SensorConfig, config_path: str | None, interfaces: Sequence[str] = (),
             db: str | None = None, mechanism: str | None = None,
             extra_sinks: Sequence[Any] = (), workers: int | None = None) -> int:
    """The `live` command. Returns the exit code. With more than one worker (--workers,
    live.workers) the supervisor in sensor.supervisor runs them."""
    live = config.live
    names = list(interfaces) or list(live.interfaces)
    if not names:
        raise UsageError("no capture interface: give --interface IF or live.interfaces")
    db_path = config.database_path(db).absolute()  # resolved before any drop of privileges
    key_path = config.key_path().absolute()
    detector = build_detector(config)
    workers = live.workers if workers is None else workers
    if workers > 1:
        from .supervisor import run_supervised

        return run_supervised(config, config_path, names, db_path, key_path, detector,
                              mechanism, workers)
    notifier = Notifier()
    sources: list[AfPacketSource] = []
    try:
        for name in names:
            sources.append(AfPacketSource(
                name, config.engine.ports, promiscuous=live.promiscuous,
                buffer_bytes=live.buffer_size, mechanism=mechanism or live.capture,
                snaplen=live.snaplen))
            src = sources[-1]
            log.info("%s: %s capture, %d-byte %s, promiscuous %s", name, src.mechanism,
                     src.rcvbuf, "ring" if src.mechanism == "ring" else "receive buffer",
                     "on" if live.promiscuous else "off")
        if os.geteuid() == 0:
            _preload()
            drop_privileges(live.user, (db_path.parent, key_path.parent))
        key = load_or_create_key(key_path)
        sink = SqliteSink(db_path)
    except (CaptureError, UsageError, OSError) as exc:
        raise start_failure(exc, sources) from None
    return serve(config, config_path, sources, detector, key, sink, db_path, notifier,
                 extra_sinks)


def serve(config: SensorConfig, config_path: str | None, sources: list, detector: Any,
          key: bytes, sink: SqliteSink, db_path: Path, notifier: Any,
          extra_sinks: Sequence[Any] = (), worker: int | None = None,
          started: float | None = None) -> int:
    """Sockets open, privileges dropped, database open: the packet loop until a stop, then the
    bounded shutdown. Returns the exit code. A worker of the supervisor passes its number (for
    the stats rows), the supervisor's start time, and a link to the supervisor as notifier."""
    alert_sink = None
    if config.alerts.targets:  # apprise, in its own thread; AF_INET/AF_INET6 in the unit
        try:
            alert_sink = build_alert_sink(config, detector, db_path)
        except UsageError:
            sink.close()
            for src in sources:
                src.close()
            raise
        alert_sink.descriptions[CAPTURE_LOSS_RULE] = CAPTURE_LOSS_DESCRIPTION
        extra_sinks = (*extra_sinks, alert_sink)
    engine = Engine(config.engine, key, detector, Tee(sink, LogFindings(), *extra_sinks))
    sensor = LiveSensor(config, config_path, sources, engine, sink, notifier)
    sensor.worker = worker
    if started is not None:
        sensor.started = started
    sensor.install_signals()
    log.info("database %s", db_path)
    rc = 0
    try:
        sensor.run()
    except CaptureError as exc:
        log.error("%s: stopping", exc)
        sensor.stop_reason, rc = "capture error", 1
    finally:
        signal.signal(signal.SIGALRM, _on_deadline)
        signal.setitimer(signal.ITIMER_REAL, STOP_DEADLINE)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if sensor.stop_reason is None:
            sensor.stop_reason = "error"
        sensor.shutdown()
        if alert_sink is not None:  # deliver what is queued, within the stop deadline
            alert_sink.close(min(config.alerts.drain_timeout, STOP_DEADLINE / 2))
        signal.setitimer(signal.ITIMER_REAL, 0)
        notifier.close()
    return rc
