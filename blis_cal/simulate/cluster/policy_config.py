"""The cluster policy YAML (`--policy-config`): instances, admission, routing, priority and scheduler in one file.

Layout (every key optional; BLIS's policy-bundle keys plus our latencies, staleness and index size):

    instances: 4
    admission:
      policy: token-bucket            # registry `admission_policies`
      token_bucket_capacity: 10000    # tokens
      token_bucket_refill_rate: 1000  # tokens per simulated second
      latency_us: 0                   # arrival -> admission decision
    routing:
      policy: weighted                # registry `routing_policies`
      scorers:                        # registry `routing_scorers` (weighted only)
        - {name: prefix-affinity, weight: 3}
        - {name: queue-depth, weight: 2}
      latency_us: 0                   # admission -> routing decision
      snapshot_refresh_us: 0          # instance state the router sees is refreshed this often; 0 = always fresh
      prefix_cache_blocks: 10000      # router-side prefix index size per instance (blocks)
    priority:
      policy: slo-based               # registry `priority_policies`
    scheduler: priority-fcfs          # registry `scheduler_policies`

Parsing is strict: unknown keys, wrong types, NaN and out-of-range values are errors naming file, line and key.
Command-line flags override the file (`with_overrides`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blis_cal.errors import ConfigError
from blis_cal.simulate.cluster.admission import AdmissionParams, admission_policies
from blis_cal.simulate.cluster.routing import DEFAULT_SCORERS, ScorerSpec, check_scorers, routing_policies
from blis_cal.simulate.cluster.scheduling import priority_policies
from blis_cal.simulate.scheduler import scheduler_policies


@dataclass(frozen=True)
class PolicyConfig:
    """Everything that shapes a cluster run beyond one instance's engine settings."""

    instances: int = 1
    admission: str = "always-admit"
    admission_params: AdmissionParams = field(default_factory=AdmissionParams)
    admission_latency_us: int = 0
    routing: str = "round-robin"
    scorers: tuple[ScorerSpec, ...] = DEFAULT_SCORERS
    routing_latency_us: int = 0
    snapshot_refresh_us: int = 0
    prefix_cache_blocks: int = 10000
    priority: str = "constant"
    scheduler: str = "fcfs"

    def __post_init__(self) -> None:
        _positive_int(self.instances, "instances")
        for name in ("admission_latency_us", "routing_latency_us", "snapshot_refresh_us"):
            _non_negative_int(getattr(self, name), name)
        _positive_int(self.prefix_cache_blocks, "routing.prefix_cache_blocks")
        admission_policies.get(self.admission)
        routing_policies.get(self.routing)
        priority_policies.get(self.priority)
        scheduler_policies.get(self.scheduler)
        check_scorers(self.scorers, "routing.scorers")

    def with_overrides(self, **flags: Any) -> PolicyConfig:
        """A copy with every flag that is not None applied (command line beats the file)."""
        return dataclasses.replace(self, **{k: v for k, v in flags.items() if v is not None})

    def to_dict(self) -> dict:
        """The effective configuration, in the YAML's layout (for run summaries)."""
        return {
            "instances": self.instances,
            "admission": {
                "policy": self.admission,
                "token_bucket_capacity": self.admission_params.token_bucket_capacity,
                "token_bucket_refill_rate": self.admission_params.token_bucket_refill_rate,
                "latency_us": self.admission_latency_us,
            },
            "routing": {
                "policy": self.routing,
                "scorers": [{"name": s.name, "weight": s.weight} for s in self.scorers],
                "latency_us": self.routing_latency_us,
                "snapshot_refresh_us": self.snapshot_refresh_us,
                "prefix_cache_blocks": self.prefix_cache_blocks,
            },
            "priority": {"policy": self.priority},
            "scheduler": self.scheduler,
        }


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _non_negative_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0 (µs), got {value!r}")


# ------------------------------------------------------------------------------------------- YAML


_SECTIONS: dict[str, set[str]] = {
    "admission": {"policy", "token_bucket_capacity", "token_bucket_refill_rate", "latency_us"},
    "routing": {"policy", "scorers", "latency_us", "snapshot_refresh_us", "prefix_cache_blocks"},
    "priority": {"policy"},
}
_TOP = {"instances", "scheduler", *_SECTIONS}


