"""Simulator speed: a synthetic 10,000-request trace (Poisson 20 req/s, input ~N(512,128), output
~N(256,64)) on one instance with llama-3.1-8b / H100 / TP2 coefficients, with and without jumping over
pure-decode steps, plus memory at 10k vs 100k requests, and the search for closed-loop users that
`blis replay` runs on every trace (over the simulated 100k-request open loop written as a trace).

    .venv/bin/python benchmarks/replay_speed.py [--requests 10000] [--big 100000] [--no-big]

Targets (issue 3): ≥ 10× from jumping; 10,000 requests in < 1 s wall; memory linear in requests.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np

from blis_cal.simulate import BlackboxModel, SimConfig, SimRequest, load_coefficients, simulate
from blis_cal.trace import Trace, TraceHeader, TraceRecord
from blis_cal.trace_links import trace_links


def synthetic_requests(n: int, seed: int = 7, rate: float = 20.0) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1e6 / rate, size=n)).astype(np.int64)
    n_in = np.clip(np.rint(rng.normal(512, 128, size=n)), 1, None).astype(int)
    n_out = np.clip(np.rint(rng.normal(256, 64, size=n)), 1, None).astype(int)
    return [
        SimRequest(i, int(arrivals[i]), int(n_in[i]), int(n_out[i]), ((f"req:{i}", int(n_in[i])),))
        for i in range(n)
    ]


def measure(n: int, jump: bool, model: BlackboxModel, track_memory: bool = False, repeat: int = 1) -> dict:
    """Best of `repeat` runs (the machine may be shared; the fastest run is the least disturbed)."""
    reqs = synthetic_requests(n)
    config = SimConfig(jump_decode=jump)
    wall = cpu = float("inf")
    for _ in range(repeat):
        if track_memory:
            tracemalloc.start()
        start, cpu_start = time.perf_counter(), time.process_time()
        run = simulate(reqs, config, model)
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - cpu_start)
        peak = tracemalloc.get_traced_memory()[1] if track_memory else 0
        if track_memory:
            tracemalloc.stop()
    sim_s = run.summary["duration_s"]
    return {
        "requests": n,
        "jump_decode": jump,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),  # the machine may be shared: CPU time is the steadier figure
        "simulated_requests_per_s": round(n / wall, 1),
        "sim_time_over_wall_time": round(sim_s / wall, 1),
        "steps": run.summary["steps"],
        "peak_memory_mb": round(peak / 2**20, 1) if track_memory else None,
        "e2e_mean_ms": run.summary["e2e_mean_ms"],
    }


def link_search(n: int, model: BlackboxModel) -> dict:
    """Seconds `trace_links` takes on an n-row open loop (the simulated answers as a trace): it finds no users."""
    run = simulate(synthetic_requests(n), SimConfig(jump_decode=True), model)
    rows = [
        TraceRecord(
            request_id=r.request_id,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            arrival_time_us=r.arrival_us,
            send_time_us=r.arrival_us,
            first_chunk_time_us=r.first_token_us,
            last_chunk_time_us=r.finish_us,
            num_chunks=r.output_tokens,
        )
        for r in run.results
    ]
    start = time.perf_counter()
    links = trace_links(Trace(header=TraceHeader(), records=rows, itl=None, notes=[]))
    return {"rows": n, "wall_s": round(time.perf_counter() - start, 3), "linked": len(links)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--no-big", action="store_true", help="skip the 100k memory run")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many timed runs")
    args = parser.parse_args()
    coeffs = load_coefficients(None, "meta-llama/llama-3.1-8b-instruct", "H100", 2)
    model = BlackboxModel(coeffs.alpha, coeffs.beta)
    jumped = measure(args.requests, True, model, repeat=args.repeat)
    stepped = measure(args.requests, False, model, repeat=args.repeat)
    if jumped["e2e_mean_ms"] != stepped["e2e_mean_ms"]:
        raise SystemExit("jumping changed the results")
    report = {
        "jump": jumped,
        "no_jump": stepped,
        "speedup_from_jumping": round(stepped["wall_s"] / jumped["wall_s"], 1),
    }
    mem_small = measure(args.requests, True, model, track_memory=True)
    report["memory"] = {"small": {"requests": args.requests, "peak_mb": mem_small["peak_memory_mb"]}}
    if not args.no_big:
        mem_big = measure(args.big, True, model, track_memory=True)
        report["memory"]["big"] = {
            "requests": args.big,
            "peak_mb": mem_big["peak_memory_mb"],
            "wall_s": mem_big["wall_s"],
        }
        report["memory"]["ratio"] = round(
            mem_big["peak_memory_mb"] / max(mem_small["peak_memory_mb"], 1e-9), 2
        )
        report["closed_loop_search"] = link_search(args.big, model)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
