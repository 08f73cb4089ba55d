"""Step-time features reconstructed from observed per-chunk timestamps (the direct estimate's inputs).

Between a request's first and last streamed token, the engine ran exactly one step per output token of that
request, and its decode time is the sum of those steps. With a step time linear in batch features
(β0 + β1·P + β2·D + ...), that sum is linear in the features summed over the steps in the window: the
number of steps, the prefill tokens computed (each prompt laid over the steps up to its first token as the
token budget chunks it), the decode tokens produced (every request's tokens after its first, inside the
window), and context sums. Counting tokens over a window is robust to several SSE events sharing one
network read, which makes single inter-chunk gaps noisy. Dividing by the request's token count gives its
mean ITL as a linear function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from blis_cal.simulate.latency import attention_pairs
from blis_cal.trace import Chunk, Trace, TraceRecord, burst_delivered, itl_means_us, ok_records
from blis_cal.trace_analysis import (
    STEP_BURST_GAP_US,
    DecodeStep,
    PromptToLay,
    duplicated_prefix_tokens,
    estimate_cached_tokens,
    lay_prompt_chunks,
    prefill_chunk_cap,
    shared_prefix_tokens,
    token_budget,
)

# Event feature columns accumulated over windows (per-step features summed over the steps in a window), named
# after simulate.latency.StepBatch: P prefill tokens computed, D decode tokens, Pctx tokens already in KV
# before each prefill (cached prefix), Dctx Σ context of decoding requests (a shared prefix's blocks counted
# once per step), Np prefill requests (with a prompt's first chunk), Ppairs the prefills' attention pairs (a
# chunk's own: a prompt's chunks sum to the whole prompt's).
EVENT_COLUMNS = ("P", "D", "Pctx", "Dctx", "Np", "Ppairs")
DCTX = EVENT_COLUMNS.index("Dctx")
# Per step without prefill, the decode requests short of a floor of k: max(0, k − D), for every k a fit may
# pick (`floor_column`).
FLOORS = tuple(range(33))


def floor_column(floor: int) -> str:
    return f"D<{floor}"


FLOOR_COLUMNS = tuple(floor_column(k) for k in FLOORS)


def chunks_of(trace: Trace, rec: TraceRecord) -> list[Chunk]:
    """The request's streamed events; evenly spaced between first and last chunk without an ITL file."""
    if trace.itl and trace.itl.get(rec.request_id):
        return trace.itl[rec.request_id]
    n = max(rec.num_chunks, 1)
    times = np.linspace(rec.first_chunk_time_us, rec.last_chunk_time_us, n).round().astype(np.int64)
    tokens = [1] * n
    # Spread any token surplus (several tokens per event) over the last event.
    tokens[-1] += max(rec.output_tokens - n, 0)
    return [Chunk(int(t), k) for t, k in zip(times, tokens, strict=True)]


class FeatureMatrix:
    """Rows with named feature columns (`features`), stacked into a matrix in a given column order."""

    features: dict[str, np.ndarray]

    def matrix(self, columns: Sequence[str]) -> np.ndarray:
        return np.column_stack([self.features[c] for c in columns])


@dataclass
class WindowRows(FeatureMatrix):
    """Per-request rows: mean ITL (µs) and the mean per-step features over its decode window."""

    request_ids: np.ndarray
    itl_us: np.ndarray
    features: dict[str, np.ndarray]  # column -> per-token mean over the window ("steps" is 1)
    send_us: np.ndarray


@dataclass
class PrefillRows(FeatureMatrix):
    """Requests that arrived to an idle engine: TTFT and their prefill features (for the α estimate)."""

    ttft_us: np.ndarray
    prompt_tokens: np.ndarray
    features: dict[str, np.ndarray]
    # TTFT minus vLLM's own queue + scheduled→first-token times (NaN when not recorded): the time outside
    # the engine, measured without any step-time model.
    outside_us: np.ndarray


def _prefill_event(total: int, hit: int) -> tuple[float, ...]:
    return (float(total - hit), 0.0, float(hit), 0.0, 1.0, float(attention_pairs(total - hit, hit)))


def _decode_event(tokens: int, context: int) -> tuple[float, ...]:
    # A decode step for output token k reads the prompt plus the k−1 tokens before it.
    return (0.0, float(tokens), 0.0, float(tokens * context), 0.0, 0.0)


def _chunk_event(tokens: int, done: int, hit: int) -> tuple[float, ...]:
    """A prompt's chunk of `tokens` after `done` of its new tokens: the prompt's hits and its request count go
    with its first chunk, so a prompt's chunks sum to `_prefill_event`; its pairs are the chunk's own."""
    first = done == 0
    pairs = attention_pairs(tokens, hit + done)
    return (float(tokens), 0.0, float(hit if first else 0), 0.0, float(first), float(pairs))


