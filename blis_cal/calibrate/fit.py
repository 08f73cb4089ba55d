"""Fit α/β step-time coefficients from traces, jointly over all of them.

1. Direct estimate (no simulation): β from every request's decode window (its mean ITL is a linear function
   of the mean step features over the window, `features.window_rows`), by bounded linear least squares on
   relative errors (β2 ≥ β1 in the extended forms: ModelForm.decode_pays_prefill); α0/α1 from requests
   that arrived to an idle engine (TTFT = queue delay + one prefill step), after subtracting the prefill
   step predicted by β (blackbox-table then sets an offset per batch size of pure-decode steps from their
   medians: `with_batch_table`). α2 (delay of every token after its step) is not separable from α0 by
   TTFT/E2E, so it stays 0 and α0 carries the fixed overhead. α1 needs vLLM's own queue and
   scheduled→first-token times: without them a TTFT's part per prompt token is the prefill's (β), and α0 alone
   carries what is outside the step.
2. Simulation in the loop: replay every trace with candidate coefficients and minimise the mean of TTFT,
   ITL and E2E MAPE over all traces (Nelder-Mead on the overall β scale, the prefill terms' scale and α0).
3. Bootstrap (whole traces when there are several, then time blocks of requests): a confidence interval
   for every coefficient (the direct estimator resampled, carried through the refinement) and prediction
   intervals for p50/p99 TTFT and E2E (replays with resampled coefficients, then resampled requests).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import numpy as np
from scipy.optimize import least_squares, lsq_linear, minimize

from blis_cal.calibrate.compare import (
    SPEED_NOTE_TOLERANCE,
    CalibrationError,
    ComparisonReport,
    ResultLike,
    TraceDiagnostics,
    compare,
    step_ratios,
    trace_diagnostics,
)
from blis_cal.calibrate.features import (
    DECODE_STEPS_MIN,
    FLOORS,
    PrefillRows,
    StepRows,
    WindowRows,
    decode_step_rows,
    floor_column,
    idle_prefill_rows,
    window_rows,
)
from blis_cal.errors import ConfigError
from blis_cal.registry import Registry
from blis_cal.replay.sessions import DEFAULT_SESSION_MODE, session_modes
from blis_cal.simulate.coefficients import FitCoverage
from blis_cal.simulate.latency import (
    BATCH_TABLE,
    BATCH_TABLE_SIZES,
    CACHED_PAIRS_TERM,
    PAIRS_TERM,
    BlackboxModel,
    LatencyModel,
    latency_models,
)
from blis_cal.simulate.roofline import shipped_model_shape
from blis_cal.stats import percentile
from blis_cal.trace import Trace, ok_records
from blis_cal.trace_analysis import SpeedDrift, estimate_cached_tokens

PAIRS = "Ppairs"  # the prefill attention pairs column (β10)
# An attention pair may cost at most this share of a prompt token (β10 ≤ share·β1), else the fit leaves pairs
# unpriced. Pairs grow with the square of a prompt, so only prompt lengths or cached prefixes that vary widely
# tell them from tokens; on narrow traces the solver trades one for the other: shared A alone 2.3e-3 (1.77 µs
# per pair, 9× what day 13's probes measure), C alone β1 → 0. The fits of 27 days' captures (each day's and its
# a08 + prefix10 pair's) put it at 2.2e-4-6.1e-4; by arithmetic a pair is 2·hidden·layers multiply-adds against
# about the parameter count per token (1.7e-4 for the tiny model, less for larger ones). The rule before (pairs
# may move β1 by at most 15 %) refused day 33's ~1,400-token prompts, where they moved it 20 %.
PAIR_MAX_TOKEN_SHARE = 1e-3
# Where the fit's traces have no prefix-cache hits, a pair of a prompt token with a cached one costs this share
# of a pair within a prompt (β44 = share·β10; with hits, the fit prices both at β10). Fits that priced the two
# apart (17 days' a08 + prefix10 pairs) put it at 0.30-1.15, median 0.46; priced at a whole pair, the prefix
# captures of days 9-32 came out 15-25 % over in TTFT when left out (docs/accuracy.md, twenty-sixth session).
UNMEASURED_CACHED_PAIR_SHARE = 0.5
# Prompts whose new tokens (past prefix-cache hits) spread less than this (std over mean, pooled over the fit's
# traces) cannot tell a price per prefill (β5) or per attention pair (β10) from the per-token one (β1): with
# fixed-length prompts, a common benchmark setting, the solver split a prefill between β1 and β5 as it liked
# (simulated 512-token prompts: β1 2.5 µs against 1,130, a 128-token prompt then priced 3.75×), so such fits
# price prompts per token only, as BLIS's 3+3 does.
PROMPT_SPREAD_MIN = 0.1
# Where each feature column's coefficient goes in the β tuple (simulate.latency.BETA_TERMS order).
TERM_OF_COLUMN = {"const": 0, "P": 1, "D": 2, "Pctx": 3, "Dctx": 4, "Np": 5, PAIRS: PAIRS_TERM}


@dataclass(frozen=True)
class ModelForm:
    """A step-time form: the simulator's latency model and the window features its betas multiply."""

    name: str
    latency_model: str  # name in blis_cal.simulate's `latency_models` registry
    beta_columns: tuple[str, ...]
    description: str
    # Also the floor under pure-decode steps (β7/β8): β7 for each decoding request short of k, for the k in
    # features.FLOORS that fits best (β7 is its own coefficient: see FLOOR_SUPPORT).
    floor: bool = False
    # β2 ≥ β1 (solved as β1 and β2 − β1 ≥ 0) in forms that price attention apart: vLLM batches a step's prompt
    # and decode tokens through the same linear layers, and a decode token adds its logits and sampling.
    decode_pays_prefill: bool = False
    # Also an offset per batch size of pure-decode steps of 1..BATCH_TABLE_SIZES requests (β11-β42): each one's
    # median pure-decode step over the form's, centred on those steps (`with_batch_table`).
    batch_table: bool = False

    def floor_columns(self, k: int) -> tuple[str, ...]:
        """The columns solved for with the floor at k requests: the form's, then the requests short of k."""
        return (*self.beta_columns, floor_column(k))

    def without(self, column: str) -> ModelForm:
        """The same form without `column` (its coefficient stays 0)."""
        return replace(self, beta_columns=tuple(c for c in self.beta_columns if c != column))

    def latency(self, alpha: Sequence[float], beta: Sequence[float]) -> LatencyModel:
        """The form's latency model with these coefficients."""
        return latency_models.get(self.latency_model)(tuple(alpha), tuple(beta))

    @property
    def terms(self) -> tuple[int, ...]:
        """Where each column's coefficient goes in the β tuple (simulate.latency.BETA_TERMS order)."""
        return tuple(TERM_OF_COLUMN[c] for c in self.beta_columns)

    def full_beta(self, solved: Sequence[float], floor: int = 0) -> tuple[float, ...]:
        """The β tuple from the solved column coefficients (and the floor in decoding requests). Forms with
        decode context write β0-β10 (β11-β43: `with_batch_table`; β44: `_with_cached_pairs`), β9 = 0: a prefix block several
        decoding requests share is read once per step (the features count it once, as the simulator's KV cache
        holds it once)."""
        beta = [0.0] * (BATCH_TABLE if "Dctx" in self.beta_columns else max(self.terms) + 1)
        for term, value in zip(self.terms, solved[: len(self.terms)], strict=True):
            beta[term] = value
        if self.floor:
            per_request = solved[len(self.terms)] if floor else 0.0  # floor_columns' last column
            beta[7:9] = [per_request, _clean(floor * per_request)]
        return tuple(beta)


