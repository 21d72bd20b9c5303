"""What an alert says, and how it is written for Slack (mrkdwn), e-mail (plain text) and JSON.

An `Alert` is built from one finding (or several, for a digest) with every string that came
off the wire already passed through `clean()`: control characters are shown as escapes, and
length is capped. The Slack form puts each such string in an inline code span with `&`, `<`,
`>` entity-escaped and backticks replaced, so `*bold*`, `<!channel>`, `@here` or
`<http://evil|click>` arrive as inert text. Nothing here ever holds a password or a token;
`guard_secrets` strips anything shaped like one from the final text all the same.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..records import SEVERITY_RANK, Finding

MAX_FIELD = 200  # characters of one wire string
MAX_TITLE = 140  # Slack header blocks take 150 at most
MAX_SENTENCE = 300

# C0, DEL, C1, and the invisible format characters that can reorder or hide text
# (bidi overrides and isolates, zero-width characters, BOM, line/paragraph separators).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# Shapes of secrets: never sent even if something upstream let one through.
_SECRET_SHAPES = (
    (re.compile(r"(?i)\b(basic|bearer)(\s+)(?=\S*[0-9+/=])[A-Za-z0-9._~+/-]{6,}=*"),
     r"\1\2[redacted]"),
    (re.compile(r"(?i)\b(password|passwd|pwd|secret|token|access_token|signature|sig|"
                r"x-amz-signature|x-amz-credential)=([^&\s`]+)"), r"\1=[redacted]"),
    (re.compile(r"(?i)(://[^/\s:@`]+:)[^@\s/`]+@"), r"\1[redacted]@"),
)
_SECRET_DETAIL_KEY = re.compile(r"(?i)pass|secret|token|authorization|cookie|credential$")


def clean(value: Any, cap: int = MAX_FIELD) -> str:
    """Text off the wire made safe to show: control characters escaped, length capped."""
    text = "" if value is None else str(value)
    text = _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\u{ord(m.group()):04x}"
                                   if ord(m.group()) > 0xff else f"\\x{ord(m.group()):02x}"),
                        text)
    if len(text) > cap:
        text = text[:cap - 1] + "…"
    return text


def guard_secrets(text: str) -> str:
    for pattern, repl in _SECRET_SHAPES:
        text = pattern.sub(repl, text)
    return text


def slack_escape(text: str) -> str:
    """Slack's three entity escapes; with them no `<...>` mention, link or command can form."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_code(value: Any, cap: int = MAX_FIELD) -> str:
    """A wire string as an inert Slack inline code span.

    Inside a code span Slack applies no bold/italic/strike and no mention; backticks (which
    would close it) become ˋ, and link schemes are defanged (hxxp://) so nothing is clickable.
    """
    text = clean(value, cap).replace("`", "ˋ")
    text = re.sub(r"(?i)\b(h)(tt)(ps?://)", r"\1xx\3", text)
    text = re.sub(r"(?i)\b(mailto|ftp|file|javascript|data):", r"\1[:]", text)
    text = slack_escape(text)
    return f"`{text}`" if text.strip() else "`-`"


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def since_arg(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def first_sentence(text: str | None) -> str:
    """The first sentence of a rule's description (its one-line 'what happened')."""
    if not text:
        return ""
    flat = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(\s|$)", flat)
    return match.group(1) if match else flat


@dataclass(frozen=True, slots=True)
class Alert:
    """One message for people: a finding (kind finding/repeat), a digest, or a test."""

    kind: str  # finding, repeat, digest, test
    severity: str
    title: str  # cleaned
    sentence: str  # cleaned
    rule: str | None = None
    fields: tuple[tuple[str, str], ...] = ()  # (label, cleaned wire value)
    count: int = 1
    first_seen: float | None = None
    last_seen: float | None = None
    command: str = ""
    sentence_is_wire: bool = False  # the sentence is a title holding wire text
    items: tuple[Alert, ...] = ()  # a digest's findings (capped)
    more: dict[str, int] = field(default_factory=dict)  # a digest's uncounted rest, by rule
    data: dict[str, Any] = field(default_factory=dict)  # structured fields for JSON


def events_command(rule: str | None, since: float | None, db: str | None) -> str:
    args = ["registry-sensor", "events"]
    if db:
        args += ["--db", db]
    if rule:
        args += ["--rule", rule]
    if since is not None:
        args += ["--since", since_arg(since)]
    return " ".join(shlex.quote(clean(a, 300)) for a in args)


def alert_from_finding(f: Finding, *, description: str | None = None, db: str | None = None,
                       count: int | None = None, first_seen: float | None = None,
                       last_seen: float | None = None, kind: str = "finding") -> Alert:
    """The alert for one finding (or, with kind='repeat', for repeats of it counted later)."""
    details = {k: v for k, v in (f.details or {}).items() if not _SECRET_DETAIL_KEY.search(k)}
    count = f.count if count is None else count
    first = first_seen if first_seen is not None else (
        f.first_ts if f.first_ts is not None else f.ts)
    last = last_seen if last_seen is not None else f.ts
    sentence = clean(first_sentence(description) or f.title, MAX_SENTENCE)
    registry = f"{f.dest_ip}:{f.dest_port}" if f.dest_port else (f.dest_ip or "")
    fields: list[tuple[str, str]] = [("Rule", f"{f.rule} ({f.severity})")]
    if f.src_ip:
        fields.append(("Client", clean(f.src_ip)))
    if registry:
        fields.append(("Registry", clean(registry)))
    if f.repository:
        fields.append(("Repository", clean(f.repository)))
    if f.username:
        fields.append(("Username", clean(f.username)))
    method, uri, status = details.get("method"), details.get("uri"), details.get("status")
    if method or uri:
        request = f"{method or '?'} {uri or '?'}" + (f" → {status}" if status else "")
        fields.append(("Request", clean(request)))
    if details.get("user_agent"):
        fields.append(("User agent", clean(details["user_agent"])))
    if details.get("tls_sni"):
        fields.append(("TLS SNI", clean(details["tls_sni"])))
    fields.append(("Count", str(count)))
    fields.append(("First seen", fmt_time(first)))
    fields.append(("Last seen", fmt_time(last)))
    data = {
        "rule": f.rule, "severity": f.severity, "src_ip": f.src_ip, "dest_ip": f.dest_ip,
        "dest_port": f.dest_port, "registry": registry or None,
        "repository": clean(f.repository) if f.repository else None,
        "username": clean(f.username) if f.username else None,
        "community_id": f.community_id,
        "method": clean(method) if method else None, "uri": clean(uri) if uri else None,
        "status": status if isinstance(status, int) else None,
        "user_agent": clean(details["user_agent"]) if details.get("user_agent") else None,
    }
    title = clean(f.title, MAX_TITLE - 20)
    if kind == "repeat":
        sentence = clean(f"Repeated {count} more times since the last alert: {sentence}",
                         MAX_SENTENCE)
    return Alert(kind=kind, severity=f.severity, title=title, sentence=sentence, rule=f.rule,
                 sentence_is_wire=not first_sentence(description), fields=tuple(fields),
                 count=count, first_seen=first, last_seen=last,
                 command=events_command(f.rule, first, db),
                 data={k: v for k, v in data.items() if v is not None})


def digest(items: list[Alert], more: dict[str, int], db: str | None = None) -> Alert:
    """Many alerts in one message: the first few listed, the rest counted by rule."""
    severity = max((i.severity for i in items), key=lambda s: SEVERITY_RANK[s])
    firsts = [i.first_seen for i in items if i.first_seen is not None]
    lasts = [i.last_seen for i in items if i.last_seen is not None]
    n = len(items) + sum(more.values())
    rules = sorted({i.rule for i in items if i.rule} | set(more))
    sentence = (f"{n} alerts came in a burst and are listed together; "
                f"rules: {', '.join(rules)}.")
    return Alert(kind="digest", severity=severity,
                 title=f"{n} alerts in a burst (highest {severity})",
                 sentence=clean(sentence, MAX_SENTENCE), count=n,
                 first_seen=min(firsts) if firsts else None,
                 last_seen=max(lasts) if lasts else None,
                 command=events_command(None, min(firsts) if firsts else None, db),
                 items=tuple(items), more=dict(more))


def probe_alert() -> Alert:
    return Alert(kind="test", severity="info", title="Test message from registry-sensor",
                 sentence="This is a test: registry-sensor can reach this target. "
                          "No finding was made.",
                 command="registry-sensor alert test")


# -- the three forms --------------------------------------------------------------------------

def _title(alert: Alert) -> str:
    prefix = f"[{alert.severity.upper()}]"
    if alert.kind == "repeat":
        prefix += f" (x{alert.count})"
    return guard_secrets(f"{prefix} {alert.title}")


def _item_line(item: Alert) -> tuple[str, str, str, str]:
    values = dict(item.fields)
    where = ", ".join(f"{k.lower()} {values[k]}" for k in ("Client", "Registry", "Repository",
                                                           "Username") if k in values)
    return item.severity, item.rule or "-", item.title, where


def render_text(alert: Alert) -> tuple[str, str]:
    """(title, body) in plain text: e-mail and any target that is not Slack or JSON."""
    lines = [alert.sentence]
    if alert.fields or alert.items:
        lines.append("")
    width = max((len(label) for label, _ in alert.fields), default=0) + 1
    for label, value in alert.fields:
        lines.append(f"{label + ':':<{width}} {value}")
    if alert.kind == "digest":
        for item in alert.items:
            severity, rule, title, where = _item_line(item)
            count = f" x{item.count}" if item.count > 1 else ""
            lines.append(f"- [{severity}] {rule}{count}: {title} ({where})")
        if alert.more:
            rest = ", ".join(f"{r} {n}" for r, n in sorted(alert.more.items()))
            lines.append(f"- ... and {sum(alert.more.values())} more ({rest})")
        lines.append("")
        lines.append(f"First seen: {fmt_time(alert.first_seen)}")
        lines.append(f"Last seen:  {fmt_time(alert.last_seen)}")
    lines += ["", f"More: {alert.command}"]
    return _title(alert), guard_secrets("\n".join(lines))


def render_slack(alert: Alert) -> tuple[str, str]:
    """(title, body) for Slack: the title goes in a plain-text header, the body is mrkdwn."""
    sentence = slack_code(alert.sentence, MAX_SENTENCE) if alert.sentence_is_wire \
        else slack_escape(alert.sentence)
    lines = [sentence]
    if alert.fields or alert.items:
        lines.append("")
    for label, value in alert.fields:
        if label in ("Count", "First seen", "Last seen"):
            lines.append(f"*{label}:* {slack_escape(value)}")
        else:
            lines.append(f"*{label}:* {slack_code(value)}")
    if alert.kind == "digest":
        for item in alert.items:
            severity, rule, title, where = _item_line(item)
            count = f" x{item.count}" if item.count > 1 else ""
            lines.append(f"• *{severity}* {slack_code(rule)}{count}: {slack_code(title)} "
                         f"{slack_code(where)}")
        if alert.more:
            rest = ", ".join(f"{r} {n}" for r, n in sorted(alert.more.items()))
            lines.append(f"• … and {sum(alert.more.values())} more {slack_code(rest)}")
        lines.append(f"*First seen:* {fmt_time(alert.first_seen)}")
        lines.append(f"*Last seen:* {fmt_time(alert.last_seen)}")
    lines += ["", f"More: {slack_code(alert.command, 400)}"]
    return _title(alert), guard_secrets("\n".join(lines))


def render_json(alert: Alert) -> tuple[str, str]:
    """(title, body) where body is a JSON document with the structured fields and the text."""
    title, text = render_text(alert)
    doc: dict[str, Any] = {
        "kind": alert.kind, "severity": alert.severity, "rule": alert.rule,
        "title": title, "summary": alert.sentence, "count": alert.count,
        "first_seen": since_arg(alert.first_seen) if alert.first_seen is not None else None,
        "last_seen": since_arg(alert.last_seen) if alert.last_seen is not None else None,
        "command": alert.command, **alert.data, "text": text,
    }
    if alert.kind == "digest":
        doc["items"] = [{"rule": i.rule, "severity": i.severity, "title": i.title,
                         "count": i.count, **i.data} for i in alert.items]
        doc["more"] = alert.more
    return title, json.dumps(_guard_all(doc), ensure_ascii=False, sort_keys=True)


def _guard_all(value: Any) -> Any:
    if isinstance(value, str):
        return guard_secrets(value)
    if isinstance(value, dict):
        return {k: _guard_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_guard_all(v) for v in value]
    return value


RENDERERS = {"slack": render_slack, "text": render_text, "json": render_json}
