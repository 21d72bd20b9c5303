"""Rule files → compiled rules: YAML read once, conditions turned into plain predicates.

A rule file holds `rules:`, a list of rules. A rule:

    id, title, severity, description, tags, enabled
    match:      conditions on transaction fields (see FIELDS); a mapping means "all of"
    threshold:  {count, window, by: [fields], distinct: field}     (optional)
                or {sum: field, total, window, by: [fields]}
    suppress:   {period, by: [fields]}                             (optional)
    except:     {networks: [set or CIDR], usernames: [...], user_agents: [regex]}  (optional)
    triggers:   [{match, threshold}, ...]  instead of match/threshold, when a rule has several

Conditions: `field: value` (equals), or `field: {op: arg}` with op one of eq, ne, in, not_in,
regex, gt, gte, lt, lte, exists, in_net, not_in_net (a named network set from the config); and
the combinators all, any, not. Unknown fields, operators or network names are load errors that
name the file, the line and the rule.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..records import SEVERITIES, Transaction
from ..yamlfile import ConfigError, line_of, load_yaml
from .fields import FIELDS, NUMERIC_FIELDS

Predicate = Callable[[Transaction], bool]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RULE_KEYS = frozenset(("id", "title", "severity", "description", "tags", "enabled", "match",
                       "threshold", "suppress", "triggers", "except"))
EXCEPT_KEYS = frozenset(("networks", "usernames", "user_agents"))
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True, slots=True)
class Threshold:
    """Fire on the count-th match (or distinct value), or when a field's sum reaches total."""

    count: int
    window: float
    by: tuple[str, ...] = ()
    distinct: str | None = None
    sum: str | None = None
    total: float = 0.0


@dataclass(frozen=True, slots=True)
class Suppress:
    period: float
    by: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Trigger:
    predicate: Predicate
    threshold: Threshold | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    title: str
    severity: str
    description: str
    triggers: tuple[Trigger, ...]
    tags: tuple[str, ...] = ()
    enabled: bool = True
    suppress: Suppress | None = None
    exception: Predicate | None = None  # transactions that never trigger the rule
    source: str = ""  # file:line
    definition: Mapping[str, Any] = field(default_factory=dict, compare=False)


class _Context:
    """Where we are while compiling, for error messages."""

    def __init__(self, path: str, rule_id: str, networks: Mapping[str, tuple[Network, ...]]):
        self.path = path
        self.rule_id = rule_id
        self.networks = networks

    def error(self, node: Any, what: str, line: int = 0) -> ConfigError:
        where = f"{self.path}:{line_of(node, line)}" if line_of(node, line) else self.path
        return ConfigError(f"{where}: rule {self.rule_id!r}: {what}")


def parse_networks(spec: Mapping[str, Any], path: str) -> dict[str, tuple[Network, ...]]:
    """{name: [cidr, ...]} → parsed networks, errors naming file and line."""
    result: dict[str, tuple[Network, ...]] = {}
    for name, items in spec.items():
        if not isinstance(items, list):
            raise ConfigError(f"{path}:{line_of(spec)}: networks.{name}: expected a list of CIDRs")
        nets = []
        for item in items:
            try:
                nets.append(ipaddress.ip_network(str(item), strict=False))
            except ValueError:
                raise ConfigError(f"{path}:{line_of(items, line_of(spec))}: networks.{name}: "
                                  f"{item!r} is not an IP network") from None
        result[str(name)] = tuple(nets)
    return result


def _net_member(nets: tuple[Network, ...]) -> Callable[[Any], bool]:
    v4 = tuple(n for n in nets if n.version == 4)
    v6 = tuple(n for n in nets if n.version == 6)
    cache: dict[str, bool] = {}

    def member(value: Any) -> bool:
        if value is None:
            return False
        hit = cache.get(value)
        if hit is None:
            try:
                addr = ipaddress.ip_address(value)
            except ValueError:
                return False
            if addr.version == 6 and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            hit = any(addr in n for n in (v4 if addr.version == 4 else v6))
            if len(cache) > 65536:
                cache.clear()
            cache[value] = hit
        return hit

    return member


def _number(ctx: _Context, node: Any, op: str, arg: Any) -> float:
    if isinstance(arg, bool) or not isinstance(arg, int | float):
        raise ctx.error(node, f"{op} needs a number, got {arg!r}")
    return arg


