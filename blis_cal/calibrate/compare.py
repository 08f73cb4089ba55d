"""Compare simulated with observed per-request latencies (BLIS's calibration report, blis-formats.md §6).

Pairs trace records with simulation results by request id; warm-up, non-`ok` and negative-latency rows are
excluded and counted. TTFT and E2E are measured from the send time; ITL is the per-request mean gap per
token after the first streamed event (the ITL file when present). The simulated TTFT/E2E get the network
round trip added (header `measured_rtt_ms`, or a flag), as BLIS does. The JSON layout is BLIS's, with our
extra fields alongside (readers of BLIS's layout ignore them).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy import stats as sstats

from blis_cal.calibrate.features import DECODE_STEPS_MIN, StepRows, decode_step_rows, prefill_step_rows
from blis_cal.errors import BlisError
from blis_cal.simulate.coefficients import FitCoverage
from blis_cal.simulate.latency import StepBatch
from blis_cal.simulate.metrics import RequestResult
from blis_cal.stats import percentile
from blis_cal.trace import (
    FRESH_SERVER,
    ITL_BURST_SHARE,
    LATE_SEND_US,
    Trace,
    TraceRecord,
    burst_delivered,
    captured_fresh,
    itl_means_us,
)
from blis_cal.trace_analysis import DecodeStep, SpeedDrift, decode_speed_drift, decode_steps, send_lags_us

METRICS = ("ttft", "itl", "e2e")
PERCENTILES = (50, 90, 95, 99)
# BLIS HEAD's fixed list (cmd/calibrate.go); ours describe the same approximations.
KNOWN_LIMITATIONS = [
    "Simulator models discrete batch steps; real engines overlap work across steps",
    "Prefix token IDs in the simulator are synthetic; cache hits depend on block-granular content identity",
    "Speculative decoding is not modelled",
    "Token counts may differ by block-granularity rounding between simulator and server",
]


class CalibrationError(BlisError):
    """Inputs that cannot be compared or fitted (no pairs, no usable rows, inconsistent files)."""


class ResultLike(Protocol):
    """What compare needs from a simulated request (simulate.metrics.RequestResult satisfies it)."""

    request_id: int
    status: str
    ttft_us: float
    e2e_us: float
    itl_mean_us: float
    input_tokens: int
    output_tokens: int


# ---------------------------------------------------------------------------------------------- metrics


def mape(real: np.ndarray, sim: np.ndarray) -> float:
    """Mean |sim − real| / real over pairs with real ≠ 0 (a fraction, as BLIS reports it)."""
    nz = real != 0
    if not nz.any():
        return 0.0
    return float(np.mean(np.abs(sim[nz] - real[nz]) / np.abs(real[nz])))


def pearson_r(real: np.ndarray, sim: np.ndarray) -> float:
    """Pearson correlation (scipy); 0 with fewer than 3 pairs or a constant side, as BLIS does."""
    if len(real) < 3 or np.ptp(real) == 0 or np.ptp(sim) == 0:
        return 0.0
    return float(sstats.pearsonr(real, sim).statistic)


def bias_direction(real: np.ndarray, sim: np.ndarray) -> str:
    if not np.any(real != 0):
        return ""
    total = float(np.sum(sim - real))
    return "over-predict" if total > 0 else "under-predict" if total < 0 else "neutral"


def quality(mape_value: float, r: float) -> str:
    """BLIS's grade (first match): excellent / good / fair / poor."""
    for grade, max_mape, min_r in (("excellent", 0.10, 0.95), ("good", 0.20, 0.85), ("fair", 0.35, 0.70)):
        if mape_value < max_mape and r > min_r:
            return grade
    return "poor"


def _pct_error(real: float, sim: float) -> float:
    return abs(sim - real) / real if real > 0 else 0.0


def workload_level(real: np.ndarray, sim: np.ndarray) -> dict[str, float]:
    """BLIS's workload-level block: mean, median and p50/p90/p95/p99, real vs sim, with errors (µs)."""
    out: dict[str, float] = {}
    real_mean, sim_mean = float(np.mean(real)), float(np.mean(sim))
    out.update(real_mean=real_mean, sim_mean=sim_mean, mean_error=sim_mean - real_mean)
    out["mean_percent_error"] = _pct_error(real_mean, sim_mean)
    real_med, sim_med = percentile(real, 50), percentile(sim, 50)
    out.update(real_median=real_med, sim_median=sim_med, median_error=sim_med - real_med)
    out["median_percent_error"] = _pct_error(real_med, sim_med)
    for p in PERCENTILES:
        rp, sp = percentile(real, p), percentile(sim, p)
        out[f"real_p{p}"], out[f"sim_p{p}"] = rp, sp
        out[f"p{p}_error"], out[f"p{p}_percent_error"] = sp - rp, _pct_error(rp, sp)
    return out


