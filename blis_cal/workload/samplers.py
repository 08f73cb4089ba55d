"""Length and inter-arrival samplers (blis-formats.md §3.3, §3.4), one registry each.

A sampler is built from its spec mapping by `from_params(params, where)`, which validates every
parameter (errors name `where`, the key path), and draws a whole numpy array at once from a caller's
`numpy.random.Generator`, so a client's stream is deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from blis_cal.errors import ConfigError
from blis_cal.registry import Registry


class LengthSampler(Protocol):
    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray: ...  # int64, each >= 0


class ArrivalSampler(Protocol):
    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray: ...  # int64 µs gaps, each >= 1


length_samplers: Registry[type] = Registry("length distribution")
arrival_samplers: Registry[type] = Registry("arrival process")

# ---------------------------------------------------------------------------------------------- params


def number(where: str, value: Any, *, positive: bool = False, nonneg: bool = False) -> float:
    """A finite real number (bool is not one); `positive` / `nonneg` bound it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{where}: must be finite, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value:g}")
    if nonneg and value < 0:
        raise ConfigError(f"{where}: must be >= 0, got {value:g}")
    return value


def _take(where: str, params: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...] = ()):
    """Check the parameter names (strict) and return them as floats (missing optional -> None)."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: expected a mapping of parameters, got {params!r}")
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown parameter; allowed: {', '.join(required + optional)}"
        )
    missing = [k for k in required if k not in params]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required parameter is missing")
    return {k: (number(f"{where}.{k}", params[k]) if k in params else None) for k in required + optional}


def _bounds(where: str, p: dict) -> tuple[float, float]:
    lo = 1.0 if p.get("min") is None else p["min"]
    hi = math.inf if p.get("max") is None else p["max"]
    if lo < 0:
        raise ConfigError(f"{where}.min: must be >= 0, got {lo:g}")
    if hi < lo:
        raise ConfigError(f"{where}.max: must be >= min ({lo:g}), got {hi:g}")
    return lo, hi


def _to_lengths(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Round, clamp to [lo, hi] and to at least 1 token (BLIS: every sampled length is >= 1)."""
    out = np.clip(np.rint(values), max(lo, 1.0), min(hi, 2.0**62))
    return out.astype(np.int64)


# ---------------------------------------------------------------------------------------------- lengths


@length_samplers.register("gaussian")
@dataclass(frozen=True)
class Gaussian:
    """N(mean, std_dev) rounded and clamped to [min, max]; min == max returns min verbatim (BLIS)."""

    mean: float
    std_dev: float
    lo: float
    hi: float

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str) -> Gaussian:
        p = _take(where, params, ("mean", "std_dev", "min", "max"))
        if p["std_dev"] < 0:
            raise ConfigError(f"{where}.std_dev: must be >= 0, got {p['std_dev']:g}")
        if p["min"] < 0:
            raise ConfigError(f"{where}.min: must be >= 0, got {p['min']:g}")
        if p["max"] < p["min"]:
            raise ConfigError(f"{where}.max: must be >= min ({p['min']:g}), got {p['max']:g}")
        return cls(p["mean"], p["std_dev"], p["min"], p["max"])

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        if self.lo == self.hi:
            return np.full(size, int(self.lo), dtype=np.int64)
        return _to_lengths(rng.normal(self.mean, self.std_dev, size), self.lo, self.hi)


@length_samplers.register("exponential")
@dataclass(frozen=True)
class Exponential:
    """mean · Exp(1), rounded, clamped to [min, max] (min defaults to 1)."""

    mean: float
    lo: float
    hi: float

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str) -> Exponential:
        p = _take(where, params, ("mean",), ("min", "max"))
        if p["mean"] <= 0:
            raise ConfigError(f"{where}.mean: must be > 0, got {p['mean']:g}")
        return cls(p["mean"], *_bounds(where, p))

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return _to_lengths(rng.exponential(self.mean, size), self.lo, self.hi)


