"""Routing policies: which instance an admitted request goes to, given (possibly stale) instance snapshots.

round-robin: request k (in admission order) goes to instance k mod N. least-loaded: the lowest effective
load (waiting + running + in flight). weighted: the highest weighted sum of scorer values (weights
normalised to sum 1, each value clamped to [0, 1]), as llm-d's endpoint picker and BLIS's `weighted` do.
Ties are broken at random from a seeded stream, as llm-d's max-score picker does: always taking the lowest
index would pile every cold prefix group onto the first idle instances.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from blis_cal.errors import ConfigError
from blis_cal.registry import Registry
from blis_cal.simulate.cluster.scorers import Scorer, ScorerContext, effective_load, routing_scorers

if TYPE_CHECKING:
    from blis_cal.simulate.request import SimRequest
    from blis_cal.simulate.router import InstanceSnapshot


@dataclass(frozen=True)
class ScorerSpec:
    """One `name:weight` entry of `--routing-scorers` or the policy YAML's `routing.scorers` list."""

    name: str
    weight: float

    def __post_init__(self) -> None:
        if self.name not in routing_scorers:
            raise ConfigError(
                f"unknown routing scorer {self.name!r}; allowed: {', '.join(routing_scorers.names())}"
            )
        if isinstance(self.weight, bool) or not math.isfinite(self.weight) or self.weight <= 0:
            raise ConfigError(
                f"routing scorer {self.name!r}: weight must be a finite number > 0, got {self.weight!r}"
            )


# llm-d's default endpoint-picker profile, as the issue and BLIS's earlier default state it.
DEFAULT_SCORERS = (
    ScorerSpec("prefix-affinity", 3.0),
    ScorerSpec("queue-depth", 2.0),
    ScorerSpec("kv-utilization", 2.0),
)


def parse_scorers(text: str, source: str = "--routing-scorers") -> tuple[ScorerSpec, ...]:
    """Parse `"prefix-affinity:3,queue-depth:2"`; names from the `routing_scorers` registry, each once."""
    specs: list[ScorerSpec] = []
    for part in text.split(","):
        name, sep, weight_text = part.strip().partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"{source}: {part.strip()!r} is not name:weight (e.g. 'queue-depth:2')")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ConfigError(
                f"{source}: weight {weight_text.strip()!r} of scorer {name.strip()!r} is not a number"
            ) from None
        specs.append(ScorerSpec(name.strip(), weight))
    return check_scorers(specs, source)


def check_scorers(specs: Sequence[ScorerSpec], source: str) -> tuple[ScorerSpec, ...]:
    if not specs:
        raise ConfigError(
            f"{source}: give at least one scorer; allowed: {', '.join(routing_scorers.names())}"
        )
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{source}: scorer {name!r} appears more than once")
    return tuple(specs)


_ROUTING_STREAM = 0x726F757465  # "route": the SeedSequence key of the routing tie-break stream


@dataclass
class Decision:
    """One routing outcome and why: per-scorer values and totals per candidate (in snapshot order)."""

    instance: int
    scores: dict[str, list[float]] = field(default_factory=dict)
    totals: list[float] | None = None


class RoutingPolicy:
    """Base class. `choose` picks an instance index; `observe` is told where the request went."""

    def __init__(self, ctx: ScorerContext, scorers: Sequence[ScorerSpec] = DEFAULT_SCORERS) -> None:
        self.ctx = ctx
        # One stream for routing ties, independent of every other subsystem's stream.
        self.rng = np.random.default_rng(np.random.SeedSequence([ctx.seed, _ROUTING_STREAM]))

    def pick(self, candidates: list[int]) -> int:
        """One of the tied best candidates (positions in the snapshot list)."""
        return candidates[0] if len(candidates) == 1 else candidates[int(self.rng.integers(len(candidates)))]

    def choose(self, req: SimRequest, snapshots: Sequence[InstanceSnapshot], now_us: int) -> Decision:
        raise NotImplementedError

    def observe(self, req: SimRequest, instance: int, now_us: int) -> None:
        """Stateless policies keep nothing."""


routing_policies: Registry[type[RoutingPolicy]] = Registry("routing policy")


@routing_policies.register("round-robin")
class RoundRobin(RoutingPolicy):
    def __init__(self, ctx: ScorerContext, scorers: Sequence[ScorerSpec] = DEFAULT_SCORERS) -> None:
        super().__init__(ctx, scorers)
        self.next = 0

    def choose(self, req: SimRequest, snapshots: Sequence[InstanceSnapshot], now_us: int) -> Decision:
        chosen = snapshots[self.next % len(snapshots)].index
        self.next += 1
        return Decision(chosen)


@routing_policies.register("least-loaded")
class LeastLoaded(RoutingPolicy):
    def choose(self, req: SimRequest, snapshots: Sequence[InstanceSnapshot], now_us: int) -> Decision:
        loads = [effective_load(s) for s in snapshots]
        low = min(loads)
        best = self.pick([i for i, load in enumerate(loads) if load == low])
        return Decision(snapshots[best].index, {"load": [float(x) for x in loads]})


@routing_policies.register("weighted")
class Weighted(RoutingPolicy):
    def __init__(self, ctx: ScorerContext, scorers: Sequence[ScorerSpec] = DEFAULT_SCORERS) -> None:
        super().__init__(ctx, scorers)
        specs = check_scorers(scorers, "routing.scorers")
        total = sum(s.weight for s in specs)
        self.scorers: list[tuple[Scorer, float]] = [
            (routing_scorers.get(s.name)(ctx), s.weight / total) for s in specs
        ]

    def choose(self, req: SimRequest, snapshots: Sequence[InstanceSnapshot], now_us: int) -> Decision:
        totals = [0.0] * len(snapshots)
        per_scorer: dict[str, list[float]] = {}
        for scorer, weight in self.scorers:
            values = scorer.score(req, snapshots, now_us)
            per_scorer[scorer.name] = values
            # weight × value clamped to [0, 1] (inline: this is the per-request hot path)
            totals = [
                t + weight * (v if 0.0 <= v <= 1.0 else (0.0 if v < 0.0 else 1.0))
                for t, v in zip(totals, values, strict=True)
            ]
        high = max(totals)
        best = self.pick([i for i, t in enumerate(totals) if t == high])
        return Decision(snapshots[best].index, per_scorer, totals)

    def observe(self, req: SimRequest, instance: int, now_us: int) -> None:
        for scorer, _ in self.scorers:
            scorer.observe(req, instance, now_us)