def _chunked_prefills(
    t: np.ndarray,
    v: np.ndarray,
    owners: np.ndarray,
    sends: dict[int, int],
    budget: int,
    cap: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The prompts laid over the steps that computed them (`trace_analysis.lay_prompt_chunks`, vLLM's chunked
    prefill). One event per chunk, at the time of its step's events (a prompt that fits its last step stays one
    event)."""
    starts = np.r_[0, np.nonzero(np.diff(t) > STEP_BURST_GAP_US)[0] + 1]
    step_of = np.searchsorted(starts, np.arange(len(t)), side="right") - 1
    room = (budget - np.add.reduceat((v[:, 1] > 0).astype(np.int64), starts)).tolist()
    events = np.nonzero(v[:, 4] > 0)[0]  # each prompt's event (its request count), earliest first token first
    laid = lay_prompt_chunks(
        t[starts].tolist(),
        room,
        (PromptToLay(int(step_of[i]), sends[int(owners[i])], int(v[i, 0])) for i in events),
        cap,
    )
    extra_t: list[int] = []
    extra_v: list[tuple[float, ...]] = []
    for i, taken in zip(events, laid, strict=True):
        if len(taken) <= 1:
            continue  # in one step: the event as it is
        hit, done = int(v[i, 2]), 0
        for k, (step, take) in enumerate(reversed(taken)):
            chunk = _chunk_event(take, done, hit)
            done += take
            if k == len(taken) - 1:
                v[i] = chunk
            else:
                extra_t.append(int(t[starts[step]]))
                extra_v.append(chunk)
    if not extra_t:
        return t, v, owners
    t2 = np.r_[t, np.asarray(extra_t, dtype=np.int64)]
    order = np.argsort(t2, kind="stable")
    v2 = np.vstack([v, np.asarray(extra_v)])[order]
    owners2 = np.r_[owners, np.full(len(extra_t), -1)][order]  # a chunk holds no decode context
    return t2[order], v2, owners2


def _laid_events(
    trace: Trace, records: Sequence[TraceRecord], cached: dict[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every streamed event in time order, (time µs, EVENT_COLUMNS, owner request id), each prompt laid over
    the steps that computed it (`_chunked_prefills`; its earlier chunks owned by no request)."""
    times: list[int] = []
    owners: list[int] = []
    values: list[tuple[float, ...]] = []
    for rec in records:
        chunks = chunks_of(trace, rec)
        total = rec.total_input_tokens
        hit = cached.get(rec.request_id, 0)
        times.append(chunks[0].timestamp_us)
        values.append(_prefill_event(total, hit))
        produced = chunks[0].tokens
        for chunk in chunks[1:]:
            produced += chunk.tokens
            values.append(_decode_event(chunk.tokens, total + produced - 1))
            times.append(chunk.timestamp_us)
        owners += [rec.request_id] * len(chunks)
    order = np.argsort(np.asarray(times, dtype=np.int64), kind="stable")
    t = np.asarray(times, dtype=np.int64)[order]
    v = np.asarray(values, dtype=float).reshape(-1, len(EVENT_COLUMNS))[order]
    owner = np.asarray(owners, dtype=np.int64)[order]
    if not len(t):
        return t, v, owner
    sends = {r.request_id: r.send_time_us for r in records}
    return _chunked_prefills(t, v, owner, sends, token_budget(trace), prefill_chunk_cap(trace))


def _events(trace: Trace, records: Sequence[TraceRecord], cached: dict[int, int]):
    t, v, owner = _laid_events(trace, records, cached)
    if not len(t):
        return t, np.zeros((1, v.shape[1] + len(FLOORS)))
    # Each pure-decode step's requests short of each floor, counted at the step's first event (a burst: its
    # events; an event carrying several tokens of one request is one request).
    starts = np.r_[0, np.nonzero(np.diff(t) > STEP_BURST_GAP_US)[0] + 1]
    v[starts, DCTX] -= _burst_duplicates(
        owner,
        starts,
        shared_prefix_tokens(trace, records, cached),
        np.add.reduceat(v[:, DCTX], starts),
    )
    short = np.zeros((len(t), len(FLOORS)))
    short[starts] = _short_of_floors(
        np.add.reduceat((v[:, 1] > 0).astype(float), starts), np.add.reduceat(v[:, 0], starts) == 0
    )
    cum = np.vstack([np.zeros((1, v.shape[1] + len(FLOORS))), np.cumsum(np.hstack([v, short]), axis=0)])
    return t, cum


