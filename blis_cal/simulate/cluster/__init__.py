"""Cluster simulation: N instances behind a router (admission -> routing -> an instance's waiting queue).

`build_router(config)` turns a PolicyConfig into the Router the simulator's engine calls
(`blis_cal.simulate.router.Router`); `run_cluster` runs requests through it and adds the cluster summary.
Importing this package also registers the instance-level schedulers ("priority-fcfs", "sjf") and the
priority policies ("constant", "slo-based", "vllm").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from blis_cal.simulate.cluster import scheduling  # noqa: F401  (registers schedulers and priority policies)
from blis_cal.simulate.cluster.admission import admission_policies
from blis_cal.simulate.cluster.decisions import DecisionTrace, decision_record
from blis_cal.simulate.cluster.policy_config import PolicyConfig, load_policy_config, parse_policy_config
from blis_cal.simulate.cluster.routing import parse_scorers, routing_policies
from blis_cal.simulate.cluster.scorers import ScorerContext, routing_scorers
from blis_cal.simulate.cluster.summary import cluster_summary
from blis_cal.simulate.engine import SimConfig, Simulation
from blis_cal.simulate.metrics import RequestResult, SimRun, summarize

if TYPE_CHECKING:
    from blis_cal.simulate.latency import LatencyModel
    from blis_cal.simulate.request import SimRequest
    from blis_cal.simulate.router import InstanceSnapshot

__all__ = [
    "ClusterRouter",
    "PolicyConfig",
    "admission_policies",
    "build_router",
    "load_policy_config",
    "parse_policy_config",
    "parse_scorers",
    "routing_policies",
    "routing_scorers",
    "run_cluster",
]


class ClusterRouter:
    """The Router the engine calls: an admission policy, a routing policy, and an optional decision trace."""

    def __init__(
        self,
        config: PolicyConfig,
        *,
        block_size: int,
        seed: int = 42,
        decisions: DecisionTrace | None = None,
    ) -> None:
        self.config = config
        self.admission_latency_us = config.admission_latency_us
        self.routing_latency_us = config.routing_latency_us
        self.snapshot_refresh_us = config.snapshot_refresh_us
        self.admission = admission_policies.get(config.admission)(config.admission_params)
        ctx = ScorerContext(config.instances, block_size, config.prefix_cache_blocks, seed)
        self.policy = routing_policies.get(config.routing)(ctx, config.scorers)
        self.decisions = decisions
        self.routed = [0] * config.instances

    def admit(self, req: SimRequest, now_us: int) -> bool:
        return self.admission.admit(req, now_us)

    def route(self, req: SimRequest, snapshots: Sequence[InstanceSnapshot], now_us: int) -> int:
        decision = self.policy.choose(req, snapshots, now_us)
        if self.decisions is not None:
            self.decisions.write(decision_record(self.config.routing, req, snapshots, decision, now_us))
        return decision.instance

    def on_routed(self, req: SimRequest, instance: int, now_us: int) -> None:
        self.routed[instance] += 1
        self.policy.observe(req, instance, now_us)

    def close(self) -> None:
        """Flush the decision trace, if any."""
        if self.decisions is not None:
            self.decisions.close()


def build_router(
    config: PolicyConfig,
    *,
    block_size: int = 16,
    seed: int = 42,
    trace_decisions: Path | str | None = None,
) -> ClusterRouter:
    """The router for a cluster run: `block_size` of the instances' KV cache (prefix hashing), `seed` for
    routing tie-breaks, `trace_decisions` a JSONL file for one line per routing decision."""
    decisions = DecisionTrace(trace_decisions) if trace_decisions is not None else None
    return ClusterRouter(config, block_size=block_size, seed=seed, decisions=decisions)


def run_cluster(
    requests: Iterable[SimRequest],
    config: SimConfig,
    model: LatencyModel,
    policy: PolicyConfig,
    *,
    follow_up: Callable[[RequestResult], list[SimRequest]] | None = None,
    trace_decisions: Path | str | None = None,
) -> SimRun:
    """Simulate `requests` on `policy.instances` copies of `config`'s engine behind `policy`'s router.

    The run summary gains a "cluster" section (see summary.cluster_summary). `follow_up` (closed loop) is
    called for finished and rejected requests alike; a follow-up of a request rejected after the admission
    latency cannot arrive before the rejection, so its arrival is moved up to the clock.
    """
    config = dataclasses.replace(
        config, instances=policy.instances, scheduler=policy.scheduler, priority=policy.priority
    )
    router = build_router(
        policy, block_size=config.block_size, seed=config.seed, trace_decisions=trace_decisions
    )
    sim: Simulation

    def released(result: RequestResult) -> None:
        now = sim.now_us
        for req in follow_up(result):
            sim.add_request(req if req.arrival_us >= now else dataclasses.replace(req, arrival_us=now))

    hook = released if follow_up is not None else None
    sim = Simulation(config, model, router=router, on_finish=hook, on_reject=hook)
    try:
        sim.add_requests(requests)
        run = sim.run()
    finally:
        router.close()
    per_instance_stats = [inst.stats for inst in sim.instances]
    run.summary["cluster"] = cluster_summary(
        run.results,
        policy.instances,
        lambda i, group: summarize(group, per_instance_stats[i]),
    ) | {"policy": policy.to_dict()}
    return run
