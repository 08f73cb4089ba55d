"""Summary statistics shared by every stage (one percentile definition for the whole project)."""

from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float] | np.ndarray, p: float) -> float:
    """BLIS's percentile: linear interpolation at rank p/100·(n−1); 0.0 for no values."""
    if len(values) == 0:
        return 0.0
    return float(np.percentile(np.asarray(values, dtype=float), p, method="linear"))


def mean(values: Sequence[float] | np.ndarray) -> float:
    return float(np.mean(np.asarray(values, dtype=float))) if len(values) else 0.0


def latency_summary(values_us: Sequence[float] | np.ndarray, prefix: str) -> dict[str, float]:
    """`{prefix}_mean_ms, _p50_ms, _p90_ms, _p99_ms` from values in µs, rounded to the µs."""
    arr = np.asarray(values_us, dtype=float)
    out = {f"{prefix}_mean_ms": round(mean(arr) / 1000.0, 3)}
    for p in (50, 90, 99):
        out[f"{prefix}_p{p}_ms"] = round(percentile(arr, p) / 1000.0, 3)
    return out


def count_summary(values: Sequence[float] | np.ndarray, prefix: str) -> dict[str, float]:
    """`{prefix}_mean, _p50, _min, _max` of a count such as tokens per request."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {f"{prefix}_mean": 0.0, f"{prefix}_p50": 0.0, f"{prefix}_min": 0, f"{prefix}_max": 0}
    return {
        f"{prefix}_mean": round(float(arr.mean()), 3),
        f"{prefix}_p50": round(percentile(arr, 50), 3),
        f"{prefix}_min": int(arr.min()),
        f"{prefix}_max": int(arr.max()),
    }