def _burst_duplicates(
    owners: np.ndarray, starts: np.ndarray, shares: dict[int, tuple[str, int]], context: np.ndarray
) -> np.ndarray:
    """Per burst of events (one step; `starts` its first events), the shared prefix tokens its requests hold
    more than once (`duplicated_prefix_tokens`, as the simulator's KV cache counts them), at most the
    burst's decode `context`."""
    out = np.zeros(len(starts))
    if not shares:
        return out
    holds = np.fromiter((rid in shares for rid in owners.tolist()), bool, len(owners))
    held = np.add.reduceat(holds.astype(int), starts)
    ends = np.r_[starts[1:], len(owners)]
    for i in np.nonzero(held > 1)[0]:
        out[i] = duplicated_prefix_tokens(owners[starts[i] : ends[i]].tolist(), shares)
    return np.minimum(out, context)


def _short_of_floors(decodes: np.ndarray, pure: np.ndarray) -> np.ndarray:
    """(steps, FLOORS): for the `pure`-decode steps, max(0, k − decode requests) for every k; else 0."""
    k = np.asarray(FLOORS, dtype=float)[None, :]
    return np.where(pure[:, None], np.maximum(k - decodes[:, None], 0.0), 0.0)


def window_rows(trace: Trace) -> WindowRows:
    """One row per `ok` request with ≥ 2 output tokens and a measured ITL (not one delivered in a burst)."""
    records = ok_records(trace)
    cached = estimate_cached_tokens(trace, records)
    t, cum = _events(trace, records, cached)
    itl = itl_means_us(trace)
    bursts = burst_delivered(itl)  # their ITL times no step
    ids, ys, sends, rows = [], [], [], []
    for rec in records:
        if rec.request_id not in itl or rec.request_id in bursts or rec.output_tokens < 2:
            continue
        chunks = chunks_of(trace, rec)
        steps = sum(c.tokens for c in chunks[1:])
        if steps <= 0:
            continue
        lo = np.searchsorted(t, chunks[0].timestamp_us, side="right")
        hi = np.searchsorted(t, chunks[-1].timestamp_us, side="right")
        rows.append((cum[hi] - cum[lo]) / steps)
        ids.append(rec.request_id)
        ys.append(itl[rec.request_id])
        sends.append(rec.send_time_us)
    mat = np.asarray(rows, dtype=float).reshape(-1, len(EVENT_COLUMNS) + len(FLOOR_COLUMNS))
    features = {"const": np.ones(len(ids))}
    features.update({c: mat[:, i] for i, c in enumerate(EVENT_COLUMNS + FLOOR_COLUMNS)})
    return WindowRows(
        request_ids=np.asarray(ids, dtype=np.int64),
        itl_us=np.asarray(ys, dtype=float),
        features=features,
        send_us=np.asarray(sends, dtype=np.int64),
    )