model_forms: Registry[ModelForm] = Registry("model form")
model_forms.register("blackbox")(
    ModelForm(
        "blackbox",
        "blackbox",
        ("const", "P", "D"),
        "BLIS 3+3: step = β0 + β1·prefill tokens + β2·decode tokens",
    )
)
# The simulator's blackbox model takes up to 45 betas in simulate.latency.BETA_TERMS order; this form fits
# β0-β2, β4, β5 and β10 (β6, decode requests, equals decode tokens without speculative decoding; β7 and β8:
# the floor; β9: 0; β11-β43: blackbox-table; β44 from β10: `_with_cached_pairs`). β3, a price per cached token
# of each prefill, stays 0: a prefill of n new tokens after c cached ones computes n·c attention pairs with the
# cache, which β44 prices, so with pairs priced β3 counted them twice, and without, wherever cached prefixes are
# all one length (shared C: 768 tokens), β3·c is a constant per prefill that the solver split from β5 as it
# liked (C alone: 119 µs per cached token, β5 = 0; A's idle-engine prefills then priced 0.72×; docs/accuracy.md).
model_forms.register("blackbox-ctx")(
    ModelForm(
        "blackbox-ctx",
        "blackbox",
        ("const", "P", "D", "Dctx", "Np", PAIRS),
        "3+3 plus β4·Σ decode context (measured from pure-decode steps of one "
        "batch size; a prefix block several running requests share counted once: β9 = 0) + β5·prefill requests "
        "(once per prefill, when it starts) + β10·prefill attention pairs (when the "
        f"traces measure them apart from tokens: a pair may cost at most {PAIR_MAX_TOKEN_SHARE:g} of a prompt token), "
        "those of a prompt token with a prefix-cache hit at β44 (β10 where the traces have hits, else "
        f"{UNMEASURED_CACHED_PAIR_SHARE:g}·β10, or with β10 unpriced a pair's FLOPs over a prompt token's × β1 from "
        "the model's shipped config); β2 ≥ β1 (a decode token runs the linear layers a prompt token does)",
        decode_pays_prefill=True,
    )
)
model_forms.register("blackbox-floor")(
    ModelForm(
        "blackbox-floor",
        "blackbox",
        ("const", "P", "D", "Dctx", "Np", PAIRS),
        "blackbox-ctx plus a floor under steps without prefill, [P = 0]·max(0, β8 − β7·decode requests): each "
        "decoding request short of k = β8/β7 adds β7, so a pure-decode step of few requests costs about the "
        "same however many decode (steps with a prefill pay every decode in full); the fit finds k and β7",
        floor=True,
        decode_pays_prefill=True,
    )
)
# Past the batch sizes a fit saw, a pure-decode step grows by this many prompt tokens' price (β1) per decoding
# request besides its context's (β4): a decoding request runs the linear layers a prompt token does, plus its
# sampling and bookkeeping. Within 94 captures of days 4-38, steps past the largest size their day's a08 +
# prefix10 pair saw grew by a median 1.28 β1 per request (quartiles 1.16-1.47; 1.29 on days 4-25, 1.25 on
# 26-38), while the pairs' own lines rose by 1.0-2.2 β1 (β2): a light load measures β2 loosely
# (docs/accuracy.md, thirty-first session).
DECODE_STEP_SLOPE = 1.28
model_forms.register("blackbox-table")(
    replace(
        model_forms.get("blackbox-floor"),
        name="blackbox-table",
        description="blackbox-floor plus a signed offset for pure-decode steps of each batch size of 1-"
        f"{BATCH_TABLE_SIZES} requests (β11-β{BATCH_TABLE + BATCH_TABLE_SIZES - 1}: the median observed step of "
        "that size over the floor form's, centred on the steps; sizes without one interpolated, past the "
        f"largest seen its offset, corrected so that a step grows by {DECODE_STEP_SLOPE:g}·β1 "
        "per request besides context, and larger batches that of the last size, growing so too: "
        f"β{BATCH_TABLE + BATCH_TABLE_SIZES} per request past {BATCH_TABLE_SIZES}), for what a line and a floor "
        "cannot follow (vLLM's CPU build runs 2 decoding requests slower than 1 or 3 and grows more slowly "
        "past 8; GPU builds pad decode batches to CUDA-graph sizes)",
        batch_table=True,
    )
)

DEFAULT_MODEL_FORM = "blackbox-table"  # the CLI's: it predicted held-out real traces best (docs/accuracy.md)

# A simulator run for calibration: (trace, form, alpha, beta) -> per-request results.
Simulator = Callable[[Trace, ModelForm, tuple[float, ...], tuple[float, ...]], Sequence[ResultLike]]
METRIC_WEIGHTS = {"ttft": 1.0, "itl": 1.0, "e2e": 1.0}
LIGHT_LOAD_BATCH = 16  # fits whose traces never decoded this many requests at once get a note
ALPHA0_STEP_US = 10_000.0  # the refinement's unit for moving α0
# Step terms paid by prefills (scaled together by the refinement).
PREFILL_COLUMNS = ("P", "Pctx", "Np", PAIRS)


@dataclass
class NamedTrace:
    name: str
    trace: Trace
    _diagnostics: TraceDiagnostics | None = field(default=None, repr=False, compare=False)

    def diagnostics(self) -> TraceDiagnostics:
        """`trace_diagnostics` of the trace, worked out once: a fit compares each trace many times."""
        if self._diagnostics is None:
            self._diagnostics = trace_diagnostics(self.trace)
        return self._diagnostics