def request_level(real: np.ndarray, sim: np.ndarray) -> dict[str, Any]:
    """BLIS's request-level block plus ours: median/p90 absolute percentage error, signed mean error."""
    m, r = mape(real, sim), pearson_r(real, sim)
    nz = real != 0
    ape = np.abs(sim[nz] - real[nz]) / np.abs(real[nz]) if nz.any() else np.zeros(0)
    signed = (sim[nz] - real[nz]) / np.abs(real[nz]) if nz.any() else np.zeros(0)
    return {
        "mape": m,
        "pearson_r": r,
        "bias_direction": bias_direction(real, sim),
        "quality": quality(m, r),
        "median_ape": percentile(ape, 50),
        "p90_ape": percentile(ape, 90),
        "mean_signed_percent_error": float(np.mean(signed)) if signed.size else 0.0,
    }


# ---------------------------------------------------------------------------------------------- pairing


@dataclass
class Pairs:
    """Matched observations, in trace order: request ids, send times and real/sim values per metric (µs)."""

    request_ids: list[int] = field(default_factory=list)
    send_us: list[int] = field(default_factory=list)
    real: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    sim: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    itl_ids: list[int] = field(default_factory=list)  # ITL pairs are a subset (requests with ≥ 2 tokens)

    def arrays(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.real[metric], dtype=float), np.asarray(self.sim[metric], dtype=float)


@dataclass
class ComparisonReport:
    """A calibration report: `to_dict()` is BLIS's JSON layout plus our fields."""

    trace_info: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    pairs: Pairs
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. fitted coefficients, prediction intervals
    decode_speed: tuple[tuple[int, float], ...] = ()  # SpeedDrift.series of the trace (plots; not in JSON)

    def mape(self, metric: str) -> float:
        return float(self.metrics[metric]["request_level"]["mape"]) if metric in self.metrics else math.nan

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trace_info": self.trace_info, "metrics": self.metrics}
        out["config_match"] = {}
        out["known_limitations"] = list(KNOWN_LIMITATIONS)
        if "ttft" in self.metrics:
            ttft_mape = self.mape("ttft")
            out["ttft_tolerance"] = {"mape": ttft_mape, "threshold": 0.15, "within": ttft_mape <= 0.15}
        if self.notes:
            out["notes"] = list(self.notes)
        out.update(self.extra)
        return out


def sim_itl(result: ResultLike) -> float | None:
    if result.output_tokens <= 1:
        return None
    if result.itl_mean_us:
        return float(result.itl_mean_us)
    return (float(result.e2e_us) - float(result.ttft_us)) / (result.output_tokens - 1)


STALL_NOTE_US = 3_000_000
SPEED_NOTE_TOLERANCE = 0.1  # beyond ±10 % per decode step, say the server ran at another speed
SPEED_NOTE_MIN_STEPS = 20  # fewer pure-decode steps say too little about the server's speed
CONTEXT_NOTE_FACTOR = 2.0  # over twice the context per decoding request a fit saw, say β4 is extrapolated
DRIFT_NOTE = 0.1  # beyond 10 % between the slowest and fastest part of a run, say the speed changed during it
TTFT_SPLIT_NOTE = 0.1  # beyond ±10 % in mean TTFT, say which part of it (waiting or prefill) is off
# vLLM preempting at least this many times per compared request: which request waits turns on microseconds, and
# two runs of one such workload differ per request by 59-83 % TTFT MAPE (docs/accuracy.md, repeat_day26).
PREEMPTION_NOTE = 0.1


