"""TraceV2: the contract between observe, replay and calibrate (spec: shared/reference/blis-formats.md §1).

A trace is a header YAML (`<stem>.yaml`) beside a data CSV (`<stem>.csv`), with an optional per-chunk ITL
file (`<stem>.itl.csv`). Reading accepts BLIS's early 22-column layout and the 27-base-column layout (optional
columns found by name), with times relative (µs) or absolute epoch µs; everything is relative µs after reading.
Writing always produces the 27-column layout with relative times.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from blis_cal.errors import ConfigError, TraceFormatError

STATUSES = ("ok", "error", "timeout", "cancelled", "rejected", "incomplete")
# A request sent this much after its scheduled arrival means the recording client was held up (starved of CPU):
# what it read meanwhile came late and in bulk.
LATE_SEND_US = 50_000
# Why a capture from a server that had run no step yet starts slow (observe and compare say it).
FRESH_SERVER = (
    "a fresh vLLM runs each step larger than any before it slower (the CPU build: 7-35 %, docs/accuracy.md)"
)
# send/chunk times above this are absolute epoch µs (≈ 3 years of relative time; 2026 epoch µs ≈ 1.8e15).
_EPOCH_THRESHOLD_US = 10**14

# ---------------------------------------------------------------------------------------------- header


@dataclass
class ServerInfo:
    """The header's `server:` block; zero / empty means unknown. Keys beyond BLIS's are ours."""

    type: str = ""
    model: str = ""
    tensor_parallel: int = 0
    max_num_seqs: int = 0
    block_size: int = 0
    gpu_memory_utilization: float = 0.0
    max_model_len: int = 0
    max_num_batched_tokens: int = 0
    num_gpu_blocks: int = 0
    long_prefill_token_threshold: int = 0  # vLLM --long-prefill-token-threshold (0: no cap, vLLM's default)
    long_prefill_token_threshold_adaptive: bool | None = None  # vLLM --long-prefill-token-threshold-adaptive
    gpu: str = ""
    vllm_version: str = ""
    enable_prefix_caching: bool | None = None


# What a replay needs to know of the captured engine; BLIS's observe records none of it (server type and model).
ENGINE_SETTINGS = ("num_gpu_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs", "max_model_len")


def unstated_engine_settings(server: ServerInfo | None, given: Iterable[str] = ()) -> list[str]:
    """The ENGINE_SETTINGS neither `server` (a header's `server:` block) nor `given` (names set elsewhere) state."""
    return [n for n in ENGINE_SETTINGS if n not in given and not (server and getattr(server, n))]


def parse_server_facts(values: Iterable[str]) -> dict[str, Any]:
    """`--server-info` items (`max_num_seqs=64`) -> typed ServerInfo fields: what a server does not expose, or
    a trace's header lacks. 0 or empty means unknown, as in the header; negative numbers are errors."""
    kinds = {f.name: f.type for f in dataclasses.fields(ServerInfo)}
    out: dict[str, Any] = {}
    for item in values:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in kinds:
            raise ConfigError(
                f"--server-info: expected KEY=VALUE with KEY one of {', '.join(kinds)}, got {item!r}"
            )
        kind = kinds[key]
        try:
            if kind == "int":
                out[key] = int(text)
            elif kind == "float":
                out[key] = float(text)
            elif kind.startswith("bool"):
                if text.lower() not in ("true", "false"):
                    raise ValueError
                out[key] = text.lower() == "true"
            else:
                out[key] = text
        except ValueError:
            raise ConfigError(f"--server-info: {key} must be {kind}, got {text!r}") from None
        if kind in ("int", "float") and not out[key] >= 0:  # NaN fails too
            raise ConfigError(f"--server-info: {key} must be >= 0 (0: unknown), got {text!r}")
    return out


def with_server_facts(info: ServerInfo | None, facts: dict[str, Any]) -> ServerInfo:
    """A copy of `info` (a blank one when None) with `facts` (`parse_server_facts`) set."""
    return dataclasses.replace(info or ServerInfo(), **facts)


@dataclass
class TraceHeader:
    trace_version: int = 2
    time_unit: str = "us"
    created_at: str = ""
    mode: str = "real"
    warm_up_requests: int = 0
    workload_seed: int | None = None
    workload_spec: str = ""
    session_context_growth: str = ""
    server: ServerInfo | None = None
    network: dict[str, float] = field(default_factory=dict)
    goodput_slo_targets: dict[str, dict[str, float]] = field(default_factory=dict)
    observed_kv_metrics: dict[str, Any] = field(default_factory=dict)
    kv_offload: dict[str, Any] = field(default_factory=dict)


_NETWORK_KEYS = {"measured_rtt_ms": float}
_GOODPUT_KEYS = {"ttft_ms", "itl_ms", "e2e_ms"}
# What observers write about the server's caches and engine over the run (deltas of vLLM counters).
OBSERVED_KV_KEYS = {
    "source": str,
    "hit_rate": float,
    "block_hits": float,
    "block_queries": float,
    "token_hits": float,
    "token_queries": float,
    "preemptions": float,
    "prompt_tokens": float,
    "generation_tokens": float,
    "engine_steps": float,
    "step_tokens": float,
    "engine_steps_before": float,  # the server's steps since its start, when the run began (0: a fresh server)
    "duration_s": float,
}


def captured_fresh(header: TraceHeader) -> bool:
    """Whether the run began on a server that had run no engine step since it started (observe records it)."""
    return header.observed_kv_metrics.get("engine_steps_before") == 0


# ---------------------------------------------------------------------------------------------- records


def user_session_id(client_id: str, user: int) -> str:
    """BLIS's session id for closed-loop user `user` of a client (`blis observe --concurrency N` writes
    `concurrency_distribution_user_<u>`): every request of the user is one round of it."""
    return f"concurrency_{client_id}_user_{user}"


_USER_SESSION = re.compile(r"concurrency_.*_user_\d+")


def is_user_session(session_id: str) -> bool:
    """Whether `session_id` names a closed-loop user (`user_session_id`) rather than a multi-turn chat."""
    return _USER_SESSION.fullmatch(session_id) is not None


@dataclass
class TraceRecord:
    """One request (one CSV row). All times are µs relative to the start of the run."""

    request_id: int
    client_id: str = ""
    tenant_id: str = ""
    slo_class: str = ""
    vllm_priority: int | None = None
    session_id: str = ""
    round_index: int = 0
    prefix_group: str = ""
    prefix_length: int = 0
    streaming: bool = True
    input_tokens: int = 0  # suffix only: total prompt − prefix_length (BLIS convention)
    output_tokens: int = 0
    text_tokens: int = 0
    image_tokens: int = 0
    audio_tokens: int = 0
    video_tokens: int = 0
    reason_ratio: float = 0.0
    model: str = ""
    deadline_us: int = 0
    slo_target_us: int | None = None
    server_input_tokens: int = 0
    arrival_time_us: int = 0
    send_time_us: int = 0
    first_chunk_time_us: int = 0
    last_chunk_time_us: int = 0
    num_chunks: int = 0
    status: str = "ok"
    error_message: str = ""
    finish_reason: str = ""
    x_request_id: str = ""
    adapter: str = ""
    think_time_us: int = 0
    # Ours (None = not recorded): server-side truth from vLLM's usage block.
    cached_tokens: int | None = None
    server_queue_us: int | None = None
    server_ttft_us: int | None = None
    server_generation_us: int | None = None
    server_mean_itl_us: int | None = None

    @property
    def ttft_us(self) -> int:
        return self.first_chunk_time_us - self.send_time_us

    @property
    def e2e_us(self) -> int:
        return self.last_chunk_time_us - self.send_time_us

    @property
    def send_lag_us(self) -> int:
        """How late the client sent it: send time less the scheduled arrival (closed loops: answer + think)."""
        return self.send_time_us - self.arrival_time_us

    @property
    def outside_engine_us(self) -> int | None:
        """TTFT outside vLLM's engine: client, HTTP, API server (tokenizing, the engine's input queue read
        between steps, streaming back); TTFT less vLLM's queue and scheduled→first-token. None if not recorded."""
        if self.server_ttft_us is None:
            return None
        return self.ttft_us - self.server_ttft_us - (self.server_queue_us or 0)

    @property
    def total_input_tokens(self) -> int:
        """The whole prompt: what the server counted when known, else prefix + suffix."""
        return self.server_input_tokens or (self.prefix_length + self.input_tokens)


@dataclass
class Chunk:
    """One streamed event: when it was parsed and how many output tokens it carried."""

    timestamp_us: int
    tokens: int = 1


@dataclass
class Trace:
    header: TraceHeader
    records: list[TraceRecord]
    itl: dict[int, list[Chunk]] | None = None
    notes: list[str] = field(default_factory=list)  # what reading had to assume or skip, for the user


# Column layouts. FEB: BLIS's early 22-column files; BASE: the 27 base columns of the current layout.
FEB_COLUMNS = [
    "request_id",
    "client_id",
    "tenant_id",
    "slo_class",
    "session_id",
    "round_index",
    "prefix_group",
    "streaming",
    "input_tokens",
    "output_tokens",
    "text_tokens",
    "image_tokens",
    "audio_tokens",
    "video_tokens",
    "reason_ratio",
    "arrival_time_us",
    "send_time_us",
    "first_chunk_time_us",
    "last_chunk_time_us",
    "num_chunks",
    "status",
    "error_message",
]
BASE_COLUMNS = [
    "request_id",
    "client_id",
    "tenant_id",
    "slo_class",
    "session_id",
    "round_index",
    "prefix_group",
    "prefix_length",
    "streaming",
    "input_tokens",
    "output_tokens",
    "text_tokens",
    "image_tokens",
    "audio_tokens",
    "video_tokens",
    "reason_ratio",
    "model",
    "deadline_us",
    "server_input_tokens",
    "arrival_time_us",
    "send_time_us",
    "first_chunk_time_us",
    "last_chunk_time_us",
    "num_chunks",
    "status",
    "error_message",
    "finish_reason",
]
TRAILING_COLUMNS = ("x_request_id", "adapter", "think_time_us")
EXTRA_COLUMNS = (
    "cached_tokens",
    "server_queue_us",
    "server_ttft_us",
    "server_generation_us",
    "server_mean_itl_us",
)
_TIME_COLUMNS = ("arrival_time_us", "send_time_us", "first_chunk_time_us", "last_chunk_time_us")
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TraceRecord)}
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TraceRecord)}
_KNOWN_COLUMNS = set(_FIELD_TYPES)


