"""The timing floor: how far moving every send by up to a few ms moves a replay's own per-request latencies."""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blis_cal.calibrate.compare import ComparisonReport
from blis_cal.calibrate.fit import NamedTrace
from blis_cal.calibrate.pipeline import run_compare
from blis_cal.calibrate.report_html import render_html
from blis_cal.calibrate.synthetic import poisson_requests, simulated_trace
from blis_cal.calibrate.timing_floor import jitter_us_of, jittered, pooled_floor, timing_floor
from blis_cal.cli import app
from blis_cal.errors import ConfigError
from blis_cal.simulate import BlackboxModel, RequestResult, SimConfig
from blis_cal.trace import Trace, TraceHeader, TraceRecord, write_trace

REPO = Path(__file__).resolve().parent.parent
CONFIG = SimConfig(
    block_size=16, num_gpu_blocks=8192, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=4096
)
ALPHA, BETA = (3000.0, 1.5, 0.0), (6000.0, 20.0, 150.0)


def result(rid, ttft, e2e, out=3, status="ok"):
    itl = (e2e - ttft) / (out - 1) if out > 1 else 0.0
    return RequestResult(rid, status, 0, 0, 0, 0, ttft, e2e, ttft, e2e, itl, 10, out, 0, 0)


def trace_of(sends):
    records = [
        TraceRecord(
            request_id=i,
            input_tokens=10,
            output_tokens=3,
            send_time_us=s,
            arrival_time_us=s,
            first_chunk_time_us=s + 1_000,
            last_chunk_time_us=s + 3_000,
            num_chunks=3,
            status="ok",
        )
        for i, s in enumerate(sends)
    ]
    return Trace(header=TraceHeader(mode="real"), records=records)


def test_jittered_moves_every_send_and_arrival_alike_within_the_bound_seeded_and_leaves_the_trace():
    trace = trace_of(range(0, 2_000_000, 10_000))
    moved = jittered(trace, 2_000)
    deltas = [m.send_time_us - r.send_time_us for r, m in zip(trace.records, moved.records, strict=True)]
    assert all(0 <= d <= 2_000 for d in deltas) and len(set(deltas)) > 50  # spread, not one shift
    assert all(
        m.arrival_time_us - r.arrival_time_us == d
        for r, m, d in zip(trace.records, moved.records, deltas, strict=True)
    )
    assert [m.request_id for m in moved.records] == [r.request_id for r in trace.records]
    assert trace.records[5].send_time_us == 50_000  # the original is untouched
    assert jittered(trace, 2_000).records == moved.records  # same seed, same moves
    assert jittered(trace, 2_000, seed=1).records != moved.records
    assert jittered(trace, 0).records == trace.records


def test_timing_floor_is_the_mean_relative_move_per_request_hand_computed():
    base = [
        result(0, 100, 300),
        result(1, 200, 600),
        result(2, 50, 50, out=1),
        result(3, 80, 90, status="rejected"),
    ]
    moved = [result(0, 110, 300), result(1, 150, 700), result(2, 60, 60, out=1), result(3, 10, 10)]
    floor = timing_floor(base, moved)
    assert floor["ttft"] == pytest.approx((0.1 + 0.25 + 0.2) / 3)  # request 3 is not ok in the base replay
    assert floor["e2e"] == pytest.approx((0.0 + 100 / 600 + 0.2) / 3)
    # ITL of requests with two or more tokens: (300-100)/2=100 → 95, (600-200)/2=200 → 275.
    assert floor["itl"] == pytest.approx((0.05 + 0.375) / 2)
    assert timing_floor(base, base) == {"ttft": 0.0, "itl": 0.0, "e2e": 0.0}
    assert timing_floor(base, []) == {}  # nothing ok in both: no metric


@pytest.mark.parametrize("ms, us", [(2.0, 2_000), (0.5, 500), (0.0, 0)])
def test_timing_floor_ms_in_microseconds(ms, us):
    assert jitter_us_of(ms) == us


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_timing_floor_ms_must_be_a_finite_non_negative_number(bad):
    with pytest.raises(ConfigError, match="--timing-floor-ms"):
        jitter_us_of(bad)