def ttft_split_ms(
    pairs: Sequence[tuple[TraceRecord, ResultLike]], rtt_us: int
) -> dict[str, dict[str, float]] | None:
    """Where TTFT goes, mean ms over `pairs` whose trace row has vLLM's per-request times and whose result its
    scheduling time: `waiting` (send → scheduled: the client and API server, the step in flight, vLLM's queue,
    of which `vllm_queue` is vLLM's own) and `prefill` (scheduled → first token), real against simulated.
    None without such pairs."""
    rows = [
        (rec, res)
        for rec, res in pairs
        if rec.server_ttft_us is not None
        and rec.server_queue_us is not None
        and getattr(res, "scheduled_us", -1) >= 0
    ]
    if not rows:
        return None
    real_prefill = np.mean([rec.server_ttft_us for rec, _ in rows])
    sim_prefill = np.mean([res.first_token_us - res.scheduled_us for _, res in rows])
    real_ttft = np.mean([rec.ttft_us for rec, _ in rows])
    sim_ttft = np.mean([res.ttft_us for _, res in rows]) + rtt_us
    return {
        "real": {
            "waiting": round((real_ttft - real_prefill) / 1e3, 3),
            "vllm_queue": round(np.mean([rec.server_queue_us for rec, _ in rows]) / 1e3, 3),
            "prefill": round(real_prefill / 1e3, 3),
        },
        "sim": {"waiting": round((sim_ttft - sim_prefill) / 1e3, 3), "prefill": round(sim_prefill / 1e3, 3)},
    }


def ttft_split_note(where: str, split: dict[str, dict[str, float]]) -> str | None:
    """A note when the simulated mean TTFT is off by more than TTFT_SPLIT_NOTE, saying which part is."""
    real, sim = split["real"], split["sim"]
    real_ttft, sim_ttft = real["waiting"] + real["prefill"], sim["waiting"] + sim["prefill"]
    if real_ttft <= 0 or abs(sim_ttft / real_ttft - 1) <= TTFT_SPLIT_NOTE:
        return None
    return (
        f"{where}: mean TTFT {sim_ttft:.0f} ms simulated against {real_ttft:.0f} observed: waiting to be scheduled "
        f"{sim['waiting']:.0f} ms against {real['waiting']:.0f} (vLLM's queue {real['vllm_queue']:.0f} of it, the "
        f"rest the client, the API server and the step in flight), the prefill {sim['prefill']:.0f} ms against "
        f"{real['prefill']:.0f}"
    )


def longest_decode_gap(trace: Trace) -> tuple[int, int]:
    """Longest interval (µs) with no streamed token while some request was between its first and last
    token, and where it started (µs); (0, 0) without an ITL file."""
    if not trace.itl:
        return 0, 0
    times = np.sort(np.fromiter((c.timestamp_us for ch in trace.itl.values() for c in ch), dtype=np.int64))
    spans = np.array([(ch[0].timestamp_us, ch[-1].timestamp_us) for ch in trace.itl.values() if len(ch) > 1])
    if times.size < 2 or spans.size == 0:
        return 0, 0
    gaps = np.diff(times)
    # A gap counts when a request was decoding across it (first token before, last token after).
    starts, ends = np.sort(spans[:, 0]), np.sort(spans[:, 1])
    active = np.searchsorted(starts, times[:-1], side="right") - np.searchsorted(
        ends, times[:-1], side="right"
    )
    gaps = np.where(active > 0, gaps, 0)
    k = int(np.argmax(gaps))
    return int(gaps[k]), int(times[k])


@dataclass(frozen=True)
class TraceDiagnostics:
    """What a comparison reports of the trace alone (the same for every replay of it)."""

    longest_gap_us: int
    longest_gap_at_us: int
    steps: list[DecodeStep]  # pure-decode steps (`decode_steps`)
    drift: SpeedDrift | None
    prefills: StepRows | None  # steps that computed a prefill (`prefill_step_rows`)


def trace_diagnostics(trace: Trace) -> TraceDiagnostics:
    gap_us, gap_at = longest_decode_gap(trace)
    steps = decode_steps(trace) if trace.itl else []
    return TraceDiagnostics(
        gap_us,
        gap_at,
        steps,
        decode_speed_drift(trace, steps) if steps else None,
        prefill_step_rows(trace) if trace.itl else None,
    )


class DecodeStepModel(Protocol):
    """What the speed check needs of a step-time model (blis_cal.simulate.LatencyModel)."""

    fit_coverage: FitCoverage | None  # the batches and contexts its coefficients' fit saw, when known

    def decode_only_step_us(
        self, num_decode: int, decode_context_tokens: int, shared_context_tokens: int = 0
    ) -> int: ...

    def step_time_us(self, batch: StepBatch) -> int: ...


