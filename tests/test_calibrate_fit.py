"""Fitting α/β: parameter recovery on simulated traces, determinism, intervals, and the real traces."""

import dataclasses
import json

import numpy as np
import pytest
import yaml
from blis_sessions import as_blis_users
from conftest import TRACES
from typer.testing import CliRunner

from blis_cal.calibrate import CalibrationError, NamedTrace, direct_estimate, fit, model_forms
from blis_cal.calibrate.features import (
    DECODE_STEPS_MIN,
    EVENT_COLUMNS,
    _events,
    decode_step_rows,
    estimate_cached_tokens,
    idle_prefill_rows,
    prefill_step_rows,
    window_rows,
)
from blis_cal.calibrate.fit import (
    DECODE_STEP_SLOPE,
    FLOOR_SUPPORT,
    LIGHT_LOAD_BATCH,
    PAIR_MAX_TOKEN_SHARE,
    PAIRS,
    UNMEASURED_CACHED_PAIR_SHARE,
    _collect,
    _solve_columns,
    bootstrap_coefficients,
    decode_context_price,
    floor_of,
    model_pair_share,
    refined_coefficients,
    with_batch_table,
)
from blis_cal.calibrate.synthetic import poisson_requests, simulated_trace
from blis_cal.cli import app
from blis_cal.errors import ConfigError
from blis_cal.simulate import BlackboxModel, SimConfig
from blis_cal.simulate.latency import BATCH_TABLE, BATCH_TABLE_SIZES, BETA_TERMS, StepBatch, attention_pairs
from blis_cal.simulate.request import SimRequest
from blis_cal.trace import ok_records, read_trace
from blis_cal.trace_analysis import DecodeStep, decode_steps

CONFIG = SimConfig(
    block_size=16, num_gpu_blocks=8192, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=4096
)
ALPHA = (3000.0, 1.5, 0.0)  # α2 is not separable from α0 by latencies; the fit keeps it 0
BETA = (6000.0, 20.0, 150.0)


@pytest.fixture(scope="module")
def synthetic():
    return [
        NamedTrace(
            "syn1", simulated_trace(poisson_requests(200, 6.0, seed=1), CONFIG, BlackboxModel(ALPHA, BETA))
        ),
        NamedTrace(
            "syn2", simulated_trace(poisson_requests(150, 3.0, seed=2), CONFIG, BlackboxModel(ALPHA, BETA))
        ),
    ]


def assert_within(fitted, truth, rel=0.02):
    for got, want in zip(fitted, truth, strict=True):
        assert got == pytest.approx(want, rel=rel, abs=1e-6), (fitted, truth)


def simulated(beta, **requests) -> list[NamedTrace]:
    """A trace per keyword, its requests simulated with ALPHA and `beta`."""
    model = BlackboxModel(ALPHA, beta)
    return [NamedTrace(name, simulated_trace(reqs, CONFIG, model)) for name, reqs in requests.items()]


def test_parameter_recovery_3_plus_3(synthetic):
    result = fit(synthetic, bootstrap=0, max_evaluations=10)
    assert_within(result.alpha, ALPHA)
    assert_within(result.beta, BETA)
    assert result.loss < 0.01
    assert result.num_requests == 350


def test_parameter_recovery_extended_form_with_prefix_caching():
    """Cached prefixes (priced through the pairs their tokens make with each new prompt token: β3 = 0 where β10
    is priced), decoding requests sharing a prefix's blocks, which a step reads once (β9 = 0), and the
    prefills' attention pairs (β10: ~6 % of a 512-token prompt's price, as on vLLM's CPU build)."""
    beta = (6000.0, 20.0, 150.0, 0.0, 0.5, 400.0, 0.0, 0.0, 0.0, 0.0, 0.005)
    traces = simulated(
        beta,
        plain=poisson_requests(150, 6.0, seed=3),
        prefix=poisson_requests(150, 6.0, seed=4, prefix_groups=3, prefix_length=512),
    )
    alpha, fitted = direct_estimate(traces, model_forms.get("blackbox-ctx"))
    assert_within(alpha, ALPHA)
    assert_within(fitted[:11], beta)
    assert fitted[11:44] == (0.0,) * 33 and fitted[44] == fitted[10]  # hits measured: cached pairs at β10
    result = fit(traces, model_form="blackbox-ctx", bootstrap=0, max_evaluations=0)
    assert not any("prefill attention" in note or "cached" in note for note in result.notes)


def test_without_prefix_hits_a_pair_with_a_cached_token_is_priced_at_the_measured_share():
    """Traces with no prefix-cache hits measure β10 on pairs within prompts only, which fits that saw both
    measured dearer than pairs with cached tokens: β44 = UNMEASURED_CACHED_PAIR_SHARE·β10, with a note; the
    simulator then prices a prompt behind a cached prefix that way."""
    beta = (6000.0, 20.0, 150.0, 0.0, 0.5, 400.0, 0.0, 0.0, 0.0, 0.0, 0.005)
    traces = [
        NamedTrace(
            "plain",
            simulated_trace(poisson_requests(150, 6.0, seed=3), CONFIG, BlackboxModel(ALPHA, beta)),
        )
    ]
    for form in ("blackbox-ctx", "blackbox-table"):
        fitted = direct_estimate(traces, model_forms.get(form))[1]
        assert len(fitted) == len(BETA_TERMS) and fitted[10] > 0
        assert fitted[44] == pytest.approx(UNMEASURED_CACHED_PAIR_SHARE * fitted[10])
    result = fit(traces, model_form="blackbox-ctx", bootstrap=0, max_evaluations=0)
    assert any(f"{UNMEASURED_CACHED_PAIR_SHARE:g} of a pair within a prompt" in note for note in result.notes)
    assert len(direct_estimate(traces, model_forms.get("blackbox"))[1]) == 3  # BLIS's 3+3 layout kept


def test_a_cached_token_is_not_priced_twice_where_pairs_are_priced(trace_a, trace_c):
    """Shared A + C: C's cached prefixes are all 768 tokens, so a price per cached token (β3) there is a constant
    per prefill; with the prefills' pairs priced (n·c of them with the cache) it counted them twice (52 µs per
    cached token against 0-4 µs on days 20-26) and over-predicted other hosts' prefix traces (docs/accuracy.md)."""
    traces = [NamedTrace("A", read_trace(trace_a)), NamedTrace("C", read_trace(trace_c))]
    for form in ("blackbox-ctx", "blackbox-table"):
        fitted = direct_estimate(traces, model_forms.get(form))[1]
        assert fitted[10] > 0 and fitted[3] == 0.0, (form, fitted)
    rows = _collect(traces, None)
    with_cached = ("const", "P", "D", "Pctx", "Dctx", "Np", PAIRS)
    both = _solve_columns(with_cached, rows.windows, rows.steps, tie=True)[0]
    assert both[with_cached.index("Pctx")] > 10 * 4.0  # what leaving β3 out keeps out