@dataclass
class FitResult:
    model_form: str
    alpha: tuple[float, float, float]
    beta: tuple[float, ...]
    direct_alpha: tuple[float, float, float]
    direct_beta: tuple[float, ...]
    loss: float  # mean over traces of the weighted mean of TTFT/ITL/E2E MAPE (fractions)
    direct_loss: float
    traces: list[str]
    num_requests: int
    alpha_ci: list[tuple[float, float]] = field(default_factory=list)
    beta_ci: list[tuple[float, float]] = field(default_factory=list)
    evaluations: int = 0
    fit_seconds: float = 0.0
    method: str = ""
    reports: dict[str, ComparisonReport] = field(default_factory=dict)  # per trace, with fitted coefficients
    prediction_intervals: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Per fit trace, (decoding requests, median pure-decode step µs, mean context per request) for every
    # batch size seen DECODE_STEPS_MIN times: the step shape the form was fitted to (the report plots it).
    decode_medians: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)

    @property
    def decode_batch_max(self) -> int:
        """The most decoding requests in a batch size seen DECODE_STEPS_MIN times in the fit's traces."""
        return max((n for medians in self.decode_medians.values() for n, _, _ in medians), default=0)

    @property
    def decode_context_max(self) -> int:
        """The most context tokens per decoding request in those batch sizes (a size's mean)."""
        return round(max((c for medians in self.decode_medians.values() for _, _, c in medians), default=0.0))

    @property
    def coverage(self) -> FitCoverage:
        return FitCoverage(self.decode_batch_max, self.decode_context_max)

    def metadata(self) -> dict[str, Any]:
        """The `fit:` block written into the defaults.yaml entry and the report."""
        return {
            "model_form": self.model_form,
            "method": self.method,
            "traces": list(self.traces),
            "requests": self.num_requests,
            "decode_batch_max": self.decode_batch_max,
            "decode_context_max": self.decode_context_max,
            "loss": round(self.loss, 6),
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "alpha_ci95": [[_round(lo), _round(hi)] for lo, hi in self.alpha_ci],
            "beta_ci95": [[_round(lo), _round(hi)] for lo, hi in self.beta_ci],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_form": self.model_form,
            "alpha": list(self.alpha),
            "beta": list(self.beta),
            "direct_alpha": list(self.direct_alpha),
            "direct_beta": list(self.direct_beta),
            "loss": self.loss,
            "direct_loss": self.direct_loss,
            "alpha_ci95": [list(x) for x in self.alpha_ci],
            "beta_ci95": [list(x) for x in self.beta_ci],
            "traces": self.traces,
            "num_requests": self.num_requests,
            "decode_batch_max": self.decode_batch_max,
            "decode_context_max": self.decode_context_max,
            "evaluations": self.evaluations,
            "fit_seconds": round(self.fit_seconds, 3),
            "method": self.method,
            "prediction_intervals": self.prediction_intervals,
            "notes": self.notes,
        }


def _round(x: float) -> float:
    return float(f"{x:.6g}")


# ---------------------------------------------------------------------------------------------- direct


@dataclass
class _Rows:
    windows: list[WindowRows]
    steps: list[StepRows]
    prefills: list[PrefillRows]
    rtts: list[int]
    decodes: list[StepRows]  # per batch size, median pure-decode steps (floor forms fit on them too)
    drifts: list[SpeedDrift | None]  # per trace: its typical pure-decode step's price per context token
    prompt_spread: float  # std over mean of every ok request's new prompt tokens (past prefix-cache hits)

    @property
    def context_price(self) -> float | None:
        """β4 from every trace (`decode_context_price`)."""
        return decode_context_price([d.context_price for d in self.drifts if d])


def _collect(traces: Sequence[NamedTrace], rtt_us: int | None) -> _Rows:
    from blis_cal.calibrate.compare import resolve_rtt_us

    windows, steps, prefills, rtts = [], [], [], []
    for nt in traces:
        if not nt.trace.records:
            raise CalibrationError(f"{nt.name}: the trace has no requests")
        if not ok_records(nt.trace):
            raise CalibrationError(f"{nt.name}: no 'ok' requests past the warm-up to fit on")
        if not nt.trace.itl:
            raise CalibrationError(
                f"{nt.name}: no per-chunk ITL file (<stem>.itl.csv beside the trace); fitting needs chunk "
                "timestamps (record them with `blis observe`, which writes the ITL file by default, or BLIS's "
                "`observe --record-itl`)"
            )
        windows.append(window_rows(nt.trace))
        steps.append(nt.diagnostics().prefills)
        prefills.append(idle_prefill_rows(nt.trace))
        rtts.append(resolve_rtt_us(nt.trace, rtt_us))
    if sum(len(w.itl_us) for w in windows) < 3:
        raise CalibrationError(
            "too few requests with two or more streamed tokens to fit step times "
            f"({sum(len(w.itl_us) for w in windows)} in {', '.join(t.name for t in traces)}; need >= 3)"
        )
    decodes = [decode_step_rows(nt.diagnostics().steps) for nt in traces]  # the steps, worked out once
    new_tokens = []
    for nt in traces:
        records = ok_records(nt.trace)
        cached = estimate_cached_tokens(nt.trace, records)
        new_tokens += [r.total_input_tokens - cached.get(r.request_id, 0) for r in records]
    new = np.asarray(new_tokens, dtype=float)
    spread = float(new.std() / new.mean()) if new.mean() > 0 else 0.0
    return _Rows(windows, steps, prefills, rtts, decodes, [nt.diagnostics().drift for nt in traces], spread)


def _identifiable(form: ModelForm, rows: _Rows) -> ModelForm:
    """`form` without the prices per prefill (β5) and per attention pair (β10) where the prompts' new tokens
    spread less than PROMPT_SPREAD_MIN: a prefill's price then cannot be split between them and β1."""
    if rows.prompt_spread >= PROMPT_SPREAD_MIN:
        return form
    return form.without("Np").without(PAIRS)


def decode_context_price(prices: Sequence[tuple[float, float]]) -> float | None:
    """β4, the price of a context token in a decode step, from the traces' (price, spread) pairs
    (`SpeedDrift.context_price`): the mean weighted by spread, None when none measures it.

    Each trace's price compares its pure-decode steps of one batch size with each other, so load, batch size
    and prefills do not enter it. Solved with β2 from request windows, where every request has a few hundred
    tokens of context, β4 traded against β2: 0.5-3.1 µs per token in the a08 + prefix10 fits of twelve days
    whose steps measured 0.6-2.0 (docs/accuracy.md, twenty-seventh session)."""
    weight = sum(spread for _, spread in prices)
    return sum(price * spread for price, spread in prices) / weight if weight > 0 else None


def floor_of(beta: Sequence[float]) -> int:
    """The k of the floor under pure-decode steps (β8/β7; 0 without a floor)."""
    return round(beta[8] / beta[7]) if len(beta) > 8 and beta[7] > 0 else 0


