"""What a trace's timings show of the server that answered it, read-only over `trace.Trace`.

The engine steps its streamed events mark (prompt chunks laid back into the steps that computed them, pure-decode
steps, the single-request step, the decode speed's drift through the run), prefix-cache hits estimated from its
prompts, and the summary `blis trace info` prints. Calibrate's features and compare, and replay's cache
estimate, read a trace through these.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blis_cal.stats import count_summary, latency_summary, percentile
from blis_cal.trace import (
    LATE_SEND_US,
    Trace,
    TraceRecord,
    injection_time_us,
    itl_means_us,
    ok_records,
)

if TYPE_CHECKING:  # numpy and scipy are imported inside the functions that use them (slow to import)
    import numpy as np


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
