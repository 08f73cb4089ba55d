"""`blis convert`: ServeGen import (synthetic sample in tests/data/servegen), trace fitting, presets."""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from blis_sessions import as_blis_users

from blis_cal.errors import ConfigError
from blis_cal.trace import read_trace
from blis_cal.trace_links import trace_links
from blis_cal.workload import generate, load_spec, parse_spec, spec_to_yaml
from blis_cal.workload.fit_trace import fit_arrival, rate_rps, spec_from_trace
from blis_cal.workload.servegen import parse_pdf, servegen_spec

SERVEGEN = Path(__file__).parent / "data" / "servegen"
TRACES = Path(__file__).resolve().parent.parent / "traces"


def blis(*args, check=True):
    return subprocess.run(
        [sys.executable, "-m", "blis_cal", *args], capture_output=True, text=True, check=check
    )


# ---------------------------------------------------------------------------------------------- servegen


def test_servegen_one_client_per_active_chunk():
    spec = servegen_spec(SERVEGEN, num_requests=100)
    by_id = {c.id: c for c in spec.clients}
    assert list(by_id) == ["servegen-chunk-0", "servegen-chunk-1", "servegen-chunk-2"]  # chunk 3 is idle
    c0, c1, c2 = by_id.values()
    assert (c0.rate_fraction, c0.arrival.process, c0.arrival.cv) == (3.0, "gamma", 1.8)  # busiest row
    assert (c1.rate_fraction, c1.arrival.process, c1.arrival.cv) == (1.25, "weibull", 0.6)  # bad rows skipped
    assert (c2.rate_fraction, c2.arrival.process) == (0.5, "poisson")  # no pattern
    assert c0.tenant_id == "chunk-0" and c0.streaming
    assert spec.aggregate_rate == pytest.approx(4.75)  # chunks keep their own rates
    # First window in lexicographic key order: "0" (float and scientific keys rounded to counts).
    assert c0.input_distribution.params == {"100": 0.25, "200": 0.5, "350": 0.25}
    assert c0.output_distribution.params == {"50": 0.5, "150": 0.5}


def test_servegen_span_picks_rows_and_windows_lexicographically():
    spec = servegen_spec(SERVEGEN, num_requests=10, span_start=600)
    c0, c1, c2 = spec.clients
    assert c0.rate_fraction == 3.0
    # Windows "1200" < "600" lexicographically; chunk 0's "1200" has an empty output PDF, so "600" it is.
    assert c0.input_distribution.params == {"400": 1.0}
    assert c1.input_distribution.params == {"500": 1.0}  # chunk 1's "1200" is complete
    assert c2.rate_fraction == 0.25


def test_servegen_regenerated_rates_and_lengths():
    spec = dataclasses.replace(servegen_spec(SERVEGEN), num_requests=6000)
    w = generate(spec, seed=1)
    assert rate_rps([r.arrival_us for r in w.requests]) == pytest.approx(4.75, rel=0.05)
    share = np.mean([r.client_id == "servegen-chunk-0" for r in w.requests])
    assert share == pytest.approx(3.0 / 4.75, abs=0.02)
    c2 = [r for r in w.requests if r.client_id == "servegen-chunk-2"]
    assert {(r.input_tokens, r.output_tokens) for r in c2} == {(800, 200)}


def test_servegen_data_key_in_a_spec_file(tmp_path):
    path = tmp_path / "sg.yaml"
    path.write_text(
        f"aggregate_rate: 10\nnum_requests: 50\nservegen_data: {{path: {SERVEGEN}, span_end: 600}}\n"
    )
    spec = load_spec(path)
    assert [c.rate_fraction for c in spec.clients] == [2.0, 1.0, 0.5]
    assert len(generate(spec).requests) == 50
    assert load_spec(path) == parse_spec(yaml.safe_load(spec_to_yaml(spec)), "again")