def _columns_for(records: list[TraceRecord], all_optional: bool = False) -> list[str]:
    """The 27 base columns plus the optional ones some record uses (BLIS's rule), in BLIS's positions."""
    cols = list(BASE_COLUMNS)

    def used(name: str) -> bool:
        return all_optional or any(getattr(r, name) != _FIELD_DEFAULTS[name] for r in records)

    if used("vllm_priority"):
        cols.insert(cols.index("slo_class") + 1, "vllm_priority")
    if used("slo_target_us"):
        cols.insert(cols.index("deadline_us") + 1, "slo_target_us")
    cols.extend(name for name in (*TRAILING_COLUMNS, *EXTRA_COLUMNS) if used(name))
    return cols


# ---------------------------------------------------------------------------------------------- parsing

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _parse_value(kind: str, text: str) -> Any:
    """Parse one CSV field by the dataclass annotation; raises ValueError with a short reason."""
    text = text.strip()
    if kind.endswith("| None"):
        if text == "":
            return None
        kind = kind.removesuffix(" | None")
    if kind == "int":
        if text == "":
            return 0
        return int(text)
    if kind == "float":
        value = float(text) if text else 0.0
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"not a finite number: {text!r}")
        return value
    if kind == "bool":
        if text in _TRUE:
            return True
        if text in _FALSE or text == "":
            return False
        raise ValueError(f"not a boolean: {text!r}")
    return text