def test_one_cached_prefix_length_prices_a_prefill_for_prompts_without_one(trace_a, trace_c):
    """Shared C alone: every prompt sits behind the same 768-token prefix and the pairs go unpriced, so a price
    per cached token (β3) was a constant per prefill the solver took from β5 (119 µs per cached token, β5 = 0),
    and A's prompts, with no cache, were priced 28 % short on an idle engine (C → A: 30.3 % TTFT MAPE). With β3
    left out, the constant is β5's, which every prefill pays: A's idle-engine TTFTs within 15 %."""
    alpha, beta = direct_estimate([NamedTrace("C", read_trace(trace_c))], model_forms.get("blackbox-table"))
    assert beta[3] == 0.0 and beta[10] == 0.0 and beta[5] > 0
    model = BlackboxModel(alpha, beta)
    idle = idle_prefill_rows(read_trace(trace_a))
    predicted = [
        model.queue_delay_us(int(p))
        + model.step_time_us(StepBatch(int(p), 0, 1, 0, 0, 0, attention_pairs(int(p), 0)))
        for p in idle.prompt_tokens
    ]
    assert len(predicted) >= 5
    assert 0.85 <= float(np.median(np.asarray(predicted) / idle.ttft_us)) <= 1.15


def test_model_pair_share_is_a_pairs_flops_over_a_prompt_tokens():
    # The tiny model (hidden 512, 8 layers, 8 heads of 64, 4 KV heads, gated MLP of 2,048): a pair is QK and PV
    # over every head plus the softmax; a prompt token goes through q, k, v, o and the MLP (the LM head is per
    # request).
    pair = (4 * 8 * 64 + 5 * 8) * 8
    token = 2 * (512 * (512 + 2 * 4 * 64) + 512 * 512 + 3 * 512 * 2048) * 8
    assert model_pair_share("tiny") == pytest.approx(pair / token)
    assert (
        model_pair_share("meta-llama/Llama-3.1-8B-Instruct") < model_pair_share("tiny") / 5
    )  # wider per layer
    assert model_pair_share("no-such-model") is None


def test_without_hits_or_priced_pairs_a_pair_with_a_cache_takes_the_models_arithmetic(trace_a, trace_c):
    """Shared A alone cannot tell pairs from tokens (β1 carries the attention within its prompts) and has no
    prefix hits, so nothing priced a pair with a cached token: C's prompts behind a 768-token prefix were
    predicted at 0.80× their idle-engine TTFT (A → C 23.1 % TTFT). Priced at the tiny model's arithmetic (β44):
    within 15 %. The bootstrap keeps that price to β1's."""
    share = model_pair_share("tiny")
    traces = [NamedTrace("A", read_trace(trace_a))]
    assert direct_estimate(traces, model_forms.get("blackbox-table"))[1][44] == 0.0
    alpha, beta = direct_estimate(traces, model_forms.get("blackbox-table"), pair_share=share)
    assert beta[10] == 0.0 and beta[44] == pytest.approx(share * beta[1]) and beta[44] > 0
    model = BlackboxModel(alpha, beta)
    idle = idle_prefill_rows(read_trace(trace_c))
    f = idle.features
    predicted = [
        model.queue_delay_us(int(total))
        + model.step_time_us(StepBatch(int(p), 0, 1, 0, int(c), 0, int(pairs), 0, int(p * c)))
        for total, p, c, pairs in zip(idle.prompt_tokens, f["P"], f["Pctx"], f["Ppairs"], strict=True)
    ]
    assert len(predicted) >= 10 and f["Pctx"].min() == 768
    assert 0.85 <= float(np.median(np.asarray(predicted) / idle.ttft_us)) <= 1.15
    result = fit(traces, model_form="blackbox-table", bootstrap=20, max_evaluations=0, pair_share=share)
    assert any(f"model's arithmetic at {share:.3g} of a prompt token" in note for note in result.notes)
    (lo, hi), (lo1, hi1) = result.beta_ci[44], result.beta_ci[1]
    assert lo == pytest.approx(share * lo1) and hi == pytest.approx(share * hi1)
    with_hits = direct_estimate(
        [*traces, NamedTrace("C", read_trace(trace_c))], model_forms.get("blackbox-table")
    )
    assert (
        direct_estimate(
            [*traces, NamedTrace("C", read_trace(trace_c))],
            model_forms.get("blackbox-table"),
            pair_share=share,
        )
        == with_hits
    )  # hits measured: the traces' price, not the arithmetic


def test_prompts_of_one_length_are_priced_per_token_only():
    """Fixed-length prompts (a common benchmark setting) cannot tell a price per prefill (β5) or per pair (β10)
    from the per-token one: the extended form split a 512-token prefill between β1 (2.5 µs against 1,130) and
    β5 (582 ms) and priced a 128-token prompt 3.75× its true step. Such fits price prompts per token, say so, and
    recover β1."""
    beta = (16500.0, 1130.0, 2500.0)
    fixed = [
        SimRequest(r.request_id, r.arrival_us, 512, r.output_len, ((f"req:{r.request_id}", 512),))
        for r in poisson_requests(300, 3.0, seed=5)
    ]
    traces = [NamedTrace("fixed", simulated_trace(fixed, CONFIG, BlackboxModel(ALPHA, beta)))]
    alpha, fitted = direct_estimate(traces, model_forms.get("blackbox-table"))
    assert fitted[5] == fitted[10] == 0.0
    assert fitted[1] == pytest.approx(beta[1], rel=0.02)
    true, model = BlackboxModel(ALPHA, beta), BlackboxModel(alpha, fitted)
    for prompt in (128, 1500):
        batch = StepBatch(prompt, 0, 1, 0, 0, 0, attention_pairs(prompt, 0))
        assert model.step_time_us(batch) == pytest.approx(true.step_time_us(batch), rel=0.05)
    result = fit(traces, model_form="blackbox-table", bootstrap=5, max_evaluations=0)
    assert any("all about one length (new tokens spread 0.0% of their mean)" in note for note in result.notes)
    assert result.beta_ci[5] == (0.0, 0.0) and result.beta_ci[10] == (0.0, 0.0)