@length_samplers.register("lognormal")
@dataclass(frozen=True)
class LogNormal:
    """exp(mu + sigma·Z), rounded, clamped to [min, max]."""

    mu: float
    sigma: float
    lo: float
    hi: float

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str) -> LogNormal:
        p = _take(where, params, ("mu", "sigma"), ("min", "max"))
        if p["sigma"] < 0:
            raise ConfigError(f"{where}.sigma: must be >= 0, got {p['sigma']:g}")
        return cls(p["mu"], p["sigma"], *_bounds(where, p))

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return _to_lengths(rng.lognormal(self.mu, self.sigma, size), self.lo, self.hi)


@length_samplers.register("pareto_lognormal")
@dataclass(frozen=True)
class ParetoLogNormal:
    """With probability mix_weight a Pareto xm/U^(1/alpha), otherwise exp(mu + sigma·Z) (BLIS)."""

    alpha: float
    xm: float
    mu: float
    sigma: float
    mix_weight: float

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str) -> ParetoLogNormal:
        p = _take(where, params, ("alpha", "xm", "mu", "sigma", "mix_weight"))
        for key in ("alpha", "xm"):
            if p[key] <= 0:
                raise ConfigError(f"{where}.{key}: must be > 0, got {p[key]:g}")
        if p["sigma"] < 0:
            raise ConfigError(f"{where}.sigma: must be >= 0, got {p['sigma']:g}")
        if not 0 <= p["mix_weight"] <= 1:
            raise ConfigError(f"{where}.mix_weight: must be in [0, 1], got {p['mix_weight']:g}")
        return cls(p["alpha"], p["xm"], p["mu"], p["sigma"], p["mix_weight"])

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        pick = rng.random(size) < self.mix_weight
        # 1 - U lies in (0, 1], so the Pareto draw is finite.
        pareto = self.xm / (1.0 - rng.random(size)) ** (1.0 / self.alpha)
        lognormal = rng.lognormal(self.mu, self.sigma, size)
        return _to_lengths(np.where(pick, pareto, lognormal), 1.0, math.inf)


@length_samplers.register("constant")
@dataclass(frozen=True)
class Constant:
    """Always `value`."""

    value: int

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str) -> Constant:
        p = _take(where, params, ("value",))
        value = p["value"]
        if value < 0 or value != int(value):
            raise ConfigError(f"{where}.value: must be a whole number >= 0, got {value:g}")
        return cls(int(value))

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.full(size, self.value, dtype=np.int64)


@length_samplers.register("empirical")
@dataclass(frozen=True)
class Empirical:
    """A PMF `{token count: probability}` (keys may be strings, as BLIS writes them), normalised."""

    values: tuple[int, ...]
    probs: tuple[float, ...]

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str) -> Empirical:
        if not isinstance(params, Mapping) or not params:
            raise ConfigError(f"{where}: empirical needs a non-empty mapping of token count -> probability")
        pmf: dict[int, float] = {}
        for key, prob in params.items():
            try:
                count = float(key)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.{key}: key must be a token count") from None
            if not math.isfinite(count) or count < 0 or count != int(count):
                raise ConfigError(f"{where}.{key}: key must be a whole token count >= 0")
            pmf[int(count)] = pmf.get(int(count), 0.0) + number(f"{where}.{key}", prob, nonneg=True)
        total = sum(pmf.values())
        if total <= 0:
            raise ConfigError(f"{where}: probabilities sum to 0")
        values = tuple(sorted(pmf))
        return cls(values, tuple(pmf[v] / total for v in values))

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        cdf = np.cumsum(self.probs)
        idx = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
        return np.asarray(self.values, dtype=np.int64)[np.minimum(idx, len(self.values) - 1)]


def length_sampler(spec: Mapping[str, Any], where: str) -> LengthSampler:
    """Build the sampler a `{type, params}` distribution mapping names."""
    return length_samplers.get(spec["type"]).from_params(spec.get("params", {}), f"{where}.params")


# ---------------------------------------------------------------------------------------------- arrivals


def _gaps(values: np.ndarray) -> np.ndarray:
    """µs gaps truncated to integers, at least 1 (BLIS)."""
    return np.maximum(np.floor(np.minimum(values, 2.0**62)), 1).astype(np.int64)