def decode_step_ratio(
    steps: Sequence[DecodeStep], model: DecodeStepModel, coverage: FitCoverage | None = None
) -> tuple[float, int] | None:
    """How long a trace's pure-decode `steps` (`decode_steps`: every batch size, so loaded traces count too; only
    those the coefficients' fit covered, up to `coverage.batch_max` requests, when known and enough) took over
    what `model` says for the same batch and context: (median ratio, steps), None with fewer than
    SPEED_NOTE_MIN_STEPS. Far from 1, the server was not the one the coefficients describe (another machine,
    other work on it, another time), which no fit on other traces can know."""
    if coverage is not None:
        covered = [s for s in steps if s.num_decode <= coverage.batch_max]
        steps = covered if len(covered) >= SPEED_NOTE_MIN_STEPS else steps  # larger batches: coverage_notes
    if len(steps) < SPEED_NOTE_MIN_STEPS:
        return None
    ratios = [
        s.duration_us
        / max(model.decode_only_step_us(s.num_decode, s.context_tokens + s.shared_tokens, s.shared_tokens), 1)
        for s in steps
    ]
    return float(np.median(ratios)), len(steps)


def prefill_step_ratio(
    rows: StepRows, model: DecodeStepModel, coverage: FitCoverage | None = None
) -> tuple[float, int] | None:
    """How long a trace's steps that computed a prompt while other requests decoded (`prefill_step_rows`, as
    the fit reads them; only those decoding up to `coverage.batch_max` requests, when known and enough) took
    over what `model` says for the same prompt tokens, decodes and contexts: (median ratio, steps), None with
    fewer than SPEED_NOTE_MIN_STEPS. TTFT follows it as ITL follows `decode_step_ratio`; the two differ when
    a host slows compute-bound prefills and memory-bound decodes apart (over 274 held-out captures: r 0.54
    with each other, −0.57 and −0.44 with the mean TTFT error)."""
    f = rows.features
    keep = np.ones(len(rows.duration_us), dtype=bool)
    if coverage is not None and np.count_nonzero(f["D"] <= coverage.batch_max) >= SPEED_NOTE_MIN_STEPS:
        keep = f["D"] <= coverage.batch_max
    if np.count_nonzero(keep) < SPEED_NOTE_MIN_STEPS:
        return None
    columns = [f[c][keep].astype(int).tolist() for c in ("P", "D", "Np", "Pctx", "Dctx", "Ppairs")]
    priced = [
        model.step_time_us(StepBatch(p, d, n, d, pc, dc, pairs))
        for p, d, n, pc, dc, pairs in zip(*columns, strict=True)
    ]
    return float(np.median(rows.duration_us[keep] / np.maximum(priced, 1))), len(priced)


def step_ratios(
    diagnostics: TraceDiagnostics, model: DecodeStepModel, coverage: FitCoverage | None = None
) -> dict[str, tuple[float, int]]:
    """The trace's `decode_step_ratio` and `prefill_step_ratio` against `model`, by kind ("decode", "prefill"),
    those its steps measure."""
    ratios = {"decode": decode_step_ratio(diagnostics.steps, model, coverage)}
    if diagnostics.prefills is not None:
        ratios["prefill"] = prefill_step_ratio(diagnostics.prefills, model, coverage)
    return {kind: ratio for kind, ratio in ratios.items() if ratio is not None}


STEP_KINDS = {
    "decode": "decode steps took {ratio:.2f}× what the coefficients say for their batch sizes and contexts",
    "prefill": "steps with a prefill took {ratio:.2f}× what the coefficients say for their prompt tokens, "
    "decodes and contexts",
}


def speed_note(where: str, ratio: tuple[float, int] | None, kind: str = "decode") -> str | None:
    """A note when the `decode_step_ratio` (kind "decode") or `prefill_step_ratio` ("prefill") is off 1 by
    more than SPEED_NOTE_TOLERANCE."""
    if ratio is None or abs(ratio[0] - 1) <= SPEED_NOTE_TOLERANCE:
        return None
    value, count = ratio
    return (
        f"{where}: {STEP_KINDS[kind].format(ratio=value)} (median of {count} steps): this server ran at "
        f"{1 / value:.2f}× the speed of the one they were fitted on (another machine, other work on it, or "
        "another time); recalibrate on traces from this environment"
    )


