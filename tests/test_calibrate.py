"""Calibration comparison: metric definitions, pairing rules, BLIS report layout, defaults.yaml merge, HTML."""

import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from decode_traces import lockstep_trace
from typer.testing import CliRunner

from blis_cal.calibrate import CalibrationError, compare, mape, pearson_r, quality, summary_row
from blis_cal.calibrate.compare import bias_direction, pooled, workload_level
from blis_cal.calibrate.defaults_file import make_entry, merge_defaults_entry
from blis_cal.calibrate.features import window_rows
from blis_cal.calibrate.report_html import render_html
from blis_cal.cli import app
from blis_cal.replay import config_from_trace, replay_trace
from blis_cal.simulate import BlackboxModel, RequestResult
from blis_cal.trace import Chunk, Trace, TraceHeader, TraceRecord, read_trace

REPO = Path(__file__).resolve().parent.parent


def result(rid, ttft, e2e, out=3, inp=10, status="ok"):
    itl = (e2e - ttft) / (out - 1) if out > 1 else 0.0
    return RequestResult(rid, status, 0, 0, 0, 0, ttft, e2e, ttft, e2e, itl, inp, out, 0, 0)


def record(rid, send, first, last, out=3, inp=10, status="ok"):
    return TraceRecord(
        request_id=rid,
        input_tokens=inp,
        output_tokens=out,
        send_time_us=send,
        arrival_time_us=send,
        first_chunk_time_us=first,
        last_chunk_time_us=last,
        num_chunks=out,
        status=status,
    )


# ---------------------------------------------------------------------------------------------- metrics


def test_metric_definitions_hand_computed():
    real = np.array([100.0, 200.0, 400.0])
    sim = np.array([110.0, 180.0, 400.0])
    # |10|/100, |20|/200, 0 -> (0.1 + 0.1 + 0) / 3
    assert mape(real, sim) == pytest.approx(0.2 / 3)
    assert bias_direction(real, sim) == "under-predict"  # Σ(sim − real) = −10
    assert bias_direction(real, real) == "neutral"
    assert pearson_r(real, sim) == pytest.approx(np.corrcoef(real, sim)[0, 1])
    assert pearson_r(real[:2], sim[:2]) == 0.0  # fewer than 3 pairs
    assert pearson_r(real, np.array([5.0, 5.0, 5.0])) == 0.0  # constant side
    wl = workload_level(real, sim)
    assert wl["real_mean"] == pytest.approx(700 / 3)
    assert wl["sim_p50"] == 180.0
    assert wl["real_p90"] == pytest.approx(200 + 0.8 * 200)  # rank 0.9·2 = 1.8
    assert wl["mean_error"] == pytest.approx((690 - 700) / 3)


@pytest.mark.parametrize(
    ("m", "r", "grade"),
    [
        (0.05, 0.99, "excellent"),
        (0.05, 0.9, "good"),
        (0.15, 0.9, "good"),
        (0.3, 0.8, "fair"),
        (0.4, 0.99, "poor"),
    ],
)
def test_quality_thresholds_are_blis(m, r, grade):
    assert quality(m, r) == grade


def test_mape_ignores_zero_real():
    assert mape(np.array([0.0, 100.0]), np.array([5.0, 150.0])) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- pairing


def small_trace(rtt_ms=0.0, warm=0):
    recs = [
        record(0, 0, 100, 300),  # warm-up when warm=1
        record(1, 1000, 1200, 1400),
        record(2, 2000, 2300, 2700),
        record(3, 3000, 0, 0, status="error"),
        record(4, 4000, 4100, 4500, out=5),
    ]
    itl = {
        1: [Chunk(1200), Chunk(1300), Chunk(1400)],
        2: [Chunk(2300), Chunk(2500), Chunk(2700)],
        4: [Chunk(4100), Chunk(4200, 3), Chunk(4500)],  # an event carrying 3 tokens
    }
    if warm:
        itl[0] = [Chunk(100), Chunk(200), Chunk(300)]
    header = TraceHeader(warm_up_requests=warm, network={"measured_rtt_ms": rtt_ms} if rtt_ms else {})
    return Trace(header=header, records=recs, itl=itl)


def test_compare_pairs_by_id_and_counts_exclusions():
    trace = small_trace(rtt_ms=0.05, warm=1)
    results = [result(1, 150, 350), result(2, 250, 650), result(4, 50, 450, out=5, inp=11), result(3, 1, 2)]
    rep = compare(trace, reversed(results))  # order does not matter: paired by id
    info = rep.trace_info
    assert info["warm_up_excluded"] == 1
    assert info["non_ok_excluded"] == 1
    assert info["matched_pairs"] == 3
    assert info["token_mismatches"] == 1  # request 4: 11 simulated prompt tokens vs 10 observed
    assert info["network_rtt_us"] == 50
    assert info["num_requests"] == 4  # matched + warm-up + unmatched real (BLIS)
    assert rep.pairs.request_ids == [1, 2, 4]
    assert rep.pairs.real["ttft"] == [200.0, 300.0, 100.0]
    assert rep.pairs.sim["ttft"] == [200.0, 300.0, 100.0]  # 150 + 50 RTT, ...
    assert rep.pairs.sim["e2e"] == [400.0, 700.0, 500.0]
    # ITL: request 4 has 4 tokens after its first event over 400 µs -> 100 µs.
    assert rep.pairs.real["itl"] == [100.0, 200.0, 100.0]
    assert rep.pairs.sim["itl"] == [100.0, 200.0, 100.0]
    assert rep.mape("ttft") == 0.0 and rep.mape("e2e") == 0.0


def test_compare_flag_rtt_overrides_header_and_counts_unmatched():
    trace = small_trace(rtt_ms=5.0)
    rep = compare(trace, [result(1, 100, 300), result(2, 200, 600), result(99, 1, 2)], rtt_us=100)
    assert rep.trace_info["network_rtt_us"] == 100
    assert rep.trace_info["unmatched_real"] == 2  # ids 0 and 4 have no simulated result
    assert rep.trace_info["unmatched_sim"] == 1
    assert rep.pairs.sim["ttft"] == [200.0, 300.0]


