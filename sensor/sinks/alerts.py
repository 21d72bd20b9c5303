"""Alerts through apprise, off the packet path: a bounded queue and one worker thread.

`AlertSink.finding()` never blocks and never touches the network: it files the finding in a
bounded queue (when full, the lowest severity goes first, and drops are counted by severity)
and returns. One worker thread takes findings in arrival order, applies each target's filter
(minimum severity, rule ids) and noise control (repeats counted, bursts digested), renders the
message in the target's form (Slack mrkdwn, plain text, JSON) and delivers it with apprise.
A failed attempt is retried later with exponential backoff while other targets go on; network
timeouts are small and bounded (apprise's cto/rto). `close(timeout)` drains within `timeout`
seconds and reports what was delivered, failed, retried, dropped and left undelivered.

Apprise URLs hold tokens and passwords: a target is shown as its name and scheme://host only,
and apprise's own log lines (which can quote a URL) are captured, redacted and kept as the
reason of a failure instead of being printed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..records import SEVERITIES, SEVERITY_RANK, Anomaly, Finding, Transaction
from .alert_config import (
    AlertsConfig,
    AlertTarget,
    capture_apprise_log,
    redact,
    secret_parts,
    url_scheme,
)
from .alert_format import RENDERERS, Alert, alert_from_finding, digest, probe_alert
from .alert_noise import NoiseControl

log = logging.getLogger("registry-sensor")

MAX_BACKOFF = 300.0
DRAIN_MARGIN = 0.2  # seconds kept free at the end of the drain for the worker to stop
BATCH = 500  # findings filed before the worker turns to sending
OUTBOX_CAP = 500  # messages waiting per target (retries included); beyond it the lowest go
SLACK_SCHEMES = ("slack",)
JSON_SCHEMES = ("json", "jsons")
_PERMANENT = re.compile(r"(?:error=|HTTP Error |status code )(4\d\d)\b")
_TRANSIENT_4XX = {"408", "425", "429"}
# the low-level cause in apprise's debug lines ("Socket Exception: ...")
_CAUSE = re.compile(r"\[Errno -?\d+\] [^'\")\]]{1,80}|Read timed out|timed out|"
                    r"Connection refused|Connection reset[^'\")]{0,40}|Name or service not "
                    r"known|certificate verify failed")


def notify_type_for(severity: str) -> str:
    rank = SEVERITY_RANK.get(severity, 0)
    if rank >= SEVERITY_RANK["high"]:
        return "failure"
    if rank >= SEVERITY_RANK["medium"]:
        return "warning"
    return "info"


# -- the queue between the producer (capture thread) and the worker ----------------------------

class SeverityQueue:
    """Bounded, non-blocking for producers; drops the lowest severity first when full."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.lanes: dict[str, deque[tuple[int, Finding]]] = {s: deque() for s in SEVERITIES}
        self.size = 0
        self.seq = itertools.count()
        self.dropped: dict[str, int] = {}
        self.cond = threading.Condition(threading.Lock())
        self.stopped = False  # set by wake(): get() no longer waits

    def put(self, finding: Finding) -> None:
        with self.cond:
            if self.size >= self.maxsize:
                lowest = next((s for s in SEVERITIES if self.lanes[s]), None)
                rank = SEVERITY_RANK.get(finding.severity, 0)
                if lowest is None or SEVERITY_RANK[lowest] >= rank:
                    self._drop(finding.severity)
                    return
                self.lanes[lowest].pop()  # the newest of the lowest severity
                self.size -= 1
                self._drop(lowest)
            lane = self.lanes.get(finding.severity, self.lanes["info"])
            lane.append((next(self.seq), finding))
            self.size += 1
            self.cond.notify()

    def _drop(self, severity: str) -> None:
        self.dropped[severity] = self.dropped.get(severity, 0) + 1

    def get(self, timeout: float) -> Finding | None:
        """The oldest finding, waiting up to `timeout` seconds; None when there is none."""
        with self.cond:
            if not self.size and timeout > 0 and not self.stopped:
                self.cond.wait(timeout)
            if not self.size:
                return None
            lane = min((lane for lane in self.lanes.values() if lane), key=lambda d: d[0][0])
            self.size -= 1
            return lane.popleft()[1]

    def wake(self) -> None:
        """Stop waiting for findings (shutdown): get() returns at once from now on."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def __len__(self) -> int:
        return self.size


# -- one target -------------------------------------------------------------------------------

@dataclass
class TargetStats:
    delivered: int = 0  # messages that arrived
    failed: int = 0  # attempts that failed (refused, timed out, an error status, ...)
    retried: int = 0  # failed attempts followed by another try
    gave_up: int = 0  # messages abandoned: retries exhausted or a permanent error (4xx)
    dropped: int = 0  # messages dropped before delivery: the target's outbox was full
    left: int = 0  # messages still waiting when the drain time ran out
    attempts: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"delivered": self.delivered, "failed": self.failed, "retried": self.retried,
                "gave_up": self.gave_up, "dropped": self.dropped, "left": self.left,
                "attempts": self.attempts, "last_error": self.last_error}


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    alert: Alert = field(compare=False)
    attempt: int = field(default=0, compare=False)


@dataclass(frozen=True)
class DeliveryResult:
    ok: bool
    reason: str = ""
    seconds: float = 0.0
    permanent: bool = False


class Target:
    """An apprise URL with its filter, rendering form, outbox, backoff and counters."""

    def __init__(self, cfg: AlertTarget, alerts: AlertsConfig) -> None:
        import apprise

        self.cfg = cfg
        self.name = cfg.name
        self.secrets = secret_parts(cfg.url)
        self.min_rank = SEVERITY_RANK[cfg.min_severity]
        self.rules = frozenset(cfg.rules) if cfg.rules is not None else None
        self.timeout = alerts.timeout
        self.stats = TargetStats()
        self.outbox: list[_Pending] = []
        self.next_send = 0.0
        self.failures = 0  # failed attempts in a row
        self.merged = 0  # findings folded into a repeat count (noise control)
        self.digested = 0  # messages that went out inside a digest
        with capture_apprise_log():
            plugin = apprise.Apprise.instantiate(cfg.url)
        if plugin is None:  # the config checked it; a URL from env/file may change under us
            raise ValueError(f"target {cfg.name!r}: apprise cannot use this "
                             f"{url_scheme(cfg.url)}:// URL")
        self.plugin = plugin
        self.schema = url_scheme(cfg.url)
        query = {k.lower() for k, _ in parse_qsl(urlsplit(cfg.url).query)}
        self.own_timeouts = ("cto" in query, "rto" in query)
        self.set_timeout(alerts.timeout)
        # apprise throttles each plugin (request_rate_per_sec, 5.5 s for most); our noise
        # control already bounds the rate, so keep only a short courtesy gap.
        plugin.request_rate_per_sec = min(getattr(plugin, "request_rate_per_sec", 0) or 0,
                                          alerts.min_interval)
        is_slack = type(plugin).__name__ == "NotifySlack"
        if is_slack and hasattr(plugin, "use_blocks") and "blocks" not in query:
            plugin.use_blocks = True  # the body goes as our mrkdwn, verbatim
        fmt = cfg.format
        if fmt == "auto":
            fmt = "slack" if is_slack else "json" if self.schema in JSON_SCHEMES else "text"
        self.format = fmt
        self.apprise = apprise.Apprise()
        self.apprise.add(plugin)
        self.display = self._display()

    def _display(self) -> str:
        """scheme://host of the target, from apprise's privacy form; never a secret."""
        try:
            private = self.plugin.url(privacy=True)
        except Exception:  # noqa: BLE001 - a plugin's url() is not our concern
            return f"{self.schema}://"
        head, _, rest = private.partition("://")
        netloc = rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]
        return redact(f"{head}://{netloc}", self.secrets)

    def set_timeout(self, seconds: float) -> None:
        if not self.own_timeouts[0]:
            self.plugin.socket_connect_timeout = seconds
        if not self.own_timeouts[1]:
            self.plugin.socket_read_timeout = seconds

    def accepts(self, f: Finding) -> bool:
        return SEVERITY_RANK.get(f.severity, 0) >= self.min_rank and (
            self.rules is None or f.rule in self.rules)

    def render(self, alert: Alert) -> tuple[str, str]:
        return RENDERERS[self.format](alert)

    def deliver(self, alert: Alert) -> DeliveryResult:
        """One attempt through apprise; apprise's log lines become the (redacted) reason."""
        import apprise

        title, body = self.render(alert)
        # Slack: hand our mrkdwn over as is (no format declared: apprise converts nothing).
        body_format = None if self.format == "slack" else apprise.NotifyFormat.TEXT
        kind = "success" if alert.kind == "test" else notify_type_for(alert.severity)
        started = time.monotonic()
        self.stats.attempts += 1
        reason = ""
        try:
            with capture_apprise_log() as records:
                ok = bool(self.apprise.notify(title=title, body=body,
                                              notify_type=apprise.NotifyType(kind),
                                              body_format=body_format))
        except Exception as exc:  # noqa: BLE001 - a plugin bug must not kill the worker
            ok = False
            reason = f"{type(exc).__name__}: {exc}"
            records = []
        seconds = time.monotonic() - started
        if ok:
            return DeliveryResult(True, seconds=seconds)
        if not reason:
            lines = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
            reason = "; ".join(dict.fromkeys(lines[-2:])) or "apprise reported a failure"
            causes = [m.group(0) for r in records if r.levelno < logging.WARNING
                      for m in [_CAUSE.search(r.getMessage())] if m]
            if causes:
                reason += f" ({causes[-1].rstrip('. ')})"
        timeout = max(self.plugin.socket_connect_timeout or 0,
                      self.plugin.socket_read_timeout or 0)
        if timeout and seconds >= 0.9 * timeout and "timed out" not in reason:
            reason += f" (no answer within {seconds:.1f} s: timed out)"
        reason = redact(" ".join(reason.split()), self.secrets)[:300]
        codes = _PERMANENT.findall(reason)
        permanent = bool(codes) and codes[-1] not in _TRANSIENT_4XX
        return DeliveryResult(False, reason, seconds, permanent)

    def report(self) -> dict[str, Any]:
        return {"target": self.display, "format": self.format, **self.stats.as_dict(),
                "pending": len(self.outbox), "merged": self.merged, "digested": self.digested}


