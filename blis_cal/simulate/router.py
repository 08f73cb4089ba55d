"""The cluster hook: admission and routing of requests across instances (policies live in simulate/cluster/).

Flow in `Simulation`: arrival -> +admission_latency_us -> `admit()` (False: status "rejected") ->
+routing_latency_us -> `route(snapshots)` -> `on_routed()` -> that instance's waiting queue at +α queue delay.
Snapshots are refreshed when older than `snapshot_refresh_us` (0 = always fresh).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from blis_cal.simulate.kv_cache import block_hashes
from blis_cal.simulate.request import SimRequest

__all__ = ["InstanceSnapshot", "Router", "block_hashes"]


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    index: int
    waiting: int  # requests in the instance's waiting queue
    running: int  # requests in its running queue
    in_flight: int  # routed to it and not finished (includes those still in the α queue delay)
    kv_utilization: float  # used blocks / usable blocks
    free_blocks: int
    num_gpu_blocks: int
    taken_at_us: int


class Router(Protocol):
    admission_latency_us: int
    routing_latency_us: int
    snapshot_refresh_us: int

    def admit(self, req: SimRequest, now_us: int) -> bool: ...

    def route(self, req: SimRequest, snapshots: Sequence[InstanceSnapshot], now_us: int) -> int: ...

    def on_routed(self, req: SimRequest, instance: int, now_us: int) -> None: ...
