"""`blis demo`: the observe -> replay -> calibrate loop against the twin, and its helpers."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from blis_cal.cli import app
from blis_cal.demo import DemoConfig, client_overhead_us, rescale_trace, run_demo
from blis_cal.errors import ConfigError
from blis_cal.trace import read_trace
from blis_cal.twin.server import ServedRequest


def test_rescaling_a_trace_scales_every_time_and_nothing_else(trace_a):
    trace = read_trace(trace_a)
    trace.header.network = {"measured_rtt_ms": 1.5}
    scaled = rescale_trace(trace, 3.0)
    for before, after in zip(trace.records, scaled.records, strict=True):
        assert after.send_time_us == round(before.send_time_us * 3)
        assert after.ttft_us == pytest.approx(before.ttft_us * 3, abs=1)
        assert after.e2e_us == pytest.approx(before.e2e_us * 3, abs=1)
        assert (after.input_tokens, after.output_tokens, after.num_chunks) == (
            before.input_tokens,
            before.output_tokens,
            before.num_chunks,
        )
    assert scaled.header.network["measured_rtt_ms"] == pytest.approx(4.5)
    assert trace.header.network["measured_rtt_ms"] == 1.5  # the input is not modified
    rid = trace.records[0].request_id
    assert [c.tokens for c in scaled.itl[rid]] == [c.tokens for c in trace.itl[rid]]
    back = rescale_trace(scaled, 1 / 3.0)
    assert all(
        abs(a.first_chunk_time_us - b.first_chunk_time_us) <= 1
        for a, b in zip(trace.records, back.records, strict=True)
    )


def test_client_overhead_matches_requests_by_id(trace_a):
    trace = read_trace(trace_a)
    first, second = trace.records[:2]
    first.x_request_id, second.x_request_id = "a", "b"
    served = [
        # at speed 2 the twin's 100 ms simulated TTFT is 50 ms of wall time
        ServedRequest("a", 0, 1000, 100_000, 200_000, 10, 5, 0),
        ServedRequest("zzz", 1, 0, 10, 20, 10, 5, 0),  # no client record: ignored
    ]
    assert client_overhead_us(trace, served, speed=2.0) == [first.ttft_us - 49_500]
    assert client_overhead_us(trace, served, speed=2.0, warmup=first.request_id + 1) == []


@pytest.mark.parametrize(("field", "value"), [("speed", 0), ("duration_s", -1.0), ("rate", 0.0)])
def test_bad_demo_settings_are_config_errors(tmp_path, field, value):
    with pytest.raises(ConfigError):
        DemoConfig(workdir=tmp_path, **{field: value})


def test_bad_demo_flag_is_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--speed", "0"])
    assert result.exit_code != 0


@pytest.mark.slow
def test_observing_the_twin_recovers_its_coefficients(tmp_path):
    """Done-when of issue 7: observe the twin at speed > 1, fit, and recover α/β within 5 %; replaying the
    observed trace with the true coefficients reproduces TTFT and E2E within 2 % MAPE."""
    result = run_demo(DemoConfig(workdir=tmp_path))  # exactly `blis demo`: speed 2, 60 s of traffic
    assert result.by_status == {"ok": result.requests}
    errors = result.coefficient_errors()
    assert max(errors.values()) <= 0.05, errors
    assert result.parity_mape["ttft"] <= 0.02 and result.parity_mape["e2e"] <= 0.02, result.parity_mape
    report = json.loads(result.report_json.read_text())
    assert report["demo"]["true_beta"] == list(result.true_beta)
    assert "models:" in result.defaults_yaml.read_text()
    assert result.report_html.read_text().startswith("<!doctype html>")