def test_run_compare_reports_the_floor_and_notes_it_past_the_ttft_target():
    """A replay whose TTFT moves 20 % when its sends move (a stand-in for a saturated small cache) gets the
    floor in its trace info and row, and a note; one that moves 5 % gets the floor and no note."""
    trace = trace_of([0, 10_000, 20_000, 30_000])
    base = [result(r.request_id, 1_000, 3_000) for r in trace.records]

    def simulate_moving(by):
        def simulate(named):
            moved = named.trace.records != trace.records
            return [
                result(r.request_id, 1_000 * (1 + by) if moved else 1_000, 3_000) for r in named.trace.records
            ]

        return simulate

    for by, noted in ((0.2, True), (0.05, False)):
        reports, data = run_compare([NamedTrace("t", trace)], simulate_moving(by), timing_floor_us=2_000)
        floor = reports[0].trace_info["timing_floor"]
        assert floor["jitter_us"] == 2_000 and floor["ttft"] == pytest.approx(by) and floor["e2e"] == 0.0
        assert data["summary_rows"][0]["ttft_timing_floor"] == pytest.approx(by)
        notes = [n for n in reports[0].notes if "moving every send by up to 2 ms" in n]
        assert bool(notes) == noted
        if noted:
            assert f"TTFT by {100 * by:.1f} %" in notes[0] and "judge TTFT by its means" in notes[0]
        assert "<th>ttft_timing_floor</th>" in render_html(reports)
    # Over several traces the pooled report carries their floors pooled as their MAPEs are (4 requests each).
    moves = {"t1": simulate_moving(0.2), "t2": simulate_moving(0.05)}
    named = [NamedTrace("t1", trace), NamedTrace("t2", trace)]
    _, data = run_compare(named, lambda t: moves[t.name](t), timing_floor_us=2_000)
    assert data["trace_info"]["timing_floor"]["ttft"] == pytest.approx(0.125)
    # Off (0), or a compare with results replayed elsewhere: no second replay, no floor.
    calls = []
    reports, _ = run_compare([NamedTrace("t", trace)], lambda t: calls.append(t) or base, timing_floor_us=0)
    assert len(calls) == 1 and "timing_floor" not in reports[0].trace_info
    assert "ttft_timing_floor" not in render_html(reports)


def floored(floor, counts):
    metrics = {m: {"count": n} for m, n in counts.items()}
    return ComparisonReport(trace_info={"timing_floor": floor}, metrics=metrics, pairs=None)


def test_pooled_floor_weights_each_trace_by_the_requests_it_compared_hand_computed():
    a = floored(
        {"jitter_us": 2_000, "ttft": 0.10, "itl": 0.02, "e2e": 0.01}, {"ttft": 30, "itl": 10, "e2e": 30}
    )
    b = floored(
        {"jitter_us": 2_000, "ttft": 0.20, "itl": 0.04, "e2e": 0.03}, {"ttft": 10, "itl": 30, "e2e": 10}
    )
    assert pooled_floor([a, b]) == {"jitter_us": 2_000, "ttft": 0.125, "itl": 0.035, "e2e": 0.015}
    assert pooled_floor([a]) == a.trace_info["timing_floor"]
    # A trace without a floor, or one moved by another jitter, leaves nothing to pool.
    assert pooled_floor([a, ComparisonReport(trace_info={}, metrics={}, pairs=None)]) is None
    assert pooled_floor([a, floored({"jitter_us": 500, "ttft": 0.1}, {"ttft": 5})]) is None
    assert pooled_floor([]) is None


