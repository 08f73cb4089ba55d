"""BLIS's `--think-time-dist` text as a length distribution in µs (blis-formats.md §2).

`lognormal:mu=2.0,sigma=0.6,min=3s,max=30s` (mu, sigma of ln seconds) or `constant:value=500ms`. Times take
the suffix s, ms or us; a bare number is milliseconds, as with `--think-time-ms`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from blis_cal.errors import ConfigError
from blis_cal.registry import Registry
from blis_cal.workload.samplers import length_sampler
from blis_cal.workload.spec import Distribution

FLAG = "--think-time-dist"
EXAMPLES = "lognormal:mu=2.0,sigma=0.6,min=3s,max=30s or constant:value=500ms"

# name -> (required keys, optional keys, builder of the µs distribution from the parsed text values)
ThinkTimeType = tuple[tuple[str, ...], tuple[str, ...], Callable[[dict[str, str]], Distribution]]
think_time_types: Registry[ThinkTimeType] = Registry("think-time distribution")

_UNITS_US = (("us", 1), ("ms", 1_000), ("s", 1_000_000))  # longest suffix first: "ms" before "s"


def duration_us(key: str, text: str) -> int:
    """`text` (s / ms / us suffix, bare = ms) in whole µs, truncated as BLIS does."""
    value, scale = text.strip(), 1_000
    for suffix, unit in _UNITS_US:
        if value.endswith(suffix):
            value, scale = value[: -len(suffix)], unit
            break
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{FLAG}: {key}={text!r} is not a time (e.g. 500ms, 3s, 250us)") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{FLAG}: {key} must be a finite time >= 0, got {text!r}")
    return int(number * scale)


def _real(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{FLAG}: {key}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{FLAG}: {key} must be finite, got {text!r}")
    return value


def _lognormal(p: dict[str, str]) -> Distribution:
    sigma = _real("sigma", p["sigma"])
    if sigma <= 0:
        raise ConfigError(f"{FLAG}: sigma must be > 0, got {p['sigma']!r}")
    # mu is of ln(seconds); + ln(1e6) makes the draw µs (BLIS). A bound of 0 is no bound.
    params: dict[str, float | int] = {"mu": _real("mu", p["mu"]) + math.log(1e6), "sigma": sigma}
    for key in ("min", "max"):
        if key in p and (bound := duration_us(key, p[key])) > 0:
            params[key] = bound
    if params.get("min", 0) > params.get("max", math.inf):
        raise ConfigError(f"{FLAG}: min ({p['min']}) must be <= max ({p['max']})")
    return Distribution("lognormal", params)


think_time_types.register("lognormal")((("mu", "sigma"), ("min", "max"), _lognormal))
think_time_types.register("constant")(
    (("value",), (), lambda p: Distribution("constant", {"value": duration_us("value", p["value"])}))
)


def parse_think_time_dist(text: str) -> Distribution:
    """The distribution of think times (µs) that `--think-time-dist TEXT` names. Raises ConfigError."""
    kind, sep, rest = text.partition(":")
    if not sep:
        raise ConfigError(f"{FLAG}: expected TYPE:KEY=VALUE,... (e.g. {EXAMPLES}), got {text!r}")
    try:
        required, optional, build = think_time_types.get(kind)
    except ConfigError as exc:
        raise ConfigError(f"{FLAG}: {exc}") from None
    params: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"{FLAG}: {item!r} is not KEY=VALUE")
        if key in params:
            raise ConfigError(f"{FLAG}: {key} given twice")
        if key not in required + optional:
            raise ConfigError(
                f"{FLAG}: {kind} has no parameter {key!r}; allowed: {', '.join(required + optional)}"
            )
        params[key] = value
    missing = [key for key in required if key not in params]
    if missing:
        raise ConfigError(f"{FLAG}: {kind} needs {missing[0]}= (e.g. {EXAMPLES})")
    dist = build(params)
    length_sampler({"type": dist.type, "params": dist.params}, FLAG)  # the sampler accepts what we built
    return dist


def think_time_option(think_time_ms: float | None, think_time_dist: str | None) -> Distribution | None:
    """The think time `--think-time-ms` or `--think-time-dist` gives (at most one of them), or None."""
    if think_time_ms is not None and think_time_dist is not None:
        raise ConfigError("--think-time-ms and --think-time-dist are mutually exclusive")
    if think_time_ms is not None:
        if not (math.isfinite(think_time_ms) and think_time_ms >= 0):
            raise ConfigError(f"--think-time-ms: must be >= 0 ms, got {think_time_ms}")
        return Distribution("constant", {"value": round(think_time_ms * 1000)})
    return None if think_time_dist is None else parse_think_time_dist(think_time_dist)
