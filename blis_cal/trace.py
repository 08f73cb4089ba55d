"""TraceV2: the contract between observe, replay and calibrate (spec: shared/reference/blis-formats.md §1).

A trace is a header YAML (`<stem>.yaml`) beside a data CSV (`<stem>.csv`), with an optional per-chunk ITL
file (`<stem>.itl.csv`). Reading accepts BLIS's early 22-column layout and the 27-base-column layout (optional
columns found by name), with times relative (µs) or absolute epoch µs; everything is relative µs after reading.
Writing always produces the 27-column layout with relative times.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from blis_cal.errors import ConfigError, TraceFormatError
from blis_cal.stats import count_summary, latency_summary, percentile

if TYPE_CHECKING:  # numpy is imported lazily: the observer imports this module and needs none of it
    import numpy as np

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


# ---------------------------------------------------------------------------------------------- analysis


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


SINGLE_DECODE_MIN_GAPS = 20  # fewer single-request steps than this say too little about the server's speed
STEP_BURST_GAP_US = 3_000  # the events of one engine step reach the client within this of each other


def _step_bursts(trace: Trace) -> list[list[tuple[int, int, int, int]]]:
    """Streamed events grouped into engine steps: (time µs, request id, tokens, chunk index) per event, events
    within STEP_BURST_GAP_US of the previous one in the same group; tokens is 0 for a first event (its step
    was a prefill)."""
    events = sorted(
        (c.timestamp_us, rid, c.tokens if i else 0, i)
        for rid, chunks in trace.itl.items()
        for i, c in enumerate(chunks)
    )
    bursts: list[list[tuple[int, int, int, int]]] = []
    for event in events:
        if bursts and event[0] - bursts[-1][-1][0] <= STEP_BURST_GAP_US:
            bursts[-1].append(event)
        else:
            bursts.append([event])
    return bursts


@dataclass(frozen=True, slots=True)
class PromptToLay:
    """A prompt as `lay_prompt_chunks` places it: the step that streamed its first token, when it was sent and
    the tokens the engine computed for it (its prompt less its prefix-cache hit)."""

    first_token_step: int
    send_us: int
    new_tokens: int


def lay_prompt_chunks(
    step_begins_us: Sequence[int], room: list[int], prompts: Iterable[PromptToLay], cap: int = 0
) -> list[list[tuple[int, int]]]:
    """vLLM's chunked prefill as the client can rebuild it: a prompt's chunks stream nothing, so each prompt
    (in order of first token) takes the steps it needs (`room`, per step: what the token budget leaves beside
    the step's decodes; consumed here) from the step of its first token back to the first step begun after it
    was sent (`step_begins_us[s]`: when step s's events arrived, so step s began at step s − 1's). vLLM
    schedules chunks forward, so every chunk but the last is as large as its step's room (at most `cap`, its
    --long-prefill-token-threshold, when > 0) and the last, in the step of its first token, is the rest (at
    least one token; past the budget when no step had room: a header with a wrong budget). Per prompt:
    [(step, tokens)] from its last step back."""

    def chunk(step: int) -> int:
        return min(room[step], cap) if cap > 0 else room[step]

    laid = []
    for prompt in prompts:
        last = prompt.first_token_step
        steps = [last]
        need = prompt.new_tokens - max(chunk(last), 1)
        for step in range(last - 1, 0, -1):
            if need <= 0 or step_begins_us[step - 1] <= prompt.send_us:
                break  # enough room, or the step began (as the one before it ended) before the prompt was sent
            if room[step] > 0:
                steps.append(step)
                need -= chunk(step)
        taken = []
        left = prompt.new_tokens
        for step in reversed(steps[1:]):  # earliest first
            take = min(chunk(step), left - 1)
            if take > 0:  # 0: an earlier step had more room than the prompt needed (it waited, not computed)
                taken.append((step, take))
                room[step] -= take
                left -= take
        room[last] -= left
        laid.append([(last, left), *taken[::-1]])
    return laid


def chunked_steps(
    trace: Trace, bursts: list[list[tuple[int, int, int, int]]], cached: dict[int, int]
) -> set[int]:
    """Indexes of the `bursts` (engine steps) that computed a chunk of a prompt whose first token came in a
    later step (`lay_prompt_chunks`; `cached`: `estimate_cached_tokens`): their events alone do not say what
    the step did."""
    records = {r.request_id: r for r in trace.records}
    budget = token_budget(trace)
    room = [budget - sum(e[2] > 0 for e in burst) for burst in bursts]
    prompts = [
        PromptToLay(i, records[e[1]].send_time_us, records[e[1]].total_input_tokens - cached.get(e[1], 0))
        for i, burst in enumerate(bursts)
        for e in burst
        if e[3] == 0 and e[1] in records
    ]
    laid = lay_prompt_chunks([b[0][0] for b in bursts], room, prompts, prefill_chunk_cap(trace))
    return {step for taken in laid for step, _ in taken[1:]}


def single_decode_steps(trace: Trace) -> list[tuple[int, int]]:
    """Engine steps with one request alone decoding one token, as (duration µs, that request's context: tokens
    in its KV cache), from consecutive bursts of streamed events that each hold a single one-token event of
    the same request, the later not one that computed a chunk of a prompt (`chunked_steps`: a prompt's chunks
    stream nothing). They show the server's speed free of batching."""
    prompts = {r.request_id: r.total_input_tokens for r in trace.records}
    bursts = _step_bursts(trace)
    chunked = chunked_steps(trace, bursts, estimate_cached_tokens(trace, trace.records))
    return [
        (b[0][0] - a[0][0], prompts.get(b[0][1], 0) + b[0][3])
        for i, (a, b) in enumerate(itertools.pairwise(bursts), start=1)
        if len(a) == len(b) == 1 and a[0][1] == b[0][1] and a[0][2] == b[0][2] == 1 and i not in chunked
    ]