def test_cli_validate_reports_a_deterministic_floor_by_default_and_checks_the_flag(tmp_path):
    trace = str(REPO / "traces" / "real_day52" / "kv32_burst8x_s5203.csv")
    lookup = ["--coeffs", str(REPO / "defaults.yaml"), "--model", "tiny", "--gpu", "cpu", "--tp", "1"]

    def floors(*extra):
        out = tmp_path / "v.json"
        res = CliRunner().invoke(app, ["validate", trace, *lookup, "--report", str(out), *extra])
        assert res.exit_code == 0, res.output
        return [r["trace_info"].get("timing_floor") for r in json.loads(out.read_text())["per_trace"]]

    default = floors()
    summary = json.loads((tmp_path / "v.json").read_text())["summary"]
    assert summary["timing_floor"] == default[0]  # one trace: its own floor
    assert default[0]["jitter_us"] == 2_000 and set(default[0]) == {"jitter_us", "ttft", "itl", "e2e"}
    assert default == floors()  # seeded: the same floor every run
    assert floors("--timing-floor-ms", "0") == [None]
    wider = floors("--timing-floor-ms", "10")[0]
    assert wider["jitter_us"] == 10_000 and wider["ttft"] > 0
    res = CliRunner().invoke(app, ["validate", trace, *lookup, "--timing-floor-ms", "-1"])
    assert res.exit_code != 0 and "--timing-floor-ms is -1.0" in str(res.exception)


def test_cli_leave_one_out_reports_each_held_out_traces_floor(tmp_path):
    paths = []
    for name, (n, rate, seed) in {"light": (120, 3.0, 1), "heavy": (160, 6.0, 2)}.items():
        trace = simulated_trace(poisson_requests(n, rate, seed=seed), CONFIG, BlackboxModel(ALPHA, BETA))
        write_trace(trace, tmp_path / f"{name}.csv")
        paths.append(str(tmp_path / f"{name}.csv"))
    out = tmp_path / "loo.json"
    res = CliRunner().invoke(app, ["validate", *paths, "--leave-one-out", "--report", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data["coefficients"]["fits"]) == {"light", "heavy"}
    floors = [r["trace_info"]["timing_floor"] for r in data["per_trace"]]
    assert [f["jitter_us"] for f in floors] == [2_000, 2_000] and all(f["ttft"] > 0 for f in floors)
    assert [r["ttft_timing_floor"] for r in data["rows"]] == [f["ttft"] for f in floors]
    counts = [r["metrics"]["ttft"]["count"] for r in data["per_trace"]]
    pooled_ttft = sum(f["ttft"] * n for f, n in zip(floors, counts, strict=True)) / sum(counts)
    assert data["summary"]["timing_floor"]["ttft"] == pytest.approx(pooled_ttft, abs=1e-6)


def test_a_replay_is_unchanged_by_the_floor():
    """The floor replays a copy: the rows compared are those of the trace as recorded."""
    trace = trace_of([0, 10_000])
    seen = []

    def simulate(named):
        seen.append([r.send_time_us for r in named.trace.records])
        return [result(r.request_id, 1_000, 3_000) for r in named.trace.records]

    run_compare([NamedTrace("t", trace)], simulate, timing_floor_us=2_000)
    assert seen[0] == [0, 10_000] and seen[1] != seen[0]
    assert [r.send_time_us for r in trace.records] == [0, 10_000]


def test_cli_calibrate_with_coefficients_reports_the_floor_and_refuses_it_where_nothing_is_replayed(tmp_path):
    trace = str(REPO / "traces" / "real_day52" / "kv32_burst8x_s5203.csv")
    lookup = ["--coeffs", str(REPO / "defaults.yaml"), "--model", "tiny", "--gpu", "cpu", "--tp", "1"]
    out = tmp_path / "c.json"
    res = CliRunner().invoke(app, ["calibrate", trace, *lookup, "--report", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["trace_info"]["timing_floor"]["jitter_us"] == 2_000
    assert data["summary_rows"][0]["ttft_timing_floor"] == data["trace_info"]["timing_floor"]["ttft"]
    for extra in (["--sim-results", trace], ["--fit", "--model", "tiny", "--gpu", "cpu", "--tp", "1"]):
        res = CliRunner().invoke(app, ["calibrate", trace, *extra, "--timing-floor-ms", "2"])
        assert res.exit_code != 0 and "not with --fit or --sim-results" in str(res.exception)
