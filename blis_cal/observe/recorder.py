"""Turning what the observer saw into a trace: records, server facts, and the /metrics sidecar.

Server facts come from `/v1/models` (max_model_len), `/version` and vLLM's Prometheus `/metrics`
(`vllm:cache_config_info` labels: block size, KV blocks, prefix caching). Counters are cumulative since the
server started, so the header's `observed_kv_metrics` holds before/after deltas over the run; gauges (queue
lengths, KV usage) are sampled every second into `<stem>.metrics.csv`.
"""

from __future__ import annotations

import asyncio
import csv
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from blis_cal.errors import BlisError, ConfigError
from blis_cal.observe.client import Outcome
from blis_cal.observe.clock import Clock
from blis_cal.trace import ServerInfo, TraceRecord, sibling

# ---------------------------------------------------------------------------------------------- records


def build_record(req: Any, out: Outcome, cfg_model: str, arrival_us: int, streaming: bool) -> TraceRecord:
    """One trace row: workload facts (BLIS columns: input_tokens is the suffix after the shared prefix),
    client timings on the run clock, and the server's own counts and per-request metrics."""
    metrics = out.server_metrics

    def ms_to_us(key: str) -> int | None:
        value = metrics.get(key)
        return round(value * 1000) if value is not None and math.isfinite(value) else None

    return TraceRecord(
        request_id=req.request_id,
        client_id=req.client_id,
        tenant_id=req.tenant_id,
        slo_class=req.slo_class,
        session_id=req.session_id,
        round_index=req.round_index,
        prefix_group=req.prefix_group,
        prefix_length=req.prefix_length,
        streaming=streaming,
        input_tokens=req.input_tokens,
        output_tokens=out.completion_tokens,
        model=getattr(req, "model", "") or cfg_model,
        server_input_tokens=out.prompt_tokens,
        arrival_time_us=arrival_us,
        send_time_us=out.send_us,
        first_chunk_time_us=out.first_us,
        last_chunk_time_us=out.last_us,
        num_chunks=len(out.chunks),
        status=out.status,
        error_message=out.error_message,
        finish_reason=out.finish_reason,
        x_request_id=out.x_request_id,
        think_time_us=req.think_time_us,
        cached_tokens=out.cached_tokens,
        server_queue_us=ms_to_us("queue_time_ms"),
        server_ttft_us=ms_to_us("time_to_first_token_ms"),
        server_generation_us=ms_to_us("generation_time_ms"),
        server_mean_itl_us=ms_to_us("mean_itl_ms"),
    )


# ---------------------------------------------------------------------------------------------- /metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus(text: str) -> list[Sample]:
    """Samples of the Prometheus text exposition format (comments skipped, unparsable lines ignored)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append(Sample(m.group(1), labels, value))
    return out


def metric_sum(samples: list[Sample], *names: str) -> float | None:
    """Sum over label sets of the first of `names` present (new name first, then vLLM's old name)."""
    for name in names:
        values = [s.value for s in samples if s.name == name]
        if values:
            return sum(values)
    return None


# Sidecar columns -> (vLLM metric names, newest first). Counters are cumulative since server start.
SIDECAR_METRICS: dict[str, tuple[str, ...]] = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "prefix_queries": ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
    "prefix_hits": ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
    "preemptions": ("vllm:num_preemptions_total",),
    "engine_steps": ("vllm:iteration_tokens_total_count",),
    "step_tokens": ("vllm:iteration_tokens_total_sum",),
    "prompt_tokens": ("vllm:prompt_tokens_total",),
    "generation_tokens": ("vllm:generation_tokens_total",),
}
# Host load beside the server's: on a shared machine another process's CPU use slows the engine, and the
# observer's own CPU is taken from the server it measures (busy fractions since the previous row).
HOST_COLUMNS = ("host_cpu_busy", "observer_cpu")
SIDECAR_COLUMNS = ("time_us", *SIDECAR_METRICS, *HOST_COLUMNS)


def sidecar_row(samples: list[Sample]) -> dict[str, float | None]:
    return {col: metric_sum(samples, *names) for col, names in SIDECAR_METRICS.items()}