def _solve_beta(
    form: ModelForm,
    windows: Sequence[WindowRows],
    steps: Sequence[StepRows],
    decodes: Sequence[StepRows],
    picks: Sequence[np.ndarray] | None = None,
    step_picks: Sequence[np.ndarray] | None = None,
    start: Sequence[float] | None = None,
    context_price: float | None = None,
) -> tuple[float, ...]:
    """The form's β (BETA_TERMS order), β4 at `context_price` when given (`decode_context_price`). A floor
    form tries every floor `_supported_floors` allows, fitting the `decodes` medians too (request windows
    average a floor away), and keeps the one that fits best if it beats no floor by FLOOR_MIN_GAIN, or keeps
    the floor of `start` (bootstrap replicates)."""
    if form.batch_table:
        plain = replace(form, batch_table=False)
        return with_batch_table(
            _solve_beta(plain, windows, steps, decodes, picks, step_picks, start, context_price), decodes
        )
    fixed = {"Dctx": context_price} if context_price is not None else {}
    if PAIRS in form.beta_columns and not _prices_pairs(
        form, windows, steps, picks, step_picks, start, fixed
    ):
        return _solve_beta(
            form.without(PAIRS), windows, steps, decodes, picks, step_picks, start, context_price
        )
    warm = None if start is None else [start[t] for t in form.terms]
    solve = partial(_solve_columns, tie=form.decode_pays_prefill, fixed=fixed)
    if not form.floor:
        return form.full_beta(solve(form.beta_columns, windows, steps, picks, step_picks, warm)[0])
    # The medians are aggregates already: kept whole in bootstrap replicates.
    with_medians = [*steps, *decodes]
    median_picks = (
        None if step_picks is None else [*step_picks, *(np.arange(len(d.duration_us)) for d in decodes)]
    )
    if start is None:
        fits = {
            k: solve(form.floor_columns(k), windows, with_medians, picks, median_picks)
            for k in _supported_floors(decodes)
        }
        fits = {k: fit for k, fit in fits.items() if k == 0 or _lifts(decodes, k, fit[0][-1])}
        k = min(fits, key=lambda f: fits[f][1])
        if fits[k][1] > (1 - FLOOR_MIN_GAIN) * fits[0][1]:
            k = 0
    else:
        k = floor_of(start)
    if k == 0:  # no floor: blackbox-ctx, fitted without the medians that were there to locate one
        return form.full_beta(solve(form.beta_columns, windows, steps, picks, step_picks, warm)[0])
    if start is None:
        return form.full_beta(fits[k][0], k)
    warm_floor = [*warm, start[7]]  # β7, the floor column's coefficient
    return form.full_beta(
        solve(form.floor_columns(k), windows, with_medians, picks, median_picks, warm_floor)[0], k
    )


def with_batch_table(beta: Sequence[float], decodes: Sequence[StepRows]) -> tuple[float, ...]:
    """`beta` with β11-β43 set: for each batch size of 1..BATCH_TABLE_SIZES with median pure-decode steps in
    `decodes`, the median over traces of how much the median step exceeds what `beta` predicts, less the
    mean of that over all those steps. Centred, the offsets move time between batch sizes and leave the
    level to `beta`: the medians sit below the mean steps a request's ITL averages, and offsets that lowered
    light loads had the refinement scale every β up, over-predicting heavier loads (docs/accuracy.md). Past the
    largest size seen (and past the table: β43), a step grows by DECODE_STEP_SLOPE·β1 per decoding request
    besides its context at β4, whatever the line's slope."""
    model = BlackboxModel((0.0, 0.0, 0.0), beta)
    excess: dict[int, list[float]] = {}
    contexts: dict[int, list[float]] = {}  # Σ context of the size's median rows
    steps: dict[int, int] = {}
    for rows in decodes:
        assert rows.counts is not None  # decode_step_rows: medians
        for n, us, context, count in zip(
            rows.features["D"], rows.duration_us, rows.features["Dctx"], rows.counts, strict=True
        ):
            n = int(n)
            if 1 <= n <= BATCH_TABLE_SIZES:
                excess.setdefault(n, []).append(us - model.decode_only_step_us(n, int(context)))
                contexts.setdefault(n, []).append(float(context))
                steps[n] = steps.get(n, 0) + int(count)
    if not excess:
        return (*beta[:BATCH_TABLE], *[0.0] * BATCH_TABLE_SIZES, 0.0)
    median = {n: float(np.median(values)) for n, values in excess.items()}
    centre = sum(median[n] * steps[n] for n in median) / sum(steps.values())
    # Sizes between two with medians take the offset interpolated between them, sizes past the largest (and
    # below the smallest) the offset of that one: the line's slope carries on from the last median step ...
    sizes = sorted(median)
    table = np.interp(np.arange(1, BATCH_TABLE_SIZES + 1), sizes, [median[n] - centre for n in sizes])
    # ... corrected so that from there a decoding request adds DECODE_STEP_SLOPE prompt tokens' price and its
    # context's, past the table too.
    top = sizes[-1]
    per_request = float(np.median(contexts[top])) / top
    line = model.decode_only_step_us(top + 1, round(per_request * (top + 1))) - model.decode_only_step_us(
        top, round(per_request * top)
    )
    # A fit that priced no prompt token (β1 = 0) has nothing to scale: its line carries on.
    correction = DECODE_STEP_SLOPE * beta[1] + beta[4] * per_request - line if beta[1] > 0 else 0.0
    table[top:] += correction * np.arange(1, BATCH_TABLE_SIZES - top + 1)
    return (*beta[:BATCH_TABLE], *(_clean(float(v)) for v in table), _clean(correction))


# Batch sizes above a floor with a median pure-decode step, for the slope past it. With β7 = β2 (until the
# twelfth session) two let one noisy step set it (day 11's pair: 1.9 ms per request, ~1.3 measured; 2 req/s
# replayed 107 % off) and three sufficed; with β7 free, three let day 11's pair read the step's jump from 6
# to 7 requests as the slope (r20 50 % off), four keep days 8-12's pairs within 7.9-9.2 % E2E (day 13's,
# captured after: 10.1 %; docs/accuracy.md).
FLOOR_SUPPORT = 4
# A floor must lower the fit's robust cost by this fraction against none: on hosts whose steps grow from the
# first request the best floor gains less (days 1, 3, 6, 7 and their leave-one-out folds: the fit stays
# blackbox-ctx's); real floors gained 0.8-11 % (a light-load pair has few steps past its floor).
FLOOR_MIN_GAIN = 0.005
# A floor must add this fraction to the median pure-decode step of the fewest requests: β7 is free, and a floor
# of a few µs per request fits noise (a simulated linear host: 12 µs against 1.5 ms per decoding request).
FLOOR_MIN_LIFT = 0.02


def _prices_pairs(
    form: ModelForm,
    windows: Sequence[WindowRows],
    steps: Sequence[StepRows],
    picks: Sequence[np.ndarray] | None,
    step_picks: Sequence[np.ndarray] | None,
    start: Sequence[float] | None,
    fixed: dict[str, float],
) -> bool:
    """Whether the fit prices prefill attention pairs (β10): as `start` did (bootstrap replicates), else when
    the form's columns, fitted without a floor, price a pair at most PAIR_MAX_TOKEN_SHARE of a prompt token."""
    if start is not None:
        return start[TERM_OF_COLUMN[PAIRS]] > 0
    solved = _solve_columns(
        form.beta_columns, windows, steps, picks, step_picks, tie=form.decode_pays_prefill, fixed=fixed
    )[0]
    per_token, per_pair = solved[form.beta_columns.index("P")], solved[form.beta_columns.index(PAIRS)]
    return per_token > 0 and per_pair <= PAIR_MAX_TOKEN_SHARE * per_token


def model_pair_share(model: str) -> float | None:
    """What one attention (query, key) pair costs in prompt tokens by `model`'s arithmetic: its shipped config's
    FLOPs per pair over FLOPs per prompt token through the weights (the roofline's; 2.7e-4 for the tiny model,
    whose fits that measured pairs found 2.2e-4-6.1e-4); None for a model without a shipped config."""
    shape = shipped_model_shape(model)
    return None if shape is None else shape.attn_flops_per_pair / shape.flops_per_token


