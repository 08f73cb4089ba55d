"""Hand-built traces of requests decoding in lockstep, with the engine's step time set per phase."""

from blis_cal.trace import Chunk, Trace, TraceHeader, TraceRecord


def lockstep_trace(phases: list[tuple], us_per_context_token: float = 0.0) -> Trace:
    """`phases` of (requests decoding together, steps, step µs[, prompt tokens, default 64]), one after
    another: each phase's requests get a first token, then one token per step taking step µs (an int, or a
    list cycled through) plus `us_per_context_token` per token in their KV caches; their events of one step
    arrive 1 ms apart."""
    records, itl, now, rid = [], {}, 1_000_000, 0
    for batch, steps, step_us, *prompt in phases:
        prompt_tokens = prompt[0] if prompt else 64
        ids = list(range(rid, rid + batch))
        rid += batch
        for k, i in enumerate(ids):
            itl[i] = [Chunk(now + 1_000 * k, 1)]
        cycle = step_us if isinstance(step_us, list) else [step_us]
        for step in range(1, steps + 1):
            now += cycle[(step - 1) % len(cycle)] + int(us_per_context_token * batch * (prompt_tokens + step))
            for k, i in enumerate(ids):
                itl[i].append(Chunk(now + 1_000 * k, 1))
        for i in ids:
            chunks = itl[i]
            records.append(
                TraceRecord(
                    request_id=i,
                    input_tokens=prompt_tokens,
                    output_tokens=len(chunks),
                    send_time_us=chunks[0].timestamp_us - 100_000,
                    arrival_time_us=chunks[0].timestamp_us - 100_000,
                    first_chunk_time_us=chunks[0].timestamp_us,
                    last_chunk_time_us=chunks[-1].timestamp_us,
                    num_chunks=len(chunks),
                    status="ok",
                )
            )
        now += 200_000  # idle until the next phase
    return Trace(TraceHeader(), records, itl)