def coverage_notes(where: str, steps: Sequence[DecodeStep], coverage: FitCoverage) -> list[str]:
    """Notes when a trace decodes more requests at once, or with over CONTEXT_NOTE_FACTOR times the context per
    request, than the traces the coefficients were fitted on (in batch sizes seen in DECODE_STEPS_MIN or more
    pure-decode steps, as the fit counts them): their step cost is extrapolated."""
    rows = decode_step_rows(steps).features
    notes = []
    seen = int(rows["D"].max()) if len(rows["D"]) else 0
    if seen > coverage.batch_max:
        notes.append(
            f"{where}: decodes up to {seen} requests at once (batch sizes seen in {DECODE_STEPS_MIN}+ pure-decode "
            f"steps) where the coefficients' fit traces reached {coverage.batch_max}: the step cost of the "
            "larger batches is extrapolated; to predict such loads, fit with a trace that keeps as many requests "
            "in flight"
        )
    context = float((rows["Dctx"] / rows["D"]).max()) if len(rows["D"]) else 0.0
    if coverage.context_max is not None and context > CONTEXT_NOTE_FACTOR * max(coverage.context_max, 1):
        notes.append(
            f"{where}: decodes with ~{context:,.0f} tokens of context per request (a batch size's mean) where the "
            f"coefficients' fit traces reached ~{coverage.context_max:,}: the price of reading context (β4) was "
            "measured on shorter ones and is extrapolated; to predict such loads, fit with a trace with as long "
            "prompts or answers"
        )
    return notes


def capture_as_results(capture: Trace, of: Trace, where: str = "capture") -> list[RequestResult]:
    """`capture`'s requests as results to compare `of` with. Two captures of one workload (same spec and
    seed) give the host's run-to-run error: a floor under any prediction of it. Requests pair by id, or,
    when ids disagree on lengths (closed-loop users number their requests as answers come back), by client
    and lengths where those are unique. The capture's own round trip comes off, as `compare` adds `of`'s
    back. Raises CalibrationError when fewer than half of `of`'s requests find a partner."""
    mine = [r for r in of.records if r.status == "ok"]
    theirs = [r for r in capture.records if r.status == "ok"]
    lengths = {r.request_id: (r.total_input_tokens, r.output_tokens) for r in mine}
    shared = [r for r in theirs if r.request_id in lengths]
    if shared and all(lengths[r.request_id] == (r.total_input_tokens, r.output_tokens) for r in shared):
        partner = {r.request_id: r.request_id for r in shared}
    else:
        mine_by, theirs_by = _unique_by_lengths(mine), _unique_by_lengths(theirs)
        partner = {theirs_by[k]: mine_by[k] for k in mine_by.keys() & theirs_by.keys()}
    if len(partner) < len(mine) / 2:
        raise CalibrationError(
            f"{where} is not a capture of the same workload: {len(partner)} of {len(mine)} requests find one "
            "with the same id or client and lengths (capture both with the same --workload-spec and --seed)"
        )
    rtt = resolve_rtt_us(capture, None)
    itl = itl_means_us(capture)
    return [
        RequestResult(
            request_id=partner[r.request_id],
            status="ok",
            instance=0,
            arrival_us=r.send_time_us,
            queued_us=-1,
            scheduled_us=-1,
            first_token_us=r.first_chunk_time_us - rtt,
            finish_us=r.last_chunk_time_us - rtt,
            ttft_us=r.ttft_us - rtt,
            e2e_us=r.e2e_us - rtt,
            itl_mean_us=itl.get(r.request_id, 0.0),
            input_tokens=r.total_input_tokens,
            output_tokens=r.output_tokens,
            num_preemptions=0,
            cached_tokens=r.cached_tokens or 0,
        )
        for r in theirs
        if r.request_id in partner
    ]


def _unique_by_lengths(records: Sequence[TraceRecord]) -> dict[tuple[str, int, int], int]:
    """Request id by (client, prompt, output) lengths, for the keys only one request has."""
    keys = [(r.client_id, r.total_input_tokens, r.output_tokens) for r in records]
    counts = Counter(keys)
    return {k: r.request_id for k, r in zip(keys, records, strict=True) if counts[k] == 1}