def _with_cached_pairs(
    form: ModelForm,
    beta: tuple[float, ...],
    windows: Sequence[WindowRows],
    steps: Sequence[StepRows],
    picks: Sequence[np.ndarray] | None = None,
    step_picks: Sequence[np.ndarray] | None = None,
    pair_share: float | None = None,
) -> tuple[float, ...]:
    """`beta` with β44, the price of a prefill's pair with a prefix-cache hit, in forms that price attention
    pairs: β10 where the (picked) rows have hits (the fit priced those pairs with the others), else
    UNMEASURED_CACHED_PAIR_SHARE·β10 (β10 measured on attention within prompts only), or, where the rows left
    pairs unpriced too (β10 = 0) and the model's `pair_share` is known, that share of a prompt token's price:
    β1 then carries the attention within the fit's prompts, and nothing the one with a cached prefix."""
    if PAIRS not in form.beta_columns:
        return beta
    if _measured("Pctx", windows, steps, picks, step_picks):
        cached = beta[PAIRS_TERM]
    elif beta[PAIRS_TERM] == 0 and pair_share:
        cached = pair_share * beta[1]
    else:
        cached = UNMEASURED_CACHED_PAIR_SHARE * beta[PAIRS_TERM]
    return (*beta, *[0.0] * (CACHED_PAIRS_TERM - len(beta)), cached)


def _measured(
    column: str,
    windows: Sequence[WindowRows],
    steps: Sequence[StepRows],
    picks: Sequence[np.ndarray] | None,
    step_picks: Sequence[np.ndarray] | None,
) -> bool:
    """Whether any (picked) request window or observed step has `column` non-zero."""
    rows = [(w, None if picks is None else picks[i]) for i, w in enumerate(windows)]
    rows += [(s, None if step_picks is None else step_picks[i]) for i, s in enumerate(steps)]
    return any(r.features[column][slice(None) if idx is None else idx].any() for r, idx in rows)


def _lifts(decodes: Sequence[StepRows], k: int, per_request: float) -> bool:
    """Whether a floor at `k` requests costing `per_request` (β7) for each one short of it adds FLOOR_MIN_LIFT
    to the median pure-decode step of the fewest decoding requests in `decodes` (the least over traces)."""
    n, step = min(
        (int(n), us) for rows in decodes for n, us in zip(rows.features["D"], rows.duration_us, strict=True)
    )
    return per_request * max(k - n, 0) >= FLOOR_MIN_LIFT * step


def _supported_floors(decodes: Sequence[StepRows]) -> tuple[int, ...]:
    """The floors a fit may pick: those with at least FLOOR_SUPPORT batch sizes above them among the median
    pure-decode steps (`decodes`); a floor above every observed batch leaves the cost per decoding
    request past it unmeasured (a light-load trace would put it at the largest k and predict heavy load
    badly)."""
    sizes = sorted({int(n) for rows in decodes for n in rows.features["D"]})
    top = sizes[-FLOOR_SUPPORT] if len(sizes) >= FLOOR_SUPPORT else 0
    return tuple(k for k in FLOORS if k < top) or (0,)


def _solve_columns(
    columns: Sequence[str],
    windows: Sequence[WindowRows],
    steps: Sequence[StepRows],
    picks: Sequence[np.ndarray] | None = None,
    step_picks: Sequence[np.ndarray] | None = None,
    start: Sequence[float] | None = None,
    tie: bool = False,
    fixed: dict[str, float] | None = None,
) -> tuple[tuple[float, ...], float]:
    """Coefficients ≥ 0 of `columns` minimising relative errors of every request's mean ITL and of every
    observed prefill step, and the robust cost they reach; with `tie`, the "D" coefficient is at least the
    "P" one (solved as "P" on prompt + decode tokens and "D" for the rest: ModelForm.decode_pays_prefill).
    Columns in `fixed` keep the given coefficient (their part of each row is not solved for).

    Robust (soft-L1 on log ratios): a step whose burst boundary was misread (events of one step split across
    two network reads) gives a wild relative error that must not steer the fit.
    """
    mats, ys = [], []
    for i, w in enumerate(windows):
        idx = picks[i] if picks is not None else slice(None)
        mats.append(w.matrix(columns)[idx])
        ys.append(w.itl_us[idx])
    for i, s in enumerate(steps):
        idx = step_picks[i] if step_picks is not None else slice(None)
        mats.append(s.matrix(columns)[idx])
        ys.append(s.duration_us[idx])
    x, y = np.vstack(mats), np.concatenate(ys)
    keep = y > 0
    a = x[keep] / y[keep, None]
    held = {columns.index(c): v for c, v in (fixed or {}).items() if c in columns}
    given = a[:, list(held)] @ np.asarray(list(held.values())) if held else np.zeros(len(a))
    a[:, list(held)] = 0.0  # unused below: solved as the rest of each row's time
    if tie:
        ip, idd = columns.index("P"), columns.index("D")
        a[:, ip] += a[:, idd]
        if start is not None:
            start = [*start[:idd], max(start[idd] - start[ip], 0.0), *start[idd + 1 :]]
    scale = np.abs(a).max(axis=0)
    used = scale > 0
    if start is None:
        # The linear first guess leaves out rows the fixed columns alone over-explain (a misread step): their
        # negative targets would pull every coefficient to 0, where the log residuals below have no slope.
        room = given < 1.0
        first = np.zeros(a.shape[1])
        first[used] = (
            lsq_linear(a[room][:, used] / scale[used], 1.0 - given[room], bounds=(0.0, np.inf)).x
            / scale[used]
        )
    else:  # warm start (bootstrap replicates start from the point estimate)
        first = np.asarray(start, dtype=float)
    a_used = a[:, used]
    # Log-ratio residuals: a misread step (tiny observed duration) costs a bounded, y-independent gradient.
    sol = least_squares(
        lambda b: np.log(np.maximum(a_used @ b + given, 1e-3)),
        first[used],
        bounds=(0.0, np.inf),
        loss="soft_l1",
        f_scale=0.2,
        x_scale=1.0 / scale[used],
    )
    beta = np.zeros(a.shape[1])
    beta[used] = sol.x
    beta[list(held)] = list(held.values())
    if tie:
        beta[idd] += beta[ip]
    return tuple(_clean(v) for v in beta), float(sol.cost)