def test_report_json_has_blis_layout():
    rep = compare(small_trace(), [result(i, 100 * (i + 1), 300 * (i + 1)) for i in (0, 1, 2, 4)])
    data = json.loads(json.dumps(rep.to_dict()))
    assert set(data["trace_info"]) >= {
        "num_requests",
        "warm_up_excluded",
        "matched_pairs",
        "token_mismatches",
    }
    for metric in ("ttft", "e2e", "itl"):
        block = data["metrics"][metric]
        assert set(block) == {"workload_level", "request_level", "count"}
        assert set(block["request_level"]) >= {"mape", "pearson_r", "bias_direction", "quality"}
        wl = block["workload_level"]
        for key in ("real_mean", "sim_mean", "mean_error", "mean_percent_error", "real_median", "sim_median"):
            assert key in wl
        for p in (50, 90, 95, 99):
            assert {f"real_p{p}", f"sim_p{p}", f"p{p}_error", f"p{p}_percent_error"} <= set(wl)
    assert len(data["known_limitations"]) == 4
    assert set(data["ttft_tolerance"]) == {"mape", "threshold", "within"}


def test_pooled_metrics_equal_one_report_when_alone():
    rep = compare(small_trace(), [result(i, 100 * (i + 1), 300 * (i + 1)) for i in (0, 1, 2, 4)])
    assert pooled([rep])["e2e"]["request_level"] == rep.metrics["e2e"]["request_level"]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("later_step_us, noted", [(20_000, False), (21_000, False), (26_000, True)])
def test_a_server_changing_speed_during_the_capture_is_noted(later_step_us, noted):
    trace = lockstep_trace([(2, 100, 20_000), (2, 100, later_step_us)])
    results = [result(r.request_id, r.ttft_us, r.e2e_us, out=r.output_tokens, inp=64) for r in trace.records]
    report = compare(trace, results, trace_name="t")
    drift = later_step_us / 20_000 - 1
    assert report.trace_info["decode_speed_drift"] == pytest.approx(drift, abs=1e-3)
    assert summary_row(report)["speed_drift"] == report.trace_info["decode_speed_drift"]
    changed = [n for n in report.notes if "speed changed during the capture" in n]
    assert bool(changed) == noted
    if noted:
        assert changed[0].startswith(
            f"t: at equal batch size and context, decode steps ran {drift:.0%} slower"
        )
    page = render_html([report])
    assert "<th>speed_drift</th>" in page and f"{100 * drift:.1f} %" in page
    assert "and the server&#x27;s speed during the capture" in page and len(report.decode_speed) == 200
    assert '"decode_speed":' not in json.dumps(report.to_dict())  # a plot's data, not the report's


def test_steps_that_computed_a_chunk_of_a_long_prompt_are_not_decode_steps():
    from blis_cal.calibrate.compare import decode_step_ratio, speed_note
    from blis_cal.calibrate.synthetic import poisson_requests, simulated_trace
    from blis_cal.simulate import BlackboxModel, SimConfig
    from blis_cal.trace_analysis import decode_steps

    # 2,000-token prompts through a 256-token budget: each prefill runs in about eight steps and only the
    # last streams a token, so most steps with only decode events also computed a prompt chunk.
    model = BlackboxModel((1000.0, 0.0, 0.0), (6000.0, 20.0, 150.0, 0.0, 2.0))
    config = SimConfig(block_size=16, num_gpu_blocks=8192, max_num_batched_tokens=256, max_model_len=8192)
    trace = simulated_trace(poisson_requests(80, 4.0, seed=3, input_mean=2000, max_input=4000), config, model)
    steps = decode_steps(trace)
    exact = [
        abs(s.duration_us / model.decode_only_step_us(s.num_decode, s.context_tokens) - 1) < 0.02
        for s in steps
    ]
    assert len(steps) > 100 and sum(exact) / len(steps) > 0.9
    ratio = decode_step_ratio(steps, model)
    assert ratio is not None and ratio[0] == pytest.approx(1, abs=0.02) and ratio[1] == len(steps)
    assert speed_note("t", ratio) is None  # the server is the model: nothing to note


def test_a_step_whose_events_reached_the_client_apart_is_not_read_as_two_short_steps():
    from blis_cal.calibrate.synthetic import jitter_chunks, poisson_requests, simulated_trace
    from blis_cal.simulate import BlackboxModel, SimConfig
    from blis_cal.trace_analysis import STEP_BURST_GAP_US, decode_steps

    # Client delays of 2 ms on average split many steps of several requests into bursts more than
    # STEP_BURST_GAP_US apart; read as steps, those halves would pull the median step of one request down.
    model = BlackboxModel((1000.0, 0.0, 0.0), (16500.0, 1130.0, 2500.0))
    config = SimConfig(block_size=16, num_gpu_blocks=4096, max_num_seqs=64, max_num_batched_tokens=2048)
    trace = simulated_trace(poisson_requests(300, 0.8, seed=4, output_mean=128), config, model)
    exact = {n: model.decode_only_step_us(n, 0) for n in range(1, 5)}
    jitter_chunks(trace, 2 * STEP_BURST_GAP_US / 3, seed=5)
    steps = decode_steps(trace)
    for n, step_us in exact.items():
        durations = [s.duration_us for s in steps if s.num_decode == n]
        assert len(durations) > 100 and np.median(durations) == pytest.approx(step_us, rel=0.01), n


