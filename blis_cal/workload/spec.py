"""The workload spec YAML (v2 schema, blis-formats.md §3): strict parsing into dataclasses, and back.

Every error names the file and the key path (`spec.yaml: clients[1].arrival.cv: must be > 0, got -1`).
Keys BLIS knows but blis-cal does not implement are rejected as such rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blis_cal.errors import ConfigError
from blis_cal.workload.samplers import arrival_samplers, length_sampler, length_samplers, number

SLO_CLASSES = ("critical", "standard", "batch", "sheddable", "background")
_V1_SLO_RENAMES = {"realtime": "critical", "interactive": "standard"}
CATEGORIES = ("", "language", "reasoning", "multimodal")
CONTEXT_GROWTH = ("", "accumulate")
DEFAULT_PREFIX_LENGTH = 50  # BLIS: a group's length when its first client does not set one

_TOP_KEYS = (
    "version",
    "seed",
    "category",
    "aggregate_rate",
    "rate",
    "num_requests",
    "horizon",
    "clients",
    "servegen_data",
    "goodput_slo_targets",
)
_CLIENT_KEYS = (
    "id",
    "tenant_id",
    "slo_class",
    "model",
    "rate_fraction",
    "concurrency",
    "think_time_us",
    "think_time_distribution",
    "arrival",
    "input_distribution",
    "output_distribution",
    "prefix_group",
    "prefix_length",
    "streaming",
    "reasoning",
    "closed_loop",
)
# BLIS keys with no blis-cal implementation: an explicit error beats silently generating something else.
_UNSUPPORTED = {
    "cohorts": "cohorts",
    "inference_perf": "inference_perf",
    "adapter": "LoRA adapters",
    "network": "per-client network delays",
    "lifecycle": "lifecycle windows",
    "multimodal": "multimodal inputs",
    "timeout": "per-client timeouts",
    "slo_target_us": "per-request SLO targets",
    "reason_ratio_distribution": "reason ratios",
}


# ---------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Distribution:
    """A length distribution: a `length_samplers` type and its params (validated at parse time)."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)

    def sampler(self, where: str = "distribution"):
        return length_sampler({"type": self.type, "params": self.params}, where)


@dataclass(frozen=True)
class Arrival:
    process: str = "poisson"
    cv: float | None = None
    shape: float | None = None
    scale: float | None = None  # µs

    def sampler(self, rate_per_us: float, where: str = "arrival"):
        params = {"cv": self.cv, "shape": self.shape, "scale": self.scale}
        return arrival_samplers.get(self.process).from_params(rate_per_us, params, where)


@dataclass(frozen=True)
class MultiTurn:
    max_rounds: int
    think_time_us: int = 0
    context_growth: str = ""  # "accumulate": each round's prompt carries every earlier prompt and answer
    single_session: bool = False  # closed-loop users stop after one session


@dataclass(frozen=True)
class ClientSpec:
    id: str
    input_distribution: Distribution
    output_distribution: Distribution
    tenant_id: str = ""
    slo_class: str = ""
    model: str = ""
    rate_fraction: float | None = None  # open loop (normalised over clients); None with concurrency
    concurrency: int | None = None  # closed-loop users
    think_time_us: int = 0  # closed-loop users: pause between a response and the next request
    think_time_distribution: Distribution | None = None  # instead of think_time_us: a drawn pause (µs)
    arrival: Arrival = field(default_factory=Arrival)
    prefix_group: str = ""
    prefix_length: int | None = None
    streaming: bool = False
    multi_turn: MultiTurn | None = None
    closed_loop: bool | None = None  # default: true for multi-turn clients

    @property
    def is_closed_loop(self) -> bool:
        """Does a driver release this client's next request when the previous one finishes?"""
        if self.concurrency is not None:
            return True
        return self.multi_turn is not None and self.closed_loop is not False


@dataclass(frozen=True)
class ServeGenData:
    path: str
    span_start: float = 0.0  # seconds; 0 = unbounded
    span_end: float = 0.0


@dataclass
class WorkloadSpec:
    clients: list[ClientSpec]
    version: str = "2"
    seed: int = 0
    category: str = ""
    aggregate_rate: float = 0.0  # requests/s over the open-loop clients
    num_requests: int = 0  # 0 = unlimited (then horizon bounds the run)
    horizon: int = 0  # µs; 0 = unbounded
    servegen_data: ServeGenData | None = None  # when set, `clients` were imported from it
    goodput_slo_targets: dict[str, dict[str, float]] = field(default_factory=dict)

    def prefix_lengths(self) -> dict[str, int]:
        """Each group's shared prefix length: set by the group's first client (BLIS), else 50."""
        lengths: dict[str, int] = {}
        for client in self.clients:
            if client.prefix_group and client.prefix_group not in lengths:
                length = client.prefix_length
                lengths[client.prefix_group] = DEFAULT_PREFIX_LENGTH if length is None else length
        return lengths