def _solve_alpha(
    form: ModelForm,
    beta: Sequence[float],
    prefills: Sequence[PrefillRows],
    rtts: Sequence[int],
    picks: Sequence[np.ndarray] | None = None,
) -> tuple[float, float, float]:
    """α0 + α1·L = time outside the engine over idle-engine requests (α ≥ 0, robust): TTFT minus vLLM's
    reported queue and scheduled→first-token times when the traces have them, else TTFT − RTT − the prefill
    step β predicts. α1 only from the former: the latter's slope in L is β's error on long prompts (another
    tool's traces: α1 up to 22 µs/token where vLLM's times say 0-2), which α1·L then charged to every prompt
    token, cached ones too (docs/accuracy.md, twenty-fifth session); α0 alone is fitted to them then."""
    ls, ys = [], []
    for i, pr in enumerate(prefills):
        idx = picks[i] if picks is not None else slice(None)
        step = pr.matrix(form.beta_columns)[idx] @ np.asarray([beta[t] for t in form.terms])  # no decodes
        modelled = pr.ttft_us[idx] - rtts[i] - step
        measured = pr.outside_us[idx] - rtts[i]
        ys.append(np.where(np.isnan(measured), modelled, measured))
        ls.append(pr.prompt_tokens[idx])
    y, lengths = np.concatenate(ys), np.concatenate(ls)
    if y.size >= 5:
        slope = _has_vllm_times(prefills) and np.ptp(lengths) > 0
        a = np.column_stack([np.ones(y.size), lengths])[:, : 2 if slope else 1]
        start = np.array([max(float(np.median(y)), 0.0), 0.0])[: a.shape[1]]
        sol = least_squares(
            lambda c: a @ c - y,
            start,
            bounds=(0.0, np.inf),
            loss="soft_l1",
            f_scale=5_000.0,
            x_scale=[1e4, 10.0][: a.shape[1]],
        )
        return (_clean(sol.x[0]), _clean(sol.x[1]) if slope else 0.0, 0.0)
    if y.size:
        return (max(float(np.median(y)), 0.0), 0.0, 0.0)
    return (0.0, 0.0, 0.0)


def _has_vllm_times(prefills: Sequence[PrefillRows]) -> bool:
    """Whether any idle-engine request has vLLM's own queue and scheduled→first-token times."""
    return any(np.any(~np.isnan(p.outside_us)) for p in prefills)


def _clean(value: float) -> float:
    """Solver dust (|x| < 1e-6 µs) is zero."""
    return 0.0 if abs(value) < 1e-6 else float(value)


def direct_estimate(
    traces: Sequence[NamedTrace], form: ModelForm, rtt_us: int | None = None, pair_share: float | None = None
) -> tuple[tuple[float, float, float], tuple[float, ...]]:
    """α and β from per-chunk timestamps alone (no simulation); `pair_share` as `fit`'s."""
    rows = _collect(traces, rtt_us)
    return _direct(rows, _identifiable(form, rows), pair_share)


def _direct(
    rows: _Rows, form: ModelForm, pair_share: float | None = None
) -> tuple[tuple[float, float, float], tuple[float, ...]]:
    beta = _with_cached_pairs(
        form,
        _solve_beta(form, rows.windows, rows.steps, rows.decodes, context_price=rows.context_price),
        rows.windows,
        rows.steps,
        pair_share=pair_share,
    )
    return _solve_alpha(form, beta, rows.prefills, rows.rtts), beta


def _time_blocks(send_us: np.ndarray, blocks: int) -> list[np.ndarray]:
    """Indices of rows split into `blocks` contiguous groups by send time (for the block bootstrap)."""
    order = np.argsort(send_us, kind="stable")
    return [b for b in np.array_split(order, min(blocks, max(len(order), 1))) if b.size]


def _resample(rng: np.random.Generator, blocks: list[np.ndarray]) -> np.ndarray:
    if not blocks:
        return np.zeros(0, dtype=int)
    return np.concatenate([blocks[c] for c in rng.integers(0, len(blocks), size=len(blocks))])


def bootstrap_coefficients(
    traces: Sequence[NamedTrace],
    form: ModelForm,
    *,
    replicates: int = 200,
    blocks: int = 20,
    seed: int = 0,
    rtt_us: int | None = None,
) -> np.ndarray:
    """Direct estimates on block-resampled requests: an array (replicates, 3 + len(beta))."""
    rows = _collect(traces, rtt_us)
    form = _identifiable(form, rows)
    return _bootstrap(rows, form, replicates, blocks, seed, _direct(rows, form)[1])