def _compile_op(ctx: _Context, node: Any, name: str, op: str, arg: Any) -> Predicate:
    get = FIELDS[name]
    if op == "eq":
        return lambda t: get(t) == arg
    if op == "ne":
        return lambda t: get(t) != arg
    if op in ("in", "not_in"):
        if not isinstance(arg, list):
            raise ctx.error(node, f"{name}: {op} needs a list, got {arg!r}")
        values = frozenset(arg)
        if op == "in":
            return lambda t: get(t) in values
        return lambda t: get(t) not in values
    if op == "regex":  # one pattern, or a list of alternatives (each with its own flags)
        patterns = []
        for source in arg if isinstance(arg, list) else [arg]:
            try:
                patterns.append(re.compile(str(source)))
            except re.error as exc:
                raise ctx.error(node, f"{name}: bad regex {str(source)[:60]!r}: {exc}") from None

        def matches(t: Transaction) -> bool:
            value = get(t)
            if value is None:
                return False
            text = str(value)
            return any(p.search(text) is not None for p in patterns)

        return matches
    if op in ("gt", "gte", "lt", "lte"):
        bound = _number(ctx, node, op, arg)
        compare = {"gt": float.__gt__, "gte": float.__ge__, "lt": float.__lt__,
                   "lte": float.__le__}[op]

        def numeric(t: Transaction) -> bool:
            value = get(t)
            return (isinstance(value, int | float) and not isinstance(value, bool)
                    and compare(float(value), float(bound)))

        return numeric
    if op == "exists":
        if not isinstance(arg, bool):
            raise ctx.error(node, f"{name}: exists needs true or false, got {arg!r}")
        return (lambda t: get(t) is not None) if arg else (lambda t: get(t) is None)
    if op in ("in_net", "not_in_net"):
        names = arg if isinstance(arg, list) else [arg]
        nets: list[Network] = []
        for net_name in names:
            if net_name not in ctx.networks:
                known = ", ".join(sorted(ctx.networks)) or "none"
                raise ctx.error(node, f"{name}: unknown network set {net_name!r} "
                                      f"(defined: {known})")
            nets.extend(ctx.networks[net_name])
        member = _net_member(tuple(nets))
        if op == "in_net":
            return lambda t: member(get(t))
        return lambda t: get(t) is not None and not member(get(t))
    raise ctx.error(node, f"{name}: unknown operator {op!r} (known: eq, ne, in, not_in, regex, "
                          f"gt, gte, lt, lte, exists, in_net, not_in_net)")


def compile_match(ctx: _Context, node: Any) -> Predicate:
    """A match tree → one predicate over transactions."""
    if isinstance(node, list):
        return _all([compile_match(ctx, item) for item in node])
    if not isinstance(node, dict) or not node:
        raise ctx.error(node, f"a match must be a non-empty mapping, got {node!r}")
    parts: list[Predicate] = []
    for key, value in node.items():
        if key == "all":
            if not isinstance(value, list) or not value:
                raise ctx.error(node, "all needs a non-empty list of conditions")
            parts.append(_all([compile_match(ctx, item) for item in value]))
        elif key == "any":
            if not isinstance(value, list) or not value:
                raise ctx.error(node, "any needs a non-empty list of conditions")
            subs = [compile_match(ctx, item) for item in value]
            parts.append(lambda t, subs=subs: any(p(t) for p in subs))
        elif key == "not":
            sub = compile_match(ctx, value)
            parts.append(lambda t, sub=sub: not sub(t))
        elif key in FIELDS:
            if isinstance(value, dict):
                if not value:
                    raise ctx.error(node, f"{key}: empty condition")
                parts.extend(_compile_op(ctx, value, key, op, arg) for op, arg in value.items())
            elif isinstance(value, list):
                raise ctx.error(node, f"{key}: a list needs an operator ({{in: [...]}})")
            else:
                parts.append(_compile_op(ctx, node, key, "eq", value))
        else:
            raise ctx.error(node, f"unknown field {key!r} (known: {', '.join(sorted(FIELDS))})")
    return _all(parts)


def _all(parts: list[Predicate]) -> Predicate:
    if len(parts) == 1:
        return parts[0]
    return lambda t: all(p(t) for p in parts)