def test_attention_pairs_are_not_priced_where_prompts_cannot_tell_them_from_tokens(trace_a):
    """Shared A alone (prompts of 43-497 tokens, no cached prefix): priced freely, a pair would cost more than
    PAIR_MAX_TOKEN_SHARE of a prompt token (9× what day 13's probes measure); the fit keeps the linear prefill
    price instead."""
    traces = [NamedTrace("A", read_trace(trace_a))]
    rows = _collect(traces, None)
    ctx = model_forms.get("blackbox-ctx")
    tie, fixed = ctx.decode_pays_prefill, {"Dctx": rows.context_price}
    free = _solve_columns(ctx.beta_columns, rows.windows, rows.steps, tie=tie, fixed=fixed)[0]
    linear = _solve_columns(ctx.without(PAIRS).beta_columns, rows.windows, rows.steps, tie=tie, fixed=fixed)[
        0
    ]
    assert free[ctx.beta_columns.index(PAIRS)] > PAIR_MAX_TOKEN_SHARE * free[1] > 0
    for form in ("blackbox-ctx", "blackbox-floor"):
        fitted = direct_estimate(traces, model_forms.get(form))[1]
        assert fitted[10] == 0.0 and fitted[1] == pytest.approx(linear[1])
    result = fit(traces, model_form="blackbox-floor", bootstrap=0, max_evaluations=0)
    assert any("prefill attention is not priced" in note for note in result.notes)


def test_attention_pairs_of_long_prompts_are_priced_however_far_they_move_the_token_price():
    """~1,800-token prompts beside ~250-token ones, a pair at 4e-4 of a prompt token (vLLM's CPU build: 2.2e-4 to
    6.1e-4): the pairs take over a quarter of a long prompt's prefill, so pricing them moves β1 far (day 33's
    captures: 20 %), and the fit prices them, both back within 2 %."""
    beta = (6000.0, 20.0, 150.0, 0.0, 0.5, 400.0, 0.0, 0.0, 0.0, 0.0, 0.008)
    traces = simulated(
        beta,
        short=poisson_requests(150, 4.0, seed=3),
        long=poisson_requests(100, 1.0, seed=8, input_mean=1800, max_input=3500),
    )
    rows = _collect(traces, None)
    ctx = model_forms.get("blackbox-ctx")
    tie, fixed = ctx.decode_pays_prefill, {"Dctx": rows.context_price}
    linear = _solve_columns(ctx.without(PAIRS).beta_columns, rows.windows, rows.steps, tie=tie, fixed=fixed)[
        0
    ]
    fitted = direct_estimate(traces, ctx)[1]
    assert fitted[1] < 0.85 * linear[1]  # the shift the former rule refused
    assert fitted[1] == pytest.approx(beta[1], rel=0.02) and fitted[10] == pytest.approx(beta[10], rel=0.02)


def test_decode_context_is_priced_from_pure_decode_steps_of_one_batch_size():
    """β4 is the traces' typical pure-decode step's price per context token (`SpeedDrift.context_price`: steps
    of one batch size compared with each other), weighted by how widely their contexts spread; bootstrap
    replicates move each drawn trace's price as its run's parts, redrawn, move, so one trace gives an interval."""
    assert decode_context_price([(1.0, 1.0), (3.0, 3.0)]) == 2.5
    assert decode_context_price([(5.0, 0.0)]) is None and decode_context_price([]) is None
    beta = (6000.0, 20.0, 150.0, 0.0, 0.5, 400.0)
    traces = simulated(beta, r6=poisson_requests(150, 6.0, seed=3), r3=poisson_requests(150, 3.0, seed=5))
    drifts = [t.diagnostics().drift for t in traces]
    assert all(d is not None and d.context_price[1] > 0 and len(d.context_parts) == 4 for d in drifts)
    fitted = direct_estimate(traces, model_forms.get("blackbox-ctx"))[1]
    assert (
        fitted[4]
        == decode_context_price([d.context_price for d in drifts])
        == pytest.approx(beta[4], rel=0.02)
    )
    reach = max(max(p for p, _ in d.context_parts) - min(p for p, _ in d.context_parts) for d in drifts)
    for n in (2, 1):
        boot = bootstrap_coefficients(traces[:n], model_forms.get("blackbox-ctx"), replicates=20)[:, 3 + 4]
        centre = decode_context_price([d.context_price for d in drifts[:n]])
        assert boot.min() < boot.max() and np.all(np.abs(boot - centre) <= reach)


def test_a_decode_token_costs_at_least_a_prompt_token_in_forms_that_price_attention_apart():
    """Steps whose decode tokens cost less than prompt tokens (β2 < β1, as in BLIS's published GPU entries,
    where the 3+3 β1 carries prefill attention too): the 3+3 form recovers them; blackbox-ctx and
    blackbox-floor, whose β1 is the linear layers' price only, never put β2 below β1."""
    beta = (6000.0, 150.0, 20.0)
    traces = [
        NamedTrace(
            f"rate{rate:g}",
            simulated_trace(poisson_requests(150, rate, seed=seed), CONFIG, BlackboxModel(ALPHA, beta)),
        )
        for seed, rate in ((7, 3.0), (8, 6.0))
    ]
    assert_within(direct_estimate(traces, model_forms.get("blackbox"))[1], beta)
    for form in ("blackbox-ctx", "blackbox-floor"):
        fitted = direct_estimate(traces, model_forms.get(form))[1]
        assert fitted[2] >= fitted[1] > 0, (form, fitted)
    # So does the refinement when it scales the prefill terms up: β2 follows β1; scaled down, β2 stays.
    base = np.asarray((*ALPHA, *direct_estimate(traces, model_forms.get("blackbox-ctx"))[1]))
    up = refined_coefficients(base, (0.0, 0.0, 0.2), model_forms.get("blackbox-ctx"))
    assert up[3 + 1] == pytest.approx(base[3 + 1] * np.exp(0.2)) and up[3 + 2] == up[3 + 1]
    down = refined_coefficients(base, (0.0, 0.0, -0.2), model_forms.get("blackbox-ctx"))
    assert down[3 + 2] == base[3 + 2] > down[3 + 1]
    free = refined_coefficients(base, (0.0, 0.0, 0.2), model_forms.get("blackbox"))
    assert free[3 + 2] == base[3 + 2] < free[3 + 1]  # the 3+3 form keeps BLIS's free β2