@pytest.mark.parametrize("rate", [2.0, 40.0])
@pytest.mark.parametrize("slowdown, noted", [(1.0, False), (1.3, True), (0.75, True)])
def test_a_server_at_another_speed_than_the_coefficients_is_noted(rate, slowdown, noted):
    from blis_cal.calibrate.sim_bridge import replay_with
    from blis_cal.calibrate.synthetic import poisson_requests, simulated_trace
    from blis_cal.simulate import BlackboxModel, SimConfig
    from blis_cal.trace_analysis import decode_steps

    # Light load (mostly one request decoding alone) and heavy load (mostly many): all steps are compared.
    alpha, beta = (1000.0, 0.0, 0.0), (6000.0, 20.0, 150.0, 0.0, 2.0)
    config = SimConfig(block_size=16, num_gpu_blocks=4096, max_num_seqs=64, max_num_batched_tokens=2048)
    server = BlackboxModel(alpha, [b * slowdown for b in beta])
    trace = simulated_trace(poisson_requests(60, rate, seed=3), config, server)
    steps = decode_steps(trace)
    alone = sum(step.num_decode == 1 for step in steps) / len(steps)
    assert alone > 0.5 if rate < 10 else alone < 0.2
    model = BlackboxModel(alpha, beta)
    report = compare(trace, replay_with(trace, "blackbox", alpha, beta), trace_name="t", latency_model=model)
    phrase = "what the coefficients say for their batch sizes"
    speed = [n for n in report.notes if phrase in n]
    assert bool(speed) == noted
    assert summary_row(report)["step_ratio"] == pytest.approx(slowdown, rel=0.02)  # noted or not
    # Every step is slower alike, so the steps that computed a prompt are too.
    assert summary_row(report)["prefill_step_ratio"] == pytest.approx(slowdown, rel=0.02)
    assert bool([n for n in report.notes if "steps with a prefill took" in n]) == noted
    if rate < 10 and noted:
        page = render_html([report])
        assert "<th>step_ratio</th>" in page and "<th>prefill_step_ratio</th>" in page
    if noted:
        ran_at = re.search(r"ran at ([0-9.]+)× the speed", speed[0])
        assert ran_at and float(ran_at.group(1)) == pytest.approx(1 / slowdown, rel=0.02)
        assert "recalibrate" in speed[0]
    # Without the model (e.g. `--sim-results`) there is nothing to compare the steps with.
    bare = compare(trace, replay_with(trace, "blackbox", alpha, beta))
    assert not [n for n in bare.notes if phrase in n] and "step_ratio" not in summary_row(bare)
    assert "prefill_step_ratio" not in summary_row(bare)


def test_a_server_slower_at_prefill_alone_shows_in_the_prefill_step_ratio_not_the_decode_one():
    from blis_cal.calibrate.compare import prefill_step_ratio, trace_diagnostics
    from blis_cal.calibrate.sim_bridge import replay_with
    from blis_cal.calibrate.synthetic import poisson_requests, simulated_trace
    from blis_cal.simulate import BlackboxModel, SimConfig

    # The server prices a prompt token at 2× the coefficients' β1 and a decode as they do: TTFT runs long
    # while ITL does not, which the decode steps alone cannot explain.
    alpha, beta = (1000.0, 0.0, 0.0), (6000.0, 20.0, 150.0, 0.0, 2.0)
    config = SimConfig(block_size=16, num_gpu_blocks=4096, max_num_seqs=64, max_num_batched_tokens=2048)
    server = BlackboxModel(alpha, (6000.0, 40.0, 150.0, 0.0, 2.0))
    trace = simulated_trace(poisson_requests(120, 4.0, seed=6), config, server)
    model = BlackboxModel(alpha, beta)
    rows = trace_diagnostics(trace).prefills
    assert rows is not None and len(rows.duration_us) >= 20
    # What each kept step should cost on the server over what the coefficients say, computed by hand.
    f = rows.features
    expected = np.median(
        (6000 + 40 * f["P"] + 150 * f["D"] + 2 * f["Dctx"])
        / (6000 + 20 * f["P"] + 150 * f["D"] + 2 * f["Dctx"])
    )
    assert expected > 1.3
    ratio = prefill_step_ratio(rows, model)
    assert (
        ratio is not None
        and ratio[0] == pytest.approx(expected, rel=0.02)
        and ratio[1] == len(rows.duration_us)
    )
    report = compare(trace, replay_with(trace, "blackbox", alpha, beta), trace_name="t", latency_model=model)
    assert report.trace_info["decode_step_ratio"] == pytest.approx(1.0, abs=0.02)
    assert report.trace_info["prefill_step_ratio"] == pytest.approx(expected, rel=0.02)
    notes = [n for n in report.notes if "took" in n and "recalibrate" in n]
    assert len(notes) == 1 and notes[0].startswith("t: steps with a prefill took")
    assert report.metrics["ttft"]["workload_level"]["mean_error"] < 0  # the replay's TTFT is short


def test_a_trace_decoding_larger_batches_than_the_fit_saw_is_noted_and_only_covered_steps_set_the_speed():
    from blis_cal.calibrate.compare import coverage_notes
    from blis_cal.calibrate.features import DECODE_STEPS_MIN
    from blis_cal.calibrate.sim_bridge import replay_with
    from blis_cal.calibrate.synthetic import poisson_requests, simulated_trace
    from blis_cal.simulate import BlackboxModel, FitCoverage, SimConfig
    from blis_cal.trace_analysis import decode_steps

    # The server's pure-decode step is flat up to 3 requests and then 1 ms more per request; coefficients
    # fitted where it never decoded more than 3 are flat everywhere.
    server = BlackboxModel((1000.0, 0.0, 0.0), (6000.0, 20.0, 1000.0, 0.0, 2.0, 0.0, 0.0, 1000.0, 3000.0))
    alpha, beta = (1000.0, 0.0, 0.0), (9000.0, 20.0, 0.0, 0.0, 2.0)
    config = SimConfig(block_size=16, num_gpu_blocks=4096, max_num_seqs=64, max_num_batched_tokens=2048)
    trace = simulated_trace(poisson_requests(200, 8.0, seed=3), config, server)
    steps = decode_steps(trace)
    counts = np.bincount([s.num_decode for s in steps])
    seen = max(n for n, c in enumerate(counts) if c >= DECODE_STEPS_MIN)
    assert seen > 6
    [note] = coverage_notes("t", steps, FitCoverage(3))
    assert f"up to {seen} requests" in note and "reached 3" in note and "extrapolated" in note
    # The fit saw batches as large: nothing to note.
    assert coverage_notes("t", steps, FitCoverage(seen)) == []
    model = BlackboxModel(alpha, beta)
    replay = replay_with(trace, "blackbox", alpha, beta)
    speed = "decode steps took"
    assert any(speed in n for n in compare(trace, replay, trace_name="t", latency_model=model).notes)
    covered = compare(trace, replay, trace_name="t", latency_model=model, fit_coverage=FitCoverage(3)).notes
    assert not any(speed in n for n in covered)  # where the fit saw, the server runs as the coefficients say
    assert any("extrapolated" in n for n in covered)
    # Steps that computed a prompt are read the same way: only those decoding as many as the fit saw, when
    # there are enough of them (here 3 of 174 decode 3 or fewer: all are read).
    from blis_cal.calibrate.compare import prefill_step_ratio, trace_diagnostics

    rows = trace_diagnostics(trace).prefills
    within = int(np.count_nonzero(rows.features["D"] <= 10))
    assert 20 <= within < len(rows.duration_us)
    assert prefill_step_ratio(rows, model, FitCoverage(10))[1] == within
    assert prefill_step_ratio(rows, model, FitCoverage(3))[1] == len(rows.duration_us)


