"""Discrete-event simulator of vLLM V1 instances (scheduler, KV cache, step-time models) and clusters."""

from blis_cal.simulate.coefficients import Coefficients, FitCoverage, load_coefficients
from blis_cal.simulate.engine import SimConfig, Simulation, SimulationError, simulate
from blis_cal.simulate.kv_cache import block_hashes
from blis_cal.simulate.latency import (
    BlackboxModel,
    LatencyModel,
    LatencyOptions,
    StepBatch,
    build_latency_model,
    latency_models,
)
from blis_cal.simulate.metrics import RequestResult, SimRun
from blis_cal.simulate.request import SimRequest
from blis_cal.simulate.roofline import RooflineModel
from blis_cal.simulate.router import InstanceSnapshot, Router
from blis_cal.simulate.scheduler import WaitingQueue, scheduler_policies

# isort: split
# Last (it imports the modules above): registers the cluster schedulers (priority-fcfs, sjf) for SimConfig.
from blis_cal.simulate.cluster import scheduling as _cluster_scheduling  # noqa: F401

__all__ = [
    "BlackboxModel",
    "Coefficients",
    "FitCoverage",
    "InstanceSnapshot",
    "LatencyModel",
    "LatencyOptions",
    "RequestResult",
    "RooflineModel",
    "Router",
    "SimConfig",
    "SimRequest",
    "SimRun",
    "Simulation",
    "SimulationError",
    "StepBatch",
    "WaitingQueue",
    "block_hashes",
    "build_latency_model",
    "latency_models",
    "load_coefficients",
    "scheduler_policies",
    "simulate",
]