def idle_prefill_rows(trace: Trace, quiet_us: int = 5_000) -> PrefillRows:
    """Requests whose prefill ran alone on an idle engine: no other request's event between its send and
    its first token (± `quiet_us`), and no other request sent in that interval. Their TTFT is queue delay
    + one prefill-only step (+ output delay), which separates α (outside the step) from β1 (inside)."""
    records = ok_records(trace)
    cached = estimate_cached_tokens(trace, records)
    stamps = []
    for rec in records:
        stamps.extend((c.timestamp_us, rec.request_id) for c in chunks_of(trace, rec))
    stamps.sort()
    times = np.asarray([s[0] for s in stamps], dtype=np.int64)
    owners = np.asarray([s[1] for s in stamps], dtype=np.int64)
    sends = np.asarray([r.send_time_us for r in records], dtype=np.int64)
    ttft, prompt, p_new, p_ctx, outside = [], [], [], [], []
    for rec in records:
        lo = np.searchsorted(times, rec.send_time_us - quiet_us, side="left")
        hi = np.searchsorted(times, rec.first_chunk_time_us + quiet_us, side="right")
        if np.any(owners[lo:hi] != rec.request_id):
            continue
        others = (sends > rec.send_time_us - quiet_us) & (sends < rec.first_chunk_time_us)
        if others.sum() > 1:
            continue
        hit = cached.get(rec.request_id, 0)
        ttft.append(rec.ttft_us)
        prompt.append(rec.total_input_tokens)
        p_new.append(rec.total_input_tokens - hit)
        p_ctx.append(hit)
        off_engine = rec.outside_engine_us
        outside.append(np.nan if off_engine is None else off_engine)
    n = len(ttft)
    budget = token_budget(trace)
    # vLLM's chunked prefill: one step per budget-sized chunk, each paying β0 and attending to the cached
    # prefix and the chunks before it
    steps = np.asarray([max(-(-new // budget), 1) for new in p_new], dtype=float)
    features = {
        "const": steps,
        "P": np.asarray(p_new, dtype=float),
        "D": np.zeros(n),
        "Pctx": steps * np.asarray(p_ctx, dtype=float) + budget * steps * (steps - 1) / 2,
        "Dctx": np.zeros(n),
        "Np": steps,
        "Ppairs": np.asarray(
            [attention_pairs(new, hit) for new, hit in zip(p_new, p_ctx, strict=True)], dtype=float
        ),
    }
    return PrefillRows(
        ttft_us=np.asarray(ttft, dtype=float),
        prompt_tokens=np.asarray(prompt, dtype=float),
        outside_us=np.asarray(outside, dtype=float),
        features=features,
    )


@dataclass
class StepRows(FeatureMatrix):
    """Observed engine steps that computed a prefill while decodes were in flight: duration and features."""

    duration_us: np.ndarray
    send_us: np.ndarray
    features: dict[str, np.ndarray]
    counts: np.ndarray | None = None  # rows that are medians: how many steps each is the median of


def prefill_step_rows(trace: Trace) -> StepRows:
    """Steps reconstructed from bursts of streamed events (the events of one step arrive within a few ms).

    A burst holding a request's first token and other requests' decode tokens ends a step that ran back to
    back with the previous one (those decodes were in flight), so its duration is the time since the
    previous burst. These steps measure the prefill cost inside the step (β1), which stalls every decode. A
    prompt's chunks are laid over the steps that computed them (`_laid_events`), so a step holds what vLLM
    computed in it, the chunk of a prompt whose first token came later included.
    """
    records = ok_records(trace)
    cached = estimate_cached_tokens(trace, records)
    t, v, owner = _laid_events(trace, records, cached)
    if not len(t):
        return StepRows(
            np.zeros(0),
            np.zeros(0, dtype=np.int64),
            {c: np.zeros(0) for c in ("const", *EVENT_COLUMNS, *FLOOR_COLUMNS)},
        )
    starts = np.r_[0, np.nonzero(np.diff(t) > STEP_BURST_GAP_US)[0] + 1]
    sums = np.add.reduceat(v, starts, axis=0)
    sums[:, DCTX] -= _burst_duplicates(
        owner, starts, shared_prefix_tokens(trace, records, cached), sums[:, DCTX]
    )
    # A prompt's last chunk (its first token) keeps its request; the chunks before it ran in steps begun after
    # its send.
    send_of = {r.request_id: r.send_time_us for r in records}
    last_chunks = np.nonzero((v[:, 0] > 0) & (owner >= 0))[0]
    sends = np.zeros(len(owner), dtype=np.int64)
    sends[last_chunks] = [send_of[o] for o in owner[last_chunks].tolist()]
    latest_send = np.maximum.reduceat(sends, starts)
    begin = t[starts]
    durations = np.diff(begin)
    s = sums[1:]
    # Prefill in the burst, decodes in flight, the prefilled requests sent before the step began, and the
    # step within the token budget (a wrong header's budget).
    budget = token_budget(trace)
    keep = (s[:, 0] > 0) & (s[:, 1] > 0) & (latest_send[1:] < begin[:-1]) & (s[:, 0] + s[:, 1] <= budget)
    features = {"const": np.ones(int(keep.sum()))}
    features.update({c: s[keep, i] for i, c in enumerate(EVENT_COLUMNS)})
    features.update({c: np.zeros(int(keep.sum())) for c in FLOOR_COLUMNS})  # every kept step has a prefill
    return StepRows(durations[keep].astype(float), begin[1:][keep], features)


DECODE_STEPS_MIN = 20  # pure-decode steps of one batch size for its median to be a row


def decode_step_rows(steps: Sequence[DecodeStep]) -> StepRows:
    """One row per batch size seen in at least DECODE_STEPS_MIN of a trace's pure-decode `steps`
    (`trace_analysis.decode_steps`): their median duration and mean context. Medians over many steps are robust
    to events of one step split over two network reads, and show how a step's cost grows with the number of
    decoding requests."""
    by_size: dict[int, list[tuple[int, int, int]]] = {}
    for step in steps:
        by_size.setdefault(step.num_decode, []).append((step.duration_us, step.context_tokens, step.time_us))
    sizes = sorted(n for n, steps in by_size.items() if len(steps) >= DECODE_STEPS_MIN)
    n = np.asarray(sizes, dtype=float)
    zeros = np.zeros(len(sizes))
    features = {
        "const": np.ones(len(sizes)),
        "P": zeros,
        "D": n,
        "Pctx": zeros,
        "Dctx": np.asarray([np.mean([c for _, c, _ in by_size[k]]) for k in sizes]),
        "Np": zeros,
        "Ppairs": zeros,
    }
    features.update(zip(FLOOR_COLUMNS, _short_of_floors(n, np.ones(len(sizes), bool)).T, strict=True))
    return StepRows(
        np.asarray([np.median([d for d, _, _ in by_size[k]]) for k in sizes]),
        np.asarray([int(np.median([t for _, _, t in by_size[k]])) for k in sizes], dtype=np.int64),
        features,
        np.asarray([len(by_size[k]) for k in sizes], dtype=np.int64),
    )