# ---------------------------------------------------------------------------------------------- parsing


def _mapping(where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _strict(where: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in data:
        if key in _UNSUPPORTED:
            raise ConfigError(f"{where}.{key}: {_UNSUPPORTED[key]} are not supported by blis-cal")
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key; allowed: {', '.join(allowed)}")


def _int(where: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _str(where: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return str(value)


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _choice(where: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        shown = ", ".join(repr(a) if a == "" else a for a in allowed)
        raise ConfigError(f"{where}: {value!r} is not allowed; allowed: {shown}")
    return value


def _distribution(where: str, value: Any) -> Distribution:
    data = _mapping(where, value)
    if "file" in data:
        raise ConfigError(f"{where}.file: distributions from files are not supported (BLIS neither)")
    _strict(where, data, ("type", "params"))
    if "type" not in data:
        raise ConfigError(f"{where}.type: required; allowed: {', '.join(length_samplers.names())}")
    kind = _choice(f"{where}.type", _str(f"{where}.type", data["type"]), tuple(length_samplers.names()))
    params = dict(_mapping(f"{where}.params", data.get("params") or {}))
    length_sampler({"type": kind, "params": params}, where)  # validates params now, with this key path
    return Distribution(kind, params)


def _arrival(where: str, value: Any) -> Arrival:
    data = _mapping(where, value)
    _strict(where, data, ("process", "cv", "shape", "scale"))
    process = _choice(
        f"{where}.process",
        _str(f"{where}.process", data.get("process", "poisson")),
        tuple(arrival_samplers.names()),
    )
    values = {
        k: number(f"{where}.{k}", data[k], positive=True) for k in ("cv", "shape", "scale") if k in data
    }
    arrival = Arrival(process, **values)
    arrival.sampler(1e-6, where)  # validates the combination (e.g. cv on poisson, weibull cv range)
    return arrival


def _multi_turn(where: str, value: Any) -> MultiTurn:
    data = _mapping(where, value)
    _strict(where, data, ("max_rounds", "think_time_us", "context_growth", "single_session"))
    if "max_rounds" not in data:
        raise ConfigError(f"{where}.max_rounds: required (>= 1)")
    return MultiTurn(
        max_rounds=_int(f"{where}.max_rounds", data["max_rounds"], minimum=1),
        think_time_us=_int(f"{where}.think_time_us", data.get("think_time_us", 0)),
        context_growth=_choice(
            f"{where}.context_growth",
            _str(f"{where}.context_growth", data.get("context_growth")),
            CONTEXT_GROWTH,
        ),
        single_session=_bool(f"{where}.single_session", data.get("single_session", False)),
    )


def _client(where: str, value: Any, version: str) -> ClientSpec:
    data = _mapping(where, value)
    _strict(where, data, _CLIENT_KEYS)
    for key in ("id", "input_distribution", "output_distribution"):
        if key not in data:
            raise ConfigError(f"{where}.{key}: required")
    if "rate_fraction" in data and "concurrency" in data:
        raise ConfigError(f"{where}: rate_fraction and concurrency are mutually exclusive")
    slo = _str(f"{where}.slo_class", data.get("slo_class"))
    if version == "1":
        slo = _V1_SLO_RENAMES.get(slo, slo)
    multi_turn = None
    if "reasoning" in data:
        reasoning = _mapping(f"{where}.reasoning", data["reasoning"])
        _strict(f"{where}.reasoning", reasoning, ("multi_turn",))
        if "multi_turn" in reasoning:
            multi_turn = _multi_turn(f"{where}.reasoning.multi_turn", reasoning["multi_turn"])
    concurrency = (
        _int(f"{where}.concurrency", data["concurrency"], minimum=1) if "concurrency" in data else None
    )
    rate_fraction = None
    if concurrency is None:
        rate_fraction = number(f"{where}.rate_fraction", data.get("rate_fraction", 1.0), positive=True)
    if concurrency is not None and "arrival" in data:
        raise ConfigError(f"{where}.arrival: closed-loop (concurrency) clients have no arrival process")
    for key in ("think_time_us", "think_time_distribution"):
        if key in data and concurrency is None:
            raise ConfigError(
                f"{where}.{key}: only for concurrency clients (sessions use reasoning.multi_turn.think_time_us)"
            )
    if "think_time_us" in data and "think_time_distribution" in data:
        raise ConfigError(f"{where}: think_time_us and think_time_distribution are mutually exclusive")
    closed_loop = _bool(f"{where}.closed_loop", data["closed_loop"]) if "closed_loop" in data else None
    if closed_loop is not None and multi_turn is None:
        raise ConfigError(f"{where}.closed_loop: only meaningful with reasoning.multi_turn")
    prefix_group = _str(f"{where}.prefix_group", data.get("prefix_group"))
    prefix_length = _int(f"{where}.prefix_length", data["prefix_length"]) if "prefix_length" in data else None
    if prefix_length is not None and not prefix_group:
        raise ConfigError(f"{where}.prefix_length: needs a prefix_group")
    return ClientSpec(
        id=_str(f"{where}.id", data["id"]),
        input_distribution=_distribution(f"{where}.input_distribution", data["input_distribution"]),
        output_distribution=_distribution(f"{where}.output_distribution", data["output_distribution"]),
        tenant_id=_str(f"{where}.tenant_id", data.get("tenant_id")),
        slo_class=_choice(f"{where}.slo_class", slo, ("", *SLO_CLASSES)),
        model=_str(f"{where}.model", data.get("model")),
        rate_fraction=rate_fraction,
        concurrency=concurrency,
        think_time_us=_int(f"{where}.think_time_us", data.get("think_time_us", 0)),
        think_time_distribution=(
            _distribution(f"{where}.think_time_distribution", data["think_time_distribution"])
            if "think_time_distribution" in data
            else None
        ),
        arrival=_arrival(f"{where}.arrival", data["arrival"]) if "arrival" in data else Arrival(),
        prefix_group=prefix_group,
        prefix_length=prefix_length,
        streaming=_bool(f"{where}.streaming", data.get("streaming", False)),
        multi_turn=multi_turn,
        closed_loop=closed_loop,
    )


def _goodput(where: str, value: Any) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for cls, targets in _mapping(where, value).items():
        here = f"{where}.{cls}"
        _choice(here, str(cls), SLO_CLASSES)
        targets = _mapping(here, targets)
        _strict(here, targets, ("ttft_ms", "itl_ms", "e2e_ms"))
        out[str(cls)] = {k: number(f"{here}.{k}", v, positive=True) for k, v in targets.items()}
    return out


def parse_spec(data: Any, source: str = "workload spec", base_dir: Path | None = None) -> WorkloadSpec:
    """Strictly parse a loaded YAML mapping; `source` prefixes every error, `base_dir` resolves servegen paths."""
    data = _mapping(source, data)
    _strict(source, data, _TOP_KEYS)
    version = _str(f"{source}.version", data.get("version")) or "2"
    _choice(f"{source}.version", version, ("1", "2"))
    if "rate" in data and "aggregate_rate" in data:
        raise ConfigError(f"{source}.rate: alias of aggregate_rate; give only one of them")
    rate_key = "rate" if "rate" in data else "aggregate_rate"
    aggregate_rate = number(f"{source}.{rate_key}", data.get(rate_key, 0.0), nonneg=True)
    if "clients" in data and "servegen_data" in data:
        raise ConfigError(f"{source}: clients and servegen_data are mutually exclusive")
    servegen = None
    if "servegen_data" in data:
        servegen = _servegen_data(f"{source}.servegen_data", data["servegen_data"])
        from blis_cal.workload.servegen import servegen_clients  # servegen imports this module

        path = Path(servegen.path)
        clients = servegen_clients(
            (base_dir / path) if base_dir and not path.is_absolute() else path, servegen
        )
    else:
        raw = data.get("clients")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{source}.clients: required, a non-empty list of clients")
        clients = [_client(f"{source}.clients[{i}]", c, version) for i, c in enumerate(raw)]
    spec = WorkloadSpec(
        clients=clients,
        version="2",  # v1 is upgraded on read (SLO class names renamed above)
        seed=_int(f"{source}.seed", data.get("seed", 0)),
        category=_choice(f"{source}.category", _str(f"{source}.category", data.get("category")), CATEGORIES),
        aggregate_rate=aggregate_rate,
        num_requests=_int(f"{source}.num_requests", data.get("num_requests", 0)),
        horizon=_int(f"{source}.horizon", data.get("horizon", 0)),
        servegen_data=servegen,
        goodput_slo_targets=_goodput(f"{source}.goodput_slo_targets", data.get("goodput_slo_targets") or {}),
    )
    check_spec(spec, source)
    return spec


def _servegen_data(where: str, value: Any) -> ServeGenData:
    data = _mapping(where, value)
    _strict(where, data, ("path", "span_start", "span_end"))
    if "path" not in data:
        raise ConfigError(f"{where}.path: required (a directory of chunk-<ID>-trace.csv files)")
    start = number(f"{where}.span_start", data.get("span_start", 0), nonneg=True)
    end = number(f"{where}.span_end", data.get("span_end", 0), nonneg=True)
    if end and end <= start:
        raise ConfigError(f"{where}.span_end: must be > span_start ({start:g}) or 0, got {end:g}")
    return ServeGenData(_str(f"{where}.path", data["path"]), start, end)


def check_spec(spec: WorkloadSpec, source: str = "workload spec") -> None:
    """Whole-spec rules that no single key can check."""
    ids = [c.id for c in spec.clients]
    for i, cid in enumerate(ids):
        if not cid:
            raise ConfigError(f"{source}.clients[{i}].id: must not be empty")
        if cid in ids[:i]:
            raise ConfigError(f"{source}.clients[{i}].id: duplicate client id {cid!r}")
    with_slo = [bool(c.slo_class) for c in spec.clients]
    if any(with_slo) and not all(with_slo):
        i = with_slo.index(False)
        raise ConfigError(f"{source}.clients[{i}].slo_class: set slo_class on all clients or on none")
    if any(c.rate_fraction is not None for c in spec.clients) and spec.aggregate_rate <= 0:
        raise ConfigError(f"{source}.aggregate_rate: must be > 0 when a client is rate-based (rate_fraction)")
    if not math.isfinite(spec.aggregate_rate):
        raise ConfigError(f"{source}.aggregate_rate: must be finite")


def load_spec(path: str | Path) -> WorkloadSpec:
    """Read and strictly parse a workload spec YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read workload spec ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_spec(data, str(path), base_dir=path.parent)


# ---------------------------------------------------------------------------------------------- writing


def _distribution_dict(dist: Distribution) -> dict[str, Any]:
    return {"type": dist.type, "params": dist.params}


def _client_dict(client: ClientSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"id": client.id}
    for key in ("tenant_id", "slo_class", "model"):
        if getattr(client, key):
            out[key] = getattr(client, key)
    if client.concurrency is not None:
        out["concurrency"] = client.concurrency
        if client.think_time_us:
            out["think_time_us"] = client.think_time_us
        if client.think_time_distribution is not None:
            out["think_time_distribution"] = _distribution_dict(client.think_time_distribution)
    else:
        out["rate_fraction"] = client.rate_fraction
        out["arrival"] = {k: v for k, v in dataclasses.asdict(client.arrival).items() if v is not None}
    out["input_distribution"] = _distribution_dict(client.input_distribution)
    out["output_distribution"] = _distribution_dict(client.output_distribution)
    if client.prefix_group:
        out["prefix_group"] = client.prefix_group
        if client.prefix_length is not None:
            out["prefix_length"] = client.prefix_length
    out["streaming"] = client.streaming
    if client.multi_turn is not None:
        out["reasoning"] = {"multi_turn": dataclasses.asdict(client.multi_turn)}
        if client.closed_loop is not None:
            out["closed_loop"] = client.closed_loop
    return out


def spec_to_dict(spec: WorkloadSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"version": spec.version, "seed": spec.seed}
    if spec.category:
        out["category"] = spec.category
    if spec.aggregate_rate:
        out["aggregate_rate"] = spec.aggregate_rate
    if spec.num_requests:
        out["num_requests"] = spec.num_requests
    if spec.horizon:
        out["horizon"] = spec.horizon
    if spec.servegen_data is not None:
        sg = spec.servegen_data
        out["servegen_data"] = {"path": sg.path, "span_start": sg.span_start, "span_end": sg.span_end}
    else:
        out["clients"] = [_client_dict(c) for c in spec.clients]
    if spec.goodput_slo_targets:
        out["goodput_slo_targets"] = spec.goodput_slo_targets
    return out


def spec_to_yaml(spec: WorkloadSpec) -> str:
    """The spec as YAML that `parse_spec` reads back to an equal spec."""
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False, default_flow_style=None, width=100)