def test_a_trace_decoding_longer_contexts_than_the_fit_saw_is_noted():
    from blis_cal.calibrate.compare import CONTEXT_NOTE_FACTOR, coverage_notes
    from blis_cal.calibrate.features import decode_step_rows
    from blis_cal.calibrate.synthetic import poisson_requests, simulated_trace
    from blis_cal.simulate import BlackboxModel, FitCoverage, SimConfig
    from blis_cal.trace_analysis import decode_steps

    config = SimConfig(block_size=16, num_gpu_blocks=4096, max_num_seqs=64, max_num_batched_tokens=2048)
    model = BlackboxModel((1000.0, 0.0, 0.0), (6000.0, 20.0, 1000.0, 0.0, 2.0))
    trace = simulated_trace(
        poisson_requests(150, 2.0, seed=4, input_mean=1500, max_input=2000), config, model
    )
    steps = decode_steps(trace)
    rows = decode_step_rows(steps).features
    batch, context = int(rows["D"].max()), float((rows["Dctx"] / rows["D"]).max())  # as the fit records them
    assert context > 1000
    short = int(context / CONTEXT_NOTE_FACTOR) - 1
    [note] = coverage_notes("t", steps, FitCoverage(batch, short))
    assert f"~{context:,.0f} tokens of context per request" in note and f"reached ~{short:,}" in note
    assert "(β4)" in note and "extrapolated" in note
    # Within the factor, or an entry that does not say: nothing to note.
    assert coverage_notes("t", steps, FitCoverage(batch, short + 2)) == []
    assert coverage_notes("t", steps, FitCoverage(batch)) == []


def test_a_trace_captured_from_a_server_that_had_run_no_step_is_noted():
    from blis_cal.calibrate.sim_bridge import replay_with
    from blis_cal.calibrate.synthetic import poisson_requests, simulated_trace
    from blis_cal.simulate import SimConfig

    model = BlackboxModel((1000.0, 0.0, 0.0), (6000.0, 20.0, 1000.0))
    config = SimConfig(block_size=16, num_gpu_blocks=4096, max_num_seqs=64, max_num_batched_tokens=2048)
    trace = simulated_trace(poisson_requests(40, 2.0, seed=6), config, model)
    results = replay_with(trace, "blackbox", model.alpha, model.beta)
    phrase = "had run no engine step since it started"
    for steps_before, noted in ((0.0, True), (350.0, False), (None, False)):
        kv = {} if steps_before is None else {"engine_steps_before": steps_before}
        header = dataclasses.replace(trace.header, observed_kv_metrics=kv)
        notes = compare(dataclasses.replace(trace, header=header), results, trace_name="t").notes
        assert any(phrase in n and "--prewarm-duration" in n for n in notes) == noted


def test_a_bad_decode_batch_max_in_an_entry_is_a_clear_error(tmp_path):
    from blis_cal.errors import ConfigError
    from blis_cal.simulate import FitCoverage, load_coefficients

    entry = make_entry(
        model="m",
        gpu="g",
        tp=1,
        vllm_version="0.1",
        alpha=(1.0, 0.0, 0.0),
        beta=(1.0, 2.0, 3.0),
        loss=0.0,
        fit={"decode_batch_max": 7, "decode_context_max": 900},
    )
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    assert load_coefficients(path, "m", "g", 1).fit_coverage == FitCoverage(7, 900)
    path.write_text(yaml.safe_dump({"models": [entry | {"fit": {"decode_batch_max": 7}}]}))
    assert load_coefficients(path, "m", "g", 1).fit_coverage == FitCoverage(7)  # entries before the context
    path.write_text(yaml.safe_dump({"models": [{k: v for k, v in entry.items() if k != "fit"}]}))
    assert load_coefficients(path, "m", "g", 1).fit_coverage is None  # BLIS's entries have no fit block
    for key in ("decode_batch_max", "decode_context_max"):
        for bad in ("7", -1, True, 2.5):
            path.write_text(yaml.safe_dump({"models": [entry | {"fit": entry["fit"] | {key: bad}}]}))
            coeffs = load_coefficients(path, "m", "g", 1)
            with pytest.raises(ConfigError, match=rf"fit\.{key} must be an integer >= 0, got {bad!r}"):
                _ = coeffs.fit_coverage


def test_empty_trace_is_a_clear_error():
    with pytest.raises(CalibrationError, match="no requests"):
        compare(Trace(header=TraceHeader(), records=[]), [result(0, 1, 2)])


def test_all_error_rows_is_a_clear_error():
    trace = Trace(header=TraceHeader(), records=[record(i, 0, 0, 0, status="error") for i in range(3)])
    with pytest.raises(CalibrationError, match="3 not ok"):
        compare(trace, [result(i, 1, 2) for i in range(3)])


def test_mismatched_ids_is_a_clear_error():
    with pytest.raises(CalibrationError, match="0 ids in common"):
        compare(small_trace(), [result(i, 1, 2) for i in range(100, 105)])


def test_no_results_is_a_clear_error():
    with pytest.raises(CalibrationError, match="no simulated results"):
        compare(small_trace(), [])


def test_negative_rtt_is_rejected():
    with pytest.raises(CalibrationError, match="RTT"):
        compare(small_trace(), [result(1, 1, 2)], rtt_us=-1)


# ---------------------------------------------------------------------------------------------- defaults.yaml


