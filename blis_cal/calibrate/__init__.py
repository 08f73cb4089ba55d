"""Calibration: compare simulated with observed latencies, fit α/β from traces, write and report them."""

from blis_cal.calibrate.compare import (
    CalibrationError,
    ComparisonReport,
    Pairs,
    compare,
    mape,
    pearson_r,
    pooled,
    quality,
    summary_row,
)
from blis_cal.calibrate.defaults_file import make_entry, merge_defaults_entry
from blis_cal.calibrate.fit import FitResult, ModelForm, NamedTrace, direct_estimate, fit, model_forms

__all__ = [
    "CalibrationError",
    "ComparisonReport",
    "FitResult",
    "ModelForm",
    "NamedTrace",
    "Pairs",
    "compare",
    "direct_estimate",
    "fit",
    "make_entry",
    "mape",
    "merge_defaults_entry",
    "model_forms",
    "pearson_r",
    "pooled",
    "quality",
    "summary_row",
]