def _bootstrap(
    rows: _Rows,
    form: ModelForm,
    replicates: int,
    blocks: int,
    seed: int,
    start: Sequence[float],
    pair_share: float | None = None,
) -> np.ndarray:
    """Two-level bootstrap: with several traces, resample whole traces first (captures of the same server at
    other times differ by more than their sampling noise: machine load, contention), then time blocks of
    requests within each chosen trace; `pair_share` as `fit`'s."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA1]))
    win_blocks = [_time_blocks(w.send_us, blocks) for w in rows.windows]
    step_blocks = [_time_blocks(s.send_us, blocks) for s in rows.steps]
    n = len(rows.windows)
    out = []
    for _ in range(replicates):
        chosen = rng.integers(0, n, size=n) if n > 1 else np.zeros(1, dtype=int)
        windows = [rows.windows[c] for c in chosen]
        steps = [rows.steps[c] for c in chosen]
        decodes = [rows.decodes[c] for c in chosen]
        prefills = [rows.prefills[c] for c in chosen]
        rtts = [rows.rtts[c] for c in chosen]
        picks = [_resample(rng, win_blocks[c]) for c in chosen]
        step_picks = [_resample(rng, step_blocks[c]) for c in chosen]
        pre_picks = [rng.integers(0, len(p.ttft_us), size=len(p.ttft_us)) for p in prefills]
        price = _redrawn_context_price(rng, [rows.drifts[c] for c in chosen])
        beta = _with_cached_pairs(
            form,
            _solve_beta(form, windows, steps, decodes, picks, step_picks, start, price),
            windows,
            steps,
            picks,
            step_picks,
            pair_share,
        )
        alpha = _solve_alpha(form, beta, prefills, rtts, pre_picks)
        out.append((*alpha, *beta))
    return np.asarray(out, dtype=float)


def _redrawn_context_price(rng: np.random.Generator, drifts: Sequence[SpeedDrift | None]) -> float | None:
    """β4 of a bootstrap replicate: each drawn trace's price moved by how far the weighted mean of its run's
    parts, redrawn with replacement, lies from that of all of them (a time-block bootstrap within the run)."""
    prices = []
    for d in drifts:
        if d is None:
            continue
        drawn = [d.context_parts[i] for i in rng.integers(0, len(d.context_parts), size=len(d.context_parts))]
        whole, redrawn = decode_context_price(d.context_parts), decode_context_price(drawn)
        shift = redrawn - whole if whole is not None and redrawn is not None else 0.0
        prices.append((max(d.context_price[0] + shift, 0.0), d.context_price[1]))
    return decode_context_price(prices)


# ---------------------------------------------------------------------------------------------- refine


def trace_simulator(session_mode: str = DEFAULT_SESSION_MODE) -> Simulator:
    """Replays of a trace in the simulator with given coefficients (server settings from its header), rows
    that answer an earlier row sent as `session_mode` says (replay.session_modes)."""
    from blis_cal.calibrate.sim_bridge import replay_with

    session_modes.get(session_mode)  # fail before any fitting

    def simulator(trace: Trace, form: ModelForm, alpha, beta) -> Sequence[ResultLike]:
        return replay_with(trace, form.latency_model, alpha, beta, session_mode)

    return simulator


def loss_of(reports: Sequence[ComparisonReport], weights: dict[str, float] = METRIC_WEIGHTS) -> float:
    """Mean over traces of the weighted mean MAPE of TTFT, ITL and E2E."""
    per_trace = []
    for rep in reports:
        num = sum(w * rep.mape(m) for m, w in weights.items() if m in rep.metrics)
        den = sum(w for m, w in weights.items() if m in rep.metrics)
        per_trace.append(num / den if den else math.inf)
    return float(np.mean(per_trace)) if per_trace else math.inf


def evaluate(
    traces: Sequence[NamedTrace],
    form: ModelForm,
    alpha: Sequence[float],
    beta: Sequence[float],
    simulator: Simulator,
    rtt_us: int | None = None,
) -> list[ComparisonReport]:
    """Replay every trace with the coefficients and compare with what was observed."""
    return [
        compare(
            nt.trace,
            simulator(nt.trace, form, tuple(alpha), tuple(beta)),
            rtt_us=rtt_us,
            trace_name=nt.name,
            diagnostics=nt.diagnostics(),
        )
        for nt in traces
    ]


def refined_coefficients(base: np.ndarray, theta: Sequence[float], form: ModelForm) -> np.ndarray:
    """α + β (`base`, one array) moved by the refinement's θ: every β × e^θ0, α0 + θ1 × ALPHA0_STEP_US, the
    prefill terms × e^θ2 (in forms with β2 ≥ β1, β2 lifted to β1 when the prefill scale passes it)."""
    c = np.asarray(base, dtype=float).copy()
    c[0] = max(c[0] + ALPHA0_STEP_US * theta[1], 0.0)
    c[3:] *= np.exp(theta[0])
    terms = [TERM_OF_COLUMN[col] for col in form.beta_columns if col in PREFILL_COLUMNS]
    if PAIRS in form.beta_columns:
        terms.append(CACHED_PAIRS_TERM)  # β44 moves with β10
    c[[3 + t for t in terms]] *= np.exp(theta[2])
    if form.decode_pays_prefill:
        c[3 + 2] = max(c[3 + 2], c[3 + 1])
    return c


def fit(
    traces: Sequence[NamedTrace],
    *,
    model_form: str = "blackbox",
    refine: bool = True,
    max_evaluations: int = 12,
    bootstrap: int = 200,
    prediction_draws: int = 0,
    seed: int = 0,
    rtt_us: int | None = None,
    simulator: Simulator | None = None,
    progress: Callable[[str], None] | None = None,
    pair_share: float | None = None,
) -> FitResult:
    """Fit one α/β set jointly over `traces`; see the module docstring for the method. `pair_share`: what an
    attention pair costs in prompt tokens by the model's arithmetic (`model_pair_share`), the price of a pair
    with a cached token where the traces have no prefix hit and leave pairs unpriced (without it, none)."""
    if not traces:
        raise CalibrationError("no traces to fit on")
    if max_evaluations < 0 or bootstrap < 0 or prediction_draws < 0:
        raise ConfigError("max_evaluations, bootstrap and prediction_draws must be >= 0")
    form = model_forms.get(model_form)
    sim = simulator or trace_simulator()
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    rows = _collect(traces, rtt_us)
    measurable = _identifiable(form, rows)
    one_length = measurable.beta_columns != form.beta_columns
    form = measurable
    alpha0, beta0 = _direct(rows, form, pair_share)
    say(f"direct estimate: alpha={_fmt(alpha0)} beta={_fmt(beta0)}")
    base = np.asarray((*alpha0, *beta0), dtype=float)
    # The refinement moves three things the direct estimate measures least well: the overall step-time scale
    # (every β × e^θ0; near saturation a 3 % change swings E2E by ~10 %, and queueing feedback is only visible
    # in the simulation), the fixed overhead outside the engine α0 (θ1 in units of 10 ms) and the prefill
    # terms against the decode ones (× e^θ2; TTFT is mostly prefill, ITL mostly decode).
    evaluations = 0
    best: dict[str, Any] = {}

    def objective(theta: np.ndarray) -> float:
        nonlocal evaluations
        c = refined_coefficients(base, theta, form)
        reports = evaluate(traces, form, c[:3], c[3:], sim, rtt_us)
        value = loss_of(reports)
        evaluations += 1
        if not best or value < best["loss"]:
            best.update(loss=value, coeffs=c, reports=reports)
        return value

    direct_loss = objective(np.zeros(3))
    say(f"direct estimate loss {direct_loss:.4f}")
    method = "direct (per-request decode windows + observed prefill steps, robust bounded least squares)"
    if form.floor:
        method = method.replace("prefill steps", "prefill steps + median pure-decode step per batch size")
        method += f", floor {floor_of(beta0)} requests of 0-{FLOORS[-1]}"
    if form.batch_table:
        method += (
            f", offsets of pure-decode steps of 1-{BATCH_TABLE_SIZES} requests (medians over the line, centred, "
            f"interpolated between sizes seen, past the largest {DECODE_STEP_SLOPE:g}·β1 per request "
            "besides context)"
        )
    # Below 0.1 % mean MAPE the direct estimate already reproduces the traces (e.g. simulated ones).
    if refine and max_evaluations > 1 and direct_loss > 1e-3:
        # The evaluation cap (not a clock) bounds the time, so results stay deterministic.
        simplex = np.array([[0.0, 0.0, 0.0], [0.03, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.05]])
        minimize(
            objective,
            simplex[0],
            method="Nelder-Mead",
            options={"maxfev": max_evaluations - 1, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-4},
        )
        method += (
            " + simulation-in-the-loop Nelder-Mead (β scale, prefill scale, α0) on mean TTFT/ITL/E2E MAPE"
        )
    say(f"refined loss {best['loss']:.4f} after {evaluations} replays")
    final, loss, reports = best["coeffs"], best["loss"], best["reports"]
    result = FitResult(
        model_form=form.name,
        alpha=tuple(float(x) for x in final[:3]),
        beta=tuple(float(x) for x in final[3:]),
        direct_alpha=alpha0,
        direct_beta=beta0,
        loss=float(loss),
        direct_loss=float(direct_loss),
        traces=[nt.name for nt in traces],
        num_requests=sum(r.trace_info["compared"] for r in reports),
        decode_medians={
            nt.name: [
                (int(n), float(us), float(ctx / n))
                for n, us, ctx in zip(d.features["D"], d.duration_us, d.features["Dctx"], strict=True)
            ]
            for nt, d in zip(traces, rows.decodes, strict=True)
        },
        evaluations=evaluations,
        method=method,
        reports={nt.name: rep for nt, rep in zip(traces, reports, strict=True)},
    )
    _note_step_ratios(result, traces, form)
    if result.decode_batch_max < LIGHT_LOAD_BATCH:
        # A light load measures β4 on short contexts too (day 44's pair: 0.68 µs, its long prompts at 64
        # requests ran 1.67× the pair's steps; docs/accuracy.md, thirty-seventh session).
        result.notes.append(
            f"the fit's traces decoded at most {result.decode_batch_max} requests at once (batch sizes seen in "
            f"{DECODE_STEPS_MIN}+ pure-decode steps) with ~{result.decode_context_max:,} tokens of context each at most (a "
            "size's mean): the step cost of larger batches is extrapolated "
            f"({DECODE_STEP_SLOPE:g}·β1 per decoding request besides its context, which β4 prices as measured "
            "on those contexts; see the β intervals); for heavier loads or longer contexts, fit with a trace "
            "that keeps more requests in flight too (a higher rate or a closed loop) and one with long prompts "
            "or answers"
        )
    if not _has_vllm_times(rows.prefills):
        result.notes.append(
            "the traces have none of vLLM's per-request queue and scheduled→first-token times (`blis observe` "
            "records them from a server started with --enable-per-request-metrics), so α1 = 0 and α0 carries "
            "all of a TTFT outside the engine steps: without them, time per prompt token outside the engine "
            "cannot be told from the prefill's"
        )
    if one_length:
        result.notes.append(
            f"the fit's prompts are all about one length (new tokens spread {rows.prompt_spread:.1%} of their "
            "mean), so a price per prefill (β5) or per attention pair (β10) cannot be told from the per-token price: "
            "prompts are priced per token only (β5 = β10 = 0); prompts of other lengths are predicted at that "
            "price, so to price them, fit with prompts of widely different lengths too"
        )
    if PAIRS in form.beta_columns and beta0[TERM_OF_COLUMN[PAIRS]] == 0:
        result.notes.append(
            "prefill attention is not priced (β10 = 0): the traces show none, or their prompt lengths and cached "
            "prefixes did not measure it apart from the per-token price (priced, a pair cost more than "
            f"{PAIR_MAX_TOKEN_SHARE:g} of a prompt token); prompts much longer than the fit's are predicted at "
            "their per-token price, "
            "so to price it, fit with prompts of widely different lengths too"
        )
    if PAIRS in form.beta_columns and not _measured("Pctx", rows.windows, rows.steps, None, None):
        if beta0[TERM_OF_COLUMN[PAIRS]] > 0:
            price = (
                f": a pair of a prompt token with a cached one is priced at {UNMEASURED_CACHED_PAIR_SHARE:g} of a pair "
                f"within a prompt (β44 = {UNMEASURED_CACHED_PAIR_SHARE:g}·β10), about the median of what fits that "
                "measured both found on vLLM's CPU build (0.30-1.15)"
            )
        elif beta0[CACHED_PAIRS_TERM] > 0:
            price = (
                f": a pair of a prompt token with a cached one is priced by the model's arithmetic at {pair_share:.3g} "
                "of a prompt token (β44: a pair's FLOPs over a prompt token's)"
            )
        else:
            price = " and they are priced at 0: prompts behind a cached prefix are predicted too fast"
        result.notes.append(
            "the fit's traces have no prefix-cache hits, so nothing measured what a prefill's cached tokens cost"
            + price
            + "; for shared system prompts or chat sessions, fit with a trace that has prefix hits too"
        )
    if bootstrap:
        boot = _bootstrap(rows, form, bootstrap, 20, seed, beta0, pair_share)
        # Carry each replicate through the refinement (β multipliers, α0 shift), then take 2.5–97.5 %.
        scaled = boot.copy()
        scaled[:, 0] = np.maximum(scaled[:, 0] + final[0] - base[0], 0.0)
        scaled[:, 3:] *= final[3:] / np.where(base[3:] != 0, base[3:], 1.0)  # β11-β43 may be negative
        lo, hi = np.percentile(scaled, 2.5, axis=0), np.percentile(scaled, 97.5, axis=0)
        result.alpha_ci = [(float(lo[i]), float(hi[i])) for i in range(3)]
        result.beta_ci = [(float(lo[i]), float(hi[i])) for i in range(3, len(base))]
        if prediction_draws:
            result.prediction_intervals = prediction_intervals(
                traces, form, scaled, draws=prediction_draws, seed=seed, simulator=sim, rtt_us=rtt_us
            )
    result.fit_seconds = time.perf_counter() - started
    return result


def _note_step_ratios(result: FitResult, traces: Sequence[NamedTrace], form: ModelForm) -> None:
    """Each fitted trace's `decode_step_ratio` (and `prefill_step_ratio`) against the fitted coefficients in its
    report, and a note for one whose decode steps are off by more than SPEED_NOTE_TOLERANCE: traces from
    different hosts or hours, which the fit averages."""
    model = form.latency(result.alpha, result.beta)
    for nt in traces:
        ratios = step_ratios(nt.diagnostics(), model)
        for kind, (value, _) in ratios.items():
            result.reports[nt.name].trace_info[f"{kind}_step_ratio"] = round(value, 4)
        ratio = ratios.get("decode")
        if ratio is not None and abs(ratio[0] - 1) > SPEED_NOTE_TOLERANCE:
            result.notes.append(
                f"{nt.name}: its decode steps took {ratio[0]:.2f}× what the fitted coefficients say for their batch "
                f"sizes and contexts (median of {ratio[1]} steps): the fit's traces ran at different speeds "
                "(another machine, other work on it, or another hour) and the coefficients average them; fit on "
                "traces captured close together in time"
            )


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def prediction_intervals(
    traces: Sequence[NamedTrace],
    form: ModelForm,
    coefficient_draws: np.ndarray,
    *,
    draws: int = 10,
    seed: int = 0,
    simulator: Simulator | None = None,
    rtt_us: int | None = None,
) -> dict[str, Any]:
    """95 % intervals for p50/p99 TTFT and E2E per trace: replays with `draws` coefficient sets drawn from the
    bootstrap, each summarised over block-resampled requests (coefficient and sampling uncertainty)."""
    sim = simulator or trace_simulator()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9E1]))
    picks = rng.choice(len(coefficient_draws), size=min(draws, len(coefficient_draws)), replace=False)
    samples: dict[str, dict[str, list[float]]] = {nt.name: {} for nt in traces}
    for k in picks:
        c = coefficient_draws[k]
        for nt, rep in zip(traces, evaluate(traces, form, c[:3], c[3:], sim, rtt_us), strict=True):
            for metric in ("ttft", "e2e"):
                sim_values = rep.pairs.arrays(metric)[1]
                blocks = _time_blocks(np.asarray(rep.pairs.send_us), 20)
                for _ in range(5):
                    chosen = rng.integers(0, len(blocks), size=len(blocks))
                    values = sim_values[np.concatenate([blocks[c] for c in chosen])]
                    for p in (50, 99):
                        samples[nt.name].setdefault(f"{metric}_p{p}", []).append(percentile(values, p))
    out: dict[str, Any] = {}
    for nt in traces:
        recs = ok_records(nt.trace)
        observed = {"ttft": [r.ttft_us for r in recs], "e2e": [r.e2e_us for r in recs]}
        out[nt.name] = {}
        for key, values in samples[nt.name].items():
            metric, p = key.split("_p")
            out[nt.name][key + "_ms"] = {
                "lo": round(percentile(values, 2.5) / 1000, 3),
                "hi": round(percentile(values, 97.5) / 1000, 3),
                "observed": round(percentile(observed[metric], int(p)) / 1000, 3),
            }
    return out
