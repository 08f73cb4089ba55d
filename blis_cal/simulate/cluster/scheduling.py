"""Instance-level ordering: priority policies and the waiting-queue schedulers that use them.

Priority policies (registry `priority_policies`; a higher score is served first):
- constant: 0 for every request (BLIS's default; priority-fcfs then degrades to FCFS);
- slo-based: the SLO class's tier priority (GAIE defaults: critical 4, standard 3, batch −1, sheddable −2,
  background −3, anything else 3) plus one unit per second waited, so a starved request eventually rises;
- vllm: the request's own vLLM `priority` (the trace's vllm_priority), negated: vLLM serves the lowest first.

Every policy ages all requests at the same rate, so the relative order of two waiting requests never changes
with time; the queues therefore keep a heap keyed by the score at one common instant instead of re-sorting
at every step (BLIS re-sorts; the order is the same).

Schedulers (added to the simulator's `scheduler_policies` registry):
- priority-fcfs: score descending, then arrival, then request id (vllm/v1/request.py Request.__lt__ orders
  by (priority, arrival_time, request_id)); a preempted request re-enters by its key and the preemption
  victim is the lowest-priority, latest-arriving running request (vLLM's SchedulingPolicy.PRIORITY);
- sjf: prompt length ascending, then arrival, then request id; preempts the last running request (as FCFS).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import TYPE_CHECKING

from blis_cal.registry import Registry
from blis_cal.simulate.scheduler import WaitingQueue, scheduler_policies

if TYPE_CHECKING:
    from blis_cal.simulate.request import ReqState, SimRequest

# GAIE / llm-d SLO tier priorities (BLIS's defaults); classes not listed get DEFAULT_TIER_PRIORITY.
SLO_PRIORITIES: dict[str, int] = {
    "critical": 4,
    "standard": 3,
    "batch": -1,
    "sheddable": -2,
    "background": -3,
}
DEFAULT_TIER_PRIORITY = 3
AGE_WEIGHT_PER_S = 1.0  # BLIS's slo-based AgeWeight: 1e-6 per µs


class PriorityPolicy:
    def compute(self, req: SimRequest, now_us: int) -> float:
        """The request's priority at `now_us` (higher = served first)."""
        raise NotImplementedError


priority_policies: Registry[type[PriorityPolicy]] = Registry("priority policy")


@priority_policies.register("constant")
class ConstantPriority(PriorityPolicy):
    def compute(self, req: SimRequest, now_us: int) -> float:
        return 0.0


@priority_policies.register("slo-based")
class SLOBasedPriority(PriorityPolicy):
    def compute(self, req: SimRequest, now_us: int) -> float:
        tier = SLO_PRIORITIES.get(req.slo_class, DEFAULT_TIER_PRIORITY)
        return tier + AGE_WEIGHT_PER_S * (now_us - req.arrival_us) / 1_000_000


@priority_policies.register("vllm")
class VLLMPriority(PriorityPolicy):
    def compute(self, req: SimRequest, now_us: int) -> float:
        return -float(req.priority)


class _HeapQueue(WaitingQueue):
    """A waiting queue ordered by a static per-request key (smallest first)."""

    def __init__(self, priority: str = "constant") -> None:
        self.policy = priority_policies.get(priority)()
        self._heap: list[tuple[tuple, ReqState]] = []

    def key(self, state: ReqState) -> tuple:
        raise NotImplementedError

    def add(self, state: ReqState) -> None:
        heapq.heappush(self._heap, (self.key(state), state))

    def add_preempted(self, state: ReqState) -> None:
        heapq.heappush(self._heap, (self.key(state), state))  # vLLM PriorityRequestQueue.prepend_request

    def peek(self) -> ReqState:
        return self._heap[0][1]

    def pop(self) -> ReqState:
        return heapq.heappop(self._heap)[1]

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[ReqState]:
        return iter([state for _, state in sorted(self._heap, key=lambda item: item[0])])


@scheduler_policies.register("priority-fcfs")
class PriorityFCFSQueue(_HeapQueue):
    def key(self, state: ReqState) -> tuple:
        req = state.req
        # Scores at instant 0: every request ages at the same rate, so this orders as at any later instant.
        return (-self.policy.compute(req, 0), req.arrival_us, req.request_id)

    def victim(self, running: list[ReqState]) -> int:
        keys = [self.key(s)[:2] for s in running]
        return keys.index(max(keys))  # vLLM: max(running, key=(priority, arrival_time)), first of equals


@scheduler_policies.register("sjf")
class SJFQueue(_HeapQueue):
    def key(self, state: ReqState) -> tuple:
        req = state.req
        return (req.input_len, req.arrival_us, req.request_id)

    def victim(self, running: list[ReqState]) -> int:
        return len(running) - 1
