"""The workload behind the CLI's workload flags (shared by `blis run` and `blis observe`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from blis_cal.errors import ConfigError
from blis_cal.workload.generator import Workload, generate
from blis_cal.workload.presets import preset_lengths, preset_spec
from blis_cal.workload.spec import ClientSpec, Distribution, WorkloadSpec, check_spec, load_spec
from blis_cal.workload.think_time import think_time_option

DEFAULT_LENGTHS_PRESET = "chatbot"  # --rate / --concurrency alone: the chatbot preset's lengths


def _constant(value: int, flag: str) -> Distribution:
    if value < 1:
        raise ConfigError(f"{flag}: must be >= 1, got {value}")
    return Distribution("constant", {"value": int(value)})


def options_spec(
    *,
    spec_path: str | Path | None = None,
    preset: str | None = None,
    rate: float | None = None,
    concurrency: int | None = None,
    think_time_ms: float | None = None,
    think_time_dist: str | None = None,
    num_requests: int | None = None,
    duration_s: float | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    seed: int | None = None,
) -> WorkloadSpec:
    """The spec the CLI flags describe. Exactly one source: a spec file, a preset/scenario (needs rate),
    `rate` alone (Poisson arrivals, chatbot lengths) or `concurrency` (closed-loop users, chatbot lengths,
    `think_time_ms` between an answer and the user's next request, default 0, or pauses drawn from
    `think_time_dist`, BLIS's `--think-time-dist` text). `input_tokens` / `output_tokens` make those lengths
    constant; `num_requests`, `duration_s` (the horizon) and `seed` override the spec's. Raises ConfigError
    otherwise.
    """
    given = [
        flag
        for flag, value in (
            ("--workload-spec", spec_path),
            ("--preset", preset),
            ("--concurrency", concurrency),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ConfigError(f"give only one workload source, not {' and '.join(given)}")
    if rate is not None and (spec_path is not None or concurrency is not None):
        raise ConfigError(f"--rate cannot be combined with {given[0]}")
    think = think_time_option(think_time_ms, think_time_dist)
    if think is not None and concurrency is None:
        flag, key = (
            ("--think-time-ms", "think_time_us")
            if think_time_ms is not None
            else ("--think-time-dist", "think_time_distribution")
        )
        raise ConfigError(f"{flag} needs --concurrency (a spec's concurrency clients set {key})")
    if preset is not None and rate is None:
        raise ConfigError("--preset needs --rate (requests/s)")
    if not given and rate is None:
        raise ConfigError(
            "give a workload: --workload-spec FILE, --preset NAME --rate R, --rate R or --concurrency N"
        )
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"--rate: must be > 0 requests/s, got {rate}")
    if num_requests is not None and num_requests < 1:
        raise ConfigError(f"--num-requests: must be >= 1, got {num_requests}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise ConfigError(f"--duration: must be > 0 seconds, got {duration_s}")

    if spec_path is not None:
        spec = load_spec(spec_path)
    elif preset is not None:
        spec = preset_spec(preset, rate, 0)
    else:
        prompt, output, _ = preset_lengths(DEFAULT_LENGTHS_PRESET)
        if concurrency is not None:
            if concurrency < 1:
                raise ConfigError(f"--concurrency: must be >= 1, got {concurrency}")
            # BLIS: one client "distribution", so user u's session is concurrency_distribution_user_<u>.
            client = ClientSpec(
                "distribution",
                prompt,
                output,
                concurrency=concurrency,
                # --think-time-ms is a constant that also staggers the users' starts (u·think/N); a
                # distribution does not stagger them (BLIS).
                think_time_us=round(think_time_ms * 1000) if think_time_ms is not None else 0,
                think_time_distribution=think if think_time_dist is not None else None,
                streaming=True,
            )
        else:
            client = ClientSpec("poisson", prompt, output, rate_fraction=1.0, streaming=True)
        spec = WorkloadSpec(clients=[client], aggregate_rate=float(rate or 0.0))
    if input_tokens is not None or output_tokens is not None:
        spec.clients = [
            dataclasses.replace(
                c,
                input_distribution=(
                    _constant(input_tokens, "--input-tokens")
                    if input_tokens is not None
                    else c.input_distribution
                ),
                output_distribution=(
                    _constant(output_tokens, "--output-tokens")
                    if output_tokens is not None
                    else c.output_distribution
                ),
            )
            for c in spec.clients
        ]
    if num_requests is not None:
        spec.num_requests = num_requests
    if duration_s is not None:
        spec.horizon = round(duration_s * 1e6)
    if seed is not None:
        if seed < 0:
            raise ConfigError(f"--seed: must be >= 0, got {seed}")
        spec.seed = seed
    if not spec.num_requests and not spec.horizon:
        raise ConfigError("bound the workload: give --num-requests N or --duration SECONDS")
    check_spec(spec, "workload options")
    return spec


def workload_from_options(**options: Any) -> Workload:
    """The workload the CLI flags describe (keywords and rules of `options_spec`), generated."""
    return generate(options_spec(**options))