# -- the sink ---------------------------------------------------------------------------------

class AlertSink:
    """A sink (finding/transaction/anomaly/close) that alerts people through apprise."""

    def __init__(self, config: AlertsConfig, *, descriptions: Mapping[str, str] | None = None,
                 db_path: str | None = None, clock: Callable[[], float] = time.monotonic,
                 targets: Iterable[Target] | None = None, start: bool = True) -> None:
        self.config = config
        self.clock = clock
        self.descriptions = dict(descriptions or {})
        self.db = db_path
        self.targets = list(targets) if targets is not None else [
            Target(t, config) for t in config.targets]
        self.noise = {t.name: NoiseControl(
            repeat_period=config.repeat_period, burst_count=config.burst_count,
            burst_window=config.burst_window, digest_max=config.digest_max,
            make_alert=self._make_alert, make_digest=self._make_digest)
            for t in self.targets}
        ranks = [t.min_rank for t in self.targets]
        self.min_rank = min(ranks) if ranks else len(SEVERITIES)
        rule_sets = [t.rules for t in self.targets]
        self.rules = None if not rule_sets or any(r is None for r in rule_sets) \
            else frozenset().union(*rule_sets)
        self.queue = SeverityQueue(config.queue_size)
        self.lock = threading.Lock()  # guards the counters read by report()
        self.accepted = 0
        self.seq = itertools.count()
        self.stopping = threading.Event()
        self.deadline: float | None = None
        self.drain_seconds: float | None = None
        self.stuck = False
        self.worker = threading.Thread(target=self._run, name="registry-sensor-alerts",
                                       daemon=True)
        self.closed = False
        if start:
            self.worker.start()

    # -- the sink interface (the producer's side: never blocks on the network) -------------

    def finding(self, f: Finding) -> None:
        if SEVERITY_RANK.get(f.severity, 0) < self.min_rank or (
                self.rules is not None and f.rule not in self.rules) or self.closed:
            return
        self.accepted += 1
        self.queue.put(f)

    def transaction(self, txn: Transaction) -> None:
        pass

    def anomaly(self, anomaly: Anomaly) -> None:
        pass

    def close(self, timeout: float | None = None) -> dict[str, Any]:
        """Stop taking findings, deliver what is left within `timeout` seconds, report."""
        if self.closed:
            return self.report()
        self.closed = True
        timeout = self.config.drain_timeout if timeout is None else timeout
        started = time.monotonic()
        self.deadline = self.clock() + timeout
        self.stopping.set()
        self.queue.wake()
        if self.worker.is_alive():
            self.worker.join(timeout)
        self.stuck = self.worker.is_alive()
        self.drain_seconds = round(time.monotonic() - started, 3)
        report = self.report()
        self._log_report(report)
        return report

    # -- the worker -------------------------------------------------------------------------

    def _make_alert(self, f: Finding, **kw: Any) -> Alert:
        return alert_from_finding(f, description=self.descriptions.get(f.rule), db=self.db,
                                  **kw)

    def _make_digest(self, items: list[Alert], more: dict[str, int]) -> Alert:
        return digest(items, more, self.db)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # pragma: no cover - our bug: say so, never take the capture down
            log.exception("alerts: the delivery worker stopped")

    def _loop(self) -> None:
        flushed = False
        while True:
            f = self.queue.get(self._next_wake(self.clock()))
            taken = 0
            while f is not None:  # file what is waiting (all of it once stopping)
                now = self.clock()
                for target in self.targets:
                    if target.accepts(f):
                        self._enqueue(target, self.noise[target.name].offer(f, now), now)
                taken += 1
                if taken >= BATCH and not self.stopping.is_set():
                    break
                f = self.queue.get(0)
            now = self.clock()
            for target in self.targets:
                self._enqueue(target, self.noise[target.name].tick(now), now)
            if not self.stopping.is_set():
                self._send_due(now, draining=False)
                continue
            if len(self.queue):
                continue
            if not flushed:
                flushed = True
                for target in self.targets:
                    self._enqueue(target, self.noise[target.name].flush(now), now)
            self._send_due(now, draining=True)
            if not self._drain_left():
                self._abandon()
                return

    def _next_wake(self, now: float) -> float:
        times = [max(t.outbox[0].due, t.next_send) for t in self.targets if t.outbox]
        if self.stopping.is_set():
            if len(self.queue):
                return 0.0
            if self.deadline is not None:
                times.append(self.deadline)
        else:
            times += [d for d in (n.next_due() for n in self.noise.values()) if d is not None]
        soonest = min(times, default=now + 1.0)
        return min(max(soonest - now, 0.0), 1.0)

    def _drain_left(self) -> bool:
        """Whether some target still has a message it can try before the deadline."""
        deadline = self.deadline if self.deadline is not None else float("inf")
        return any(max(t.outbox[0].due, t.next_send) < deadline
                   for t in self.targets if t.outbox) and self.clock() < deadline

    def _enqueue(self, target: Target, alerts: list[Alert], now: float) -> None:
        for alert in alerts:
            if len(target.outbox) >= OUTBOX_CAP:
                lowest = min(target.outbox, key=lambda p: (SEVERITY_RANK[p.alert.severity],
                                                           -p.seq))
                target.outbox.remove(lowest)
                heapq.heapify(target.outbox)
                with self.lock:
                    target.stats.dropped += 1
            heapq.heappush(target.outbox, _Pending(now, next(self.seq), alert))

    def _send_due(self, now: float, draining: bool) -> None:
        """One attempt per target whose next message is due (round-robin across targets).

        Backoff is per target: after a failure the target is left alone for backoff * 2^(n-1)
        seconds (n failures in a row), whichever message is next, so a dead or hanging target
        costs one timeout per backoff period while the others go on.
        """
        for target in sorted(self.targets, key=lambda t: t.failures):  # healthy ones first
            if not target.outbox:
                continue
            if max(target.outbox[0].due, target.next_send) > now:
                continue
            if draining and self.deadline is not None:
                left = self.deadline - self.clock() - DRAIN_MARGIN
                if left <= 0.05:
                    return
                # connect and read each get half of what is left, so one attempt ends in time
                target.set_timeout(max(0.05, min(self.config.timeout, left / 2)))
            pending = heapq.heappop(target.outbox)
            result = target.deliver(pending.alert)
            done = self.clock()
            late = self.deadline is not None and done >= self.deadline
            with self.lock:
                if result.ok:
                    target.stats.delivered += 1
                    target.failures = 0
                    target.next_send = done + self.config.min_interval
                    continue
                target.failures += 1
                target.stats.failed += 1
                target.stats.last_error = result.reason
                retry = pending.attempt < self.config.retries and not result.permanent
                if retry:
                    target.stats.retried += 1
                else:
                    target.stats.gave_up += 1
                delay = min(self.config.backoff * (2 ** (target.failures - 1)), MAX_BACKOFF)
                target.next_send = done + max(delay, self.config.min_interval)
            if retry:
                heapq.heappush(target.outbox, _Pending(target.next_send, pending.seq,
                                                       pending.alert, pending.attempt + 1))
                log.debug("alerts: %s (%s): attempt %d failed, next try in %.1f s: %s",
                          target.name, target.display, pending.attempt + 1, delay,
                          result.reason)
            elif not late:
                log.warning("alerts: %s (%s): giving up on a %s message after %d attempt(s): "
                            "%s", target.name, target.display, pending.alert.severity,
                            pending.attempt + 1, result.reason)

    def _abandon(self) -> None:
        with self.lock:
            for target in self.targets:
                target.stats.left += len(target.outbox)
                target.outbox.clear()

    # -- reporting --------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        with self.lock:
            for t in self.targets:
                t.merged = self.noise[t.name].repeats_merged
                t.digested = self.noise[t.name].digested
            targets = {t.name: t.report() for t in self.targets}
            undelivered = sum(t["pending"] + t["left"] for t in targets.values())
            return {
                "targets": targets,
                "findings_accepted": self.accepted,
                "queue_dropped": dict(self.queue.dropped),
                "queue_left": len(self.queue),
                "undelivered": undelivered + len(self.queue),
                "drain_seconds": self.drain_seconds,
                "worker_stuck": self.stuck,
            }

    def _log_report(self, report: dict[str, Any]) -> None:
        dropped = report["queue_dropped"]
        if dropped:
            log.warning("alerts: queue full, dropped %s",
                        ", ".join(f"{n} {s}" for s, n in dropped.items()))
        for name, t in report["targets"].items():
            if t["failed"] or t["dropped"] or t["pending"] or t["left"]:
                log.warning("alerts: %s (%s): %s%s", name, t["target"], describe_counts(t),
                            f"; last error: {t['last_error']}" if t["last_error"] else "")
        if report["worker_stuck"]:
            log.warning("alerts: delivery still in progress after %.1f s; left undelivered",
                        report["drain_seconds"] or 0)


def describe_counts(t: Mapping[str, Any]) -> str:
    """'3 delivered, 2 failed attempts, ...' for one target's report."""
    left = t["left"] + t.get("pending", 0)
    parts = [f"{t['delivered']} delivered", f"{t['failed']} failed attempts",
             f"{t['retried']} retried"]
    parts += [f"{n} {what}" for n, what in ((t.get("merged", 0), "merged as repeats"),
                                             (t.get("digested", 0), "sent in digests")) if n]
    parts += [f"{n} {what}" for n, what in ((t["gave_up"], "given up"),
                                             (t["dropped"], "dropped"),
                                             (left, "left undelivered")) if n]
    return ", ".join(parts)


def send_test(config: AlertsConfig) -> list[tuple[Target, DeliveryResult]]:
    """One test message to every target, one attempt each; (target, result) per target."""
    results = []
    for cfg in config.targets:
        target = Target(cfg, config)
        results.append((target, target.deliver(probe_alert())))
    return results
