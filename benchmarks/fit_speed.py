"""Fit speed: α/β fitted on a 1,000-request trace (target, issue 5: < 10 s on the 2-core dev machine).

The trace is simulated with per-token chunk times at the real CPU server's settings and roughly its
coefficients (Poisson 0.8 req/s, input ~N(256, 85), output ~N(128, 43)), so the fit sees a realistic load,
with client-side jitter on every chunk so the direct estimate is not exact and the refinement runs.
Prints the time of each stage: direct estimate, simulation-in-the-loop refinement (default evaluation
budget), bootstrap intervals, and the recovered coefficients against the truth.

    .venv/bin/python benchmarks/fit_speed.py [--requests 1000] [--bootstrap 200] [--max-evaluations 12]
        [--model-form blackbox-floor]
"""

from __future__ import annotations

import argparse
import json
import time

from blis_cal.calibrate.fit import (
    DEFAULT_MODEL_FORM,
    NamedTrace,
    bootstrap_coefficients,
    direct_estimate,
    fit,
    model_forms,
)
from blis_cal.calibrate.synthetic import jitter_chunks, poisson_requests, simulated_trace
from blis_cal.simulate import BlackboxModel, SimConfig

ALPHA = (8000.0, 0.0, 0.0)
BETA = (16500.0, 1130.0, 2500.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--max-evaluations", type=int, default=12)
    parser.add_argument(
        "--model-form", default=DEFAULT_MODEL_FORM, help="the form fitted (default: the CLI's)"
    )
    parser.add_argument("--jitter-us", type=float, default=2000.0, help="mean client-side delay per chunk")
    args = parser.parse_args()
    config = SimConfig(
        block_size=128, num_gpu_blocks=1024, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=4096
    )
    requests = poisson_requests(args.requests, 0.8, seed=11, input_mean=256, output_mean=128)
    trace = simulated_trace(requests, config, BlackboxModel(ALPHA, BETA))
    jitter_chunks(trace, args.jitter_us, seed=3)
    named = [NamedTrace("synthetic", trace)]
    form = model_forms.get(args.model_form)
    t0 = time.perf_counter()
    direct_estimate(named, form)
    t_direct = time.perf_counter() - t0
    t0 = time.perf_counter()
    bootstrap_coefficients(named, form, replicates=args.bootstrap)
    t_boot = time.perf_counter() - t0
    t0 = time.perf_counter()
    options = {"model_form": form.name, "bootstrap": args.bootstrap, "max_evaluations": args.max_evaluations}
    result = fit(named, **options, prediction_draws=0)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit(named, **options, prediction_draws=10)
    t_full = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "requests": args.requests,
                "model_form": form.name,
                "direct_estimate_s": round(t_direct, 2),
                "bootstrap_s": round(t_boot, 2),
                "fit_total_s (direct + refinement + bootstrap)": round(t_fit, 2),
                "with_prediction_intervals_s (CLI default, 10 extra replays)": round(t_full, 2),
                "replays": result.evaluations,
                "target_s": 10.0,
                "met": t_fit < 10.0,
                "alpha": [round(a, 1) for a in result.alpha],
                "beta": [round(b, 1) for b in result.beta],
                "true_alpha": list(ALPHA),
                "true_beta": list(BETA),
                "loss": round(result.loss, 5),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
