"""Workload generation speed: requests generated per second for a preset and a closed loop, and prompt
token ids realised per second (what the observer pays per request before sending).

    .venv/bin/python benchmarks/workload_speed.py [--requests 100000]

Targets: 100,000 open-loop requests in < 3 s; token ids at > 2 M tokens/s (a 2-core box sends far fewer).
"""

from __future__ import annotations

import argparse
import json
import time

from blis_cal.workload import generate, parse_spec, workload_from_options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    args = parser.parse_args()
    n = args.requests

    t0 = time.perf_counter()
    w = workload_from_options(preset="mixed-slo", rate=100, num_requests=n, seed=1)
    open_loop_s = time.perf_counter() - t0

    sample = w.requests[: min(n, 5000)]
    t0 = time.perf_counter()
    tokens = sum(len(r.token_ids(32000)) for r in sample)
    ids_s = time.perf_counter() - t0

    users = {
        "id": "u",
        "concurrency": 64,
        "input_distribution": {"type": "exponential", "params": {"mean": 200}},
    }
    users["output_distribution"] = {"type": "exponential", "params": {"mean": 100}}
    spec = parse_spec({"num_requests": n, "clients": [users]}, "bench")
    t0 = time.perf_counter()
    cw = generate(spec, seed=1)
    pending = list(cw.requests)
    released = 0
    while pending:  # every request finishes 1 ms after arrival; each finish releases the user's next one
        req = pending.pop()
        nxt = cw.follow_up(req, req.output_tokens, req.arrival_us + 1000)
        if nxt is not None:
            pending.append(nxt)
            released += 1
    closed_loop_s = time.perf_counter() - t0

    print(
        json.dumps(
            {
                "open_loop_requests": n,
                "open_loop_s": round(open_loop_s, 3),
                "open_loop_requests_per_s": round(n / open_loop_s),
                "token_ids_per_s": round(tokens / ids_s),
                "closed_loop_requests": len(cw.requests) + released,
                "closed_loop_s": round(closed_loop_s, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
