"""Simulation results on disk: the per-request results JSON, and a replayed TraceV2."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blis_cal.errors import TraceFormatError
from blis_cal.simulate.metrics import RESULT_STATUSES, RequestResult, SimRun
from blis_cal.trace import Chunk, Trace, TraceHeader, TraceRecord

_FIELDS = [f.name for f in dataclasses.fields(RequestResult)]


def results_to_json(run: SimRun) -> list[dict[str, Any]]:
    """Completed requests sorted by request_id: BLIS SimResult fields (request_id, ttft_us, e2e_us,
    input_tokens, output_tokens, slo_class, itl_mean_us) first, then ours (timestamps, instance, ...)."""
    out = []
    for r in run.results:
        if r.status != "ok":
            continue
        row = {
            "request_id": r.request_id,
            "ttft_us": r.ttft_us,
            "e2e_us": r.e2e_us,
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "itl_mean_us": r.itl_mean_us,
        }
        row |= {k: v for k, v in r.to_dict().items() if k not in row}
        out.append(row)
    return out


def write_results_json(run: SimRun, path: str | Path) -> None:
    """Write the completed requests' results (a JSON array, BLIS `--results-path` layout plus our fields)."""
    Path(path).write_text(json.dumps(results_to_json(run), indent=1) + "\n", encoding="utf-8")


def read_results_json(path: str | Path) -> list[RequestResult]:
    """Read a results JSON written by `write_results_json` (or BLIS's: missing fields get defaults)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraceFormatError(f"results file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise TraceFormatError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise TraceFormatError(f"{path}: expected a JSON array of per-request results")
    out: list[RequestResult] = []
    for i, row in enumerate(data):
        if not isinstance(row, dict) or not {"request_id", "ttft_us", "e2e_us"} <= row.keys():
            raise TraceFormatError(f"{path}: entry {i} lacks request_id / ttft_us / e2e_us")
        unknown = set(row) - set(_FIELDS) - {"model"}
        if unknown:
            raise TraceFormatError(f"{path}: entry {i} has unknown field(s) {sorted(unknown)}")
        status = row.get("status", "ok")
        if status not in RESULT_STATUSES:
            raise TraceFormatError(
                f"{path}: entry {i}: status {status!r} is not one of {', '.join(RESULT_STATUSES)}"
            )
        ttft, e2e = int(row["ttft_us"]), int(row["e2e_us"])
        arrival = int(row.get("arrival_us", 0))
        out.append(
            RequestResult(
                request_id=int(row["request_id"]),
                status=status,
                instance=int(row.get("instance", 0)),
                arrival_us=arrival,
                queued_us=int(row.get("queued_us", -1)),
                scheduled_us=int(row.get("scheduled_us", -1)),
                first_token_us=int(row.get("first_token_us", arrival + ttft)),
                finish_us=int(row.get("finish_us", arrival + e2e)),
                ttft_us=ttft,
                e2e_us=e2e,
                itl_mean_us=float(row.get("itl_mean_us", 0.0)),
                input_tokens=int(row.get("input_tokens", 0)),
                output_tokens=int(row.get("output_tokens", 0)),
                num_preemptions=int(row.get("num_preemptions", 0)),
                cached_tokens=int(row.get("cached_tokens", 0)),
                slo_class=str(row.get("slo_class", "")),
                tenant_id=str(row.get("tenant_id", "")),
            )
        )
    return out


def results_to_trace(
    run: SimRun,
    source: Trace | None = None,
    header: TraceHeader | None = None,
    released_by: Mapping[int, int] | None = None,
    output_delay_us: int | None = None,
) -> Trace:
    """A TraceV2 of the simulated requests (`mode: replayed`): the source rows' identity fields are kept and
    the timing fields replaced by the simulated ones (send = arrival, chunks = token deliveries, with a
    per-token ITL file when the run recorded token times). Given the model's `output_delay_us` (α2), rows also
    get vLLM's per-request queue and scheduled→first-token times (`server_queue_us`, `server_ttft_us`), as
    `blis observe` records them; otherwise those stay empty. A row `released_by` a parent's simulated answer
    (`TraceFollowUp.released_by`) arrives at that answer + its think time (as much of it as it paused in the
    simulation), as a closed-loop capture records it, so the written trace replays as a closed loop again."""
    if header is None:
        header = dataclasses.replace(source.header) if source is not None else TraceHeader()
    header = dataclasses.replace(header, mode="replayed", created_at="")
    by_id = {r.request_id: r for r in source.records} if source is not None else {}
    finish_us = {r.request_id: r.finish_us for r in run.results} if released_by else {}
    records: list[TraceRecord] = []
    for r in run.results:
        base = by_id.get(r.request_id)
        rec = dataclasses.replace(base) if base is not None else TraceRecord(request_id=r.request_id)
        done = r.status == "ok"
        rec.slo_class = r.slo_class or rec.slo_class
        rec.tenant_id = r.tenant_id or rec.tenant_id
        rec.output_tokens = r.output_tokens
        rec.server_input_tokens = r.input_tokens
        if base is None:
            rec.input_tokens = r.input_tokens
        parent = released_by.get(r.request_id) if released_by else None
        if parent is not None:  # the pause it took in the simulation (`aligned` may cut it short)
            rec.think_time_us = min(rec.think_time_us, max(r.arrival_us - finish_us[parent], 0))
        rec.arrival_time_us = r.arrival_us if parent is None else finish_us[parent] + rec.think_time_us
        rec.send_time_us = r.arrival_us
        rec.first_chunk_time_us = r.first_token_us if r.first_token_us >= 0 else 0
        rec.last_chunk_time_us = r.finish_us if done else 0
        rec.num_chunks = r.output_tokens if done else 0
        rec.status = r.status
        rec.error_message = "" if done else f"simulated: {r.status}"
        rec.finish_reason = "length" if done else ""
        rec.cached_tokens = r.cached_tokens
        for name in ("server_queue_us", "server_ttft_us", "server_generation_us", "server_mean_itl_us"):
            setattr(rec, name, None)
        if output_delay_us is not None and r.first_token_us >= 0:
            rec.server_queue_us = r.scheduled_us - r.queued_us
            rec.server_ttft_us = r.first_token_us - output_delay_us - r.scheduled_us
        records.append(rec)
    itl = None
    if run.token_times is not None:  # one streamed event per token, at its simulated delivery
        itl = {rid: [Chunk(t) for t in times] for rid, times in run.token_times.items()}
    return Trace(header=header, records=records, itl=itl, notes=[])