class _Doc:
    """The parsed YAML plus its node tree, so errors can name the line of the offending key."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        try:
            self.node = yaml.compose(text)
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        self._no_duplicate_keys(self.node)

    def _no_duplicate_keys(self, node: yaml.Node | None) -> None:
        """YAML keeps the last of two equal keys silently; a policy file saying a thing twice is a mistake."""
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                if key.value in seen:
                    raise ConfigError(f"{self.source}:{key.start_mark.line + 1}: {key.value}: duplicate key")
                seen.add(key.value)
                self._no_duplicate_keys(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._no_duplicate_keys(item)

    def line(self, path: tuple[Any, ...]) -> int | None:
        node = self.node
        line = node.start_mark.line + 1 if node is not None else None
        for key in path:
            if isinstance(node, yaml.MappingNode):
                match = next((v for k, v in node.value if k.value == key), None)
                key_node = next((k for k, v in node.value if k.value == key), None)
                if match is None:
                    return line
                line, node = key_node.start_mark.line + 1, match
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    def error(self, path: tuple[Any, ...], message: str) -> ConfigError:
        line = self.line(path)
        where = f"{self.source}:{line}" if line is not None else self.source
        key = ".".join(str(p) for p in path)
        return ConfigError(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def load_policy_config(path: Path | str) -> PolicyConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--policy-config {path}: cannot read ({exc.strerror})") from None
    return parse_policy_config(text, str(path))


def parse_policy_config(text: str, source: str = "<policy-config>") -> PolicyConfig:
    """Parse the policy YAML strictly into a PolicyConfig (defaults for everything absent)."""
    doc = _Doc(text, source)
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise doc.error((), f"the top level must be a mapping of {', '.join(sorted(_TOP))}")
    _known(doc, (), data, _TOP)
    kwargs: dict[str, Any] = {}
    if "instances" in data:
        kwargs["instances"] = _int(doc, ("instances",), data["instances"], minimum=1)
    if "scheduler" in data:
        kwargs["scheduler"] = _name(doc, ("scheduler",), data["scheduler"], scheduler_policies)
    adm = _section(doc, data, "admission")
    if "policy" in adm:
        kwargs["admission"] = _name(doc, ("admission", "policy"), adm["policy"], admission_policies)
    params = {}
    for key in ("token_bucket_capacity", "token_bucket_refill_rate"):
        if key in adm:
            params[key] = _number(
                doc, ("admission", key), adm[key], minimum=0.0, strict=key.endswith("capacity")
            )
    kwargs["admission_params"] = AdmissionParams(**params)
    if "latency_us" in adm:
        kwargs["admission_latency_us"] = _int(doc, ("admission", "latency_us"), adm["latency_us"], minimum=0)
    rt = _section(doc, data, "routing")
    if "policy" in rt:
        kwargs["routing"] = _name(doc, ("routing", "policy"), rt["policy"], routing_policies)
    if "scorers" in rt:
        kwargs["scorers"] = _scorers(doc, rt["scorers"])
    for key, field_name, minimum in (
        ("latency_us", "routing_latency_us", 0),
        ("snapshot_refresh_us", "snapshot_refresh_us", 0),
        ("prefix_cache_blocks", "prefix_cache_blocks", 1),
    ):
        if key in rt:
            kwargs[field_name] = _int(doc, ("routing", key), rt[key], minimum=minimum)
    pr = _section(doc, data, "priority")
    if "policy" in pr:
        kwargs["priority"] = _name(doc, ("priority", "policy"), pr["policy"], priority_policies)
    return PolicyConfig(**kwargs)


def _known(doc: _Doc, path: tuple[Any, ...], data: dict, allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise doc.error((*path, key), f"unknown key; allowed: {', '.join(sorted(allowed))}")


def _section(doc: _Doc, data: dict, name: str) -> dict:
    sec = data.get(name)
    if sec is None:
        return {}
    if not isinstance(sec, dict):
        raise doc.error((name,), f"must be a mapping of {', '.join(sorted(_SECTIONS[name]))}")
    _known(doc, (name,), sec, _SECTIONS[name])
    return sec


def _name(doc: _Doc, path: tuple[Any, ...], value: Any, registry: Any) -> str:
    if not isinstance(value, str) or value not in registry:
        raise doc.error(path, f"{value!r} is not one of: {', '.join(registry.names())}")
    return value


def _int(doc: _Doc, path: tuple[Any, ...], value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise doc.error(path, f"must be an integer, got {value!r}")
    if value < minimum:
        raise doc.error(path, f"must be >= {minimum}, got {value}")
    return value


def _number(doc: _Doc, path: tuple[Any, ...], value: Any, *, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise doc.error(path, f"must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise doc.error(path, f"must be {'>' if strict else '>='} {minimum:g}, got {value}")
    return float(value)


def _scorers(doc: _Doc, value: Any) -> tuple[ScorerSpec, ...]:
    path = ("routing", "scorers")
    if not isinstance(value, list) or not value:
        raise doc.error(path, "must be a non-empty list of {name, weight}")
    specs = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise doc.error((*path, i), "must be a mapping with name and weight")
        _known(doc, (*path, i), item, {"name", "weight"})
        if "name" not in item or "weight" not in item:
            raise doc.error((*path, i), "needs both name and weight")
        try:
            specs.append(
                ScorerSpec(
                    item["name"], _number(doc, (*path, i, "weight"), item["weight"], minimum=0.0, strict=True)
                )
            )
        except ConfigError as exc:
            raise doc.error((*path, i), str(exc)) from None
    try:
        return check_scorers(specs, "routing.scorers")
    except ConfigError as exc:
        raise doc.error(path, str(exc)) from None