def test_parse_pdf():
    assert parse_pdf("{100: 1, 2.5e2: 3}", "w") == {"100": 0.25, "250": 0.75}
    assert parse_pdf("{}", "w") == {}
    with pytest.raises(ConfigError, match="w: not a"):
        parse_pdf("[1, 2]", "w")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "chunk-0-dataset.json").unlink(), "chunk-0-dataset.json: missing"),
        (
            lambda d: (d / "chunk-0-dataset.json").write_text("{oops"),
            "chunk-0-dataset.json: line 1: not valid JSON",
        ),
        (
            lambda d: (d / "chunk-1-dataset.json").write_text('{"0": {"input_tokens": "{1: }"}}'),
            "not a {token",
        ),
        (lambda d: [p.unlink() for p in d.glob("chunk-*-trace.csv")], "no chunk-<ID>-trace.csv files"),
        (
            lambda d: [p.write_text("0,0,1,Gamma\n") for p in d.glob("chunk-*-trace.csv")],
            "every chunk is idle",
        ),
        (lambda d: (d / "chunk-1-trace.csv").write_text("0,1.0,50,Weibull\n"), "weibull cv must be in"),
    ],
)
def test_servegen_bad_inputs(tmp_path, mutate, message):
    directory = tmp_path / "sg"
    shutil.copytree(SERVEGEN, directory)
    mutate(directory)
    with pytest.raises(ConfigError, match=message.replace("{", r"\{")):
        servegen_spec(directory)


# ---------------------------------------------------------------------------------------------- trace fit


@pytest.mark.parametrize("name", ["A_poisson_0.8", "C_prefix_1.0"])
@pytest.mark.parametrize("lengths", ["empirical", "gaussian"])
def test_trace_fit_regenerates_rate_and_length_means_within_10_percent(name, lengths):
    trace = read_trace(TRACES / f"{name}.csv")
    spec = spec_from_trace(trace, lengths=lengths)
    assert spec.num_requests == len(trace.records)
    # A large regenerated sample tests the fitted parameters, not this seed's luck.
    w = generate(dataclasses.replace(spec, num_requests=4000), seed=1)
    recs = trace.records
    pairs = {
        "rate": (rate_rps([r.arrival_time_us for r in recs]), rate_rps([r.arrival_us for r in w.requests])),
        "input": (np.mean([r.input_tokens for r in recs]), np.mean([r.input_tokens for r in w.requests])),
        "total input": (
            np.mean([r.total_input_tokens for r in recs]),
            np.mean([r.total_input_tokens for r in w.requests]),
        ),
        "output": (np.mean([r.output_tokens for r in recs]), np.mean([r.output_tokens for r in w.requests])),
    }
    for what, (observed, regenerated) in pairs.items():
        assert regenerated == pytest.approx(observed, rel=0.10), what
    # At the spec's own size the request count is the trace's.
    assert len(generate(spec, seed=2).requests) == len(recs)


def test_trace_fit_keeps_prefix_groups():
    trace = read_trace(TRACES / "C_prefix_1.0.csv")
    spec = spec_from_trace(trace)
    groups = {c.prefix_group: c.prefix_length for c in spec.clients}
    assert groups == {f"group-{i}": 768 for i in range(4)}
    w = generate(spec, seed=1)
    heads = {}
    for r in w.requests:
        heads.setdefault(r.prefix_group, set()).add(tuple(r.token_ids(8192)[:768]))
    assert all(len(h) == 1 for h in heads.values()) and len(heads) == 4


def test_fit_arrival_recognises_processes():
    rng = np.random.default_rng(0)
    assert fit_arrival(np.cumsum(rng.exponential(1e5, 2000))).process == "poisson"
    assert fit_arrival(np.arange(0, 10**7, 10**5)).process == "constant"
    bursty = fit_arrival(np.cumsum(rng.gamma(1 / 9, 9e5, 5000)))
    assert bursty.process == "gamma" and bursty.cv == pytest.approx(3.0, rel=0.1)


def test_trace_fit_sessions_become_multi_turn(tmp_path):
    trace = read_trace(TRACES / "A_poisson_0.8.csv")
    for i, r in enumerate(trace.records):
        r.session_id, r.round_index = f"s{i // 3}", i % 3
        r.think_time_us = 2000 if r.round_index else 0
    spec = spec_from_trace(trace)
    (client,) = spec.clients
    assert client.multi_turn.max_rounds == 3 and client.multi_turn.think_time_us == 2000
    assert client.is_closed_loop
    assert spec.aggregate_rate == pytest.approx(
        rate_rps([r.arrival_time_us for r in trace.records[::3]]), rel=1e-6
    )


