"""Waiting-queue policies of an instance's scheduler (registry `scheduler_policies`).

A policy owns the waiting queue's order and picks the preemption victim, as vLLM's SchedulingPolicy does
(v1/core/sched/request_queue.py). This module registers "fcfs"; the cluster package registers more.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from blis_cal.registry import Registry
from blis_cal.simulate.request import ReqState

scheduler_policies: Registry[type[WaitingQueue]] = Registry("scheduler policy")


class WaitingQueue:
    """Interface: one instance's waiting queue, constructed with the name of the priority policy
    (registry `priority_policies` in simulate/cluster/scheduling.py) that priority-aware queues order by."""

    def add(self, state: ReqState) -> None:
        """A request joins the queue (new arrival)."""
        raise NotImplementedError

    def add_preempted(self, state: ReqState) -> None:
        """A preempted request returns to the queue."""
        raise NotImplementedError

    def peek(self) -> ReqState:
        raise NotImplementedError

    def pop(self) -> ReqState:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[ReqState]:
        raise NotImplementedError

    def victim(self, running: list[ReqState]) -> int:
        """Index in `running` of the request to preempt when KV blocks run out."""
        raise NotImplementedError


@scheduler_policies.register("fcfs")
class FCFSQueue(WaitingQueue):
    """vLLM FCFS: arrivals at the tail, preempted requests back at the head, the last running one preempted."""

    def __init__(self, priority: str = "constant") -> None:
        self._q: deque[ReqState] = deque()  # FCFS ignores priorities (vLLM's fcfs policy does too)

    def add(self, state: ReqState) -> None:
        self._q.append(state)

    def add_preempted(self, state: ReqState) -> None:
        self._q.appendleft(state)  # vLLM: waiting.prepend_request(preempted)

    def peek(self) -> ReqState:
        return self._q[0]

    def pop(self) -> ReqState:
        return self._q.popleft()

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[ReqState]:
        return iter(self._q)

    def victim(self, running: list[ReqState]) -> int:
        return len(running) - 1  # vLLM FCFS: preempted_req = self.running[-1]
