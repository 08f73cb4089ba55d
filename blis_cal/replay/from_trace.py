"""Replay a TraceV2 trace through the simulator: trace rows -> SimRequests, header -> SimConfig.

Each row becomes a request injected at its send time (the moment the server could first see it), with the
server-reported prompt length when recorded and the observed output length. Rows of a `prefix_group` share
identical prefix content of `prefix_length` tokens, so the simulated prefix cache hits where vLLM's did; with
`session_context_growth: accumulate` a session's round carries the previous round's prompt and output as its own
prefix (multi-turn chat history), or the prompt alone where the recorded hits say the answer came back as other
token ids (`trace_analysis.answers_reused`). When a row's recorded `cached_tokens` (vLLM's usage) go beyond the
blocks its prompt shares with earlier rows' prompts and answers, they were in the server's cache before the
capture (a warm cache, e.g. the same prompts sent in an earlier run): they start out cached in the simulated
prefix cache too. Rows sent in answer to an earlier row (closed-loop users, sessions) follow the session mode
(`sessions.py`): by default never before their predecessor's simulated answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from blis_cal.replay.sessions import DEFAULT_SESSION_MODE, TraceFollowUp, chain_requests
from blis_cal.simulate.engine import SimConfig, simulate
from blis_cal.simulate.kv_cache import block_hashes
from blis_cal.simulate.latency import LatencyModel
from blis_cal.simulate.metrics import SimRun
from blis_cal.simulate.request import SimRequest, output_key
from blis_cal.trace import Trace, TraceHeader, TraceRecord, injection_time_us, unstated_engine_settings
from blis_cal.trace_analysis import answers_reused
from blis_cal.trace_links import trace_links

# Header `server:` fields that set engine settings (0 / None there means unknown: keep the default).
SERVER_FIELDS = (
    "block_size",
    "num_gpu_blocks",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "long_prefill_token_threshold",
    "long_prefill_token_threshold_adaptive",
)


def unstated_settings_note(
    header: TraceHeader, config: SimConfig, how: str, given: Iterable[str] = ()
) -> str | None:
    """A note naming the engine settings neither the header's `server:` block nor `given` (flags) state
    (`unstated_engine_settings`), with the values `config` took for them and `how` to set them: a replay on
    another engine predicts another server."""
    missing = unstated_engine_settings(header.server, given)
    if not missing:
        return None
    taken = ", ".join(f"{n}={getattr(config, n)}" for n in missing)
    cache = ", a KV cache too large to run short" if "num_gpu_blocks" in missing else ""
    return (
        f"the trace header does not state the server's {', '.join(missing)}: replayed with {taken} (vLLM's "
        f"serving defaults{cache}); set what the server ran with ({how}; vLLM logs them at startup)"
    )


def requests_from_trace(
    trace: Trace,
    notes: list[str] | None = None,
    *,
    block_size: int | None = None,
    prefix_caching: bool = True,
) -> list[SimRequest]:
    """One SimRequest per row that produced output (rows with 0 output tokens never ran: skipped, noted).
    `block_size` (default: the header's, else SimConfig's) aligns the warm-cache tokens to KV blocks; without
    `prefix_caching` nothing starts out cached."""
    accumulate = trace.header.session_context_growth == "accumulate"
    # session -> (the content a next round starts with, its length)
    history: dict[str, tuple[tuple[tuple[str, int], ...], int]] = {}
    server = trace.header.server
    block = block_size or (server.block_size if server and server.block_size > 0 else SimConfig().block_size)
    reused = not accumulate or answers_reused(trace, block, notes)
    # Blocks a later row may have found cached: hashing stops there (most traces record no hits at all).
    reach = max((r.cached_tokens or 0 for r in trace.records), default=0) // block if prefix_caching else 0
    seen: set[int] = set()  # hashes of the first `reach` blocks of the sequences (prompt + answer) so far
    warmed: list[int] = []
    out: list[SimRequest] = []
    skipped: list[int] = []
    for rec in sorted(trace.records, key=lambda r: (injection_time_us(r), r.request_id)):
        if rec.output_tokens <= 0:
            skipped.append(rec.request_id)
            continue
        input_len = rec.total_input_tokens
        segments = _segments(
            rec, input_len, history.get(rec.session_id) if accumulate and rec.session_id else None
        )
        sequence = (*segments, (output_key(rec.request_id), rec.output_tokens))  # prompt + answer
        if accumulate and rec.session_id:
            history[rec.session_id] = (
                (sequence, input_len + rec.output_tokens) if reused else (segments, input_len)
            )
        warm = 0
        if reach:
            # vLLM caches answers too (a chat's next round hits them); the last token's KV is never computed.
            hashes = block_hashes(
                _head(sequence, min(reach * block, input_len + rec.output_tokens - 1)), block
            )
            # vLLM reports whole cached blocks, at most all but the last prompt token (it needs its logits).
            hit = min(rec.cached_tokens or 0, input_len - 1) // block
            explained = next((i for i, h in enumerate(hashes[:hit]) if h not in seen), hit)
            if hit > explained:  # more than earlier rows can account for: cached before the capture
                warm = hit * block
                warmed.append(rec.request_id)
            seen.update(hashes)
        out.append(
            SimRequest(
                request_id=rec.request_id,
                arrival_us=injection_time_us(rec),
                input_len=input_len,
                output_len=rec.output_tokens,
                segments=segments,
                slo_class=rec.slo_class,
                tenant_id=rec.tenant_id,
                priority=rec.vllm_priority or 0,
                session_id=rec.session_id,
                round_index=rec.round_index,
                warm_tokens=warm,
            )
        )
    if warmed and notes is not None:
        notes.append(
            f"{len(warmed)} row(s) hit vLLM's prefix cache on content no earlier row sent (a cache warm from "
            "before the capture): their cached tokens start out in the simulated cache"
        )
    if skipped and notes is not None:
        shown = ", ".join(str(i) for i in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        notes.append(f"{len(skipped)} row(s) with 0 output tokens not replayed (request_id {shown})")
    out.sort(key=lambda r: r.request_id)
    return out


def _head(segments: tuple[tuple[str, int], ...], tokens: int) -> list[tuple[str, int]]:
    """The first `tokens` tokens of a prompt given as content segments."""
    head, left = [], tokens
    for key, length in segments:
        if left <= 0:
            break
        head.append((key, min(length, left)))
        left -= length
    return head


def _segments(
    rec: TraceRecord, input_len: int, previous: tuple[tuple[tuple[str, int], ...], int] | None
) -> tuple[tuple[str, int], ...]:
    own = f"req:{rec.request_id}"
    if previous is not None and 0 < previous[1] <= input_len:
        prior, prior_len = previous
        return prior + (((own, input_len - prior_len),) if input_len > prior_len else ())
    if rec.prefix_group and rec.prefix_length > 0:
        shared = min(rec.prefix_length, input_len)
        rest = input_len - shared
        return ((f"prefix:{rec.prefix_group}", shared),) + (((own, rest),) if rest else ())
    return ((own, input_len),)


def config_from_trace(header: TraceHeader, base: SimConfig | None = None, **overrides: Any) -> SimConfig:
    """Engine settings: `base` (defaults), then the header's `server:` block, then non-None `overrides`."""
    values = (base or SimConfig()).to_dict()
    server = header.server
    if server is not None:
        for name in SERVER_FIELDS:
            value = getattr(server, name)
            if value:
                values[name] = value
        if server.enable_prefix_caching is not None:
            values["enable_prefix_caching"] = server.enable_prefix_caching
    values |= {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("max_num_seqs") is None and not (server and server.max_num_seqs):
        # Seats unknown: vLLM's default is capped at the budget, and it refuses more seats than that.
        values["max_num_seqs"] = min(values["max_num_seqs"], values["max_num_batched_tokens"])
    return SimConfig(**values)


def trace_requests(
    trace: Trace, config: SimConfig, notes: list[str] | None = None, session_mode: str = DEFAULT_SESSION_MODE
) -> tuple[list[SimRequest], TraceFollowUp | None]:
    """The requests to inject up front and the bridge releasing the rows that follow an earlier answer."""
    requests = requests_from_trace(
        trace, notes, block_size=config.block_size, prefix_caching=config.enable_prefix_caching
    )
    return chain_requests(requests, trace_links(trace), session_mode, notes)


def replay_trace(
    trace: Trace,
    config: SimConfig,
    model: LatencyModel,
    notes: list[str] | None = None,
    *,
    record_tokens: bool = False,
    session_mode: str = DEFAULT_SESSION_MODE,
) -> SimRun:
    """Simulate a trace's requests on `config` (see `config_from_trace`) with `model`."""
    requests, follow_up = trace_requests(trace, config, notes, session_mode)
    return simulate(requests, config, model, follow_up, record_tokens=record_tokens)