def test_merge_adds_entry_keeping_every_other_byte(tmp_path):
    path = tmp_path / "defaults.yaml"
    shutil.copy(REPO / "defaults.yaml", path)
    before = path.read_text(encoding="utf-8")
    entry = make_entry(
        model="tiny-new", gpu="cpu", tp=1, vllm_version="0.32.0", alpha=(1, 2, 0), beta=(3, 4, 5), loss=0.1
    )
    assert merge_defaults_entry(path, entry) == "added"
    after = path.read_text(encoding="utf-8")
    added = after[len(after) - len(before) :] if after.endswith(before) else None
    assert added is None  # inserted inside the models list, not at the end
    # Everything before the insertion point and after it is byte-identical.
    i = next(k for k in range(len(before)) if before[k] != after[k])
    assert after[:i] == before[:i]
    assert after.endswith(before[i:])
    data = yaml.safe_load(after)
    assert data["models"][-1]["id"] == "tiny-new" and data["models"][-1]["beta_coeffs"] == [3.0, 4.0, 5.0]
    assert len(data["models"]) == len(yaml.safe_load(before)["models"]) + 1
    assert data["trained_physics_coefficients"] == yaml.safe_load(before)["trained_physics_coefficients"]


def test_merge_replaces_matching_entry_only(tmp_path):
    path = tmp_path / "defaults.yaml"
    shutil.copy(REPO / "defaults.yaml", path)
    before_data = yaml.safe_load(path.read_text(encoding="utf-8"))
    target = before_data["models"][5]
    entry = make_entry(
        model=target["id"].upper(),  # ids compare case-insensitively
        gpu=target["GPU"],
        tp=target["tensor_parallelism"],
        vllm_version=target["vllm_version"],
        alpha=(1, 1, 1),
        beta=(2, 2, 2),
        loss=0.5,
        fit={"traces": ["x"]},
    )
    assert merge_defaults_entry(path, entry) == "replaced"
    after = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert len(after["models"]) == len(before_data["models"])
    assert after["models"][5]["alpha_coeffs"] == [1.0, 1.0, 1.0]
    assert after["models"][5]["fit"] == {"traces": ["x"]}
    for k, m in enumerate(before_data["models"]):
        if k != 5:
            assert after["models"][k] == m
    # Replacing again with the same entry is a fixed point.
    text = path.read_text(encoding="utf-8")
    merge_defaults_entry(path, entry)
    assert path.read_text(encoding="utf-8") == text


def test_the_validation_table_fits_80_columns_and_folds_a_long_trace_name():
    from rich.console import Console

    from blis_cal.cli import _calibration_table

    name = "budget256_kv40_closed12p_s2608_with_a_longer_name"
    row = {"trace": name, "requests": 144, "rate_rps": 6.2, "ttft_mape": 0.177, "itl_mape": 0.065}
    row |= {"e2e_mape": 0.059, "e2e_pearson_r": 0.995, "e2e_quality": "excellent", "speed_drift": 0.08}
    row |= {"step_ratio": 1.2961, "prefill_step_ratio": 0.9449, "ttft_timing_floor": 0.086}
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(_calibration_table("Validation", [row]))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    body = lines[next(i for i, line in enumerate(lines) if "───" in line) + 1 :]
    assert "".join(line.split()[0] for line in body if line.strip()) == name  # folded, not cut
    assert all(
        cell in body[0]
        for cell in (
            "144",
            "6.20",
            "17.7 %",
            "6.5 %",
            "5.9 %",
            "0.995",
            "8.0 %",
            "1.30/0.94",
            "8.6 %",
        )
    )


def test_cli_validate_says_when_a_trace_decodes_larger_batches_than_the_entry_was_fitted_on(tmp_path):
    shipped = yaml.safe_load((REPO / "defaults.yaml").read_text(encoding="utf-8"))
    tiny = next(m for m in shipped["models"] if m["id"] == "tiny" and m["GPU"] == "cpu")
    trace = str(REPO / "traces" / "real_day11" / "r20_s1103.csv")  # up to 28 requests decoding at once
    for batch_max, noted in ((4, True), (28, False)):
        path = tmp_path / f"d{batch_max}.yaml"
        path.write_text(
            yaml.safe_dump({"models": [tiny | {"fit": tiny["fit"] | {"decode_batch_max": batch_max}}]})
        )
        args = ["validate", trace, "--coeffs", str(path), "--model", "tiny", "--gpu", "cpu", "--tp", "1"]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        flat = " ".join(res.output.split())
        assert ("fit traces reached 4" in flat and "extrapolated" in flat) == noted


def test_merge_creates_missing_file_and_section(tmp_path):
    path = tmp_path / "new.yaml"
    entry = make_entry(model="m", gpu="g", tp=2, vllm_version="", alpha=(1, 2, 3), beta=(4, 5, 6), loss=0)
    assert merge_defaults_entry(path, entry) == "created"
    assert yaml.safe_load(path.read_text())["models"][0]["tensor_parallelism"] == 2
    other = tmp_path / "other.yaml"
    other.write_text("# keep me\nversion: 0.0.1\n")
    assert merge_defaults_entry(other, entry) == "added"
    text = other.read_text()
    assert text.startswith("# keep me\nversion: 0.0.1\n")
    assert yaml.safe_load(text)["models"][0]["id"] == "m"


