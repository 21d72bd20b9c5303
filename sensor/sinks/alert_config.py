"""The `alerts:` section of the configuration: where findings are sent, and how loudly.

Parsed and checked once at start-up (sensor.config calls `parse_alerts`). Every problem is one
ConfigError line naming the file, the line and the key. A target's apprise URL is a secret
(it holds tokens and passwords): it comes from `url`, `url_env: NAME` or `url_file: PATH`, is
checked with apprise itself, and is never printed: not in errors, not in reprs, not in logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ..records import SEVERITIES
from ..yamlfile import ConfigError, line_of

DEFAULT_MIN_SEVERITY = "medium"
FORMATS = ("auto", "slack", "text", "json")
TARGET_KEYS = frozenset(("name", "url", "url_env", "url_file", "min_severity", "rules",
                         "format"))
NUMBER_KEYS: dict[str, tuple[type, float, float]] = {
    # key: (type, smallest, largest)
    "queue_size": (int, 1, 1_000_000),
    "drain_timeout": (float, 0, 3600),
    "timeout": (float, 0.1, 300),
    "retries": (int, 0, 20),
    "backoff": (float, 0, 3600),
    "min_interval": (float, 0, 60),
    "repeat_period": (float, 0, 86400 * 7),
    "burst_count": (int, 1, 100_000),
    "burst_window": (float, 0, 86400),
    "digest_max": (int, 1, 1000),
}
ALERT_KEYS = frozenset(("targets", "min_severity", *NUMBER_KEYS))


@dataclass(frozen=True, slots=True)
class AlertTarget:
    """One place alerts go. `url` is secret: it is kept out of repr() and never printed."""

    name: str
    url: str = field(repr=False)
    source: str = "url"  # where the URL came from: "url", "env NAME" or "file PATH"
    min_severity: str = DEFAULT_MIN_SEVERITY
    rules: tuple[str, ...] | None = None  # None: every rule
    format: str = "auto"  # auto, slack, text, json


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    targets: tuple[AlertTarget, ...] = ()
    queue_size: int = 1000  # findings waiting for the worker; beyond it the lowest go first
    drain_timeout: float = 10.0  # seconds shutdown may spend delivering what is left
    timeout: float = 5.0  # seconds per network attempt (apprise cto/rto) unless the URL says
    retries: int = 3  # further attempts after a transient failure
    backoff: float = 2.0  # seconds before the first retry; doubles each time (at most 300)
    min_interval: float = 0.25  # seconds between two messages to one target
    repeat_period: float = 900.0  # repeats of one rule and group within it → one message
    burst_count: int = 5  # more messages than this within burst_window → one digest
    burst_window: float = 60.0
    digest_max: int = 20  # findings listed in one digest; the rest are counted

    @property
    def enabled(self) -> bool:
        return bool(self.targets)


# -- apprise's log, kept quiet and captured -----------------------------------------------------
# apprise logs whole URLs (secrets included) when it cannot parse one, and a warning per failed
# delivery, from its own worker threads (apprise 2.x). Its records are never printed: while a
# `capture_apprise_log()` block runs (one at a time, process-wide), they are kept for the
# caller, who redacts them and reports the reason in its own words.

_capture_lock = threading.RLock()
_active: list[logging.LogRecord] | None = None


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        records = _active
        if records is not None:
            records.append(record)
        return False


class _QuietWhileCapturing(logging.Filter):
    """urllib3 logs request paths (a Slack webhook's path is its token) at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _active is None


_FILTER = _QuietFilter()
_URLLIB3_FILTER = _QuietWhileCapturing()


@contextlib.contextmanager
def capture_apprise_log() -> Iterator[list[logging.LogRecord]]:
    global _active
    logger = logging.getLogger("apprise")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
        for name in ("urllib3.connectionpool", "urllib3.connection", "urllib3.util.retry"):
            logging.getLogger(name).addFilter(_URLLIB3_FILTER)
    with _capture_lock:
        previous, level = _active, logger.level
        records: list[logging.LogRecord] = []
        _active = records
        logger.setLevel(logging.DEBUG)  # the socket error is only in apprise's debug lines
        try:
            yield records
        finally:
            _active = previous
            logger.setLevel(level)


def url_scheme(url: str) -> str:
    """The scheme of a URL, for messages that must not show the rest of it."""
    head, sep, _ = url.partition("://")
    if sep and head.replace("+", "").replace("-", "").replace(".", "").isalnum() \
            and len(head) <= 20:
        return head.lower()
    return "?"


def secret_parts(url: str) -> list[str]:
    """Pieces of an apprise URL that may be secret, longest first (for redacting text)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    pieces = {url}
    host = parts.hostname or ""
    with contextlib.suppress(ValueError):
        pieces.update(p for p in (parts.username, parts.password) if p)
    # a host without a dot is a token in many apprise URLs (slack://TokenA/..., tgram://bot...)
    if host and "." not in host and host != "localhost" and ":" not in host:
        pieces.add(host)
    pieces.update(s for s in parts.path.split("/") if s)
    pieces.update(v for _, v in parse_qsl(parts.query, keep_blank_values=False) if v)
    pieces.update([unquote(p) for p in pieces])
    return sorted((p for p in pieces if len(p) >= 4), key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    for piece in secrets:
        if piece in text:
            text = text.replace(piece, "***")
    return text


def check_apprise_url(url: str) -> bool:
    """True when apprise can use the URL (apprise.Apprise().add(url)); nothing is printed."""
    import apprise

    with capture_apprise_log():
        return bool(apprise.Apprise().add(url))


# -- parsing ----------------------------------------------------------------------------------

def _error(path: str, node: Any, key: str, what: str) -> ConfigError:
    line = line_of(node)
    return ConfigError(f"{path}:{line}: {key}: {what}" if line else f"{path}: {key}: {what}")


def _severity(path: str, node: Any, key: str, value: Any) -> str:
    if value not in SEVERITIES:
        raise _error(path, node, key, f"{value!r} is not a severity ({', '.join(SEVERITIES)})")
    return value


def _number(path: str, node: dict, key: str, value: Any) -> int | float:
    kind, low, high = NUMBER_KEYS[key]
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or not low <= value <= high:
        what = "a whole number" if kind is int else "a number"
        raise _error(path, node, f"alerts.{key}", f"{value!r} must be {what} from {low:g} "
                                                  f"to {high:g}")
    return kind(value)


def _resolve_url(path: str, item: dict, key: str, base: Path) -> tuple[str, str, str]:
    """(url, where it came from, which key gave it)."""
    sources = [k for k in ("url", "url_env", "url_file") if k in item]
    if len(sources) != 1:
        raise _error(path, item, key, "give exactly one of url, url_env, url_file")
    which = sources[0]
    value = item[which]
    if not isinstance(value, str) or not value.strip():
        raise _error(path, item, f"{key}.{which}", "must be a non-empty string")
    value = value.strip()
    if which == "url":
        return value, "url", which
    if which == "url_env":
        url = os.environ.get(value)
        if not url or not url.strip():
            raise _error(path, item, f"{key}.url_env", f"environment variable {value} is not "
                                                       f"set or empty")
        return url.strip(), f"env {value}", which
    file = base / value
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise _error(path, item, f"{key}.url_file",
                     f"cannot read {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _error(path, item, f"{key}.url_file", f"{file} is not UTF-8 text") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip()
             .startswith("#")]
    if len(lines) != 1:
        raise _error(path, item, f"{key}.url_file",
                     f"{file} must hold one URL on one line (found {len(lines)})")
    return lines[0], f"file {file}", which


def _target(path: str, item: Any, index: int, base: Path, default_min: str,
            names: set[str]) -> AlertTarget:
    key = f"alerts.targets[{index}]"
    if not isinstance(item, dict):
        raise _error(path, item, key, "must be a mapping (name, url/url_env/url_file, ...)")
    unknown = set(item) - TARGET_KEYS
    if unknown:
        raise _error(path, item, f"{key}.{sorted(unknown)[0]}",
                     f"unknown key (known: {', '.join(sorted(TARGET_KEYS))})")
    name = item.get("name", f"target-{index + 1}")
    if not isinstance(name, str) or not name.strip() or len(name) > 64:
        raise _error(path, item, f"{key}.name", "must be a short non-empty string")
    if name in names:
        raise _error(path, item, f"{key}.name", f"{name!r} is used twice")
    names.add(name)
    url, source, which = _resolve_url(path, item, key, base)
    if not check_apprise_url(url):
        raise _error(path, item, f"{key}.{which}",
                     f"apprise cannot use this {url_scheme(url)}:// URL (target {name!r}; "
                     f"see apprise's documentation for its form)")
    min_severity = _severity(path, item, f"{key}.min_severity",
                             item.get("min_severity", default_min))
    rules = item.get("rules")
    if rules is not None:
        if not isinstance(rules, list) or not rules or \
                not all(isinstance(r, str) and r for r in rules):
            raise _error(path, item, f"{key}.rules", "must be a non-empty list of rule ids")
        rules = tuple(rules)
    fmt = item.get("format", "auto")
    if fmt not in FORMATS:
        raise _error(path, item, f"{key}.format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    return AlertTarget(name=name, url=url, source=source, min_severity=min_severity,
                       rules=rules, format=fmt)


def parse_alerts(path: str, spec: Any, base: Path) -> AlertsConfig:
    """The `alerts:` mapping of the config file at `path` (relative files are under `base`)."""
    if spec is None:
        return AlertsConfig()
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: alerts: must be a mapping (targets, min_severity, ...)")
    unknown = set(spec) - ALERT_KEYS
    if unknown:
        raise _error(path, spec, f"alerts.{sorted(unknown)[0]}",
                     f"unknown key (known: {', '.join(sorted(ALERT_KEYS))})")
    default_min = _severity(path, spec, "alerts.min_severity",
                            spec.get("min_severity", DEFAULT_MIN_SEVERITY))
    numbers = {k: _number(path, spec, k, spec[k]) for k in NUMBER_KEYS if k in spec}
    targets = spec.get("targets")
    targets = [] if targets is None else targets
    if not isinstance(targets, list):
        raise _error(path, spec, "alerts.targets", "must be a list of targets")
    names: set[str] = set()
    parsed = tuple(_target(path, item, i, base, default_min, names)
                   for i, item in enumerate(targets))
    return AlertsConfig(targets=parsed, **numbers)