@dataclass(frozen=True, slots=True)
class DecodeStep:
    """A pure-decode engine step seen by the client: when its events arrived, how long after the previous
    step's, how many requests it decoded (one token each) and their context (Σ tokens in their KV cache, the
    blocks of a prefix several of them share counted once: `duplicated_prefix_tokens`)."""

    time_us: int
    duration_us: int
    num_decode: int
    context_tokens: int
    shared_tokens: int = 0  # the tokens left out of context_tokens


DEFAULT_TOKEN_BUDGET = 2048  # max_num_batched_tokens when the header does not say (vLLM's serving default)


def token_budget(trace: Trace) -> int:
    """The server's max_num_batched_tokens from the header, else vLLM's serving default."""
    server = trace.header.server
    return (
        server.max_num_batched_tokens
        if server and server.max_num_batched_tokens > 0
        else DEFAULT_TOKEN_BUDGET
    )


def prefill_chunk_cap(trace: Trace) -> int:
    """The server's --long-prefill-token-threshold from the header (0: none, vLLM's default). Adaptive, vLLM's
    cap is at least the budget over the requests running and waiting, which the client does not see; the
    threshold, that cap under load, lays day 44's two adaptive captures best (docs/accuracy.md)."""
    server = trace.header.server
    return server.long_prefill_token_threshold if server else 0


DEFAULT_BLOCK_SIZE = 16


def block_size_of(trace: Trace) -> int:
    server = trace.header.server
    return server.block_size if server and server.block_size > 0 else DEFAULT_BLOCK_SIZE


def injection_time_us(rec: TraceRecord) -> int:
    """When the server could first see the request: its send time if recorded, else its arrival."""
    return rec.send_time_us if rec.send_time_us > 0 or rec.arrival_time_us == 0 else rec.arrival_time_us


