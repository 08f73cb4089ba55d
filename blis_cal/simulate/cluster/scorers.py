"""Routing scorers for the `weighted` policy: each rates every instance in [0, 1], higher = better target.

Semantics follow llm-d's endpoint-picker scorers as BLIS models them: queue-depth is min-max normalised
effective load (llm-d queue-scorer), kv-utilization is 1 − utilisation (kv-cache-utilization-scorer),
load-balance is 1/(1 + load) (BLIS-native), prefix-affinity is the fraction of the request's full prompt
blocks found, as an unbroken chain from the start, in the router-side index of that instance (prefix-scorer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blis_cal.registry import Registry
from blis_cal.simulate.cluster.prefix_index import PrefixIndex, block_keys

if TYPE_CHECKING:
    from blis_cal.simulate.request import SimRequest
    from blis_cal.simulate.router import InstanceSnapshot


@dataclass(frozen=True)
class ScorerContext:
    """What a scorer may need to know about the cluster when it is built."""

    num_instances: int
    block_size: int
    prefix_cache_blocks: int
    seed: int = 42  # breaks routing ties (see routing.py)


def effective_load(snap: InstanceSnapshot) -> int:
    """Requests an instance owes work to: waiting + running + routed but not yet queued (in flight)."""
    return snap.waiting + snap.running + snap.in_flight


class Scorer:
    """Base class: `score` returns one value per snapshot (same order); `observe` sees each routing outcome."""

    name = ""

    def __init__(self, ctx: ScorerContext) -> None:
        self.ctx = ctx

    def score(self, req: SimRequest, snapshots: Sequence[InstanceSnapshot], now_us: int) -> list[float]:
        raise NotImplementedError

    def observe(self, req: SimRequest, instance: int, now_us: int) -> None:
        """Stateless scorers keep nothing."""


routing_scorers: Registry[type[Scorer]] = Registry("routing scorer")


@routing_scorers.register("queue-depth")
class QueueDepthScorer(Scorer):
    """Min-max normalised effective load: the least loaded scores 1, the most loaded 0, all equal -> 1."""

    name = "queue-depth"

    def score(self, req: SimRequest, snapshots: Sequence[InstanceSnapshot], now_us: int) -> list[float]:
        loads = [effective_load(s) for s in snapshots]
        lo, hi = min(loads), max(loads)
        if hi == lo:
            return [1.0] * len(loads)
        return [(hi - load) / (hi - lo) for load in loads]


@routing_scorers.register("kv-utilization")
class KVUtilizationScorer(Scorer):
    """1 − KV utilisation: prefer the instance with the most free cache."""

    name = "kv-utilization"

    def score(self, req: SimRequest, snapshots: Sequence[InstanceSnapshot], now_us: int) -> list[float]:
        return [1.0 - s.kv_utilization for s in snapshots]


@routing_scorers.register("load-balance")
class LoadBalanceScorer(Scorer):
    """1 / (1 + effective load): keeps absolute load differences, unlike min-max normalisation."""

    name = "load-balance"

    def score(self, req: SimRequest, snapshots: Sequence[InstanceSnapshot], now_us: int) -> list[float]:
        return [1.0 / (1.0 + effective_load(s)) for s in snapshots]


@routing_scorers.register("prefix-affinity")
class PrefixAffinityScorer(Scorer):
    """Fraction of the request's full prompt blocks each instance already holds, from the router's index."""

    name = "prefix-affinity"

    def __init__(self, ctx: ScorerContext) -> None:
        super().__init__(ctx)
        self.index = PrefixIndex(ctx.num_instances, ctx.prefix_cache_blocks)
        # Hashes of the request being routed, computed in `score` and reused by `observe`.
        self._cached: tuple[int, list[int]] = (-1, [])

    def hashes(self, req: SimRequest) -> list[int]:
        if self._cached[0] != req.request_id:
            self._cached = (req.request_id, block_keys(req.segments, self.ctx.block_size))
        return self._cached[1]

    def score(self, req: SimRequest, snapshots: Sequence[InstanceSnapshot], now_us: int) -> list[float]:
        hashes = self.hashes(req)
        if not hashes:
            return [0.0] * len(snapshots)
        return [self.index.match_length(hashes, s.index) / len(hashes) for s in snapshots]

    def observe(self, req: SimRequest, instance: int, now_us: int) -> None:
        self.index.record(self.hashes(req), instance)
