"""The discrete-event core: an integer-µs clock and a heap of events with deterministic tie-breaking.

Events at the same time run in priority order (arrivals and queue joins before step ends, step ends
before step starts, so a request that joins the queue exactly when a step starts is seen by it), then in
the order they were pushed. The clock never goes back: pushing an event before `now` is an error.
"""

from __future__ import annotations

import heapq
from typing import Any

# Event kinds (the payload's meaning depends on the kind).
ARRIVAL = 0  # payload: ReqState
ADMIT = 1  # payload: ReqState (after the router's admission latency)
ROUTE = 2  # payload: ReqState (after the routing latency)
QUEUED = 3  # payload: ReqState (joins its instance's waiting queue)
STEP_END = 4  # payload: instance index
STEP_START = 5  # payload: instance index

_PRIORITY = {ARRIVAL: 0, ADMIT: 0, ROUTE: 0, QUEUED: 0, STEP_END: 1, STEP_START: 2}


class EventQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, int, Any]] = []
        self._seq = 0
        self.now_us = 0

    def push(self, time_us: int, kind: int, payload: Any) -> None:
        if time_us < self.now_us:
            raise ValueError(f"event at {time_us} µs is before the clock ({self.now_us} µs)")
        self._seq += 1
        heapq.heappush(self._heap, (time_us, _PRIORITY[kind], self._seq, kind, payload))

    def pop(self) -> tuple[int, int, Any]:
        time_us, _, _, kind, payload = heapq.heappop(self._heap)
        self.now_us = time_us
        return time_us, kind, payload

    def peek_time(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)