def _format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _check_record(rec: TraceRecord) -> None:
    """Semantic checks on one row; ValueError names the field."""
    for name in ("input_tokens", "output_tokens", "prefix_length", "num_chunks", "server_input_tokens"):
        if getattr(rec, name) < 0:
            raise ValueError(f"field {name}: must be >= 0, got {getattr(rec, name)}")
    if rec.cached_tokens is not None and rec.cached_tokens < 0:
        raise ValueError(f"field cached_tokens: must be >= 0, got {rec.cached_tokens}")
    for name in _TIME_COLUMNS:
        if getattr(rec, name) < 0:
            raise ValueError(f"field {name}: negative time {getattr(rec, name)}")
    if not 0.0 <= rec.reason_ratio <= 1.0:
        raise ValueError(f"field reason_ratio: must lie in [0, 1], got {rec.reason_ratio}")
    if rec.status not in STATUSES:
        raise ValueError(f"field status: {rec.status!r} is not one of {', '.join(STATUSES)}")
    if rec.first_chunk_time_us > 0 and rec.first_chunk_time_us < rec.send_time_us:
        raise ValueError(
            f"field first_chunk_time_us: {rec.first_chunk_time_us} is before send_time_us {rec.send_time_us}"
        )
    if rec.last_chunk_time_us > 0 and rec.last_chunk_time_us < rec.first_chunk_time_us:
        raise ValueError(
            f"field last_chunk_time_us: {rec.last_chunk_time_us} is before first_chunk_time_us "
            f"{rec.first_chunk_time_us}"
        )


