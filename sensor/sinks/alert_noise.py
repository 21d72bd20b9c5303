"""Noise control for alerts, in real time (not packet time): pure, the clock is an argument.

Two stages, per target:
- Repeats: the first finding of a group (rule, client, registry, repository, username) is
  sent at once; further findings of that group within `repeat_period` seconds are counted,
  and one message with the count goes out when the period ends (then a new period starts).
- Bursts: more than `burst_count` messages within `burst_window` seconds, and the rest wait
  and go out together as one digest when the window closes (at most `digest_max` listed, the
  others counted by rule).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..records import Finding
from .alert_format import Alert, alert_from_finding, digest

MAX_GROUPS = 10_000


def group_key(f: Finding) -> tuple:
    return (f.rule, f.src_ip, f.dest_ip, f.dest_port, f.repository, f.username)


@dataclass
class _Group:
    until: float
    pending: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    last: Finding | None = None


class NoiseControl:
    def __init__(self, *, repeat_period: float, burst_count: int, burst_window: float,
                 digest_max: int, make_alert: Callable[..., Alert] = alert_from_finding,
                 make_digest: Callable[[list[Alert], dict[str, int]], Alert] = digest) -> None:
        self.repeat_period = repeat_period
        self.burst_count = burst_count
        self.burst_window = burst_window
        self.digest_max = digest_max
        self.make_alert = make_alert
        self.make_digest = make_digest
        self.groups: dict[tuple, _Group] = {}
        self.sent: deque[float] = deque()  # times of messages let through, within the window
        self.held: list[Alert] = []  # waiting for the digest
        self.held_more: dict[str, int] = {}
        self.digest_due: float | None = None
        self.repeats_merged = 0  # findings folded into another message
        self.digested = 0  # alerts that went out inside a digest

    # -- input ----------------------------------------------------------------------------

    def offer(self, f: Finding, now: float) -> list[Alert]:
        """A finding arrives: the messages to send now (often one, sometimes none)."""
        key = group_key(f)
        group = self.groups.get(key)
        if group is not None and now < group.until:
            if not group.pending:
                group.first_ts = f.first_ts if f.first_ts is not None else f.ts
            group.pending += f.count
            group.last_ts = f.ts
            group.last = f
            self.repeats_merged += 1
            return []
        if group is None and len(self.groups) >= MAX_GROUPS:
            del self.groups[next(iter(self.groups))]
        self.groups.pop(key, None)
        self.groups[key] = _Group(until=now + self.repeat_period)
        return self._admit(self.make_alert(f), now)

    def tick(self, now: float) -> list[Alert]:
        """Time passes: repeat counts whose period ended, and a digest whose window closed."""
        out: list[Alert] = []
        for key in [k for k, g in self.groups.items() if g.until <= now]:
            group = self.groups[key]
            if group.pending and group.last is not None:
                out += self._admit(self._repeat(group), now)
                self.groups[key] = _Group(until=now + self.repeat_period)
            else:
                del self.groups[key]
        if self.digest_due is not None and now >= self.digest_due:
            out += self._release_digest(now)
        return out

    def flush(self, now: float) -> list[Alert]:
        """Shutdown: everything still counted or held, at once (one digest if many)."""
        out: list[Alert] = []
        for group in self.groups.values():
            if group.pending and group.last is not None:
                out += self._admit(self._repeat(group), now)
        self.groups.clear()
        if self.held:
            out += self._release_digest(now)
        return out

    def next_due(self) -> float | None:
        """When tick() next has something to do (None: nothing pending)."""
        times = [g.until for g in self.groups.values() if g.pending]
        if self.digest_due is not None:
            times.append(self.digest_due)
        return min(times) if times else None

    # -- internals ------------------------------------------------------------------------

    def _repeat(self, group: _Group) -> Alert:
        assert group.last is not None
        return self.make_alert(group.last, count=group.pending, first_seen=group.first_ts,
                               last_seen=group.last_ts, kind="repeat")

    def _admit(self, alert: Alert, now: float) -> list[Alert]:
        sent = self.sent
        while sent and sent[0] <= now - self.burst_window:
            sent.popleft()
        if len(sent) < self.burst_count and not self.held:
            sent.append(now)
            return [alert]
        if len(self.held) < self.digest_max:
            self.held.append(alert)
        else:
            key = alert.rule or alert.kind
            self.held_more[key] = self.held_more.get(key, 0) + 1
        if self.digest_due is None:
            self.digest_due = now + self.burst_window
        return []

    def _release_digest(self, now: float) -> list[Alert]:
        held, more = self.held, self.held_more
        self.held, self.held_more, self.digest_due = [], {}, None
        if not held:
            return []
        self.sent.append(now)
        if len(held) == 1 and not more:
            return held
        self.digested += len(held) + sum(more.values())
        return [self.make_digest(held, more)]
