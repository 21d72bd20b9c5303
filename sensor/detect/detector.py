"""Rules applied to transactions: matching, thresholds, distinct counts and suppression.

Windows are kept in packet time (a replay gives the same findings every time) and in bounded
memory (the oldest groups are dropped past a cap). The rule set can be swapped atomically with
`replace_rules` (the live daemon reloads on SIGHUP); state of rules that remain is kept.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from ..records import Finding, Transaction
from .fields import DETAIL_FIELDS, FIELDS
from .rules import Rule, Threshold

MAX_GROUPS = 50_000  # per rule trigger; the oldest are forgotten first
MAX_DISTINCT_SAMPLE = 20


class _Window:
    """Matches of one threshold group within its window."""

    __slots__ = ("times", "values", "amounts", "total")

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.values: dict[Any, float] = {}  # distinct value → last seen
        self.amounts: deque[tuple[float, float]] = deque()  # (ts, amount) for sums
        self.total = 0.0


class _Quiet:
    """A suppressed group: quiet until `until`, counting what it swallowed."""

    __slots__ = ("until", "count", "first_ts", "last", "last_ts")

    def __init__(self, until: float) -> None:
        self.until = until
        self.count = 0
        self.first_ts = 0.0
        self.last: Transaction | None = None
        self.last_ts = 0.0


def _key(txn: Transaction, fields: tuple[str, ...]) -> tuple:
    return tuple(FIELDS[f](txn) for f in fields)


class Detector:
    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules: tuple[Rule, ...] = ()
        self.windows: dict[tuple[str, int], dict[tuple, _Window]] = {}
        self.quiet: dict[str, dict[tuple, _Quiet]] = {}
        self.replace_rules(rules)

    def replace_rules(self, rules: Iterable[Rule]) -> None:
        """Swap the whole rule set; keep windows and suppression of rules that stay the same."""
        active = tuple(r for r in rules if r.enabled)
        keep = {r.id for r in active}
        self.windows = {k: v for k, v in self.windows.items() if k[0] in keep}
        self.quiet = {k: v for k, v in self.quiet.items() if k in keep}
        self.rules = active

    def evaluate(self, txn: Transaction) -> list[Finding]:
        """The findings one transaction raises (often none)."""
        findings: list[Finding] = []
        for rule in self.rules:
            if rule.exception is not None and rule.exception(txn):
                continue
            for index, trigger in enumerate(rule.triggers):
                if not trigger.predicate(txn):
                    continue
                extra: dict[str, Any] = {}
                if trigger.threshold is not None:
                    reached = self._threshold(rule, index, trigger.threshold, txn)
                    if reached is None:
                        continue
                    extra = reached
                finding = self._fire(rule, index, txn, extra)
                if finding is not None:
                    findings.append(finding)
                break  # one finding per rule per transaction
        return findings

    def flush(self, now: float) -> list[Finding]:
        """Report what suppression swallowed and has not yet reported (end of input, shutdown)."""
        findings = []
        for rule in self.rules:
            groups = self.quiet.get(rule.id, {})
            for quiet in groups.values():
                if quiet.count and quiet.last is not None:
                    findings.append(self._finding(
                        rule, quiet.last, quiet.count, quiet.last_ts,
                        {"suppressed": True, "first_seen": quiet.first_ts,
                         "last_seen": quiet.last_ts}, first_ts=quiet.first_ts))
                    quiet.count = 0
        return findings

    # -- thresholds -----------------------------------------------------------------------

    def _threshold(self, rule: Rule, index: int, th: Threshold,
                   txn: Transaction) -> dict[str, Any] | None:
        groups = self.windows.setdefault((rule.id, index), {})
        key = _key(txn, th.by)
        window = groups.pop(key, None)
        if window is None:
            window = _Window()
            if len(groups) >= MAX_GROUPS:
                del groups[next(iter(groups))]
        groups[key] = window  # re-inserted: the dict stays in least-recently-used order
        now = txn.ts
        start = now - th.window
        if th.sum is not None:
            amount = FIELDS[th.sum](txn) or 0
            amounts = window.amounts
            amounts.append((now, amount))
            window.total += amount
            while amounts and amounts[0][0] <= start:
                window.total -= amounts.popleft()[1]
            if window.total < th.total:
                return None
            reached = {"threshold_sum": th.sum, "threshold_total": th.total,
                       "window": th.window, "sum": window.total,
                       "matched": len(amounts), "first_seen": amounts[0][0]}
            amounts.clear()
            window.total = 0.0
            return reached
        if th.distinct is None:
            times = window.times
            times.append(now)
            while times and times[0] <= start:
                times.popleft()
            if len(times) < th.count:
                return None
            first = times[0]
            times.clear()
            return {"threshold": th.count, "window": th.window, "matched": th.count,
                    "first_seen": first}
        value = FIELDS[th.distinct](txn)
        values = window.values
        if value is not None:
            values.pop(value, None)
            values[value] = now
        for stale in [v for v, seen in values.items() if seen <= start]:
            del values[stale]
        if len(values) < th.count:
            return None
        first = min(values.values())
        sample = list(values)[:MAX_DISTINCT_SAMPLE]
        values.clear()
        return {"threshold": th.count, "window": th.window, "distinct_field": th.distinct,
                "distinct_count": th.count, "distinct_values": sample, "first_seen": first}

    # -- suppression and findings ---------------------------------------------------------

    def _fire(self, rule: Rule, index: int, txn: Transaction,
              extra: dict[str, Any]) -> Finding | None:
        sup = rule.suppress
        if sup is None:
            return self._finding(rule, txn, 1, txn.ts, extra)
        groups = self.quiet.setdefault(rule.id, {})
        key = (index, *_key(txn, sup.by))
        quiet = groups.get(key)
        now = txn.ts
        if quiet is not None and now < quiet.until:
            if not quiet.count:
                quiet.first_ts = now
            quiet.count += 1
            quiet.last = txn
            quiet.last_ts = now
            return None
        swallowed = quiet.count if quiet is not None else 0
        first_ts = quiet.first_ts if swallowed else None
        if quiet is None:
            if len(groups) >= MAX_GROUPS:
                del groups[next(iter(groups))]
        else:
            del groups[key]
        groups[key] = _Quiet(now + sup.period)
        if swallowed:
            extra = {**extra, "suppressed_before": swallowed}
        return self._finding(rule, txn, 1 + swallowed, now, extra, first_ts=first_ts)

    @staticmethod
    def _finding(rule: Rule, txn: Transaction, count: int, ts: float, extra: dict[str, Any],
                 first_ts: float | None = None) -> Finding:
        details: dict[str, Any] = {}
        for name in DETAIL_FIELDS:
            value = FIELDS[name](txn)
            if value is not None and value != "":
                details[name] = value
        details.update(extra)
        details["rule_tags"] = list(rule.tags)
        key = txn.flow.key
        username = txn.credential.username
        repository = txn.op.repository if txn.op is not None else None
        return Finding(
            ts=ts, rule=rule.id, severity=rule.severity,
            title=_render_title(rule.title, txn), src_ip=key.src_ip, dest_ip=key.dest_ip,
            dest_port=key.dest_port, community_id=txn.flow.community_id, username=username,
            repository=repository, count=count, details=details,
            first_ts=first_ts if first_ts is not None else extra.get("first_seen"))


class _Fields(dict):
    def __init__(self, txn: Transaction) -> None:
        super().__init__()
        self.txn = txn

    def __missing__(self, name: str) -> str:
        getter = FIELDS.get(name)
        value = getter(self.txn) if getter is not None else None
        return "?" if value is None or value == "" else str(value)


def _render_title(template: str, txn: Transaction) -> str:
    """A rule title with {field} placeholders filled from the transaction."""
    if "{" not in template:
        return template
    try:
        return template.format_map(_Fields(txn))
    except (ValueError, IndexError, AttributeError):
        return template
