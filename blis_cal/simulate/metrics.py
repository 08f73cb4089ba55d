"""Per-request results and the run summary (the JSON object `blis replay` / `blis run` print)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from blis_cal.simulate.request import ReqState
from blis_cal.stats import latency_summary, percentile

RESULT_STATUSES = ("ok", "rejected", "incomplete")


@dataclass
class RequestResult:
    """What the simulator predicts for one request. Times are µs on the run's clock; −1 = did not happen."""

    request_id: int
    status: str  # "ok" | "rejected" | "incomplete"
    instance: int
    arrival_us: int
    queued_us: int  # joined the instance's waiting queue (arrival + α queue delay, + routing)
    scheduled_us: int  # first engine step that computed part of it
    first_token_us: int  # first token delivered (end of its step + α2)
    finish_us: int  # last token delivered
    ttft_us: int
    e2e_us: int
    itl_mean_us: float  # (E2E − TTFT)/(M − 1), 0 for M ≤ 1
    input_tokens: int  # whole prompt, prefix included
    output_tokens: int  # tokens generated (the requested count when ok)
    num_preemptions: int
    cached_tokens: int  # prompt tokens served from the prefix cache at first admission
    slo_class: str = ""
    tenant_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def result_from_state(state: ReqState, status: str, num_output: int | None = None) -> RequestResult:
    req = state.req
    done = status == "ok"
    ttft = state.first_token_us - req.arrival_us if state.first_token_us >= 0 else -1
    e2e = state.finish_us - req.arrival_us if done else -1
    m = state.num_output if num_output is None else num_output
    itl = (e2e - ttft) / (m - 1) if done and m > 1 else 0.0
    return RequestResult(
        request_id=req.request_id,
        status=status,
        instance=state.instance,
        arrival_us=req.arrival_us,
        queued_us=state.queued_us,
        scheduled_us=state.scheduled_us,
        first_token_us=state.first_token_us,
        finish_us=state.finish_us if done else -1,
        ttft_us=ttft,
        e2e_us=e2e,
        itl_mean_us=itl,
        input_tokens=req.input_len,
        output_tokens=m,
        num_preemptions=state.num_preemptions,
        cached_tokens=max(state.cached_tokens, 0),
        slo_class=req.slo_class,
        tenant_id=req.tenant_id,
    )


@dataclass
class EngineStats:
    """Counters the instances accumulate (summed over instances for the summary)."""

    steps: int = 0
    kv_used_block_steps: int = 0  # Σ over steps of used blocks after scheduling
    kv_block_capacity_steps: int = 0  # Σ over steps of usable blocks
    preemptions: int = 0
    prompt_tokens_admitted: int = 0  # first admissions only
    prefix_hit_tokens: int = 0  # first admissions only

    def add(self, other: EngineStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class SimRun:
    results: list[RequestResult]  # sorted by request_id
    summary: dict[str, Any] = field(default_factory=dict)
    # request_id -> delivery time (µs) of each token, when asked for (simulate(..., record_tokens=True))
    token_times: dict[int, list[int]] | None = None


def summarize(
    results: list[RequestResult], stats: EngineStats, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run summary: counts, rates, latency percentiles (ms), preemptions, KV use, prefix-hit rate."""
    ok = [r for r in results if r.status == "ok"]
    start = min((r.arrival_us for r in results), default=0)
    end = max((r.finish_us for r in ok), default=start)
    duration_s = (end - start) / 1e6
    out_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "requests": len(results),
        "completed": len(ok),
        "rejected": sum(r.status == "rejected" for r in results),
        "incomplete": sum(r.status == "incomplete" for r in results),
        "duration_s": round(duration_s, 6),
        "throughput_rps": round(len(ok) / duration_s, 6) if duration_s > 0 else 0.0,
        "output_tokens_per_s": round(out_tokens / duration_s, 3) if duration_s > 0 else 0.0,
        "input_tokens": sum(r.input_tokens for r in ok),
        "output_tokens": out_tokens,
    }
    summary |= latency_summary([r.ttft_us for r in ok], "ttft")
    summary |= latency_summary([r.itl_mean_us for r in ok if r.output_tokens > 1], "itl")
    summary |= latency_summary([r.e2e_us for r in ok], "e2e")
    summary["scheduling_delay_p99_ms"] = round(
        percentile([r.scheduled_us - r.arrival_us for r in ok], 99) / 1000.0, 3
    )
    summary["preemptions"] = stats.preemptions
    summary["steps"] = stats.steps
    summary["kv_utilization_mean"] = (
        round(stats.kv_used_block_steps / stats.kv_block_capacity_steps, 6)
        if stats.kv_block_capacity_steps
        else 0.0
    )
    summary["prefix_hit_rate"] = (
        round(stats.prefix_hit_tokens / stats.prompt_tokens_admitted, 6)
        if stats.prompt_tokens_admitted
        else 0.0
    )
    if extra:
        summary |= extra
    return summary