def _read_rows(path: Path, skip_bad_rows: bool, notes: list[str]) -> tuple[list[TraceRecord], bool]:
    """Records from the data CSV and whether the file used BLIS's early 22-column layout."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot read trace data: {exc.strerror or exc}") from None
    with handle:
        reader = csv.reader(handle)
        try:
            names = [n.strip() for n in next(reader)]
        except StopIteration:
            raise TraceFormatError(f"{path}: empty file (expected a header row)") from None
        except csv.Error as exc:
            raise TraceFormatError(f"{path}:1: malformed CSV: {exc}") from None
        feb = names == FEB_COLUMNS
        missing = [c for c in (FEB_COLUMNS if feb else BASE_COLUMNS) if c not in names]
        if missing:
            raise TraceFormatError(
                f"{path}:1: header row lacks column(s) {', '.join(missing)}; not a TraceV2 data file"
            )
        unknown = [n for n in names if n not in _KNOWN_COLUMNS]
        if unknown:
            notes.append(f"{path}: ignored unknown column(s) {', '.join(unknown)}")
        records: list[TraceRecord] = []
        skipped = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise TraceFormatError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
            if not row or row == [""]:
                continue
            try:
                records.append(_parse_row(names, row))
            except ValueError as exc:
                if not skip_bad_rows:
                    raise TraceFormatError(
                        f"{path}:{reader.line_num}: {exc} (use --skip-bad-rows to load the other rows)"
                    ) from None
                skipped += 1
                if skipped <= 5:
                    notes.append(f"{path}:{reader.line_num}: skipped: {exc}")
        if skipped:
            notes.append(f"{path}: skipped {skipped} bad row(s)")
    return records, feb


def _parse_row(names: list[str], row: list[str]) -> TraceRecord:
    if len(row) != len(names):
        raise ValueError(f"wrong column count: {len(row)} fields, header has {len(names)}")
    values: dict[str, Any] = {}
    for name, text in zip(names, row, strict=True):
        kind = _FIELD_TYPES.get(name)
        if kind is None:
            continue
        try:
            values[name] = _parse_value(kind, text)
        except ValueError as exc:
            raise ValueError(f"field {name}: {exc}") from None
    if values.get("status") == "":
        values["status"] = "ok"
    rec = TraceRecord(**values)
    rec.error_message = rec.error_message.strip()
    return rec


def _normalise_times(
    records: list[TraceRecord], itl: dict[int, list[Chunk]] | None, notes: list[str]
) -> None:
    """Absolute epoch send/chunk times (BLIS's Go observer) become relative to the run's start.

    The base is chosen so that the earliest-dispatched request is sent exactly at its scheduled arrival:
    base = min(send − arrival) over sent requests; arrival times are already relative in BLIS's files.
    """
    sent = [r for r in records if r.send_time_us > 0]
    if not sent or max(r.send_time_us for r in sent) < _EPOCH_THRESHOLD_US:
        return
    base = min(r.send_time_us - r.arrival_time_us for r in sent)
    for r in records:
        for name in ("send_time_us", "first_chunk_time_us", "last_chunk_time_us"):
            value = getattr(r, name)
            if value > 0:
                setattr(r, name, value - base)
    if itl:
        for chunks in itl.values():
            for c in chunks:
                c.timestamp_us -= base
    notes.append(f"absolute epoch times converted to relative µs (base {base} µs)")


# ---------------------------------------------------------------------------------------------- header IO


def _strict_keys(where: str, data: dict, allowed: Iterable[str]) -> None:
    allowed = set(allowed)
    for key in data:
        if key not in allowed:
            raise TraceFormatError(f"{where}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")


def _typed(where: str, key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TraceFormatError(f"{where}: key {key!r} must be {kind.__name__}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise TraceFormatError(f"{where}: key {key!r} must be a finite number, got {value!r}")
    return value


def _dataclass_from(where: str, cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise TraceFormatError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _strict_keys(where, data, fields)
    kinds = {"int": int, "float": float, "str": str, "bool": bool, "int | None": int, "bool | None": bool}
    values = {}
    for key, value in data.items():
        kind = kinds.get(fields[key].type)
        if kind is None or value is None:
            values[key] = value
            continue
        values[key] = _typed(where, key, value, kind)
    return cls(**values)


def header_from_dict(data: Any, where: str = "trace header") -> TraceHeader:
    """A TraceHeader from parsed YAML, strictly: unknown keys anywhere are errors naming the key."""
    if data is None:
        data = {}
    simple = (
        {
            k: v
            for k, v in data.items()
            if k not in ("server", "network", "goodput_slo_targets", "observed_kv_metrics", "kv_offload")
        }
        if isinstance(data, dict)
        else data
    )
    header = _dataclass_from(where, TraceHeader, simple)
    if "server" in data and data["server"] is not None:
        header.server = _dataclass_from(f"{where}: server", ServerInfo, data["server"])
    network = data.get("network") or {}
    if not isinstance(network, dict):
        raise TraceFormatError(f"{where}: network must be a mapping")
    _strict_keys(f"{where}: network", network, _NETWORK_KEYS)
    header.network = {k: _typed(f"{where}: network", k, v, float) for k, v in network.items()}
    goodput = data.get("goodput_slo_targets") or {}
    if not isinstance(goodput, dict):
        raise TraceFormatError(f"{where}: goodput_slo_targets must be a mapping")
    for cls_name, targets in goodput.items():
        if not isinstance(targets, dict):
            raise TraceFormatError(f"{where}: goodput_slo_targets.{cls_name} must be a mapping")
        _strict_keys(f"{where}: goodput_slo_targets.{cls_name}", targets, _GOODPUT_KEYS)
        header.goodput_slo_targets[str(cls_name)] = {
            k: _typed(f"{where}: goodput_slo_targets.{cls_name}", k, v, float) for k, v in targets.items()
        }
    kv = data.get("observed_kv_metrics") or {}
    if not isinstance(kv, dict):
        raise TraceFormatError(f"{where}: observed_kv_metrics must be a mapping")
    _strict_keys(f"{where}: observed_kv_metrics", kv, OBSERVED_KV_KEYS)
    header.observed_kv_metrics = {
        k: _typed(f"{where}: observed_kv_metrics", k, v, OBSERVED_KV_KEYS[k]) for k, v in kv.items()
    }
    offload = data.get("kv_offload") or {}
    if not isinstance(offload, dict):
        raise TraceFormatError(f"{where}: kv_offload must be a mapping")
    header.kv_offload = dict(offload)
    if header.time_unit not in ("us", "microseconds"):
        raise TraceFormatError(f"{where}: time_unit {header.time_unit!r} is not 'us' or 'microseconds'")
    return header


def header_to_dict(header: TraceHeader) -> dict[str, Any]:
    """YAML-ready mapping; like BLIS, zero/empty values are omitted and `network` is always written."""
    out: dict[str, Any] = {
        "trace_version": header.trace_version,
        "time_unit": header.time_unit,
    }
    if header.created_at:
        out["created_at"] = header.created_at
    out["mode"] = header.mode
    out["warm_up_requests"] = header.warm_up_requests
    if header.workload_seed is not None:
        out["workload_seed"] = header.workload_seed
    if header.workload_spec:
        out["workload_spec"] = header.workload_spec
    if header.session_context_growth:
        out["session_context_growth"] = header.session_context_growth
    if header.server is not None:
        out["server"] = {
            k: v
            for k, v in dataclasses.asdict(header.server).items()
            if v not in (0, 0.0, "", None) or isinstance(v, bool)
        }
    out["network"] = dict(header.network)
    if header.goodput_slo_targets:
        out["goodput_slo_targets"] = {k: dict(v) for k, v in header.goodput_slo_targets.items()}
    if header.observed_kv_metrics:
        out["observed_kv_metrics"] = dict(header.observed_kv_metrics)
    if header.kv_offload:
        out["kv_offload"] = dict(header.kv_offload)
    return out


def read_header(path: Path) -> TraceHeader:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot read trace header: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise TraceFormatError(
            f"{path}{line}: unreadable YAML header: {getattr(exc, 'problem', exc)}"
        ) from None
    if data is not None and not isinstance(data, dict):
        raise TraceFormatError(f"{path}: trace header must be a YAML mapping")
    return header_from_dict(data, where=str(path))


def write_header(header: TraceHeader, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(header_to_dict(header), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written header


# ---------------------------------------------------------------------------------------------- ITL IO

ITL_COLUMNS = ("request_id", "chunk_index", "timestamp_us", "tokens")


def sibling(csv_path: str | Path, suffix: str) -> Path:
    """`run.csv` -> `run<suffix>` (e.g. `.yaml`, `.itl.csv`, `.metrics.csv`)."""
    p = Path(csv_path)
    stem = p.name[: -len(".csv")] if p.name.endswith(".csv") else p.name
    return p.with_name(stem + suffix)


def read_itl(path: Path) -> dict[int, list[Chunk]]:
    """Per-request chunk times; a 4th `tokens` column is optional (readers without it assume 1 per chunk)."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot read ITL file: {exc.strerror or exc}") from None
    indexed: dict[int, list[tuple[int, Chunk]]] = {}
    with handle:
        reader = csv.reader(handle)
        names = next(reader, None)
        if names is None or [n.strip() for n in names[:3]] != list(ITL_COLUMNS[:3]):
            raise TraceFormatError(
                f"{path}:1: ITL header must start with request_id,chunk_index,timestamp_us"
            )
        width = len(names)
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            if len(row) != width:
                raise TraceFormatError(
                    f"{path}:{line}: wrong column count: {len(row)} fields, header has {width}"
                )
            try:
                nums = [int(x) for x in row]
            except ValueError:
                raise TraceFormatError(f"{path}:{line}: non-integer field in {row}") from None
            if min(nums) < 0:
                raise TraceFormatError(f"{path}:{line}: negative value in {row}")
            tokens = nums[3] if width > 3 else 1
            indexed.setdefault(nums[0], []).append((nums[1], Chunk(nums[2], tokens)))
    return {rid: [c for _, c in sorted(items, key=lambda t: t[0])] for rid, items in indexed.items()}