def kv_deltas(before: list[Sample], after: list[Sample], duration_s: float) -> dict[str, Any]:
    """The header's `observed_kv_metrics`: counter deltas over the run (vLLM's prefix cache counts tokens)."""
    b, a = sidecar_row(before), sidecar_row(after)

    def delta(col: str) -> float | None:
        return a[col] - b[col] if a[col] is not None and b[col] is not None else None

    out: dict[str, Any] = {"source": "vllm /metrics (after - before)"}
    pairs = {
        "token_queries": "prefix_queries",
        "token_hits": "prefix_hits",
        "preemptions": "preemptions",
        "prompt_tokens": "prompt_tokens",
        "generation_tokens": "generation_tokens",
        "engine_steps": "engine_steps",
        "step_tokens": "step_tokens",
    }
    for key, col in pairs.items():
        value = delta(col)
        if value is not None:
            out[key] = float(value)
    if out.get("token_queries"):
        out["hit_rate"] = round(out["token_hits"] / out["token_queries"], 6)
    if b["engine_steps"] is not None:
        out["engine_steps_before"] = float(b["engine_steps"])
    out["duration_s"] = round(duration_s, 6)
    return out


# ---------------------------------------------------------------------------------------------- facts


@dataclass
class ServerFacts:
    info: ServerInfo
    metrics: list[Sample] | None  # None: no /metrics
    notes: list[str] = field(default_factory=list)


