"""The twin wired to the real live simulator (`blis_cal.simulate.Simulation`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from blis_cal.simulate import LatencyModel, SimConfig, SimRequest, Simulation, StepBatch
from blis_cal.twin.server import TwinConfig, TwinEngine


class StepRecordingModel(LatencyModel):
    """A latency model that reports each step's token count (vLLM's `iteration_tokens_total`) and
    otherwise defers to the wrapped model."""

    def __init__(self, inner: LatencyModel, on_step: Callable[[int], None]) -> None:
        self.inner = inner
        self.name = inner.name
        self._on_step = on_step

    def queue_delay_us(self, input_len: int) -> int:
        return self.inner.queue_delay_us(input_len)

    def step_time_us(self, batch: StepBatch) -> int:
        self._on_step(batch.num_prefill_tokens + batch.num_decode_tokens)
        return self.inner.step_time_us(batch)

    def output_delay_us(self) -> int:
        return self.inner.output_delay_us()

    def describe(self) -> dict:
        return self.inner.describe()


def instance_gauges(sim: Simulation) -> tuple[int, int, float]:
    """vLLM's gauges summed over instances: running, waiting, mean KV usage."""
    running = sum(len(inst.running) for inst in sim.instances)
    waiting = sum(len(inst.waiting) for inst in sim.instances)
    usage = sum(inst.kv.usage() for inst in sim.instances) / len(sim.instances)
    return running, waiting, usage


def twin_config_for(sim_config: SimConfig, **twin_fields: Any) -> TwinConfig:
    """A TwinConfig whose advertised limits (context window, KV cache) are the simulated engine's."""
    return TwinConfig(
        max_model_len=sim_config.max_model_len,
        block_size=sim_config.block_size,
        num_gpu_blocks=sim_config.num_gpu_blocks,
        enable_prefix_caching=sim_config.enable_prefix_caching,
        seed=sim_config.seed,
        **twin_fields,
    )


def simulated_twin(
    sim_config: SimConfig, model: LatencyModel, twin_config: TwinConfig, policy: Any = None
) -> TwinEngine:
    """A TwinEngine running `model` on the live simulator; `policy` (a cluster PolicyConfig) puts
    `policy.instances` engines behind its admission and routing, as `run_cluster` does.

    Decode-step jumping is off: live, every step is an event anyway (jumps may not cross the wall clock),
    and each step must be seen to count `iteration_tokens_total`.
    """
    config = dataclasses.replace(sim_config, jump_decode=False)
    router = None
    if policy is not None:
        from blis_cal.simulate.cluster import build_router

        config = dataclasses.replace(
            config, instances=policy.instances, scheduler=policy.scheduler, priority=policy.priority
        )
        router = build_router(policy, block_size=config.block_size, seed=config.seed)
    holder: dict[str, TwinEngine] = {}

    def record_step(tokens: int) -> None:
        holder["engine"].metrics.record_step(tokens)

    def make(**callbacks: Any) -> Simulation:
        return Simulation(config, StepRecordingModel(model, record_step), router=router, **callbacks)

    engine = TwinEngine(make, SimRequest, twin_config, gauges=instance_gauges)
    holder["engine"] = engine
    return engine
