"""Traces simulated with known coefficients, with per-token chunk times (parameter recovery, benchmarks)."""

from __future__ import annotations

import dataclasses

import numpy as np

from blis_cal.replay import results_to_trace
from blis_cal.simulate import LatencyModel, SimConfig, SimRequest, Simulation
from blis_cal.trace import Chunk, ServerInfo, Trace, TraceHeader


def poisson_requests(
    n: int,
    rate_per_s: float,
    *,
    seed: int,
    input_mean: int = 256,
    output_mean: int = 64,
    max_input: int = 1024,
    max_output: int = 256,
    prefix_groups: int = 0,
    prefix_length: int = 0,
) -> list[SimRequest]:
    """`n` single-shot requests with Poisson arrivals and clipped normal lengths (deterministic in `seed`);
    with `prefix_groups`, each request starts with one of that many shared prefixes of `prefix_length`."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E7]))
    gaps = rng.exponential(1e6 / rate_per_s, size=n)
    arrivals = np.cumsum(gaps).astype(np.int64)
    inputs = np.clip(rng.normal(input_mean, input_mean / 3, size=n), 16, max_input).astype(int)
    outputs = np.clip(rng.normal(output_mean, output_mean / 3, size=n), 2, max_output).astype(int)
    groups = rng.integers(0, max(prefix_groups, 1), size=n)
    out = []
    for i in range(n):
        own = ((f"req:{i}", int(inputs[i])),)
        if prefix_groups and prefix_length:
            segments = ((f"prefix:group-{groups[i]}", prefix_length), *own)
        else:
            segments = own
        total = sum(length for _, length in segments)
        out.append(SimRequest(i, int(arrivals[i]), total, int(outputs[i]), segments))
    return out


def simulated_trace(requests: list[SimRequest], config: SimConfig, model: LatencyModel) -> Trace:
    """Simulate `requests` and return them as a real-looking trace: one chunk per token at its delivery time,
    the engine settings in the header's `server:` block, the simulator's prefix-cache hits and vLLM's
    per-request queue and scheduled→first-token times (as `blis observe` records them) filled in."""
    chunks: dict[int, list[Chunk]] = {}

    def on_token(request_id: int, _index: int, delivery_us: int) -> None:
        chunks.setdefault(request_id, []).append(Chunk(delivery_us, 1))

    config = dataclasses.replace(config, jump_decode=False)  # every token's time, one step at a time
    sim = Simulation(config, model, on_token=on_token)
    sim.add_requests(requests)
    run = sim.run()
    header = TraceHeader(
        mode="generated",
        server=ServerInfo(
            type="blis-sim",
            block_size=config.block_size,
            num_gpu_blocks=config.num_gpu_blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
        ),
    )
    trace = results_to_trace(run, header=header, output_delay_us=model.output_delay_us())
    by_id = {r.request_id: r for r in requests}
    for rec in trace.records:
        key, length = by_id[rec.request_id].segments[0]
        if key.startswith("prefix:"):  # BLIS convention: input_tokens is the part after the shared prefix
            rec.prefix_group, rec.prefix_length = key.removeprefix("prefix:"), length
            rec.input_tokens = rec.server_input_tokens - length
    trace.itl = {rid: c for rid, c in chunks.items() if rid in {r.request_id for r in trace.records}}
    return trace


def jitter_chunks(trace: Trace, mean_us: float, seed: int) -> None:
    """Client-side delivery noise on `trace`'s streamed events (exponential per event with mean `mean_us`, as
    a loaded client reads late; times stay in order per request): the direct estimate is then not exact,
    and one step's events may reach the client apart, as on real traces."""
    rng = np.random.default_rng(seed)
    for rec in trace.records:
        chunks = trace.itl[rec.request_id]
        delays = rng.exponential(mean_us, size=len(chunks)) if mean_us > 0 else np.zeros(len(chunks))
        times = np.maximum.accumulate([c.timestamp_us + int(d) for c, d in zip(chunks, delays, strict=True)])
        for chunk, t in zip(chunks, times, strict=True):
            chunk.timestamp_us = int(t)
        rec.first_chunk_time_us, rec.last_chunk_time_us = int(times[0]), int(times[-1])