def resolve_rtt_us(trace: Trace, rtt_us: int | None) -> int:
    """The flag when given, else the header's measured_rtt_ms × 1000 truncated (BLIS), else 0."""
    if rtt_us is not None:
        if rtt_us < 0:
            raise CalibrationError(f"network RTT must be >= 0 µs, got {rtt_us}")
        return int(rtt_us)
    return int(float(trace.header.network.get("measured_rtt_ms", 0.0)) * 1000)


def compare(
    trace: Trace,
    results: Iterable[ResultLike],
    *,
    rtt_us: int | None = None,
    warmup: int | None = None,
    trace_name: str = "",
    latency_model: DecodeStepModel | None = None,
    diagnostics: TraceDiagnostics | None = None,
    fit_coverage: FitCoverage | None = None,
) -> ComparisonReport:
    """Pair `trace` with simulated `results` by request id and compute BLIS's metrics.

    `warmup` (None = the header's warm_up_requests) excludes request ids below it. With the `latency_model`
    that produced the results, the trace's `decode_step_ratio` (and a note when the server ran at another
    speed); with the batches and contexts its coefficients were fitted on (`fit_coverage`, else the model's
    own when it knows them), notes when the trace decoded larger ones or longer ones (`coverage_notes`).
    `diagnostics` are `trace_diagnostics(trace)` when already known (a fit compares each trace many times).
    Raises CalibrationError when nothing can be compared.
    """
    if fit_coverage is None and latency_model is not None:
        fit_coverage = latency_model.fit_coverage
    warm = trace.header.warm_up_requests if warmup is None else warmup
    if warm < 0:
        raise CalibrationError(f"warm-up request count must be >= 0, got {warm}")
    rtt = resolve_rtt_us(trace, rtt_us)
    where = trace_name or "trace"
    if not trace.records:
        raise CalibrationError(f"{where}: the trace has no requests")
    by_id: dict[int, ResultLike] = {}
    for res in results:
        by_id[int(res.request_id)] = res
    if not by_id:
        raise CalibrationError(f"{where}: no simulated results to compare with")
    real_itl = itl_means_us(trace)
    bursts = burst_delivered(real_itl)
    counts = dict.fromkeys(
        (
            "warm_up_excluded",
            "non_ok_excluded",
            "unmatched_real",
            "sim_not_ok",
            "token_mismatches",
            "negative_latency",
            "itl_dropped",
            "itl_one_burst",
        ),
        0,
    )
    pairs = Pairs()
    matched: list[tuple[TraceRecord, ResultLike]] = []
    matched_ids: set[int] = set()
    for rec in trace.records:
        if rec.request_id < warm:
            counts["warm_up_excluded"] += 1
            continue
        if rec.status != "ok":
            counts["non_ok_excluded"] += 1
            continue
        res = by_id.get(rec.request_id)
        if res is None:
            counts["unmatched_real"] += 1
            continue
        matched_ids.add(rec.request_id)
        if res.status != "ok":
            counts["sim_not_ok"] += 1
            continue
        if rec.total_input_tokens != res.input_tokens or rec.output_tokens != res.output_tokens:
            counts["token_mismatches"] += 1
        if rec.ttft_us < 0 or rec.e2e_us < 0 or rec.first_chunk_time_us <= 0:
            counts["negative_latency"] += 1
            continue
        matched.append((rec, res))
        pairs.request_ids.append(rec.request_id)
        pairs.send_us.append(rec.send_time_us)
        pairs.real["ttft"].append(float(rec.ttft_us))
        pairs.sim["ttft"].append(float(res.ttft_us) + rtt)
        pairs.real["e2e"].append(float(rec.e2e_us))
        pairs.sim["e2e"].append(float(res.e2e_us) + rtt)
        itl_us = sim_itl(res)
        if rec.output_tokens > 1:
            if rec.request_id in bursts:
                counts["itl_one_burst"] += 1
            elif rec.request_id in real_itl and itl_us is not None:
                pairs.itl_ids.append(rec.request_id)
                pairs.real["itl"].append(real_itl[rec.request_id])
                pairs.sim["itl"].append(itl_us)
            else:
                counts["itl_dropped"] += 1
    if not pairs.request_ids:
        sim_ids = sorted(by_id)
        trace_ids = sorted(r.request_id for r in trace.records)
        raise CalibrationError(
            f"{where}: no comparable pairs: trace ids {trace_ids[0]}..{trace_ids[-1]} ({len(trace_ids)} rows, "
            f"{counts['non_ok_excluded']} not ok, {counts['warm_up_excluded']} warm-up), sim ids "
            f"{sim_ids[0]}..{sim_ids[-1]} ({len(sim_ids)}), {len(matched_ids)} ids in common, "
            f"{counts['sim_not_ok']} of them not ok in the simulation"
        )
    metrics: dict[str, dict[str, Any]] = {}
    for metric in METRICS:
        real, sim = pairs.arrays(metric)
        if real.size == 0:
            continue
        metrics[metric] = {
            "workload_level": workload_level(real, sim),
            "request_level": request_level(real, sim),
            "count": int(real.size),
        }
    sends = sorted(r.send_time_us for r in trace.records if r.request_id >= warm)
    span_s = (sends[-1] - sends[0]) / 1e6 if len(sends) > 1 else 0.0
    trace_info: dict[str, Any] = {
        "num_requests": len(matched_ids) + counts["warm_up_excluded"] + counts["unmatched_real"],
        "warm_up_excluded": counts["warm_up_excluded"],
        "matched_pairs": len(matched_ids),
        "token_mismatches": counts["token_mismatches"],
    }
    if counts["itl_dropped"]:
        trace_info["itl_dropped"] = counts["itl_dropped"]
    # Ours (BLIS readers ignore them).
    trace_info.update(
        trace=trace_name,
        records=len(trace.records),
        non_ok_excluded=counts["non_ok_excluded"],
        unmatched_real=counts["unmatched_real"],
        unmatched_sim=len(set(by_id) - {r.request_id for r in trace.records}),
        sim_not_ok=counts["sim_not_ok"],
        negative_latency=counts["negative_latency"],
        compared=len(pairs.request_ids),
        network_rtt_us=rtt,
        offered_rate_rps=round((len(sends) - 1) / span_s, 4) if span_s > 0 else 0.0,
        itl_one_burst=counts["itl_one_burst"],
    )
    notes = []
    if "itl" not in metrics:
        notes.append(f"{where}: no ITL pairs (no request with two or more streamed tokens)")
    if counts["itl_one_burst"]:
        notes.append(
            f"{where}: {counts['itl_one_burst']} request(s) received all their tokens in one burst (a mean gap "
            f"under {ITL_BURST_SHARE:.0%} of the trace's median ITL): the stream was held up on its way (the "
            "server or the recording client stalled), so their ITL times no decode step and is left out of the "
            "ITL metrics; their TTFT and E2E are compared"
        )
    diagnostics = diagnostics or trace_diagnostics(trace)
    gap_us, gap_at = diagnostics.longest_gap_us, diagnostics.longest_gap_at_us
    trace_info["longest_decode_gap_s"] = round(gap_us / 1e6, 3)
    if gap_us > STALL_NOTE_US:
        notes.append(
            f"{where}: no token received for {gap_us / 1e6:.1f} s at {gap_at / 1e6:.1f} s while requests were "
            "decoding: a very long prefill, or the server or the recording client stalled (e.g. another "
            "process took the CPU); stalls are not part of the step-time model and inflate the errors of the "
            "requests in flight"
        )
    lags = send_lags_us(trace)
    late = [lag for lag in lags if lag > LATE_SEND_US]
    if lags:
        trace_info["late_sends"] = len(late)
    if late:
        notes.append(
            f"{where}: {len(late)} request(s) were sent more than {LATE_SEND_US // 1000} ms after their "
            f"scheduled time (up to {max(late) / 1e6:.2f} s): the recording client was held up (by a "
            "concurrency cap, or starved of CPU, e.g. by a CPU-bound server on its machine), and what it read "
            "meanwhile came late and in bulk, so the TTFT and ITL of the requests then in flight include client "
            "time no step model contains; recapture with the client on another machine or with spare CPU"
        )
    if captured_fresh(trace.header):
        notes.append(
            f"{where}: captured from a server that had run no engine step since it started (the header's "
            f"observed_kv_metrics.engine_steps_before): {FRESH_SERVER}; the simulation is of a warm server, so "
            "expect the first large steps' requests to run slower than simulated (capture with "
            "`blis observe --prewarm-duration` to leave this out)"
        )
    preemptions = int(trace.header.observed_kv_metrics.get("preemptions", 0))
    if preemptions and preemptions >= PREEMPTION_NOTE * len(pairs.request_ids) and "ttft" in metrics:
        means = "; ".join(
            f"{m.upper()} {metrics[m]['workload_level']['real_mean'] / 1000:.0f} ms observed, "
            f"{metrics[m]['workload_level']['sim_mean'] / 1000:.0f} simulated"
            for m in ("ttft", "e2e")
            if m in metrics
        )
        notes.append(
            f"{where}: vLLM counted {preemptions} preemption(s) for {len(pairs.request_ids)} compared requests: which "
            "request waits for KV blocks then turns on microseconds, and two runs of one such workload differ per "
            "request too (59-83 % TTFT MAPE between repeated 24- and 32-block closed loops, docs/accuracy.md); "
            f"judge it by the means ({means})"
        )
    drift = diagnostics.drift
    if drift is not None:
        trace_info["decode_speed_parts"] = list(drift.parts)
        trace_info["decode_speed_drift"] = drift.drift
        if drift.drift > DRIFT_NOTE:
            notes.append(
                f"{where}: at equal batch size and context, decode steps ran {drift.drift:.0%} slower in the "
                f"slowest quarter of the run than in the fastest (medians "
                f"{', '.join(f'{p:.2f}' for p in drift.parts)} of the run's own): the server's speed changed during the capture (other work on the machine); a step "
                "model holds one speed, so part of this trace's error is beyond any fit"
            )
    if latency_model is not None:
        for kind, ratio in step_ratios(diagnostics, latency_model, fit_coverage).items():
            trace_info[f"{kind}_step_ratio"] = round(ratio[0], 4)
            if speed := speed_note(where, ratio, kind):
                notes.append(speed)
    if fit_coverage is not None:
        notes.extend(coverage_notes(where, diagnostics.steps, fit_coverage))
    split = ttft_split_ms(matched, rtt)
    if split is not None:
        trace_info["ttft_split_ms"] = split
        if note := ttft_split_note(where, split):
            notes.append(note)
    return ComparisonReport(
        trace_info=trace_info,
        metrics=metrics,
        pairs=pairs,
        notes=notes,
        decode_speed=drift.series if drift is not None else (),
    )