def _itl_rows(request_id: int, chunks: list[Chunk]) -> Iterable[list[int]]:
    return ([request_id, i, c.timestamp_us, c.tokens] for i, c in enumerate(chunks))


def write_itl(itl: dict[int, list[Chunk]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(ITL_COLUMNS)
        for rid in sorted(itl):
            writer.writerows(_itl_rows(rid, itl[rid]))


# ---------------------------------------------------------------------------------------------- trace IO


def read_trace(
    csv_path: str | Path,
    header_path: str | Path | None = None,
    *,
    itl_path: str | Path | None = None,
    skip_bad_rows: bool = False,
) -> Trace:
    """Read a trace from its data CSV; the header is the sibling `.yaml` unless `header_path` names it.

    A missing header is allowed (defaults are used and a note says so); a named header must exist. The ITL
    file is the sibling `.itl.csv` when present, or `itl_path`.
    """
    csv_path = Path(csv_path)
    notes: list[str] = []
    if header_path is not None:
        header = read_header(Path(header_path))
    elif sibling(csv_path, ".yaml").exists():
        header = read_header(sibling(csv_path, ".yaml"))
    else:
        header = TraceHeader()
        notes.append(f"no header {sibling(csv_path, '.yaml')} found; using default header values")
    records, feb = _read_rows(csv_path, skip_bad_rows, notes)
    if feb:
        notes.append(f"{csv_path}: BLIS 22-column layout (input_tokens is the whole prompt)")
    itl = None
    if itl_path is not None:
        itl = read_itl(Path(itl_path))
    elif sibling(csv_path, ".itl.csv").exists():
        itl = read_itl(sibling(csv_path, ".itl.csv"))
    _normalise_times(records, itl, notes)
    # Chunk-order checks run after normalisation so both time bases are judged alike.
    good: list[TraceRecord] = []
    for index, rec in enumerate(records):
        try:
            _check_record(rec)
        except ValueError as exc:
            where = f"{csv_path}: row {index + 1} (request_id {rec.request_id})"
            if not skip_bad_rows:
                raise TraceFormatError(
                    f"{where}: {exc} (use --skip-bad-rows to load the other rows)"
                ) from None
            notes.append(f"{where}: skipped: {exc}")
            continue
        good.append(rec)
    if len(good) != len(records):
        notes.append(f"{csv_path}: skipped {len(records) - len(good)} row(s) that failed checks")
    return Trace(header=header, records=good, itl=itl, notes=notes)


def _record_row(rec: TraceRecord, columns: list[str]) -> list[str]:
    return [_format_value(getattr(rec, c)) for c in columns]


def write_trace(trace: Trace, csv_path: str | Path) -> None:
    """Write `<stem>.csv`, `<stem>.yaml` and, when the trace has chunk times, `<stem>.itl.csv`."""
    csv_path = Path(csv_path)
    columns = _columns_for(trace.records)
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(_record_row(r, columns) for r in trace.records)
    write_header(trace.header, sibling(csv_path, ".yaml"))
    if trace.itl is not None:
        write_itl(trace.itl, sibling(csv_path, ".itl.csv"))


class TraceWriter:
    """Incremental, crash-safe writer for observers.

    The header is written at start and rewritten by `close()`; every `append()` writes one data row (and its
    chunk rows) and flushes, so a crash leaves a readable partial trace. All optional columns are written.
    """

    def __init__(self, csv_path: str | Path, header: TraceHeader, record_itl: bool = True) -> None:
        self.csv_path = Path(csv_path)
        self.header = header
        self.columns = _columns_for([], all_optional=True)
        self.count = 0
        write_header(header, sibling(self.csv_path, ".yaml"))
        self._data: IO[str] = self.csv_path.open("w", newline="", encoding="utf-8")
        self._rows = csv.writer(self._data, lineterminator="\n")
        self._rows.writerow(self.columns)
        self._data.flush()
        self._itl_file: IO[str] | None = None
        if record_itl:
            self._itl_file = sibling(self.csv_path, ".itl.csv").open("w", newline="", encoding="utf-8")
            self._itl = csv.writer(self._itl_file, lineterminator="\n")
            self._itl.writerow(ITL_COLUMNS)
            self._itl_file.flush()

    def append(self, record: TraceRecord, chunks: list[Chunk] | None = None) -> None:
        self._rows.writerow(_record_row(record, self.columns))
        self._data.flush()
        if self._itl_file is not None and chunks:
            self._itl.writerows(_itl_rows(record.request_id, chunks))
            self._itl_file.flush()
        self.count += 1

    def close(self, header: TraceHeader | None = None) -> None:
        if header is not None:
            self.header = header
        write_header(self.header, sibling(self.csv_path, ".yaml"))
        self._data.close()
        if self._itl_file is not None:
            self._itl_file.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._data.closed:
            self.close()


# ------------------------------------------------ per-request latencies (engine steps: trace_analysis.py)


def _itl_mean_from_chunks(chunks: list[Chunk]) -> float | None:
    """Mean gap per token after the first event: (t_last − t_first) / (tokens after the first event)."""
    if len(chunks) < 2:
        return None
    tokens_after_first = sum(c.tokens for c in chunks[1:])
    if tokens_after_first <= 0:
        return None
    return (chunks[-1].timestamp_us - chunks[0].timestamp_us) / tokens_after_first


def itl_means_us(trace: Trace) -> dict[int, float]:
    """Per-request mean inter-token latency of `ok` requests: from the ITL file when it has the request,
    else (last − first)/(num_chunks − 1). Requests with fewer than two chunks have no ITL."""
    out: dict[int, float] = {}
    for r in trace.records:
        if r.status != "ok":
            continue
        chunks = trace.itl.get(r.request_id) if trace.itl else None
        value = _itl_mean_from_chunks(chunks) if chunks else None
        if value is None and not chunks and r.num_chunks > 1:
            value = (r.last_chunk_time_us - r.first_chunk_time_us) / (r.num_chunks - 1)
        if value is not None:
            out[r.request_id] = value
    return out


# A request whose tokens all reached the client in one read (mean gap under this share of its trace's median ITL)
# was held up on its way (a stalled server or client process), not decoded that fast: its ITL times no step.
# Measured: 125 of 49,000 captured requests, all under 0.1 % of their trace's median; the next smallest, 12 %.
ITL_BURST_SHARE = 0.05


def burst_delivered(itl: dict[int, float]) -> set[int]:
    """The ids in `itl` (`itl_means_us`) whose streamed tokens reached the client in one burst."""
    if not itl:
        return set()
    floor = ITL_BURST_SHARE * statistics.median(itl.values())
    return {rid for rid, value in itl.items() if value < floor}


def ok_records(trace: Trace) -> list[TraceRecord]:
    """`ok` rows past warm-up that received output (the rows latency statistics are taken over)."""
    warm = trace.header.warm_up_requests
    return [
        r for r in trace.records if r.status == "ok" and r.request_id >= warm and r.last_chunk_time_us > 0
    ]


def trace_frame(trace: Trace):  # -> pandas.DataFrame (imported lazily: pandas is slow to import)
    """One row per request with every column plus derived `ttft_us`, `e2e_us`, `itl_mean_us`."""
    import pandas as pd

    frame = pd.DataFrame([dataclasses.asdict(r) for r in trace.records], columns=list(_FIELD_TYPES))
    frame["ttft_us"] = frame["first_chunk_time_us"] - frame["send_time_us"]
    frame["e2e_us"] = frame["last_chunk_time_us"] - frame["send_time_us"]
    itl = itl_means_us(trace)
    frame["itl_mean_us"] = frame["request_id"].map(itl)
    return frame


def injection_time_us(rec: TraceRecord) -> int:
    """When the server could first see the request: its send time if recorded, else its arrival."""
    return rec.send_time_us if rec.send_time_us > 0 or rec.arrival_time_us == 0 else rec.arrival_time_us