async def _get(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> httpx.Response | None:
    try:
        resp = await client.get(url, headers=headers, timeout=10.0)
    except httpx.HTTPError:
        return None
    return resp if resp.status_code == 200 else None


async def scrape_metrics(
    client: httpx.AsyncClient, endpoint: str, headers: dict[str, str]
) -> list[Sample] | None:
    resp = await _get(client, endpoint + "/metrics", headers)
    return parse_prometheus(resp.text) if resp is not None else None


async def server_facts(
    client: httpx.AsyncClient, endpoint: str, model: str, headers: dict[str, str]
) -> ServerFacts:
    """What the server says about itself; a missing endpoint is a note, not an error. A server that cannot be
    reached, or that lists its models without `model`, is an error before anything is sent (as vLLM's own
    benchmark stops after a failed first request)."""
    info = ServerInfo(type="openai", model=model)
    notes: list[str] = []
    try:
        resp: httpx.Response | None = await client.get(endpoint + "/v1/models", headers=headers, timeout=10.0)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise BlisError(
            f"cannot connect to {endpoint} ({str(exc) or type(exc).__name__}): start the server or fix --endpoint; "
            "nothing was sent"
        ) from None
    except httpx.HTTPError:
        resp = None
    if resp is None or resp.status_code != 200:
        notes.append(f"{endpoint}/v1/models did not answer; max_model_len unknown")
    else:
        try:
            listed = resp.json().get("data", [])
            served = [entry.get("id") for entry in listed]
            for entry in listed:
                if entry.get("id") == model and entry.get("max_model_len"):
                    info.max_model_len = int(entry["max_model_len"])
        except (ValueError, AttributeError, TypeError):
            notes.append(f"{endpoint}/v1/models: unreadable answer")
        else:
            if served and model not in served:
                raise ConfigError(
                    f"--model {model!r} is not served at {endpoint}; it serves: {', '.join(map(str, served))}"
                )
    resp = await _get(client, endpoint + "/version", headers)
    if resp is not None:
        try:
            info.vllm_version = str(resp.json().get("version", ""))
            info.type = "vllm"
        except (ValueError, AttributeError):
            pass
    resp = await _get(client, endpoint + "/server_info?config_format=json", headers)
    if resp is not None:
        _engine_config(info, resp)
    samples = await scrape_metrics(client, endpoint, headers)
    if samples is None:
        notes.append(f"{endpoint}/metrics did not answer; no cache facts, counters or metrics sidecar")
        return ServerFacts(info, None, notes)
    if any(s.name.startswith("vllm:") for s in samples):
        info.type = "vllm"
    for s in samples:
        if s.name == "vllm:cache_config_info":
            _cache_config(info, s.labels)
    return ServerFacts(info, samples, notes)


# vLLM's /server_info (a dev-mode endpoint, VLLM_SERVER_DEV_MODE=1) shows its whole engine config; these are the
# scheduler's facts /metrics does not: ServerInfo field -> (config section, key, type).
_ENGINE_CONFIG = {
    "max_num_seqs": ("scheduler_config", "max_num_seqs", int),
    "max_num_batched_tokens": ("scheduler_config", "max_num_batched_tokens", int),
    "long_prefill_token_threshold": ("scheduler_config", "long_prefill_token_threshold", int),
    "long_prefill_token_threshold_adaptive": (
        "scheduler_config",
        "long_prefill_token_threshold_adaptive",
        bool,
    ),
    "tensor_parallel": ("parallel_config", "tensor_parallel_size", int),
    "max_model_len": ("model_config", "max_model_len", int),
}


def _engine_config(info: ServerInfo, resp: httpx.Response) -> None:
    try:
        config = resp.json().get("vllm_config")
    except (ValueError, AttributeError):
        return
    if not isinstance(config, dict):
        return
    for name, (section, key, kind) in _ENGINE_CONFIG.items():
        part = config.get(section)
        value = part.get(key) if isinstance(part, dict) else None
        if type(value) is kind and not (kind is int and value < 0):
            setattr(info, name, value)


def _cache_config(info: ServerInfo, labels: dict[str, str]) -> None:
    def number(key: str, kind: type) -> Any:
        try:
            return kind(labels[key])
        except (KeyError, ValueError):
            return kind(0)

    info.block_size = number("block_size", int)
    info.num_gpu_blocks = number("num_gpu_blocks", int)
    info.gpu_memory_utilization = number("gpu_memory_utilization", float)
    if labels.get("enable_prefix_caching") in ("True", "False"):
        info.enable_prefix_caching = labels["enable_prefix_caching"] == "True"


# ---------------------------------------------------------------------------------------------- sidecar


class MetricsSampler:
    """Scrapes /metrics every `interval_s` into `<stem>.metrics.csv` (flushed per row) until stopped."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        endpoint: str,
        headers: dict[str, str],
        csv_path: str | Path,
        clock: Clock,
        interval_s: float = 1.0,
    ) -> None:
        self.path = sibling(csv_path, ".metrics.csv")
        self._client, self._endpoint, self._headers = client, endpoint, headers
        self._clock, self._interval = clock, interval_s
        self.rows = 0
        self.failures = 0
        self._host = _host_cpu()
        self._own = (time.monotonic(), time.process_time())

    async def run(self) -> None:
        handle: IO[str] = self.path.open("w", newline="", encoding="utf-8")
        with handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(SIDECAR_COLUMNS)
            handle.flush()
            next_at = self._clock.now_us()
            while True:
                t = self._clock.now_us()
                samples = await scrape_metrics(self._client, self._endpoint, self._headers)
                if samples is None:
                    self.failures += 1
                else:
                    row = {**sidecar_row(samples), **self._host_row()}
                    writer.writerow([t, *("" if v is None else _fmt(v) for v in row.values())])
                    handle.flush()
                    self.rows += 1
                next_at += int(self._interval * 1e6)
                await asyncio.sleep(max(0.0, (next_at - self._clock.now_us()) / 1e6))

    def _host_row(self) -> dict[str, float | None]:
        host = _host_cpu()
        busy = None
        if host is not None and self._host is not None and host[1] > self._host[1]:
            busy = round((host[0] - self._host[0]) / (host[1] - self._host[1]), 4)
        self._host = host
        wall, cpu = time.monotonic(), time.process_time()
        own = round((cpu - self._own[1]) / (wall - self._own[0]), 4) if wall > self._own[0] else None
        self._own = (wall, cpu)
        return {"host_cpu_busy": busy, "observer_cpu": own}


def _host_cpu() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs from /proc/stat (Linux); None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(x) for x in handle.readline().split()[1:9]]  # guest time is already in user
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _fmt(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)