def summary_row(report: ComparisonReport) -> dict[str, Any]:
    """One flat row (for tables and the validation report): requests, load, MAPE/r/bias/quality per metric."""
    row: dict[str, Any] = {
        "trace": report.trace_info.get("trace", ""),
        "requests": report.trace_info["compared"],
        "rate_rps": report.trace_info.get("offered_rate_rps", 0.0),
    }
    if "decode_speed_drift" in report.trace_info:
        row["speed_drift"] = report.trace_info["decode_speed_drift"]
    if "decode_step_ratio" in report.trace_info:
        row["step_ratio"] = report.trace_info["decode_step_ratio"]
    if "prefill_step_ratio" in report.trace_info:
        row["prefill_step_ratio"] = report.trace_info["prefill_step_ratio"]
    if "timing_floor" in report.trace_info and "ttft" in report.trace_info["timing_floor"]:
        row["ttft_timing_floor"] = report.trace_info["timing_floor"]["ttft"]
    for metric in METRICS:
        if metric not in report.metrics:
            continue
        block = report.metrics[metric]
        rl, wl = block["request_level"], block["workload_level"]
        row[f"{metric}_mape"] = rl["mape"]
        row[f"{metric}_pearson_r"] = rl["pearson_r"]
        row[f"{metric}_bias"] = rl["bias_direction"]
        row[f"{metric}_quality"] = rl["quality"]
        for p in (50, 90, 99):
            row[f"{metric}_p{p}_percent_error"] = wl[f"p{p}_percent_error"]
    return row


def pooled(reports: Sequence[ComparisonReport]) -> dict[str, dict[str, Any]]:
    """Metrics over the pairs of several reports pooled together (the validation summary)."""
    out: dict[str, dict[str, Any]] = {}
    for metric in METRICS:
        real = np.concatenate([r.pairs.arrays(metric)[0] for r in reports]) if reports else np.zeros(0)
        sim = np.concatenate([r.pairs.arrays(metric)[1] for r in reports]) if reports else np.zeros(0)
        if real.size:
            out[metric] = {
                "workload_level": workload_level(real, sim),
                "request_level": request_level(real, sim),
                "count": int(real.size),
            }
    return out