def _fields_list(ctx: _Context, node: Any, what: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    for item in items:
        if item not in FIELDS:
            raise ctx.error(node, f"{what}: unknown field {item!r}")
    return tuple(items)


def _positive(ctx: _Context, node: Any, what: str, value: Any, integer: bool = False) -> Any:
    ok = (isinstance(value, int) if integer else isinstance(value, int | float))
    if isinstance(value, bool) or not ok or value <= 0:
        kind = "a positive whole number" if integer else "a positive number of seconds"
        raise ctx.error(node, f"{what} must be {kind}, got {value!r}")
    return value


def _compile_threshold(ctx: _Context, node: Any) -> Threshold:
    if not isinstance(node, dict):
        raise ctx.error(node, "threshold must be a mapping")
    unknown = set(node) - {"count", "window", "by", "distinct", "sum", "total"}
    if unknown:
        raise ctx.error(node, f"threshold: unknown key {sorted(unknown)[0]!r}")
    summed = node.get("sum")
    needed = ("sum", "total", "window") if summed is not None else ("count", "window")
    for required in needed:
        if required not in node:
            raise ctx.error(node, f"threshold needs {required!r}")
    if summed is not None:
        if summed not in NUMERIC_FIELDS:
            raise ctx.error(node, f"threshold: sum: {summed!r} is not a numeric field "
                                  f"(numeric: {', '.join(sorted(NUMERIC_FIELDS))})")
        if "count" in node or "distinct" in node:
            raise ctx.error(node, "threshold: sum goes with total, not with count or distinct")
    distinct = node.get("distinct")
    if distinct is not None and distinct not in FIELDS:
        raise ctx.error(node, f"threshold: distinct: unknown field {distinct!r}")
    return Threshold(
        count=_positive(ctx, node, "threshold.count", node["count"], integer=True)
        if summed is None else 0,
        window=float(_positive(ctx, node, "threshold.window", node["window"])),
        by=_fields_list(ctx, node, "threshold.by", node.get("by")),
        distinct=distinct, sum=summed,
        total=float(_positive(ctx, node, "threshold.total", node["total"]))
        if summed is not None else 0.0)


def _compile_exception(ctx: _Context, node: Any) -> Predicate:
    """`except:` → a predicate true for the transactions the rule must ignore."""
    if not isinstance(node, dict) or not node:
        raise ctx.error(node, "except must be a mapping of networks, usernames, user_agents")
    unknown = set(node) - EXCEPT_KEYS
    if unknown:
        raise ctx.error(node, f"except: unknown key {sorted(unknown)[0]!r} "
                              f"(known: {', '.join(sorted(EXCEPT_KEYS))})")
    parts: list[Predicate] = []
    for key, value in node.items():
        if not isinstance(value, list) or not value:
            raise ctx.error(node, f"except.{key} must be a non-empty list")
    if "networks" in node:
        nets: list[Network] = []
        for item in node["networks"]:
            if isinstance(item, str) and item in ctx.networks:
                nets.extend(ctx.networks[item])
                continue
            try:
                nets.append(ipaddress.ip_network(str(item), strict=False))
            except ValueError:
                raise ctx.error(node, f"except.networks: {item!r} is neither a network set "
                                      f"nor a CIDR") from None
        member = _net_member(tuple(nets))
        parts.append(lambda t: member(t.flow.key.src_ip))
    if "usernames" in node:
        names = frozenset(str(u) for u in node["usernames"])
        parts.append(lambda t: t.credential.username in names)
    if "user_agents" in node:
        try:
            agents = re.compile("|".join(f"(?:{p})" for p in node["user_agents"]))
        except re.error as exc:
            raise ctx.error(node, f"except.user_agents: bad regex: {exc}") from None
        parts.append(lambda t: t.user_agent is not None and agents.search(t.user_agent)
                     is not None)
    if len(parts) == 1:
        return parts[0]
    return lambda t: any(p(t) for p in parts)


def _check_title(ctx: _Context, node: Any, title: str) -> None:
    for name in _PLACEHOLDER.findall(title):
        if name not in FIELDS:
            raise ctx.error(node, f"title: unknown field {{{name}}}")


def _compile_suppress(ctx: _Context, node: Any) -> Suppress:
    if not isinstance(node, dict):
        raise ctx.error(node, "suppress must be a mapping")
    unknown = set(node) - {"period", "by"}
    if unknown:
        raise ctx.error(node, f"suppress: unknown key {sorted(unknown)[0]!r}")
    if "period" not in node:
        raise ctx.error(node, "suppress needs 'period'")
    return Suppress(period=float(_positive(ctx, node, "suppress.period", node["period"])),
                    by=_fields_list(ctx, node, "suppress.by", node.get("by")))


def compile_rule(node: Any, path: str, networks: Mapping[str, tuple[Network, ...]]) -> Rule:
    """One rule mapping → Rule, or ConfigError naming file, line and rule."""
    rule_id = node.get("id") if isinstance(node, dict) else None
    ctx = _Context(path, str(rule_id) if rule_id is not None else "?", networks)
    if not isinstance(node, dict):
        raise ctx.error(node, f"a rule must be a mapping, got {type(node).__name__}")
    if not isinstance(rule_id, str) or not _ID.match(rule_id):
        raise ctx.error(node, "id must be lower-case letters, digits and dashes")
    unknown = set(node) - RULE_KEYS
    if unknown:
        raise ctx.error(node, f"unknown key {sorted(unknown)[0]!r}")
    for required in ("title", "severity", "description"):
        if not isinstance(node.get(required), str) or not node[required].strip():
            raise ctx.error(node, f"{required} is required (text)")
    _check_title(ctx, node, node["title"])
    severity = node["severity"]
    if severity not in SEVERITIES:
        raise ctx.error(node, f"severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    enabled = node.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ctx.error(node, f"enabled must be true or false, got {enabled!r}")
    tags = node.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ctx.error(node, "tags must be a list of strings")
    if ("triggers" in node) == ("match" in node):
        raise ctx.error(node, "give either match (with an optional threshold) or triggers")
    if "triggers" in node:
        specs = node["triggers"]
        if not isinstance(specs, list) or not specs:
            raise ctx.error(node, "triggers must be a non-empty list")
    else:
        specs = [{k: node[k] for k in ("match", "threshold") if k in node}]
    triggers = []
    for spec in specs:
        if not isinstance(spec, dict) or "match" not in spec or set(spec) - {"match",
                                                                                "threshold"}:
            raise ctx.error(spec, "a trigger is a mapping with match and an optional threshold",
                            line_of(node))
        triggers.append(Trigger(
            predicate=compile_match(ctx, spec["match"]),
            threshold=_compile_threshold(ctx, spec["threshold"]) if "threshold" in spec
            else None))
    return Rule(
        id=rule_id, title=node["title"].strip(), severity=severity,
        description=" ".join(node["description"].split()), triggers=tuple(triggers),
        tags=tuple(tags), enabled=enabled,
        suppress=_compile_suppress(ctx, node["suppress"]) if "suppress" in node else None,
        exception=_compile_exception(ctx, node["except"]) if "except" in node else None,
        source=f"{path}:{line_of(node)}", definition=node)


def _merged(base: Any, changes: Mapping[str, Any]) -> Any:
    """A copy of mapping `base` with `changes` applied, keeping its line number."""
    merged = type(base)(base) if isinstance(base, dict) else dict(base)
    if hasattr(base, "line"):
        merged.line = base.line
    merged.update(changes)
    return merged


_COUNT_ONLY = frozenset(("count", "distinct"))
_SUM_ONLY = frozenset(("sum", "total"))


def _threshold_override(threshold: Any, change: Mapping[str, Any]) -> Any:
    """A trigger's threshold with the override keys that fit its kind (count or sum)."""
    is_sum = "sum" in threshold
    fitting = {k: v for k, v in change.items()
               if not (k in _COUNT_ONLY and is_sum) and not (k in _SUM_ONLY and not is_sum)}
    return _merged(threshold, fitting)


def merge_override(node: Mapping[str, Any], override: Mapping[str, Any]) -> Any:
    """A rule definition with an operator's override applied.

    Mappings (threshold, suppress, except) are merged one level deep. On a rule with several
    triggers, a threshold override applies to each trigger's threshold where it fits:
    count/distinct to counting thresholds, sum/total to summing ones, window/by to all.
    """
    merged = _merged(node, {})
    for key, value in override.items():
        if key == "threshold" and isinstance(merged.get("triggers"), list) and isinstance(
                value, dict):
            merged["triggers"] = [
                _merged(t, {"threshold": _threshold_override(t["threshold"], value)})
                if isinstance(t, dict) and isinstance(t.get("threshold"), dict) else t
                for t in merged["triggers"]]
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def rule_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and the *.yaml / *.yml files of directories named, in a stable order."""
    files: list[Path] = []
    for entry in paths:
        p = Path(entry)
        if p.is_dir():
            files.extend(sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml")))
        elif p.exists():
            files.append(p)
        else:
            raise ConfigError(f"{p}: rule file or directory not found")
    return files


def load_rules(paths: Iterable[str | Path], networks: Mapping[str, tuple[Network, ...]],
               overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[Rule]:
    """Every rule of the files (and directories) given, compiled; ConfigError on the first fault."""
    overrides = overrides or {}
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for path in rule_files(paths):
        data = load_yaml(path)
        if data is None:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
            raise ConfigError(f"{path}:{line_of(data, 1)}: a rule file holds 'rules:', a list")
        extra = set(data) - {"rules"}
        if extra:
            raise ConfigError(f"{path}:{line_of(data, 1)}: unknown top-level key "
                              f"{sorted(extra)[0]!r}")
        for node in data["rules"]:
            rid = node.get("id") if isinstance(node, dict) else None
            if isinstance(rid, str) and rid in overrides:
                node = merge_override(node, overrides[rid])
            rule = compile_rule(node, str(path), networks)
            if rule.id in seen:
                raise ConfigError(f"{path}:{line_of(node)}: rule {rule.id!r}: duplicate id "
                                  f"(first defined at {seen[rule.id]})")
            seen[rule.id] = rule.source
            rules.append(rule)
    unknown = set(overrides) - set(seen)
    if unknown:
        raise ConfigError(f"override for unknown rule {sorted(unknown)[0]!r}")
    return rules