@pytest.mark.parametrize(
    ("path", "users", "think_us", "rounds"),
    [
        ("real/closed12.csv", 12, 1_000_000, None),  # think time recorded per row
        ("real_day8/closed16z_s803.csv", 16, 0, None),  # sent the moment the answer came
        ("real_day22/closed12_s2201.csv", 12, 1_000_000, None),  # each user one BLIS session
        ("real_day8/chat4_s809.csv", 4, 300_000, 4),  # chat sessions, the next one after a think time
    ],
)
def test_trace_fit_closed_loop_users_stay_closed_loop_users(path, users, think_us, rounds):
    spec = spec_from_trace(read_trace(TRACES / path))
    (client,) = spec.clients
    assert (client.concurrency, client.think_time_us, client.rate_fraction) == (users, think_us, None)
    assert spec.aggregate_rate == 0.0
    assert (client.multi_turn.max_rounds if client.multi_turn else None) == rounds
    again = parse_spec(yaml.safe_load(spec_to_yaml(spec)), "round trip")
    assert again == spec
    workload = generate(again)
    assert workload.closed_loop and len(workload.requests) == users  # the rest follow their answers


def test_trace_fit_of_users_started_staggered_recorded_without_sessions_gives_users_and_their_pause():
    """Day 41's sixteen users pausing 2 s, started 125 ms apart, as a tool without session ids or think times
    records them: still sixteen users, the pause found (2 s and the quickest user's client overhead)."""
    trace = read_trace(TRACES / "real_day41/closed16w2_s4104.csv")
    foreign = dataclasses.replace(
        trace,
        records=[
            dataclasses.replace(
                r,
                client_id="client-0",
                session_id="",
                round_index=0,
                think_time_us=0,
                arrival_time_us=r.send_time_us,
            )
            for r in trace.records
        ],
    )
    (client,) = spec_from_trace(foreign).clients
    assert (client.concurrency, client.rate_fraction) == (16, None)
    assert 2_000_000 <= client.think_time_us < 2_005_000


@pytest.mark.parametrize("fit", ["empirical", "gaussian"])
def test_trace_fit_of_varied_think_times_regenerates_their_spread(fit):
    """Users whose recorded pauses vary (lognormal, median 0.46 s): `median` keeps BLIS's one think time, a
    length fit gives a think_time_distribution whose draws have the recorded median and range."""
    trace = read_trace(TRACES / "real_day23/closed16ln_s2305.csv")
    recorded = [r.think_time_us for r in trace.records if r.round_index > 0]
    (plain,) = spec_from_trace(trace).clients
    assert (plain.think_time_us, plain.think_time_distribution) == (int(np.median(recorded)), None)
    spec = spec_from_trace(trace, think_times=fit, num_requests=4000)
    (client,) = spec.clients
    assert (client.concurrency, client.think_time_us, client.think_time_distribution.type) == (16, 0, fit)
    assert parse_spec(yaml.safe_load(spec_to_yaml(spec)), "round trip") == spec
    workload = generate(spec)
    drawn, pending = [], list(workload.requests)
    while pending:
        req = pending.pop()
        nxt = workload.follow_up(req, 5, req.arrival_us + 1_000_000)
        if nxt is not None:
            drawn.append(nxt.think_time_us)
            pending.append(nxt)
    assert len(drawn) == 4000 - 16 and min(recorded) <= min(drawn) and max(drawn) <= max(recorded)
    if fit == "empirical":
        assert set(drawn) <= set(recorded)
        assert np.median(drawn) == pytest.approx(np.median(recorded), rel=0.1)
    else:
        assert np.mean(drawn) == pytest.approx(np.mean(recorded), rel=0.1)


def test_trace_fit_of_one_think_time_stays_a_constant_and_bad_fit_names_are_listed():
    trace = read_trace(TRACES / "real_day22/closed12_s2201.csv")  # every pause 1 s
    (client,) = spec_from_trace(trace, think_times="empirical").clients
    assert (client.think_time_us, client.think_time_distribution) == (1_000_000, None)
    with pytest.raises(
        ConfigError, match="unknown think-time fit 'mean'; allowed: median, empirical, gaussian"
    ):
        spec_from_trace(trace, think_times="mean")