@dataclass(frozen=True)
class _RateArrival:
    """Base: built from the client's rate (requests/µs) and the `arrival:` mapping's cv/shape/scale."""

    rate_per_us: float

    @classmethod
    def from_params(cls, rate_per_us: float, params: Mapping[str, Any], where: str):
        extra = sorted(k for k in ("cv", "shape", "scale") if params.get(k) is not None)
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: not a parameter of this process (only gamma and weibull)")
        if rate_per_us <= 0:
            raise ConfigError(f"{where}: an arrival process needs a rate > 0")
        return cls(rate_per_us)


@arrival_samplers.register("poisson")
@dataclass(frozen=True)
class Poisson(_RateArrival):
    """Exponential gaps with mean 1/rate."""

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return _gaps(rng.exponential(1.0 / self.rate_per_us, size))


@arrival_samplers.register("constant")
@dataclass(frozen=True)
class ConstantArrival(_RateArrival):
    """Every gap is int(1/rate)."""

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return _gaps(np.full(size, 1.0 / self.rate_per_us))


def _cv(where: str, params: Mapping[str, Any]) -> float:
    return 1.0 if params.get("cv") is None else number(f"{where}.cv", params["cv"], positive=True)


def _shape_scale(where: str, params: Mapping[str, Any]) -> tuple[float, float] | None:
    """Explicit shape and scale (µs) override the rate (BLIS); both or neither."""
    shape, scale = params.get("shape"), params.get("scale")
    if shape is None and scale is None:
        return None
    if shape is None or scale is None:
        raise ConfigError(f"{where}: give both shape and scale, or neither")
    return (number(f"{where}.shape", shape, positive=True), number(f"{where}.scale", scale, positive=True))


@arrival_samplers.register("gamma")
@dataclass(frozen=True)
class GammaArrival:
    """Gamma gaps: shape 1/cv², scale cv²/rate (mean 1/rate, coefficient of variation cv)."""

    shape: float
    scale_us: float

    @classmethod
    def from_params(cls, rate_per_us: float, params: Mapping[str, Any], where: str) -> GammaArrival:
        explicit = _shape_scale(where, params)
        if explicit:
            return cls(*explicit)
        if rate_per_us <= 0:
            raise ConfigError(f"{where}: gamma arrivals need a rate > 0 (or explicit shape and scale)")
        cv = _cv(where, params)
        return cls(1.0 / cv**2, cv**2 / rate_per_us)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        if self.shape < 0.01:  # BLIS falls back to Poisson for extreme burstiness
            return _gaps(rng.exponential(self.shape * self.scale_us, size))
        return _gaps(rng.gamma(self.shape, self.scale_us, size))


def weibull_shape_for_cv(cv: float) -> float:
    """Weibull shape k whose coefficient of variation is cv (bisection on [0.1, 100], as BLIS)."""

    def cv_of(k: float) -> float:
        g1, g2 = math.gamma(1 + 1 / k), math.gamma(1 + 2 / k)
        return math.sqrt(max(g2 / g1**2 - 1, 0.0))

    lo, hi = 0.1, 100.0  # cv decreases as k grows
    for _ in range(100):
        mid = (lo + hi) / 2
        if abs(cv_of(mid) - cv) < 1e-3:
            return mid
        if cv_of(mid) > cv:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@arrival_samplers.register("weibull")
@dataclass(frozen=True)
class WeibullArrival:
    """Weibull gaps with mean 1/rate and the given cv (k by bisection, λ = mean/Γ(1+1/k))."""

    shape: float
    scale_us: float

    @classmethod
    def from_params(cls, rate_per_us: float, params: Mapping[str, Any], where: str) -> WeibullArrival:
        explicit = _shape_scale(where, params)
        if explicit:
            return cls(*explicit)
        if rate_per_us <= 0:
            raise ConfigError(f"{where}: weibull arrivals need a rate > 0 (or explicit shape and scale)")
        cv = _cv(where, params)
        if not 0.01 <= cv <= 10.4:
            raise ConfigError(f"{where}.cv: weibull cv must be in [0.01, 10.4], got {cv:g}")
        k = weibull_shape_for_cv(cv)
        return cls(k, (1.0 / rate_per_us) / math.gamma(1 + 1 / k))

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return _gaps(self.scale_us * rng.weibull(self.shape, size))