def test_beta9_equal_to_beta4_replays_as_an_entry_without_it_and_a_cheaper_one_runs_faster():
    beta = (6000.0, 20.0, 150.0, 2.0, 0.5, 400.0)
    requests = poisson_requests(120, 6.0, seed=4, prefix_groups=3, prefix_length=512)
    plain = simulated_trace(requests, CONFIG, BlackboxModel(ALPHA, beta)).records
    tied = simulated_trace(requests, CONFIG, BlackboxModel(ALPHA, (*beta, 0.0, 0.0, 0.0, 0.5))).records
    assert tied == plain
    free = simulated_trace(requests, CONFIG, BlackboxModel(ALPHA, (*beta, 0.0, 0.0, 0.0, 0.0))).records

    def total_e2e(records):
        return sum(r.last_chunk_time_us - r.send_time_us for r in records)

    assert total_e2e(free) < total_e2e(plain)  # steps over a shared prefix cost less: faster on the whole


@pytest.mark.parametrize("per_short", [1500.0, 2500.0])
def test_parameter_recovery_floor_form(per_short):
    """Pure-decode steps of fewer than 4 decoding requests cost `per_short` more for each one short (1.5 ms:
    flat, as costly as 4 requests of 1.5 ms; 2.5 ms: cheaper as requests join, the shape vLLM's CPU build
    measures at a fixed context), steps with a prefill pay every decode; the fit finds the floor among
    features.FLOORS, helped by the medians of pure-decode steps per batch size, and its price."""
    beta = (6000.0, 20.0, 1500.0, 0.0, 0.5, 0.0, 0.0, per_short, 4 * per_short, 0.0, 0.0)
    model = BlackboxModel(ALPHA, beta)
    traces = [
        NamedTrace(f"rate{rate:g}", simulated_trace(poisson_requests(200, rate, seed=seed), CONFIG, model))
        for seed, rate in ((5, 4.0), (6, 10.0))
    ]
    alpha, fitted = direct_estimate(traces, model_forms.get("blackbox-floor"))
    assert floor_of(fitted) == 4
    assert_within(alpha, ALPHA)
    for got, want in zip(fitted[:11], beta, strict=True):
        assert got == pytest.approx(want, rel=0.02, abs=1.0)  # µs: β5 may take a fraction of a µs
    plain = direct_estimate(traces, model_forms.get("blackbox-ctx"))[1]
    assert plain[6:9] == (0.0, 0.0, 0.0)


def test_parameter_recovery_batch_table_form():
    """Pure-decode steps with an offset per batch size on top of a floor (the CPU build's shape: a step of 2
    decoding requests slower than one of 1 or 3): blackbox-table gives every pure-decode step of 1-8 requests
    within 2 %, where blackbox-floor, a line and a floor, misses the step of 2 by more than 5 %; and a
    trace without offsets gets none at the sizes it shows (each within 1 % of its step), past which a step
    grows by DECODE_STEP_SLOPE·β1 per request besides context, not by the line's β2."""
    floor = (6000.0, 20.0, 1500.0, 0.0, 0.5, 0.0, 0.0, 1500.0, 6000.0, 0.0, 0.0)
    table = (-800.0, 1400.0, -300.0, 0.0, 600.0, 0.0, 0.0, 0.0)
    truth = BlackboxModel(ALPHA, (*floor, *table))

    def traces_of(model):
        return [
            NamedTrace(
                f"rate{rate:g}", simulated_trace(poisson_requests(200, rate, seed=seed), CONFIG, model)
            )
            for seed, rate in ((5, 4.0), (6, 10.0))
        ]

    traces = traces_of(truth)
    context = 600  # per decoding request

    def steps(model, sizes=range(1, 9)):
        return np.array([model.decode_only_step_us(n, n * context) for n in sizes], dtype=float)

    fitted = BlackboxModel(*direct_estimate(traces, model_forms.get("blackbox-table")))
    np.testing.assert_allclose(steps(fitted), steps(truth), rtol=0.02)
    line = BlackboxModel(*direct_estimate(traces, model_forms.get("blackbox-floor")))
    assert abs(steps(line)[1] / steps(truth)[1] - 1) > 0.05
    plain = traces_of(BlackboxModel(ALPHA, floor))
    top = int(max(max(decode_step_rows(nt.diagnostics().steps).features["D"], default=0) for nt in plain))
    beta = direct_estimate(plain, model_forms.get("blackbox-table"))[1]
    offsets = np.array(beta[BATCH_TABLE : BATCH_TABLE + top])
    assert np.all(np.abs(offsets) < 0.01 * steps(BlackboxModel(ALPHA, floor), range(1, top + 1)))
    fitted = BlackboxModel(ALPHA, beta)
    grown = steps(fitted, (top, top + 10))
    assert grown[1] - grown[0] == pytest.approx(
        10 * (DECODE_STEP_SLOPE * beta[1] + beta[4] * context), rel=0.01
    )


