"""The sensor's configuration: YAML → frozen dataclasses, validated once at start-up.

Every problem is a ConfigError of one line naming the file, the line and the key. With no file,
the embedded defaults apply: port 5000, the internal networks of RFC 1918 and friends, the rule
pack shipped inside the package, state under the default state directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .detect.rules import Network, parse_networks
from .engine import EngineSettings
from .sinks.alert_config import AlertsConfig, AlertTarget, parse_alerts  # noqa: F401
from .state import default_state_dir
from .yamlfile import ConfigError, line_of, load_yaml

DEFAULT_INTERNAL = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "127.0.0.0/8", "::1/128",  # loopback
    "169.254.0.0/16", "fe80::/10",  # link-local
    "100.64.0.0/10",  # CGNAT (RFC 6598)
    "fc00::/7",  # IPv6 unique local
)

TOP_KEYS = frozenset(("ports", "database", "key_file", "networks", "rules", "reassembly",
                      "alerts", "live"))
REASSEMBLY_KEYS = {
    "idle_timeout": float, "max_held_per_flow": int, "max_held_total": int,
    "max_header_bytes": int, "max_pending_requests": int,
}


@dataclass(frozen=True, slots=True)
class LiveConfig:
    """The `live:` section: how `registry-sensor live` captures and keeps house."""

    interfaces: tuple[str, ...] = ()  # capture interfaces (span ports); --interface overrides
    promiscuous: bool = True  # PACKET_ADD_MEMBERSHIP promiscuous mode, for span ports
    capture: str = "ring"  # ring (TPACKET_V3 mmap) or recv (one recv per frame)
    buffer_size: int = 64 << 20  # ring size or socket receive buffer, per interface, bytes
    snaplen: int = 262144  # bytes kept of each frame (GRO frames reach 64 KiB)
    stats_interval: float = 10.0  # seconds between kernel-statistics reads (stats table)
    flush_interval: float = 1.0  # seconds between SQLite commits
    user: str = "registry-sensor"  # started as root: drop to this user once sockets are open
    watchdog: bool = True  # answer systemd's WatchdogSec= with WATCHDOG=1 pings
    workers: int = 1  # capture processes, flows spread by PACKET_FANOUT_HASH; --workers overrides


MAX_WORKERS = 64  # live.workers, --workers

_SIZE_UNITS = {"": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_live(path: str, node: Any) -> LiveConfig:
    """The `live:` mapping → LiveConfig; every error one line naming the key."""
    if node is None:
        return LiveConfig()
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: live: must be a mapping")
    known = set(LiveConfig.__slots__)
    args: dict[str, Any] = {}
    for key, value in node.items():
        where = f"live.{key}"
        if key not in known:
            raise _error(path, node, where, f"unknown key (known: {', '.join(sorted(known))})")
        if key == "interfaces":
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(i, str) and 0 < len(i) < 16 and "/" not in i for i in items):
                raise _error(path, node, where, "must be a list of interface names")
            args[key] = tuple(items)
        elif key in ("promiscuous", "watchdog"):
            if not isinstance(value, bool):
                raise _error(path, node, where, "must be true or false")
            args[key] = value
        elif key == "capture":
            if value not in ("ring", "recv"):
                raise _error(path, node, where, f"{value!r} must be ring or recv")
            args[key] = value
        elif key in ("buffer_size", "snaplen"):
            size = value
            if isinstance(value, str):
                text = value.strip().lower().replace(" ", "")
                digits = text.rstrip("kmgib")
                unit = _SIZE_UNITS.get(text[len(digits):])
                size = int(digits) * unit if digits.isdigit() and unit else None
            if isinstance(size, bool) or not isinstance(size, int):
                raise _error(path, node, where, f"{value!r} is not a size (65536, 64MiB)")
            low, high = (1 << 16, 1 << 34) if key == "buffer_size" else (1514, 1 << 18)
            if not low <= size <= high:
                raise _error(path, node, where, f"{value!r} must be between {low} and {high}")
            args[key] = size
        elif key in ("stats_interval", "flush_interval"):
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    0.05 <= value <= 86400):
                raise _error(path, node, where, f"{value!r} must be seconds (0.05 to 86400)")
            args[key] = float(value)
        elif key == "user":
            if not isinstance(value, str) or not value or ":" in value:
                raise _error(path, node, where, "must be a user name")
            args[key] = value
        elif key == "workers":
            if isinstance(value, bool) or not isinstance(value, int) or not (
                    1 <= value <= MAX_WORKERS):
                raise _error(path, node, where, f"{value!r} must be a number of processes "
                                                f"(1 to {MAX_WORKERS})")
            args[key] = value
    return LiveConfig(**args)


def builtin_rules_dir() -> Path:
    """The rule pack shipped inside the installed package."""
    return Path(str(resources.files("sensor") / "rules"))


@dataclass(frozen=True, slots=True)
class SensorConfig:
    source: str = "<defaults>"
    engine: EngineSettings = field(default_factory=EngineSettings)
    database: Path | None = None
    key_file: Path | None = None
    networks: dict[str, tuple[Network, ...]] = field(default_factory=dict)
    rule_paths: tuple[Path, ...] = ()
    rule_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)  # apprise targets, noise control
    live: LiveConfig = field(default_factory=LiveConfig)  # capture, privileges, housekeeping

    def database_path(self, override: str | None = None) -> Path:
        if override:
            return Path(override)
        return self.database or default_state_dir() / "sensor.db"

    def key_path(self) -> Path:
        return self.key_file or default_state_dir() / "fingerprint.key"


def _error(path: str, node: Any, key: str, what: str) -> ConfigError:
    """One line naming the file, the line of `key` (dotted; its last part is looked up in
    `node`, the mapping that holds it) and what is wrong."""
    line = line_of(node, key=key.rsplit(".", 1)[-1])
    return ConfigError(f"{path}:{line}: {key}: {what}" if line else f"{path}: {key}: {what}")


def _ports(path: str, data: dict, value: Any) -> frozenset[int]:
    items = value if isinstance(value, list) else [value]
    ports = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 < item < 65536:
            raise _error(path, data, "ports", f"{item!r} is not a TCP port")
        ports.append(item)
    if not ports:
        raise _error(path, data, "ports", "at least one port is needed")
    return frozenset(ports)


def load_config(path: str | Path | None) -> SensorConfig:
    """The configuration in `path`, or the embedded defaults when path is None."""
    networks = parse_networks({"internal": list(DEFAULT_INTERNAL)}, "<defaults>")
    if path is None:
        return SensorConfig(networks=networks, rule_paths=(builtin_rules_dir(),))
    spath = str(path)
    data = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{spath}: the configuration must be a mapping")
    unknown = set(data) - TOP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise _error(spath, data, key, f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    base = Path(spath).parent

    engine_args: dict[str, Any] = {}
    if "ports" in data:
        engine_args["ports"] = _ports(spath, data, data["ports"])
    reassembly = data.get("reassembly") or {}
    if not isinstance(reassembly, dict):
        raise _error(spath, data, "reassembly", "must be a mapping")
    for key, value in reassembly.items():
        kind = REASSEMBLY_KEYS.get(key)
        if kind is None:
            raise _error(spath, reassembly, f"reassembly.{key}", "unknown key")
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise _error(spath, reassembly, f"reassembly.{key}", f"{value!r} must be positive")
        engine_args[key] = kind(value)

    if "networks" in data:
        spec = data["networks"]
        if not isinstance(spec, dict):
            raise _error(spath, data, "networks", "must be a mapping of name: [CIDR, ...]")
        networks.update(parse_networks(spec, spath))

    rules = data.get("rules") or {}
    if not isinstance(rules, dict):
        raise _error(spath, data, "rules", "must be a mapping (builtin, paths, overrides)")
    extra = set(rules) - {"builtin", "paths", "overrides"}
    if extra:
        raise _error(spath, rules, f"rules.{sorted(extra)[0]}", "unknown key")
    rule_paths: list[Path] = []
    builtin = rules.get("builtin", True)
    if not isinstance(builtin, bool):
        raise _error(spath, rules, "rules.builtin", "must be true or false")
    if builtin:
        rule_paths.append(builtin_rules_dir())
    paths = rules.get("paths") or []
    if not isinstance(paths, list):
        raise _error(spath, rules, "rules.paths", "must be a list of files or directories")
    rule_paths.extend(base / str(p) for p in paths)
    overrides = rules.get("overrides") or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict)
                                                  for v in overrides.values()):
        raise _error(spath, rules, "rules.overrides", "must map rule ids to mappings")

    def opt_path(key: str) -> Path | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise _error(spath, data, key, "must be a path")
        return base / value

    return SensorConfig(
        source=spath, engine=EngineSettings(**engine_args), database=opt_path("database"),
        key_file=opt_path("key_file"), networks=networks, rule_paths=tuple(rule_paths),
        rule_overrides=dict(overrides), alerts=parse_alerts(spath, data.get("alerts"), base),
        live=parse_live(spath, data.get("live")))
