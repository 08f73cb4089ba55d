"""Length and arrival samplers: statistical laws over large samples with fixed seeds, and bad params."""

import math
import re

import numpy as np
import pytest
from scipy.stats import norm

from blis_cal.errors import ConfigError
from blis_cal.workload.samplers import arrival_samplers, length_sampler, length_samplers, weibull_shape_for_cv

N = 200_000


def draw(kind, params, seed=1, size=N):
    return length_sampler({"type": kind, "params": params}, "t").sample(np.random.default_rng(seed), size)


def test_registries_list_every_documented_variant():
    assert length_samplers.names() == sorted(
        ["gaussian", "exponential", "lognormal", "pareto_lognormal", "empirical", "constant"]
    )
    assert arrival_samplers.names() == sorted(["poisson", "gamma", "weibull", "constant"])


def test_gaussian_mean_sd_and_bounds():
    x = draw("gaussian", {"mean": 256, "std_dev": 100, "min": 2, "max": 800})
    assert x.dtype == np.int64
    assert x.min() >= 2 and x.max() <= 800
    assert x.mean() == pytest.approx(256, rel=0.01)
    assert x.std() == pytest.approx(100, rel=0.02)  # clamping at ±5.4σ/2.5σ barely matters


def test_gaussian_clamps_at_bounds():
    x = draw("gaussian", {"mean": 100, "std_dev": 100, "min": 50, "max": 150})
    assert x.min() == 50 and x.max() == 150
    assert (x == 50).mean() == pytest.approx(0.31, abs=0.01)  # P(Z < -0.5)


def test_gaussian_min_equal_max_is_verbatim_even_zero():
    assert set(draw("gaussian", {"mean": 5, "std_dev": 1, "min": 0, "max": 0}, size=100)) == {0}


def test_exponential_mean_cv_and_floor():
    x = draw("exponential", {"mean": 512})
    assert x.min() >= 1
    assert x.mean() == pytest.approx(512, rel=0.01)
    assert x.std() / x.mean() == pytest.approx(1.0, rel=0.02)


def test_exponential_bounds():
    x = draw("exponential", {"mean": 100, "min": 20, "max": 300})
    assert x.min() == 20 and x.max() == 300


def test_lognormal_median_and_mean():
    x = draw("lognormal", {"mu": 5.0, "sigma": 0.5})
    assert np.median(x) == pytest.approx(math.exp(5.0), rel=0.01)
    assert x.mean() == pytest.approx(math.exp(5.0 + 0.125), rel=0.01)


def test_pareto_lognormal_mixture():
    x = draw("pareto_lognormal", {"alpha": 3.0, "xm": 100, "mu": 4.0, "sigma": 0.3, "mix_weight": 0.25})
    expected = 0.25 * 3.0 * 100 / 2.0 + 0.75 * math.exp(4.0 + 0.045)
    assert x.mean() == pytest.approx(expected, rel=0.02)
    # Every Pareto draw is >= xm; the lognormal part exceeds 100 with probability P(Z > (ln 100 - mu)/sigma).
    tail = 0.25 + 0.75 * norm.sf((math.log(100) - 4.0) / 0.3)
    assert (x >= 100).mean() == pytest.approx(tail, abs=0.005)


def test_constant():
    assert set(draw("constant", {"value": 17}, size=10)) == {17}


def test_empirical_frequencies_and_string_keys():
    x = draw("empirical", {"100": 0.5, "200.0": 0.3, 300: 0.2})
    assert set(np.unique(x)) == {100, 200, 300}
    assert (x == 100).mean() == pytest.approx(0.5, abs=0.005)
    assert (x == 300).mean() == pytest.approx(0.2, abs=0.005)


def test_empirical_normalises():
    x = draw("empirical", {"10": 2, "20": 2})
    assert x.mean() == pytest.approx(15, rel=0.01)


def gaps(process, rate_per_s, seed=2, size=N, **params):
    sampler = arrival_samplers.get(process).from_params(rate_per_s / 1e6, params, "arrival")
    return sampler.sample(np.random.default_rng(seed), size)


@pytest.mark.parametrize(
    ("process", "cv"), [("poisson", None), ("gamma", 0.5), ("gamma", 3.5), ("weibull", 0.5), ("weibull", 2.0)]
)
def test_arrival_mean_and_cv(process, cv):
    params = {} if cv is None else {"cv": cv}
    x = gaps(process, 10.0, **params)
    assert x.dtype == np.int64 and x.min() >= 1
    assert x.mean() == pytest.approx(100_000, rel=0.02)
    assert x.std() / x.mean() == pytest.approx(cv or 1.0, rel=0.05)


def test_constant_arrivals():
    assert set(gaps("constant", 3.0, size=10)) == {333_333}


def test_gamma_explicit_shape_scale_ignores_rate():
    x = gaps("gamma", 1.0, shape=2.0, scale=500.0)
    assert x.mean() == pytest.approx(1000, rel=0.02)


def test_weibull_shape_bisection():
    assert weibull_shape_for_cv(1.0) == pytest.approx(1.0, abs=0.01)  # Weibull(1) is exponential


def test_same_seed_same_draws_other_seed_differs():
    a = draw("exponential", {"mean": 50}, seed=7, size=1000)
    assert np.array_equal(a, draw("exponential", {"mean": 50}, seed=7, size=1000))
    assert not np.array_equal(a, draw("exponential", {"mean": 50}, seed=8, size=1000))


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("gaussian", {"mean": 1, "std_dev": 1, "min": 1}, "t.max: required"),
        ("gaussian", {"mean": 1, "std_dev": -1, "min": 1, "max": 2}, "t.std_dev: must be >= 0"),
        ("gaussian", {"mean": 1, "std_dev": 1, "min": 5, "max": 2}, "t.max: must be >= min"),
        ("gaussian", {"mean": "x", "std_dev": 1, "min": 1, "max": 2}, "t.mean: expected a number"),
        ("gaussian", {"mean": float("nan"), "std_dev": 1, "min": 1, "max": 2}, "t.mean: must be finite"),
        ("exponential", {"mean": 0}, "t.mean: must be > 0"),
        ("exponential", {"mean": 5, "mode": 1}, "t.mode: unknown parameter"),
        ("lognormal", {"mu": 1, "sigma": -1}, "t.sigma: must be >= 0"),
        ("pareto_lognormal", {"alpha": 1, "xm": 1, "mu": 1, "sigma": 1, "mix_weight": 2}, "t.mix_weight"),
        ("constant", {"value": 2.5}, "t.value: must be a whole number"),
        ("empirical", {}, "non-empty mapping"),
        ("empirical", {"abc": 1}, "t.abc: key must be a token count"),
        ("empirical", {"10": -1}, "t.10: must be >= 0"),
        ("empirical", {"10": 0}, "probabilities sum to 0"),
    ],
)
def test_bad_length_params(kind, params, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        length_samplers.get(kind).from_params(params, "t")


@pytest.mark.parametrize(
    ("process", "params", "message"),
    [
        ("poisson", {"cv": 2.0}, "arrival.cv: not a parameter"),
        ("weibull", {"cv": 20.0}, r"arrival.cv: weibull cv must be in \[0.01, 10.4\]"),
        ("gamma", {"shape": 2.0}, "give both shape and scale"),
        ("gamma", {"cv": -1.0}, "arrival.cv: must be > 0"),
    ],
)
def test_bad_arrival_params(process, params, message):
    with pytest.raises(ConfigError, match=message):
        arrival_samplers.get(process).from_params(1e-5, params, "arrival")