def test_trace_fit_blis_concurrency_user_sessions_become_users_not_chats():
    """BLIS's `--concurrency` trace: each user one session `concurrency_distribution_user_<u>` of unending
    rounds, no think-time column. The fit gives 16 users, not 16 chat sessions at an arrival rate."""
    trace = as_blis_users(read_trace(TRACES / "real_day8/closed16z_s803.csv"))
    spec = spec_from_trace(trace)
    (client,) = spec.clients
    assert (client.concurrency, client.think_time_us, client.multi_turn) == (16, 0, None)
    assert max(r.round_index for r in trace.records) > 10 and spec.aggregate_rate == 0.0


def test_trace_fit_keeps_open_and_closed_loop_clients_apart():
    """One open-loop client and twelve closed-loop users in one trace: the rate and the arrival process are
    the open-loop client's alone."""
    open_loop, closed = read_trace(TRACES / "real/a08.csv"), read_trace(TRACES / "real/closed12.csv")
    shift = max(r.request_id for r in open_loop.records) + 1
    rows = [dataclasses.replace(r, client_id="open") for r in open_loop.records] + [
        dataclasses.replace(r, request_id=r.request_id + shift) for r in closed.records
    ]
    spec = spec_from_trace(dataclasses.replace(open_loop, records=rows))
    by_id = {c.id: c for c in spec.clients}
    assert by_id["users"].concurrency == 12 and by_id["open"].concurrency is None
    assert spec.aggregate_rate == pytest.approx(rate_rps([r.arrival_time_us for r in open_loop.records]))
    assert by_id["open"].arrival == fit_arrival([r.arrival_time_us for r in open_loop.records])


def test_trace_fit_closed_loop_users_that_switch_prefix_groups_still_make_a_valid_spec():
    """Another tool's trace may put a user's requests in several prefix groups (spec clients): every
    closed-loop group keeps at least one user."""
    trace = read_trace(TRACES / "real/closed12.csv")
    follows = trace_links(trace)  # every user's first request in g0: g1 holds only follow-ups
    rows = [
        dataclasses.replace(r, prefix_group=f"g{int(r.request_id in follows and r.request_id % 2)}")
        for r in trace.records
    ]
    spec = spec_from_trace(dataclasses.replace(trace, records=rows))
    assert len(spec.clients) == 2 and all(c.concurrency and c.concurrency >= 1 for c in spec.clients)
    assert parse_spec(yaml.safe_load(spec_to_yaml(spec)), "round trip") == spec


def test_trace_fit_bad_inputs():
    trace = read_trace(TRACES / "A_poisson_0.8.csv")
    with pytest.raises(ConfigError, match="unknown length fit 'normal'; allowed: empirical, gaussian"):
        spec_from_trace(trace, lengths="normal")
    trace.records = trace.records[:1]
    with pytest.raises(ConfigError, match="at least 2 requests"):
        spec_from_trace(trace)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_convert_preset_round_trips(tmp_path):
    proc = blis("convert", "preset", "chatbot", "--rate", "4", "--num-requests", "50", "--seed", "3")
    spec = parse_spec(yaml.safe_load(proc.stdout), "stdout")
    assert spec.aggregate_rate == 4.0 and spec.num_requests == 50 and spec.seed == 3
    assert len(generate(spec).requests) == 50


def test_cli_convert_trace_and_servegen_write_loadable_specs(tmp_path):
    out = tmp_path / "a.yaml"
    proc = blis("convert", "trace", str(TRACES / "A_poisson_0.8.csv"), "-o", str(out))
    assert "req/s" in proc.stderr
    assert load_spec(out).num_requests == 150
    proc = blis("convert", "trace", str(TRACES / "real" / "closed12.csv"))
    assert "12 closed-loop user(s)" in proc.stderr and "req/s" not in proc.stderr
    proc = blis("convert", "servegen", str(SERVEGEN), "--duration", "60")
    spec = parse_spec(yaml.safe_load(proc.stdout), "stdout")
    assert spec.horizon == 60_000_000 and len(spec.clients) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "preset", "nope", "--rate", "1"], "unknown workload preset 'nope'; allowed: bursty"),
        (["convert", "preset", "chatbot", "--rate", "-1"], "--rate: must be > 0"),
        (["convert", "servegen", "/nonexistent-dir"], "not a directory"),
        (["convert", "trace", "/nonexistent.csv"], "nonexistent.csv"),
    ],
)
def test_cli_convert_bad_input_is_one_line_exit_2(args, message):
    proc = blis(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