def answers_reused(trace: Trace, block: int, notes: list[str] | None = None) -> bool:
    """Whether a session's rounds hit their previous answer's KV blocks in vLLM's prefix cache.

    Judged by the recorded `cached_tokens` of the rounds where hitting it or not differs by a block; without
    them (BLIS's observe, or a vLLM without --enable-prompt-tokens-details) by the run's hit rate
    (`observed_kv_metrics`), whichever reading's total it is nearer, unless under 90 % of the lower (evictions).
    A captured trace with neither comes from BLIS's observe (ours records both from vLLM): False; any other, True.
    vLLM caches by token id: a round sent as token ids carries the answer's ids; a chat round carries the answer's
    text, re-tokenized (for a random-weight model's answer, other ids past its first few), and BLIS's observe
    sends placeholder words for it.
    """
    previous: dict[str, tuple[int, int]] = {}  # session -> (prompt tokens, answer tokens)
    groups: set[str] = set()
    with_answer = without = 0  # rounds whose recorded hits are those of either reading
    total_answer = total_prompt = prompt_tokens = 0  # hit tokens over the trace by either reading
    for rec in sorted(trace.records, key=lambda r: (injection_time_us(r), r.request_id)):
        if rec.output_tokens <= 0:
            continue
        input_len = rec.total_input_tokens
        prompt_tokens += input_len
        cap = (input_len - 1) // block  # vLLM recomputes at least the last prompt token
        group = min(rec.prefix_length // block, cap) if rec.prefix_group in groups else 0
        if rec.prefix_group:
            groups.add(rec.prefix_group)
        prior = previous.get(rec.session_id) if rec.session_id else None
        if rec.session_id:
            previous[rec.session_id] = (input_len, rec.output_tokens)
        # Full blocks a round finds of its previous prompt and answer (whose last token has no KV), or prompt.
        hit_answer = min((prior[0] + prior[1] - 1) // block, cap) if prior else 0
        hit_prompt = min(prior[0] // block, cap) if prior else 0
        total_answer += max(group, hit_answer) * block
        total_prompt += max(group, hit_prompt) * block
        if prior and rec.cached_tokens is not None and hit_answer != hit_prompt:
            recorded = min(rec.cached_tokens, input_len - 1) // block
            with_answer += recorded == hit_answer
            without += recorded == hit_prompt
    if with_answer or without:
        reused = without <= with_answer
        evidence = f"{without} round(s) hit it on their previous prompt only, {with_answer} on its answer too"
    else:
        rate = trace.header.observed_kv_metrics.get("hit_rate")
        observed = (rate or 0.0) * prompt_tokens
        if total_answer == total_prompt:
            return True
        if rate is None:
            if trace.header.mode == "real" and notes is not None:
                notes.append(
                    "sessions' rounds: no prefix-cache hits recorded, per row or over the run, as BLIS's observe "
                    "captures without --scrape-kv-metrics; it sends placeholder words for a previous answer, so a "
                    "round is replayed finding its previous prompt cached but not that answer"
                )
            return trace.header.mode != "real"
        # Far fewer hits than the prompts alone hold: evictions (a small cache) hide which reading was right.
        if observed < 0.9 * total_prompt:
            return True
        reused = abs(observed - total_answer) <= abs(observed - total_prompt)
        evidence = (
            f"its hit rate over the run ({observed:.0f} tokens) is nearer the {total_prompt} that previous prompts "
            f"hold than the {total_answer} with their answers"
        )
    if not reused and notes is not None:
        notes.append(
            f"sessions' rounds found their previous prompt in vLLM's prefix cache but not its answer ({evidence}): "
            "the answer came back as other token ids (a chat API re-tokenizes its text; BLIS's observe sends "
            "placeholder words); replayed so"
        )
    return reused


def estimate_cached_tokens(trace: Trace, records: Sequence[TraceRecord]) -> dict[int, int]:
    """Prompt tokens served from vLLM's prefix cache, per request.

    The recorded `cached_tokens` when the trace has it; else full blocks of a shared prefix already computed
    by an earlier request of the same prefix group (vLLM caches full blocks only, and only once a request's
    prefill has run), or, when sessions accumulate context, of the previous round of the same session (its
    prompt, and its answer where `answers_reused`).
    """
    block = block_size_of(trace)
    accumulate = trace.header.session_context_growth == "accumulate"
    # Only rows without recorded hits are estimated (the fit asks for every trace several times).
    reused = accumulate and any(r.cached_tokens is None for r in records) and answers_reused(trace, block)
    first_token: dict[str, int] = {}
    session_ctx: dict[str, tuple[int, int]] = {}  # session -> (context tokens, first token time)
    out: dict[int, int] = {}
    for rec in sorted(records, key=lambda r: r.send_time_us):
        total = rec.total_input_tokens
        if rec.cached_tokens is not None:
            out[rec.request_id] = rec.cached_tokens
        else:
            cached = 0
            group_first = first_token.get(rec.prefix_group) if rec.prefix_group else None
            if group_first is not None and group_first <= rec.send_time_us:
                cached = rec.prefix_length // block * block
            prev = session_ctx.get(rec.session_id) if accumulate and rec.session_id else None
            if prev is not None and prev[1] <= rec.send_time_us:
                cached = max(cached, min(prev[0], total) // block * block)
            # vLLM always recomputes at least the last prompt token (it needs its logits).
            out[rec.request_id] = min(cached, max(total - 1, 0) // block * block)
        if rec.prefix_group and rec.prefix_group not in first_token:
            first_token[rec.prefix_group] = rec.first_chunk_time_us
        if rec.session_id:
            session_ctx[rec.session_id] = (total + rec.output_tokens * reused, rec.first_chunk_time_us)
    return out


def shared_prefix_tokens(
    trace: Trace, records: Sequence[TraceRecord], cached: dict[int, int]
) -> dict[int, tuple[str, int]]:
    """Requests holding the KV blocks of a shared prefix: request id -> (prefix group, tokens of the prefix in
    those blocks). The group's first request computed the blocks (its full blocks of the prefix); a later one
    holds them when it hit the cache (its `cached` tokens, from `estimate_cached_tokens`, at most the
    prefix's)."""
    block = block_size_of(trace)
    out: dict[int, tuple[str, int]] = {}
    first: set[str] = set()
    for rec in sorted(records, key=lambda r: r.send_time_us):
        if not rec.prefix_group:
            continue
        aligned = min(rec.prefix_length, max(rec.total_input_tokens - 1, 0)) // block * block
        tokens = aligned if rec.prefix_group not in first else min(cached.get(rec.request_id, 0), aligned)
        first.add(rec.prefix_group)
        if tokens > 0:
            out[rec.request_id] = (rec.prefix_group, tokens)
    return out


def duplicated_prefix_tokens(request_ids: Iterable[int], shares: dict[int, tuple[str, int]]) -> int:
    """Tokens of shared prefix blocks that several of `request_ids` hold, counted past their first holder
    (`shares` from `shared_prefix_tokens`): vLLM keeps one copy of such a block, so a step's requests read
    it once between them."""
    by_group: dict[str, list[int]] = {}
    for rid in request_ids:
        share = shares.get(rid)
        if share is not None:
            by_group.setdefault(share[0], []).append(share[1])
    return sum(sum(tokens) - max(tokens) for tokens in by_group.values())


def decode_steps(trace: Trace) -> list[DecodeStep]:
    """Every step whose events are one-token decode events of distinct requests, timed from the previous
    step's events, and streamed to exactly the requests of that step that had tokens still to come (every
    running request decodes in every step): the events of one step that reached the client more than
    STEP_BURST_GAP_US apart read as two short steps of fewer requests, which this leaves out, as it does the
    steps that computed a chunk of a prompt streaming its first token later (`chunked_steps`)."""
    prompts = {r.request_id: r.total_input_tokens for r in trace.records}
    bursts = _step_bursts(trace)
    cached = estimate_cached_tokens(trace, trace.records)
    chunked = chunked_steps(trace, bursts, cached)
    shares = shared_prefix_tokens(trace, trace.records, cached)
    last = {rid: len(chunks) - 1 for rid, chunks in trace.itl.items()}
    steps = []
    for i, (a, b) in enumerate(itertools.pairwise(bursts), start=1):
        requests = {e[1] for e in b}
        if (
            i not in chunked
            and all(e[2] == 1 for e in b)
            and len(requests) == len(b)
            and requests == {e[1] for e in a if e[3] != last[e[1]]}
        ):
            shared = duplicated_prefix_tokens((e[1] for e in b), shares)
            context = sum(prompts.get(e[1], 0) + e[3] for e in b)
            steps.append(DecodeStep(b[0][0], b[0][0] - a[0][0], len(b), context - shared, shared))
    return steps


DRIFT_PARTS = 4  # the run is cut into this many parts (quarters) of equal step counts
DRIFT_MIN_STEPS = 20  # per batch size kept, and per part


@dataclass(frozen=True, slots=True)
class SpeedDrift:
    """How the server's decode speed changed during a capture: per part of the run (equal step counts, in
    time order), the median of each pure-decode step's duration over the run's own typical step for its
    batch size and context; `drift` is the slowest part's over the fastest's, minus 1."""

    parts: tuple[float, ...]
    drift: float
    steps: int
    series: tuple[tuple[int, float], ...] = ()  # (time µs, step ÷ typical step) per step, for plots
    # The typical step's price per context token (µs) and what measures it, Σ over the steps of (context − the
    # mean context of its batch size)²: a fit over several runs weighs each run's price by it
    # (calibrate.fit.decode_context_price). The same of each part alone (against its own time per batch size)
    # gives the fit's bootstrap the price's spread within the run.
    context_price: tuple[float, float] = (0.0, 0.0)
    context_parts: tuple[tuple[float, float], ...] = ()


def decode_speed_drift(trace: Trace, steps: list[DecodeStep] | None = None) -> SpeedDrift | None:
    """`SpeedDrift` from the trace's pure-decode steps (`decode_steps`, or `steps` when already worked out).
    A step's typical duration is a
    fit over the run: a time per batch size plus a shared time per context token, so a change of load or
    of context lengths is not one of speed. None with too few steps to tell."""
    import numpy as np  # lazily: the observer imports this module and needs neither

    steps = decode_steps(trace) if steps is None else steps
    counts: dict[int, int] = {}
    for step in steps:
        counts[step.num_decode] = counts.get(step.num_decode, 0) + 1
    batches = sorted(n for n, c in counts.items() if c >= DRIFT_MIN_STEPS)
    kept = [s for s in steps if counts[s.num_decode] >= DRIFT_MIN_STEPS]
    size = len(kept) // DRIFT_PARTS
    if size < DRIFT_MIN_STEPS:
        return None
    column = {n: i for i, n in enumerate(batches)}
    x = np.zeros((len(kept), len(batches) + 1))
    x[np.arange(len(kept)), [column[s.num_decode] for s in kept]] = 1.0
    x[:, -1] = [s.context_tokens for s in kept]
    y = np.array([s.duration_us for s in kept], dtype=float)
    f_scale = max(0.1 * float(np.median(y)), 1.0)
    coef = _typical_step_fit(x, y, f_scale)
    typical = x @ coef
    if np.any(typical <= 0):
        return None
    ratios = y / typical
    chunks = [slice(i * size, (i + 1) * size) for i in range(DRIFT_PARTS)]
    parts = tuple(float(np.median(ratios[c])) for c in chunks)
    series = tuple(zip((s.time_us for s in kept), ratios.tolist(), strict=True))
    context_parts = tuple(
        (float(_typical_step_fit(x[c], y[c], f_scale)[-1]), _context_spread(x[c])) for c in chunks
    )
    return SpeedDrift(
        tuple(round(p, 4) for p in parts),
        round(max(parts) / min(parts) - 1, 4),
        len(kept),
        series,
        (float(coef[-1]), _context_spread(x)),
        context_parts,
    )


def _typical_step_fit(x: np.ndarray, y: np.ndarray, f_scale: float) -> np.ndarray:
    """Coefficients of step durations `y` on `x` (a column per batch size, the context last), ≥ 0: robust
    (soft L1) least squares, so stalls and coalesced reads barely pull them. Batch columns without rows
    (a part of the run without that size) stay 0."""
    import numpy as np
    from scipy.optimize import least_squares

    present = np.append(x[:, :-1].any(axis=0), True)
    xs = x[:, present]
    start = np.append([np.median(y[xs[:, j] == 1]) for j in range(xs.shape[1] - 1)], 0.0)
    coef = np.zeros(x.shape[1])
    coef[present] = least_squares(
        lambda c: xs @ c - y, start, jac=lambda _c: xs, bounds=(0, np.inf), loss="soft_l1", f_scale=f_scale
    ).x
    return coef


def _context_spread(x: np.ndarray) -> float:
    """Σ over the rows of `x` (a column per batch size, the context last) of (context − the mean context of
    its batch size)²: how well the rows measure a price per context token apart from a time per size."""
    import numpy as np

    counts = x[:, :-1].sum(axis=0)
    sums = x[:, :-1].T @ x[:, -1]
    batch_mean = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return float(np.sum((x[:, -1] - x[:, :-1] @ batch_mean) ** 2))


def single_decode_step_us(trace: Trace) -> float | None:
    """Median single-request decode step (`single_decode_steps`): compare captures with it (the same server on
    another host or under other load shows another value). None without an ITL file or with fewer than
    SINGLE_DECODE_MIN_GAPS such steps."""
    steps = single_decode_steps(trace)
    return float(statistics.median(d for d, _ in steps)) if len(steps) >= SINGLE_DECODE_MIN_GAPS else None


def send_lags_us(trace: Trace) -> list[int]:
    """Each sent row's `send_lag_us`; empty when the trace records no scheduled arrivals (all 0)."""
    if not any(r.arrival_time_us for r in trace.records):
        return []
    return [r.send_lag_us for r in trace.records if r.send_time_us]


def trace_summary(trace: Trace) -> dict[str, Any]:
    """What `blis trace info` prints: counts by status, duration, achieved rate, token stats, latencies."""
    records = trace.records
    by_status: dict[str, int] = {}
    for r in records:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    ok = ok_records(trace)
    sends = sorted(r.send_time_us or r.arrival_time_us for r in records)
    ends = [max(r.last_chunk_time_us, r.send_time_us, r.arrival_time_us) for r in records]
    duration_us = (max(ends) - sends[0]) if records else 0
    send_span_us = sends[-1] - sends[0] if len(sends) > 1 else 0
    out: dict[str, Any] = {
        "requests": len(records),
        "by_status": dict(sorted(by_status.items())),
        "warm_up_requests": trace.header.warm_up_requests,
        "duration_s": round(duration_us / 1e6, 6),
        "achieved_rate_rps": round((len(sends) - 1) / (send_span_us / 1e6), 6) if send_span_us > 0 else 0.0,
        "throughput_rps": round(len(ok) / (duration_us / 1e6), 6) if duration_us > 0 else 0.0,
        "output_tokens_per_s": round(sum(r.output_tokens for r in ok) / (duration_us / 1e6), 3)
        if duration_us > 0
        else 0.0,
    }
    out.update(count_summary([r.total_input_tokens for r in ok], "input_tokens"))
    out.update(count_summary([r.output_tokens for r in ok], "output_tokens"))
    itl = itl_means_us(trace)
    out.update(latency_summary([r.ttft_us for r in ok], "ttft"))
    out.update(latency_summary([itl[r.request_id] for r in ok if r.request_id in itl], "itl"))
    out.update(latency_summary([r.e2e_us for r in ok], "e2e"))
    out["itl_source"] = "itl file" if trace.itl else "num_chunks"
    step = single_decode_step_us(trace) if trace.itl else None
    if step is not None:
        out["single_decode_step_ms"] = round(step / 1000, 3)
    drift = decode_speed_drift(trace) if trace.itl else None
    if drift is not None:
        out["decode_speed_drift"] = drift.drift
        out["decode_context_us_per_token"] = round(drift.context_price[0], 4)  # what a fit takes as β4
    lags = send_lags_us(trace)
    if lags:
        out["send_lag_p99_ms"] = round(percentile(lags, 99) / 1000, 3)
        out["send_lag_max_ms"] = round(max(lags) / 1000, 3)
        out["late_sends"] = sum(lag > LATE_SEND_US for lag in lags)
    outside = [o for o in (r.outside_engine_us for r in ok) if o is not None]
    if outside:  # a starved client or API server shows here, not in vLLM's own times
        out.update(latency_summary(outside, "ttft_outside_engine"))
    return out
