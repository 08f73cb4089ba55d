"""Workload -> simulator requests, and the closed-loop bridge from finished results to follow-ups."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from blis_cal.simulate.metrics import RequestResult
from blis_cal.simulate.request import SimRequest
from blis_cal.trace import Trace, TraceHeader, TraceRecord
from blis_cal.workload import Workload, WorkloadRequest


def sim_request(req: WorkloadRequest) -> SimRequest:
    """The simulator's view of a request: the whole prompt and its content segments (prefix caching)."""
    return SimRequest(
        request_id=req.request_id,
        arrival_us=req.arrival_us,
        input_len=req.total_input_tokens,
        output_len=req.output_tokens,
        segments=req.context,
        slo_class=req.slo_class,
        tenant_id=req.tenant_id,
        session_id=req.session_id,
        round_index=req.round_index,
    )


def requests_from_workload(workload: Workload) -> list[SimRequest]:
    """The pre-generated requests (open loop, and the first request of each closed-loop user/session)."""
    return [sim_request(r) for r in workload.requests]


class WorkloadFollowUp:
    """`follow_up` for `simulate()`: a finished (or rejected) result releases the workload's next request.

    The next request arrives at the result's last-token delivery (or, rejected, its arrival) + think time;
    a rejected request ends its session (a concurrency user starts a new one), as `Workload.follow_up`.
    """

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self._pending: dict[int, WorkloadRequest] = {r.request_id: r for r in workload.requests}
        self.released: list[WorkloadRequest] = []  # follow-ups in release order

    def __call__(self, result: RequestResult) -> list[SimRequest]:
        req = self._pending.pop(result.request_id, None)
        if req is None:
            return []
        ok = result.status == "ok"
        finished_at = result.finish_us if ok and result.finish_us >= 0 else result.arrival_us
        nxt = self.workload.follow_up(req, result.output_tokens if ok else 0, finished_at, ok=ok)
        if nxt is None:
            return []
        self._pending[nxt.request_id] = nxt
        self.released.append(nxt)
        return [sim_request(nxt)]


def follow_up_for(workload: Workload) -> Callable[[RequestResult], list[SimRequest]] | None:
    """The closed-loop bridge when the workload needs one, else None (pure open loop)."""
    return WorkloadFollowUp(workload) if workload.closed_loop else None


def workload_trace(
    workload: Workload, released: Sequence[WorkloadRequest] = (), spec_label: str = ""
) -> Trace:
    """The workload's requests as trace rows (identity fields, scheduled arrivals, no timings): the
    `source` that gives a simulated trace its clients, prefix groups and sessions."""
    records = [
        TraceRecord(
            request_id=r.request_id,
            client_id=r.client_id,
            tenant_id=r.tenant_id,
            slo_class=r.slo_class,
            session_id=r.session_id,
            round_index=r.round_index,
            prefix_group=r.prefix_group,
            prefix_length=r.prefix_length,
            streaming=r.streaming,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            model=r.model,
            arrival_time_us=r.arrival_us,
            send_time_us=r.arrival_us,
            think_time_us=r.think_time_us,
        )
        for r in [*workload.requests, *released]
    ]
    growth = (
        any(c.multi_turn and c.multi_turn.context_growth for c in workload.spec.clients)
        if workload.spec
        else False
    )
    header = TraceHeader(
        mode="generated",
        workload_seed=workload.seed,
        workload_spec=spec_label,
        session_context_growth="accumulate" if growth else "",
    )
    return Trace(header=header, records=sorted(records, key=lambda r: r.request_id), itl=None, notes=[])