def test_batch_table_offsets_interpolate_between_sizes_seen_and_carry_past_the_largest():
    """Offsets come from the batch sizes with median pure-decode steps; a size between two of them takes the
    offset interpolated between theirs, sizes past the largest keep its offset where the line already rises by
    DECODE_STEP_SLOPE·β1 per request besides context (no jump back onto the line), and batches past the table
    take its last."""
    beta = (6000.0, 1000.0, DECODE_STEP_SLOPE * 1000.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    line = BlackboxModel(ALPHA, beta)
    excess = {2: 900, 6: -300, 10: -1500}  # over the line; centred on their steps (equal counts): -300
    steps = [
        DecodeStep(i, line.decode_only_step_us(n, 100 * n) + extra, n, 100 * n)
        for n, extra in excess.items()
        for i in range(DECODE_STEPS_MIN)
    ]
    *table, past = with_batch_table(beta, [decode_step_rows(steps)])[BATCH_TABLE:]
    assert len(table) == BATCH_TABLE_SIZES and past == 0.0
    assert table[:10] == [1200.0, 1200.0, 900.0, 600.0, 300.0, 0.0, -300.0, -600.0, -900.0, -1200.0]
    assert set(table[10:]) == {-1200.0}
    model = BlackboxModel(ALPHA, (*beta, *table))
    for n in (10, BATCH_TABLE_SIZES, BATCH_TABLE_SIZES + 8):
        assert model.decode_only_step_us(n, 100 * n) - line.decode_only_step_us(n, 100 * n) == -1200


@pytest.mark.parametrize("decode_price", [600.0, 1500.0], ids=["flat line", "steep line"])
def test_past_the_largest_batch_seen_a_step_grows_by_the_decode_step_slope(decode_price):
    """A light load measures the price of a decoding request (β2) loosely: past the largest batch with a median
    step, the offsets make a step grow by DECODE_STEP_SLOPE·β1 per decoding request besides its context at β4,
    whether the line rises more slowly or faster, and β43 carries that past the table's largest size (vLLM runs
    up to --max-num-seqs, 256 by default). A step still grows with every request."""
    beta = (6000.0, 600.0, decode_price, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    line = BlackboxModel(ALPHA, beta)
    steps = [
        DecodeStep(i, line.decode_only_step_us(n, 100 * n), n, 100 * n)
        for n in range(1, 7)
        for i in range(DECODE_STEPS_MIN)
    ]
    *table, past = with_batch_table(beta, [decode_step_rows(steps)])[BATCH_TABLE:]
    growth = DECODE_STEP_SLOPE * 600.0 + 0.5 * 100  # per request: β1's share and its 100 tokens of context
    correction = growth - (decode_price + 50.0)
    assert table[:6] == [0.0] * 6
    assert table[6:] == pytest.approx([correction * k for k in range(1, BATCH_TABLE_SIZES - 5)])
    assert past == pytest.approx(correction)
    model = BlackboxModel(ALPHA, (*beta, *table, past))
    for n in (7, 16, BATCH_TABLE_SIZES, BATCH_TABLE_SIZES + 1, 64):
        grown = model.decode_only_step_us(n, 100 * n) - model.decode_only_step_us(6, 600)
        assert grown == pytest.approx(growth * (n - 6), abs=1)
    unpriced = (6000.0, 0.0, *beta[2:])  # no prompt token priced: nothing to scale, the line carries on
    assert with_batch_table(unpriced, [decode_step_rows(steps)])[BATCH_TABLE:] == (0.0,) * (
        BATCH_TABLE_SIZES + 1
    )


def test_floor_form_without_a_floor_is_the_ctx_fit():
    """Steps that grow from the first decoding request: no floor both gains FLOOR_MIN_GAIN and lifts a step
    by FLOOR_MIN_LIFT (a floor priced freely fits the solver's dust), so blackbox-floor gives blackbox-ctx's
    betas exactly (and zeros for the floor terms)."""
    beta = (6000.0, 20.0, 1500.0, 0.0, 0.5, 0.0)
    model = BlackboxModel(ALPHA, beta)
    traces = [NamedTrace("linear", simulated_trace(poisson_requests(200, 8.0, seed=8), CONFIG, model))]
    floor = direct_estimate(traces, model_forms.get("blackbox-floor"))[1]
    ctx = direct_estimate(traces, model_forms.get("blackbox-ctx"))[1]
    assert floor == ctx and floor[6:9] == (0.0, 0.0, 0.0)


def test_floor_is_not_placed_above_the_batches_seen():
    """A light load never decodes more than a few requests at once: a floor there leaves the cost past it
    unmeasured, so the fit may only place one below the FLOOR_SUPPORT-th largest batch with a median step."""
    beta = (6000.0, 20.0, 1500.0, 0.0, 0.5, 0.0, 0.0, 1500.0, 12000.0)  # floor at 8 requests
    model = BlackboxModel(ALPHA, beta)
    trace = simulated_trace(poisson_requests(200, 1.0, seed=9), CONFIG, model)
    sizes = sorted(decode_step_rows(decode_steps(trace)).features["D"])
    assert sizes[-1] < 8  # never past the true floor
    fitted = direct_estimate([NamedTrace("light", trace)], model_forms.get("blackbox-floor"))[1]
    assert floor_of(fitted) < sizes[-FLOOR_SUPPORT]


def test_a_light_load_fit_says_larger_batches_are_extrapolated():
    trace = simulated_trace(poisson_requests(150, 1.0, seed=10), CONFIG, BlackboxModel(ALPHA, BETA))
    result = fit([NamedTrace("light", trace)], bootstrap=0, max_evaluations=0)
    seen = int(decode_step_rows(decode_steps(trace)).features["D"].max())
    assert result.decode_batch_max == seen == result.metadata()["decode_batch_max"]
    assert max(n for n, _, _ in result.decode_medians["light"]) == seen
    assert seen < LIGHT_LOAD_BATCH
    context = round(max(c for _, _, c in result.decode_medians["light"]))  # the largest of the sizes' means
    assert result.decode_context_max == context == result.metadata()["decode_context_max"]
    assert any(
        f"decoded at most {seen} requests at once" in note and f"~{context:,} tokens of context each" in note
        for note in result.notes
    )


def test_a_fit_without_cached_prompt_tokens_says_their_price_is_unmeasured():
    """No prefix hit: nothing measures what cached prompt tokens cost (shared A alone then predicts C's prompts
    behind a 768-token prefix too fast: TTFT 23 % under, docs/accuracy.md)."""
    trace = simulated_trace(poisson_requests(150, 1.0, seed=10), CONFIG, BlackboxModel(ALPHA, BETA))
    extended = fit([NamedTrace("plain", trace)], model_form="blackbox-table", bootstrap=0, max_evaluations=0)
    assert extended.beta[3] == 0.0
    notes = [n for n in extended.notes if "nothing measured what a prefill's cached tokens cost" in n]
    assert len(notes) == 1 and ("they are priced at 0:" in notes[0]) == (extended.beta[10] == 0.0)
    plain = fit([NamedTrace("plain", trace)], bootstrap=0, max_evaluations=0)  # the library's default: 3+3
    assert not any("cached tokens cost" in note for note in plain.notes)  # 3+3 prices no cached token apart


def test_idle_prefills_longer_than_the_token_budget_pay_one_step_per_chunk():
    # 2,500–3,500-token prompts with a 2,048-token budget: vLLM's chunked prefill runs each over two steps,
    # each paying β0 and attending to the cached prefix and the chunks before it. With the true coefficients
    # the features reproduce every idle-engine TTFT (counting one step would push β0 into α).
    beta = (6000.0, 20.0, 150.0, 0.5, 0.25)
    reqs = poisson_requests(100, 1.0, seed=7, input_mean=3000, max_input=3500)
    idle = idle_prefill_rows(simulated_trace(reqs, CONFIG, BlackboxModel(ALPHA, beta)))
    assert len(idle.ttft_us) > 20 and set(idle.features["const"]) == {1.0, 2.0}
    outside = ALPHA[0] + ALPHA[1] * idle.prompt_tokens
    step = idle.matrix(("const", "P", "D", "Pctx", "Dctx")) @ beta
    np.testing.assert_allclose(step + outside, idle.ttft_us, atol=2)


def test_a_blis_closed_loop_without_cached_token_counts_fits_as_the_capture_that_has_them():
    """BLIS records a closed-loop user as one session and no cached tokens: its rounds are fresh prompts (no
    accumulated context), so nothing of the previous round is estimated cached and the fit is the same."""
    capture = read_trace(TRACES / "real_day20/closed16z_s2003.csv")
    blis = as_blis_users(capture)
    recorded = {r.request_id: r.cached_tokens for r in capture.records}
    assert estimate_cached_tokens(blis, blis.records) == recorded
    a, b = (fit([NamedTrace("c", t)], bootstrap=0, max_evaluations=2) for t in (capture, blis))
    assert (a.alpha, a.beta) == (b.alpha, b.beta)


def test_cached_token_estimate_matches_simulator_without_recorded_counts():
    model = BlackboxModel(ALPHA, BETA)
    trace = simulated_trace(
        poisson_requests(80, 4.0, seed=5, prefix_groups=2, prefix_length=256), CONFIG, model
    )
    simulated = {r.request_id: r.cached_tokens for r in trace.records}
    assert any(simulated.values())
    blind = dataclasses.replace(
        trace, records=[dataclasses.replace(r, cached_tokens=None) for r in trace.records]
    )
    estimate = estimate_cached_tokens(blind, blind.records)
    agree = sum(estimate[rid] == simulated[rid] for rid in simulated)
    assert agree >= 0.95 * len(simulated)


def test_fit_is_deterministic(synthetic):
    a = fit(synthetic[:1], bootstrap=30, seed=7, max_evaluations=3).to_dict()
    b = fit(synthetic[:1], bootstrap=30, seed=7, max_evaluations=3).to_dict()
    a.pop("fit_seconds"), b.pop("fit_seconds")
    assert json.dumps(a) == json.dumps(b)


def test_bootstrap_intervals_contain_the_estimate(trace_a):
    result = fit([NamedTrace("A", read_trace(trace_a))], bootstrap=40, max_evaluations=1, prediction_draws=2)
    for value, (lo, hi) in zip(
        (*result.alpha, *result.beta), (*result.alpha_ci, *result.beta_ci), strict=True
    ):
        assert lo <= value * 1.0001 + 1e-9 and value <= hi * 1.0001 + 1e-9
    block = result.prediction_intervals["A"]
    assert set(block) == {"ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms"}
    assert all(v["lo"] <= v["hi"] for v in block.values())


def test_direct_estimate_on_real_traces_is_physical(trace_a, trace_c):
    """On the real CPU server: every coefficient finite and >= 0, prefill cost per token inside the step."""
    traces = [NamedTrace("A", read_trace(trace_a)), NamedTrace("C", read_trace(trace_c))]
    alpha, beta = direct_estimate(traces, model_forms.get("blackbox"))
    assert all(np.isfinite(v) and v >= 0 for v in (*alpha, *beta))
    # Prefill must be charged inside the step (β1), where it stalls decodes, not outside it (α1).
    assert beta[1] > 10 * alpha[1]


def test_window_rows_reproduce_observed_itl(trace_a):
    rows = window_rows(read_trace(trace_a))
    assert len(rows.itl_us) == 150
    assert np.all(rows.features["D"] >= 1.0)  # a request's own decode tokens are in its window


def test_window_features_follow_prompts_chunked_through_a_small_budget():
    """Through a 128-token budget every prompt runs over several steps beside the decodes (vLLM's chunked
    prefill). Laid over those steps, a window's features times the true β give each request's mean ITL (with
    every prompt counted in the step of its first token, up to 27 % off)."""
    config = dataclasses.replace(CONFIG, max_num_batched_tokens=128)
    trace = simulated_trace(poisson_requests(200, 6.0, seed=1), config, BlackboxModel(ALPHA, BETA))
    rows = window_rows(trace)
    predicted = rows.matrix(("const", "P", "D")) @ np.asarray(BETA)
    assert len(rows.itl_us) == 200
    assert np.max(np.abs(predicted / rows.itl_us - 1)) < 0.02
    # Conservation: the chunks of every prompt add up to it (new tokens, one request, its attention pairs).
    records = ok_records(trace)
    cached = estimate_cached_tokens(trace, records)
    _, cum = _events(trace, records, cached)
    new = [(r.total_input_tokens - cached.get(r.request_id, 0), cached.get(r.request_id, 0)) for r in records]
    totals = dict(zip(EVENT_COLUMNS, cum[-1], strict=False))
    assert totals["P"] == sum(n for n, _ in new) and totals["Np"] == len(records)
    assert totals["Ppairs"] == sum(attention_pairs(n, hit) for n, hit in new)


def test_prefill_steps_hold_the_chunks_vllm_computed_in_them():
    """Through a 128-token budget a prompt runs over several steps, its first chunks filling them (vLLM
    schedules chunks forward) and its last one the rest. Rebuilt so, the steps measured with a prefill cost
    what the true β says of their features (with every prompt counted in the step of its first token, only 15
    steps of the 200 requests stayed within the budget to be measured)."""
    config = dataclasses.replace(CONFIG, max_num_batched_tokens=128)
    trace = simulated_trace(poisson_requests(200, 6.0, seed=1), config, BlackboxModel(ALPHA, BETA))
    rows = prefill_step_rows(trace)
    ratio = rows.duration_us / (rows.matrix(("const", "P", "D")) @ np.asarray(BETA))
    assert len(ratio) > 400 and np.mean(np.abs(ratio - 1) < 0.01) > 0.95
    assert np.all(np.abs(np.quantile(ratio, [0.01, 0.99]) - 1) < 0.1)


def test_a_trace_without_answered_requests_gives_no_feature_rows():
    trace = simulated_trace(poisson_requests(5, 1.0, seed=2), CONFIG, BlackboxModel(ALPHA, BETA))
    failed = dataclasses.replace(
        trace, records=[dataclasses.replace(r, status="error") for r in trace.records]
    )
    assert len(window_rows(failed).itl_us) == 0 and len(prefill_step_rows(failed).duration_us) == 0


def test_fit_rejects_bad_input(trace_a):
    with pytest.raises(CalibrationError, match="no traces"):
        fit([])
    with pytest.raises(ConfigError, match="model form"):
        fit([NamedTrace("A", read_trace(trace_a))], model_form="nope")
    errors = dataclasses.replace(
        read_trace(trace_a),
        records=[dataclasses.replace(r, status="error") for r in read_trace(trace_a).records],
    )
    with pytest.raises(CalibrationError, match="no 'ok' requests"):
        fit([NamedTrace("E", errors)])


def test_cli_fit_writes_defaults_entry_and_reports(tmp_path, trace_a):
    out, rep, page = tmp_path / "d.yaml", tmp_path / "cal.json", tmp_path / "cal.html"
    args = [
        "calibrate",
        str(trace_a),
        "--fit",
        "--model",
        "tiny",
        "--gpu",
        "cpu",
        "--tp",
        "1",
        "--out",
        str(out),
    ]
    args += ["--report", str(rep), "--html", str(page), "--bootstrap", "20", "--prediction-draws", "0"]
    args += ["--max-evaluations", "3"]
    proc = CliRunner().invoke(app, args)
    assert proc.exit_code == 0, proc.output
    entry = yaml.safe_load(out.read_text())["models"][0]
    # The default form is blackbox-table (every beta term); the plain 3+3 fit is reported beside it.
    betas = len(BETA_TERMS)
    assert entry["id"] == "tiny" and len(entry["alpha_coeffs"]) == 3 and len(entry["beta_coeffs"]) == betas
    assert entry["fit"]["traces"] == ["A_poisson_0.8"] and len(entry["fit"]["beta_ci95"]) == betas
    assert entry["total_kv_blocks"] == 1024
    data = json.loads(rep.read_text())
    assert data["calibration"]["model_form"] == "blackbox-table"
    assert len(data["baseline_3plus3"]["beta"]) == 3
    assert "data:image/png;base64," in page.read_text()
    assert "Pure-decode step time by batch size" in page.read_text()
    # The entry is usable by the simulator's lookup and by `blis validate`.
    proc = CliRunner().invoke(
        app, ["validate", str(trace_a), "--coeffs", str(out), "--model", "tiny", "--gpu", "cpu", "--tp", "1"]
    )
    assert proc.exit_code == 0, proc.output
    summary = json.loads(proc.stdout)["summary"]
    assert summary["e2e_mape"] == pytest.approx(data["metrics"]["e2e"]["request_level"]["mape"])


def test_alpha_comes_from_server_side_times_when_recorded(synthetic):
    """With vLLM's per-request queue and scheduled→first-token times, α0/α1 are the time outside the engine,
    independent of the step-time estimate: here the simulator's exact queue delay α0 + α1·prompt."""
    trace = synthetic[1].trace
    records = []
    for rec in trace.records:
        outside = int(ALPHA[0] + ALPHA[1] * rec.total_input_tokens)
        records.append(dataclasses.replace(rec, server_queue_us=0, server_ttft_us=rec.ttft_us - outside))
    named = [NamedTrace("server", dataclasses.replace(trace, records=records))]
    alpha, _ = direct_estimate(named, model_forms.get("blackbox"))
    assert_within(alpha, ALPHA)


def test_synthetic_traces_record_vllm_times_outside_the_engine(synthetic):
    """A simulated trace records vLLM's queue and scheduled→first-token times as `blis observe` does: what
    they leave of each TTFT is the simulator's queue delay α0 + α1·prompt (α2 = 0)."""
    for rec in synthetic[0].trace.records:
        assert rec.outside_engine_us == int(ALPHA[0] + ALPHA[1] * rec.total_input_tokens)


def without_vllm_times(trace):
    """`trace` as another tool records it: no vLLM per-request queue or scheduled→first-token times."""
    records = [dataclasses.replace(r, server_queue_us=None, server_ttft_us=None) for r in trace.records]
    return dataclasses.replace(trace, records=records)


def test_alpha_without_server_side_times_is_one_overhead(synthetic):
    """Without vLLM's queue and scheduled→first-token times (another tool's trace), α1 is not told apart from
    the prefill's price per token: α1 = 0 and α0 is the typical time outside the step (a robust fit of one
    constant), which for these exact synthetic steps is near α0 + α1 × the median prompt of the idle-engine
    requests."""
    from blis_cal.calibrate.features import idle_prefill_rows

    bare = without_vllm_times(synthetic[1].trace)
    alpha, beta = direct_estimate([NamedTrace("bare", bare)], model_forms.get("blackbox"))
    assert alpha[1] == 0.0 and alpha[2] == 0.0
    median_prompt = float(np.median(idle_prefill_rows(bare).prompt_tokens))
    assert alpha[0] == pytest.approx(ALPHA[0] + ALPHA[1] * median_prompt, rel=0.02)
    assert_within(beta, BETA)  # the step price is the same either way


def test_long_decode_gap_is_noted(trace_a):
    from blis_cal.calibrate.compare import compare
    from blis_cal.calibrate.sim_bridge import replay_with

    trace = read_trace(trace_a)
    rec = trace.records[40]
    stall_at = (rec.first_chunk_time_us + rec.last_chunk_time_us) // 2  # request 40 is decoding here
    for r in trace.records:  # nothing arrives for 5 s (the server or the client froze), then all resumes
        for chunk in trace.itl[r.request_id]:
            if chunk.timestamp_us > stall_at:
                chunk.timestamp_us += 5_000_000
        r.first_chunk_time_us = trace.itl[r.request_id][0].timestamp_us
        r.last_chunk_time_us = trace.itl[r.request_id][-1].timestamp_us
    results = replay_with(trace, "blackbox", (8000, 0, 0), (16000, 1150, 2500))
    report = compare(trace, results, trace_name="A")
    assert report.trace_info["longest_decode_gap_s"] >= 4.0
    assert any("no token received" in note for note in report.notes)


def test_cli_extended_form_is_reported_beside_3_plus_3(tmp_path, trace_c):
    out, rep = tmp_path / "d.yaml", tmp_path / "cal.json"
    args = [
        "calibrate",
        str(trace_c),
        "--fit",
        "--model",
        "tiny",
        "--gpu",
        "cpu",
        "--model-form",
        "blackbox-ctx",
    ]
    args += ["--out", str(out), "--report", str(rep), "--bootstrap", "0", "--prediction-draws", "0"]
    args += ["--max-evaluations", "2"]
    proc = CliRunner().invoke(app, args)
    assert proc.exit_code == 0, proc.output
    entry = yaml.safe_load(out.read_text())["models"][0]
    beta = entry["beta_coeffs"]
    assert len(beta) == len(BETA_TERMS) and entry["fit"]["model_form"] == "blackbox-ctx"
    assert (
        beta[11:44] == [0.0] * 33 and beta[44] == beta[10]
    )  # no offsets; C's hits price cached pairs at β10
    data = json.loads(rep.read_text())
    assert len(data["baseline_3plus3"]["beta"]) == 3
    assert data["baseline_3plus3"]["summary_rows"][0]["trace"] == "C_prefix_1.0"
    # The entry replays through the simulator's blackbox model.
    proc = CliRunner().invoke(
        app, ["validate", str(trace_c), "--coeffs", str(out), "--model", "tiny", "--gpu", "cpu"]
    )
    assert proc.exit_code == 0, proc.output


def test_leave_one_out_validates_each_trace_on_a_fit_without_it(synthetic):
    from blis_cal.calibrate.pipeline import leave_one_out

    reports, fits = leave_one_out(synthetic, max_evaluations=2)
    assert [r.trace_info["trace"] for r in reports] == ["syn1", "syn2"]
    assert fits[0].traces == ["syn2"] and fits[1].traces == ["syn1"]
    # Both traces come from the same engine, so each one's fit predicts the other.
    for rep in reports:
        assert rep.mape("e2e") < 0.02
        assert rep.trace_info["decode_step_ratio"] == pytest.approx(1.0, abs=0.03)  # the same server's speed
    # The heavier trace decodes larger batches than the lighter one its fold was fitted on: noted.
    assert fits[0].decode_batch_max < fits[1].decode_batch_max
    assert any("extrapolated" in n for n in reports[0].notes)
    assert not any("extrapolated" in n for n in reports[1].notes)
    assert not any("timing_floor" in r.trace_info for r in reports)  # none unless asked for
    with pytest.raises(CalibrationError, match="at least two"):
        leave_one_out(synthetic[:1])


def test_leave_one_out_floors_each_trace_under_its_folds_fit(synthetic):
    """With a timing floor, each held-out trace's is that of its own fold's coefficients, and its comparison
    is the one without the floor."""
    from blis_cal.calibrate.fit import trace_simulator
    from blis_cal.calibrate.pipeline import leave_one_out
    from blis_cal.calibrate.timing_floor import jittered, timing_floor

    plain, _ = leave_one_out(synthetic, max_evaluations=2)
    reports, fits = leave_one_out(synthetic, max_evaluations=2, timing_floor_us=2_000)
    simulate = trace_simulator()
    form = model_forms.get("blackbox")
    for held, rep, before, f in zip(synthetic, reports, plain, fits, strict=True):
        assert rep.mape("ttft") == before.mape("ttft") and rep.mape("e2e") == before.mape("e2e")
        a, b = tuple(f.alpha), tuple(f.beta)
        base = simulate(held.trace, form, a, b)
        moved = simulate(jittered(held.trace, 2_000), form, a, b)
        want = {m: round(v, 6) for m, v in timing_floor(base, moved).items()}
        assert rep.trace_info["timing_floor"] == {"jitter_us": 2_000} | want
        assert want["ttft"] > 0


def test_fit_notes_what_its_traces_did_not_measure(synthetic):
    """A fit says when α1 could not be measured (no vLLM per-request times) and when cached tokens' cost
    was not (no prefix-cache hits), and says neither when the traces measured them."""
    bare = [NamedTrace(nt.name, without_vllm_times(nt.trace)) for nt in synthetic]
    without = fit(bare, model_form="blackbox-ctx", refine=False, bootstrap=0)
    assert without.alpha[1] == 0.0
    assert any("none of vLLM's per-request queue" in n for n in without.notes)
    assert any("no prefix-cache hits" in n for n in without.notes)
    cached = simulated_trace(
        poisson_requests(150, 3.0, seed=3, prefix_groups=2, prefix_length=256),
        CONFIG,
        BlackboxModel(ALPHA, BETA),
    )
    measured = fit(
        [*synthetic, NamedTrace("cached", cached)], model_form="blackbox-ctx", refine=False, bootstrap=0
    )
    assert not any("per-request queue" in n or "prefix-cache hits" in n for n in measured.notes)


def test_a_fit_over_traces_at_different_speeds_reports_each_step_ratio_and_notes_the_spread(synthetic):
    """Two traces from one server: each trace's decode steps run at the fitted price. A third from the same
    server 30 % slower: the joint fit averages them, each trace's step ratio says how far it ran from the
    average, and a note names the traces off it by more than 10 %."""
    alone = fit(synthetic, bootstrap=0, max_evaluations=0)
    for nt in synthetic:
        assert alone.reports[nt.name].trace_info["decode_step_ratio"] == pytest.approx(1.0, abs=0.02)
        assert alone.reports[nt.name].trace_info["prefill_step_ratio"] == pytest.approx(1.0, abs=0.05)
    assert not any("ran at different speeds" in note for note in alone.notes)
    slow = simulated(tuple(1.3 * b for b in BETA), slow=poisson_requests(200, 6.0, seed=5))
    mixed = fit([*synthetic, *slow], bootstrap=0, max_evaluations=0)
    ratios = {name: report.trace_info["decode_step_ratio"] for name, report in mixed.reports.items()}
    assert ratios["slow"] / ratios["syn1"] == pytest.approx(1.3, rel=0.03)
    assert ratios["syn1"] < 1 < ratios["slow"]
    # Here the slow trace is the one beyond 10 % (1.22×; the others 0.94× and 0.97×).
    noted = [note for note in mixed.notes if "ran at different speeds" in note]
    assert (
        [note.split(":")[0] for note in noted]
        == [n for n, r in ratios.items() if abs(r - 1) > 0.1]
        == ["slow"]
    )
    assert f"took {ratios['slow']:.2f}× what the fitted coefficients say" in noted[0]


def test_a_slow_hosts_capture_with_misread_steps_fits_and_replays_itself():
    """vLLM with its kernels held to SSE4.1 (~10x our host's per-token cost; a08 saturates it): nine of its
    steps with a prefill were misread as a few ms, their contexts alone at the measured context price came out
    over their time, and the linear first guess went to 0, where the log-ratio solve has no slope (every β but
    the context price was 0). Those rows are left out of the first guess now."""
    trace = NamedTrace("sse_a08", read_trace(TRACES / "sse_day55/a08_s5501.csv"))
    _, beta = direct_estimate([trace], model_forms.get("blackbox-ctx"))
    assert all(b > 0 for b in (beta[0], beta[1], beta[2]))
    result = fit([trace], bootstrap=0, max_evaluations=4)
    report = result.reports["sse_a08"]
    assert report.mape("e2e") < 0.10 and report.mape("itl") < 0.10
