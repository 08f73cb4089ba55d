"""Named workloads: BLIS's presets (defaults.yaml `workloads:`, §3.6) and built-in scenarios (§3.7).

Every entry of the `workload_presets` registry is a factory `(rate, num_requests) -> WorkloadSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import yaml

from blis_cal.data import data_path
from blis_cal.errors import ConfigError
from blis_cal.registry import Registry
from blis_cal.workload.samplers import number
from blis_cal.workload.spec import Arrival, ClientSpec, Distribution, WorkloadSpec, check_spec

PresetFactory = Callable[[float, int], WorkloadSpec]
workload_presets: Registry[PresetFactory] = Registry("workload preset")

PRESET_NAMES = ("chatbot", "summarization", "contentgen", "multidoc")


@lru_cache(maxsize=1)
def _preset_table() -> dict[str, dict[str, Any]]:
    with data_path("defaults.yaml").open() as fh:
        return yaml.safe_load(fh).get("workloads", {})


def gaussian(mean: float, std_dev: float, lo: float, hi: float) -> Distribution:
    return Distribution("gaussian", {"mean": mean, "std_dev": std_dev, "min": lo, "max": hi})


def exponential(mean: float) -> Distribution:
    return Distribution("exponential", {"mean": mean})


def preset_lengths(name: str) -> tuple[Distribution, Distribution, int]:
    """(prompt, output, prefix tokens) of a defaults.yaml preset."""
    entry = _preset_table().get(name)
    if entry is None:
        raise ConfigError(f"defaults.yaml has no workloads.{name}")
    p = "prompt_tokens"
    o = "output_tokens"
    prompt = gaussian(entry[p], entry[f"{p}_stdev"], entry[f"{p}_min"], entry[f"{p}_max"])
    output = gaussian(entry[o], entry[f"{o}_stdev"], entry[f"{o}_min"], entry[f"{o}_max"])
    return prompt, output, int(entry.get("prefix_tokens", 0))


def _spec(rate: float, num_requests: int, clients: list[ClientSpec], source: str) -> WorkloadSpec:
    number(f"{source} --rate", rate, positive=True)
    if num_requests < 0:
        raise ConfigError(f"{source}: num_requests must be >= 0, got {num_requests}")
    spec = WorkloadSpec(clients=clients, aggregate_rate=float(rate), num_requests=num_requests)
    check_spec(spec, source)
    return spec


def _register_preset(name: str) -> None:
    def factory(rate: float, num_requests: int) -> WorkloadSpec:
        prompt, output, prefix = preset_lengths(name)
        # BLIS HEAD: one client "distribution", constant arrivals at the rate, gaussian lengths.
        client = ClientSpec(
            id="distribution",
            input_distribution=prompt,
            output_distribution=output,
            rate_fraction=1.0,
            arrival=Arrival("constant"),
            prefix_group="shared" if prefix else "",
            prefix_length=prefix or None,
            streaming=True,
        )
        return _spec(rate, num_requests, [client], f"preset {name}")

    workload_presets.register(name)(factory)


for _name in PRESET_NAMES:
    _register_preset(_name)


def _client(cid: str, frac: float, inp: Distribution, out: Distribution, **kw: Any) -> ClientSpec:
    return ClientSpec(id=cid, rate_fraction=frac, input_distribution=inp, output_distribution=out, **kw)


@workload_presets.register("bursty")
def bursty(rate: float, num_requests: int) -> WorkloadSpec:
    """One batch client, gamma arrivals with cv 3.5."""
    client = _client(
        "bursty", 1.0, exponential(512), exponential(256), slo_class="batch", arrival=Arrival("gamma", cv=3.5)
    )
    return _spec(rate, num_requests, [client], "scenario bursty")


@workload_presets.register("unfair")
def unfair(rate: float, num_requests: int) -> WorkloadSpec:
    """90 % batch traffic with long prompts beside 10 % short critical streaming requests."""
    clients = [
        _client("batch-heavy", 0.9, exponential(1024), exponential(512), slo_class="batch"),
        _client(
            "critical-light",
            0.1,
            gaussian(128, 50, 10, 2048),
            exponential(64),
            slo_class="critical",
            streaming=True,
        ),
    ]
    return _spec(rate, num_requests, clients, "scenario unfair")


@workload_presets.register("prefix-heavy")
def prefix_heavy(rate: float, num_requests: int) -> WorkloadSpec:
    """80 % of requests share the `system-prompt` prefix (default length 50)."""
    clients = [
        _client("shared-prefix", 0.8, exponential(256), exponential(128), prefix_group="system-prompt"),
        _client("no-prefix", 0.2, exponential(512), exponential(256)),
    ]
    return _spec(rate, num_requests, clients, "scenario prefix-heavy")


@workload_presets.register("mixed-slo")
def mixed_slo(rate: float, num_requests: int) -> WorkloadSpec:
    """Critical, standard and batch clients in roughly equal shares."""
    clients = [
        _client(
            "critical", 0.33, gaussian(64, 20, 10, 256), exponential(32), slo_class="critical", streaming=True
        ),
        _client("standard", 0.34, gaussian(256, 100, 32, 2048), exponential(128), slo_class="standard"),
        _client("batch", 0.33, exponential(1024), exponential(512), slo_class="batch"),
    ]
    return _spec(rate, num_requests, clients, "scenario mixed-slo")


def preset_spec(name: str, rate: float, num_requests: int = 0) -> WorkloadSpec:
    """The spec of a preset or scenario at `rate` requests/s (num_requests 0 = bounded by a horizon)."""
    return workload_presets.get(name)(rate, num_requests)