def test_merge_rejects_bad_files(tmp_path):
    entry = make_entry(model="m", gpu="g", tp=1, vllm_version="", alpha=(1, 2, 3), beta=(4, 5, 6), loss=0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: 3\n")
    with pytest.raises(Exception, match="must be a list"):
        merge_defaults_entry(bad, entry)
    with pytest.raises(Exception, match="TP >= 1"):
        make_entry(model="m", gpu="g", tp=0, vllm_version="", alpha=(1, 2, 3), beta=(4, 5, 6), loss=0)


# ---------------------------------------------------------------------------------------------- HTML / CLI


def test_html_is_self_contained_with_pictures():
    rep = compare(
        small_trace(), [result(i, 100 * (i + 1), 300 * (i + 1)) for i in (0, 1, 2, 4)], trace_name="t"
    )
    page = render_html([rep], title="x")
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page
    assert render_html([rep], title="x") == page  # deterministic


def test_cli_calibrate_with_given_coefficients_writes_blis_report(tmp_path, trace_a):
    out = tmp_path / "cal.json"
    proc = CliRunner().invoke(
        app,
        ["calibrate", str(trace_a), "--alpha", "8000,0,0", "--beta", "16000,1150,2500", "--report", str(out)],
    )
    assert proc.exit_code == 0, proc.output
    data = json.loads(out.read_text())
    assert data["trace_info"]["matched_pairs"] == 150
    assert data["metrics"]["e2e"]["request_level"]["mape"] < 0.2
    assert data["summary_rows"][0]["trace"] == "A_poisson_0.8"


def test_cli_calibrate_with_sim_results(tmp_path, trace_a):
    results = tmp_path / "r.json"
    runner = CliRunner()
    proc = runner.invoke(
        app,
        [
            "replay",
            str(trace_a),
            "--alpha",
            "8000,0,0",
            "--beta",
            "16000,1150,2500",
            "--results",
            str(results),
        ],
    )
    assert proc.exit_code == 0, proc.output
    proc = runner.invoke(app, ["calibrate", str(trace_a), "--sim-results", str(results)])
    assert proc.exit_code == 0, proc.output
    assert json.loads(proc.stdout)["summary_rows"][0]["requests"] == 150


def test_fit_needs_the_itl_file(tmp_path, trace_a):
    from blis_cal.calibrate.fit import NamedTrace, fit

    trace = dataclasses.replace(read_trace(trace_a), itl=None)
    with pytest.raises(CalibrationError, match="ITL file"):
        fit([NamedTrace("a", trace)], bootstrap=0)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text((REPO / "traces" / "A_poisson_0.8.csv").read_text().splitlines()[0] + "\n")
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "blis_cal", "calibrate", str(empty), "--alpha", "1,0,0", "--beta", "1,1,1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "no requests" in proc.stderr and "Traceback" not in proc.stderr


def test_a_capture_compared_with_itself_has_no_error_and_a_slower_one_its_slowdown(trace_a):
    from blis_cal.calibrate.compare import capture_as_results
    from blis_cal.demo import rescale_trace

    trace = read_trace(trace_a)
    trace.header.network = {}  # no round trip: the slower copy's errors are exactly its factor
    same = compare(trace, capture_as_results(trace, trace))
    for metric in ("ttft", "itl", "e2e"):
        assert same.metrics[metric]["request_level"]["mape"] == 0.0
    slower = compare(trace, capture_as_results(rescale_trace(trace, 1.1), trace))
    for metric in ("ttft", "itl", "e2e"):
        level = slower.metrics[metric]["request_level"]
        assert level["mape"] == pytest.approx(0.10, abs=1e-4), metric
        assert level["bias_direction"] == "over-predict"


def test_a_capture_of_another_workload_is_refused_by_name(trace_a, trace_c):
    from blis_cal.calibrate.compare import capture_as_results

    with pytest.raises(
        CalibrationError, match=r"C\.csv is not a capture of the same workload: \d+ of 150 requests"
    ):
        capture_as_results(read_trace(trace_c), read_trace(trace_a), where="C.csv")


def test_cli_calibrate_against_a_second_capture(tmp_path, trace_a):
    other = tmp_path / "again.csv"
    for suffix in (".csv", ".yaml", ".itl.csv"):
        shutil.copy(str(trace_a).removesuffix(".csv") + suffix, str(other).removesuffix(".csv") + suffix)
    proc = CliRunner().invoke(app, ["calibrate", str(trace_a), "--sim-results", str(other)])
    assert proc.exit_code == 0, proc.output
    row = json.loads(proc.stdout)["summary_rows"][0]
    assert row["requests"] == 150 and row["e2e_mape"] == 0.0


def test_closed_loop_captures_pair_by_client_and_lengths_when_their_ids_disagree(trace_a):
    from blis_cal.calibrate.compare import capture_as_results

    trace = read_trace(trace_a)
    renumbered = dataclasses.replace(
        trace,
        records=[dataclasses.replace(r, request_id=1000 + i) for i, r in enumerate(reversed(trace.records))],
        itl={1000 + i: trace.itl[r.request_id] for i, r in enumerate(reversed(trace.records))},
    )
    results = capture_as_results(renumbered, trace)
    keys = [(r.client_id, r.total_input_tokens, r.output_tokens) for r in trace.records]
    assert len(results) == sum(keys.count(k) == 1 for k in keys) > 75
    report = compare(trace, results)
    for metric in ("ttft", "itl", "e2e"):
        assert report.metrics[metric]["request_level"]["mape"] == 0.0


def test_two_real_closed_loop_captures_of_one_workload_pair_every_request():
    """Day 16's budget256 closed loop and its repeat number their requests in answer order, so most ids
    disagree on lengths; every request still finds its twin by client and lengths."""
    from blis_cal.calibrate.compare import capture_as_results

    first = read_trace(REPO / "traces" / "real_day16" / "budget256_closed10_s1608.csv")
    again = read_trace(REPO / "traces" / "repeat_day16" / "budget256_closed10_s1608_again.csv")
    prompt_again = {r.request_id: r.total_input_tokens for r in again.records}
    assert sum(prompt_again[r.request_id] != r.total_input_tokens for r in first.records) > 60
    report = compare(first, capture_as_results(again, first))
    assert report.trace_info["compared"] == len(first.records) == 120
    assert report.trace_info["token_mismatches"] == 0


def timed_result(rid, arrival, scheduled, first, finish, out=3, inp=10):
    return RequestResult(
        rid, "ok", 0, arrival, arrival, scheduled, first, finish, first - arrival, finish - arrival,
        (finish - first) / (out - 1), inp, out, 0, 0,
    )  # fmt: skip


def test_ttft_split_hand_computed_and_noted_only_when_the_mean_is_off():
    recs = [record(1, 1_000_000, 1_200_000, 1_400_000), record(2, 2_000_000, 2_300_000, 2_700_000)]
    recs[0].server_queue_us, recs[0].server_ttft_us = 50_000, 100_000  # 50 ms before vLLM saw it
    recs[1].server_queue_us, recs[1].server_ttft_us = 0, 200_000
    trace = Trace(header=TraceHeader(), records=recs)
    same = [
        timed_result(1, 1_000_000, 1_130_000, 1_200_000, 1_400_000),
        timed_result(2, 2_000_000, 2_100_000, 2_300_000, 2_700_000),
    ]
    rep = compare(trace, same)
    assert rep.trace_info["ttft_split_ms"] == {
        "real": {"waiting": 100.0, "vllm_queue": 25.0, "prefill": 150.0},
        "sim": {"waiting": 115.0, "prefill": 135.0},
    }
    assert not any("mean TTFT" in n for n in rep.notes)  # 250 ms both
    slow = [
        timed_result(1, 1_000_000, 1_300_000, 1_400_000, 1_600_000),
        timed_result(2, 2_000_000, 2_250_000, 2_450_000, 2_850_000),
    ]
    rep = compare(trace, slow, rtt_us=10_000)  # the round trip counts as waiting
    assert rep.trace_info["ttft_split_ms"]["sim"] == {"waiting": 285.0, "prefill": 150.0}
    (note,) = [n for n in rep.notes if "mean TTFT" in n]
    assert note.startswith(
        "trace: mean TTFT 435 ms simulated against 250 observed: waiting to be scheduled 285 ms"
    )
    assert "(vLLM's queue 25 of it" in note and "the prefill 150 ms against 150" in note


def test_requests_the_client_sent_late_are_counted_and_noted():
    recs = [record(1, 1_000_000, 1_200_000, 1_400_000), record(2, 2_000_000, 2_300_000, 2_700_000)]
    results = [timed_result(1, 1_000_000, 1_100_000, 1_200_000, 1_400_000)]
    results.append(timed_result(2, 2_000_000, 2_100_000, 2_300_000, 2_700_000))
    on_time = compare(Trace(header=TraceHeader(), records=recs), results)
    assert on_time.trace_info["late_sends"] == 0 and not any("sent more than" in n for n in on_time.notes)
    recs[1].arrival_time_us = 1_700_000  # due 300 ms before it went
    held = compare(Trace(header=TraceHeader(), records=recs), results)
    assert held.trace_info["late_sends"] == 1
    (note,) = [n for n in held.notes if "sent more than" in n]
    assert note.startswith(
        "trace: 1 request(s) were sent more than 50 ms after their scheduled time (up to 0.30 s)"
    )
    for r in recs:  # a trace with no scheduled arrivals recorded: nothing to say
        r.arrival_time_us = 0
    assert "late_sends" not in compare(Trace(header=TraceHeader(), records=recs), results).trace_info


def test_a_preempting_capture_is_noted_with_its_means():
    recs = [record(1, 1_000_000, 1_200_000, 1_400_000), record(2, 2_000_000, 2_300_000, 2_700_000)]
    results = [timed_result(1, 1_000_000, 1_300_000, 1_400_000, 1_600_000)]
    results.append(timed_result(2, 2_000_000, 2_250_000, 2_450_000, 2_850_000))
    for preemptions, noted in ((None, False), (0.0, False), (1.0, True)):
        header = TraceHeader()
        if preemptions is not None:
            header.observed_kv_metrics = {"preemptions": preemptions}
        notes = [
            n for n in compare(Trace(header=header, records=recs), results).notes if "preemption(s)" in n
        ]
        assert bool(notes) == noted
    assert notes[0].startswith("trace: vLLM counted 1 preemption(s) for 2 compared requests")
    assert notes[0].endswith("(TTFT 250 ms observed, 425 simulated; E2E 550 ms observed, 725 simulated)")
    header.observed_kv_metrics = {"preemptions": 1.0}
    many = [record(i, i * 1_000_000, i * 1_000_000 + 200_000, i * 1_000_000 + 400_000) for i in range(1, 12)]
    fine = [timed_result(i, i * 1_000_000, i * 1_000_000, i * 1_000_000 + 200_000, i * 1_000_000 + 400_000)
            for i in range(1, 12)]  # fmt: skip
    assert not any(
        "preemption(s)" in n for n in compare(Trace(header=header, records=many), fine).notes
    )  # 1 in 11


def test_ttft_split_needs_vllm_times_in_the_trace():
    trace = small_trace()
    rep = compare(trace, [timed_result(1, 1000, 1100, 1200, 1400), timed_result(2, 2000, 2100, 2300, 2700)])
    assert "ttft_split_ms" not in rep.trace_info


def test_ttft_split_of_a_real_capture_adds_up_to_its_mean_ttft():
    trace = read_trace(REPO / "traces/real_day23/seats8_r40_s2311.csv")
    model = BlackboxModel((5000.0, 0.1, 0.0), (4800.0, 260.0, 345.0))
    run = replay_trace(trace, config_from_trace(trace.header), model)
    rep = compare(trace, run.results)
    split = rep.trace_info["ttft_split_ms"]
    real, sim = (
        rep.metrics["ttft"]["workload_level"]["real_mean"],
        rep.metrics["ttft"]["workload_level"]["sim_mean"],
    )
    assert split["real"]["waiting"] + split["real"]["prefill"] == pytest.approx(real / 1e3, abs=0.01)
    assert split["sim"]["waiting"] + split["sim"]["prefill"] == pytest.approx(sim / 1e3, abs=0.01)
    assert 0 < split["real"]["vllm_queue"] < split["real"]["waiting"]  # 8 seats: requests queued in vLLM


def test_html_pictures_where_ttft_goes_when_the_trace_has_vllm_times():
    recs = [record(1, 1_000_000, 1_200_000, 1_400_000), record(2, 2_000_000, 2_300_000, 2_700_000)]
    for rec, (queue, server_ttft) in zip(recs, [(50_000, 100_000), (0, 200_000)], strict=True):
        rec.server_queue_us, rec.server_ttft_us = queue, server_ttft
    results = [
        timed_result(1, 1_000_000, 1_300_000, 1_400_000, 1_600_000),
        timed_result(2, 2_000_000, 2_250_000, 2_450_000, 2_850_000),
    ]
    page = render_html([compare(Trace(header=TraceHeader(), records=recs), results, trace_name="t")])
    assert "Where TTFT goes: mean ms, observed and predicted" in page
    assert page.count("data:image/png;base64,") == 4  # the three of every trace, and this one


def test_a_request_whose_tokens_reached_the_client_in_one_burst_leaves_the_itl_metrics_only():
    """A stalled stream delivers a request's tokens in one read: its ~0 ITL times no step, so it is left out of
    the ITL pairs (counted, noted) and of the fit's windows, while its TTFT and E2E are still compared."""
    recs = [
        record(i, i * 1_000_000, i * 1_000_000 + 100_000, i * 1_000_000 + 300_000, out=11)
        for i in range(1, 6)
    ]
    itl = {i: [Chunk(i * 1_000_000 + 100_000 + k * 20_000) for k in range(11)] for i in range(1, 6)}
    itl[3] = [Chunk(3_300_000)] * 10 + [Chunk(3_300_006)]  # every token in one read, 6 µs spread
    trace = Trace(header=TraceHeader(), records=recs, itl=itl)
    results = [result(i, 100_000, 300_000, out=11) for i in range(1, 6)]
    rep = compare(trace, results)
    assert rep.pairs.request_ids == [1, 2, 3, 4, 5]  # conservation: TTFT and E2E keep every request
    assert rep.pairs.itl_ids == [1, 2, 4, 5]
    assert rep.mape("itl") == 0.0  # without it the 6 µs / 10 gap would read as a 3,000-fold error
    assert rep.trace_info["itl_one_burst"] == 1
    (note,) = [n for n in rep.notes if "one burst" in n]
    assert note.startswith("trace: 1 request(s) received all their tokens in one burst")
    assert list(window_rows(trace).request_ids) == [1, 2, 4, 5]
    del itl[3]  # a steady stream again: nothing left out, nothing noted
    recs[2] = record(3, 3_000_000, 3_100_000, 3_300_000, out=11)
    rep = compare(Trace(header=TraceHeader(), records=recs), results)
    assert rep.trace_info["itl_one_burst"] == 0 and not any("one burst" in n for n in rep.notes)


def test_scoped_server_info_sets_one_traces_header_and_leaves_the_others():
    from blis_cal.calibrate.pipeline import load_traces

    day = REPO / "traces" / "real_day48"
    paths = [day / "a08_s4801.csv", day / "kv24_closed8t_s4804.csv"]
    before = [t.trace.header.server for t in load_traces(paths)]
    assert [s.num_gpu_blocks for s in before] == [1024, 24]
    items = ["max_num_seqs=8", "a08_s4801:num_gpu_blocks=48", "kv24_closed8t_s4804:max_num_seqs=4"]
    after = [t.trace.header.server for t in load_traces(paths, server_info=items)]
    assert [(s.num_gpu_blocks, s.max_num_seqs) for s in after] == [(48, 8), (24, 4)]
    assert [s.max_num_batched_tokens for s in after] == [s.max_num_batched_tokens for s in before]


def test_a_trace_whose_header_lacks_engine_settings_gets_a_note_naming_them_and_server_info(tmp_path):
    from blis_cal.calibrate.pipeline import load_traces

    src = REPO / "traces" / "real_day48" / "kv24_closed8t_s4804"
    for suffix in (".csv", ".itl.csv"):
        shutil.copy(src.with_suffix(suffix), tmp_path / f"t{suffix}")
    (tmp_path / "t.yaml").write_text("trace_version: 2\nmode: real\nserver: {type: vllm, model: tiny}\n")
    [named] = load_traces([tmp_path / "t.csv"], server_info=["t:num_gpu_blocks=24"])
    [note] = [n for n in named.trace.notes if "does not state" in n]
    assert note.startswith(
        "t: the trace header does not state the server's block_size, max_num_batched_tokens"
    )
    assert "num_gpu_blocks" not in note and "--server-info KEY=VALUE, or t:KEY=VALUE" in note
    stated = [
        f"{k}={v}" for k, v in (("block_size", 128), ("max_num_batched_tokens", 2048), ("max_num_seqs", 64))
    ]
    [named] = load_traces(
        [tmp_path / "t.csv"], server_info=["t:num_gpu_blocks=24", *stated, "max_model_len=2048"]
    )
    assert not any("does not state" in n for n in named.trace.notes)
    assert not any("does not state" in n for n in load_traces([src.with_suffix(".csv")])[0].trace.notes)


def test_cli_server_info_sets_what_a_trace_header_lacks(tmp_path):
    # Day 44's capture through vLLM's --long-prefill-token-threshold 128, its header stripped of the threshold:
    # `--server-info` puts it back and the validation is the header's; `=0` replays without the cap.
    src = REPO / "traces" / "real_day44" / "lpt128_burst25_s4404"
    for suffix in (".csv", ".itl.csv"):
        shutil.copy(src.with_suffix(suffix), tmp_path / f"t{suffix}")
    header = src.with_suffix(".yaml").read_text(encoding="utf-8")
    assert "long_prefill_token_threshold: 128" in header
    (tmp_path / "t.yaml").write_text(
        header.replace("  long_prefill_token_threshold: 128\n", ""), encoding="utf-8"
    )
    lookup = ["--coeffs", str(REPO / "defaults.yaml"), "--model", "tiny", "--gpu", "cpu", "--tp", "1"]

    def summary(trace, *extra):
        res = CliRunner().invoke(app, ["validate", str(trace), *lookup, *extra])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout[res.stdout.index("{") :])["summary"]

    as_captured = summary(src.with_suffix(".csv"))
    assert summary(tmp_path / "t.csv", "--server-info", "long_prefill_token_threshold=128") == as_captured
    assert summary(tmp_path / "t.csv") != as_captured
    uncapped = summary(src.with_suffix(".csv"), "--server-info", "long_prefill_token_threshold=0")
    assert uncapped == summary(tmp_path / "t.csv")
    # TRACE:KEY=VALUE sets it in that trace's header only, over a value for every trace.
    scoped = [
        "--server-info",
        "long_prefill_token_threshold=0",
        "--server-info",
        "t:long_prefill_token_threshold=128",
    ]
    assert summary(tmp_path / "t.csv", *scoped) == as_captured
    res = CliRunner().invoke(
        app, ["validate", str(tmp_path / "t.csv"), *lookup, "--server-info", "u:max_num_seqs=4"]
    )
    assert (
        res.exit_code != 0 and "no trace named 'u'" in str(res.exception) and "one of t" in str(res.exception)
    )
    res = CliRunner().invoke(
        app, ["validate", str(tmp_path / "t.csv"), *lookup, "--server-info", "max_num_seqs=-4"]
    )
    assert res.exit_code != 0 and "max_num_seqs must be >= 0" in str(res.exception)
