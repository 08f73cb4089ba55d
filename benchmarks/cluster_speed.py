"""Cluster simulator speed: 100,000 requests over 16 instances behind weighted routing (default llm-d
profile: prefix-affinity:3, queue-depth:2, kv-utilization:2), llama-3.1-8b / H100 / TP2 coefficients.

Workload: Poisson at 20 req/s per instance (320 req/s), input ~N(512,128), output ~N(256,64); half of the
requests start with one of 32 shared 256-token system prompts, so the prefix-affinity scorer has work.
Prints wall time and simulated requests/s at 10k and 100k requests, the 100k/10k wall-time ratio
(linear cost = 10), and the cost of routing itself (weighted vs round-robin at 10k).

    .venv/bin/python benchmarks/cluster_speed.py [--requests 100000] [--small 10000] [--instances 16]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from blis_cal.simulate import BlackboxModel, SimConfig, SimRequest, load_coefficients
from blis_cal.simulate.cluster import PolicyConfig, run_cluster


def synthetic_requests(n: int, instances: int, seed: int = 7) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1e6 / (20.0 * instances), size=n)).astype(np.int64)
    n_in = np.clip(np.rint(rng.normal(512, 128, size=n)), 1, None).astype(int)
    n_out = np.clip(np.rint(rng.normal(256, 64, size=n)), 1, None).astype(int)
    shared = rng.random(n) < 0.5
    group = rng.integers(32, size=n)
    reqs = []
    for i in range(n):
        own = int(n_in[i])
        segs = ((f"prefix:sys{group[i]}", 256), (f"req:{i}", own)) if shared[i] else ((f"req:{i}", own),)
        total = sum(length for _, length in segs)
        reqs.append(SimRequest(i, int(arrivals[i]), total, int(n_out[i]), segs))
    return reqs


def measure(n: int, instances: int, routing: str, model: BlackboxModel) -> dict:
    reqs = synthetic_requests(n, instances)
    policy = PolicyConfig(instances=instances, routing=routing)
    start = time.perf_counter()
    run = run_cluster(reqs, SimConfig(), model, policy)
    wall = time.perf_counter() - start
    cluster = run.summary["cluster"]
    return {
        "requests": n,
        "instances": instances,
        "routing": routing,
        "wall_s": round(wall, 3),
        "simulated_requests_per_s": round(n / wall, 1),
        "sim_time_over_wall_time": round(run.summary["duration_s"] / wall, 1),
        "completed": run.summary["completed"],
        "prefix_hit_rate": run.summary["prefix_hit_rate"],
        "ttft_p99_ms": run.summary["ttft_p99_ms"],
        "requests_per_instance_min_max": [
            min(cluster["requests_per_instance"]),
            max(cluster["requests_per_instance"]),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=16)
    args = parser.parse_args()
    coeffs = load_coefficients(None, "meta-llama/llama-3.1-8b-instruct", "H100", 2)
    model = BlackboxModel(coeffs.alpha, coeffs.beta)
    small = measure(args.small, args.instances, "weighted", model)
    small_rr = measure(args.small, args.instances, "round-robin", model)
    big = measure(args.requests, args.instances, "weighted", model)
    report = {
        "small": small,
        "small_round_robin": small_rr,
        "big": big,
        "wall_ratio_big_over_small": round(big["wall_s"] / small["wall_s"], 2),
        "request_ratio_big_over_small": round(args.requests / args.small, 2),
        "routing_overhead_weighted_over_round_robin": round(small["wall_s"] / small_rr["wall_s"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
