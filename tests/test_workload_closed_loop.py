"""Workloads through the simulator: open-loop conversion, and closed loops via the follow-up bridge."""

import itertools
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from closed_loop_capture import users_client
from sim_results import max_in_flight

from blis_cal.replay.from_workload import follow_up_for, requests_from_workload
from blis_cal.simulate import BlackboxModel, RequestResult, SimConfig, simulate
from blis_cal.trace import read_trace
from blis_cal.workload import generate, parse_spec, spec_to_yaml, workload_from_options

MODEL = BlackboxModel((1000.0, 1.0, 100.0), (5000.0, 10.0, 200.0))
CONFIG = SimConfig(block_size=16, num_gpu_blocks=4096, max_num_seqs=64, max_num_batched_tokens=2048)


def users_spec(concurrency, think_us, num_requests, multi_turn=None):
    client = users_client(
        concurrency,
        {"think_time_us": think_us},
        inputs=(200, 50, 20, 400),
        outputs=(40, 10, 5, 80),
        prefix_group="sys",
        prefix_length=64,
    )
    if multi_turn:
        client["reasoning"] = {"multi_turn": multi_turn}
    return parse_spec({"num_requests": num_requests, "clients": [client]}, "t")


def run(workload):
    return simulate(requests_from_workload(workload), CONFIG, MODEL, follow_up_for(workload))


def test_open_loop_requests_keep_lengths_and_prefix():
    w = workload_from_options(preset="prefix-heavy", rate=5, num_requests=60, seed=1)
    sim = requests_from_workload(w)
    assert follow_up_for(w) is None
    for wr, sr in zip(w.requests, sim, strict=True):
        assert sr.input_len == wr.prefix_length + wr.input_tokens == sum(n for _, n in sr.segments)
        assert (sr.request_id, sr.arrival_us, sr.output_len) == (
            wr.request_id,
            wr.arrival_us,
            wr.output_tokens,
        )
    result = run(w)
    assert [r.status for r in result.results] == ["ok"] * 60
    # The shared 50-token prefix is 3 full 16-token blocks: later group members hit the cache.
    assert max(r.cached_tokens for r in result.results) >= 48


@pytest.mark.parametrize(("concurrency", "think_us"), [(1, 0), (4, 0), (8, 250_000)])
def test_concurrency_never_exceeded_and_think_time_respected(concurrency, think_us):
    w = generate(users_spec(concurrency, think_us, 80), seed=3)
    bridge = follow_up_for(w)
    out = simulate(requests_from_workload(w), CONFIG, MODEL, bridge)
    results = out.results
    assert len(results) == 80  # budget spent exactly: the pre-generated users plus follow-ups
    assert all(r.status == "ok" for r in results)
    in_flight = max_in_flight(results)
    assert in_flight <= concurrency
    if think_us == 0:  # every user in flight from t = 0 (with a think time they start u·think/N apart)
        assert in_flight == concurrency
    by_id = {r.request_id: r for r in results}
    finishes = sorted(r.finish_us for r in results)
    for req in bridge.released:
        # Released at some earlier request's last token + think time (the user's previous request).
        assert req.arrival_us - think_us in finishes
        assert by_id[req.request_id].arrival_us == req.arrival_us


def test_each_concurrency_user_is_one_blis_session_whose_rounds_follow_its_answers():
    """BLIS names closed-loop user u's session `concurrency_<client>_user_<u>`; its requests are rounds 0, 1, ...,
    each sent at the previous round's last token + think time."""
    w = generate(users_spec(3, 5000, 30), seed=4)
    bridge = follow_up_for(w)
    by_id = {r.request_id: r for r in simulate(requests_from_workload(w), CONFIG, MODEL, bridge).results}
    sessions: dict[str, list] = {}
    for req in sorted([*w.requests, *bridge.released], key=lambda r: r.arrival_us):
        sessions.setdefault(req.session_id, []).append(req)
    assert sorted(sessions) == [f"concurrency_u_user_{u}" for u in range(3)]
    for rounds in sessions.values():
        assert [r.round_index for r in rounds] == list(range(len(rounds)))
        for prev, nxt in itertools.pairwise(rounds):
            assert nxt.arrival_us == by_id[prev.request_id].finish_us + 5000


def test_concurrency_flag_users_carry_blis_session_ids_and_start_think_over_n_apart():
    w = workload_from_options(concurrency=3, think_time_ms=300, num_requests=9, seed=1)
    assert [r.session_id for r in w.requests] == [f"concurrency_distribution_user_{u}" for u in range(3)]
    assert [r.arrival_us for r in w.requests] == [0, 100_000, 200_000]
    nxt = w.follow_up(w.requests[0], 10, 1_000_000)
    assert (nxt.arrival_us, nxt.session_id, nxt.round_index) == (
        1_300_000,
        "concurrency_distribution_user_0",
        1,
    )


def test_closed_loop_run_is_deterministic():
    a = run(generate(users_spec(4, 1000, 50), seed=2))
    b = run(generate(users_spec(4, 1000, 50), seed=2))
    assert a.results == b.results


def test_multi_turn_sessions_hit_the_prefix_cache_on_history():
    mt = {"max_rounds": 4, "think_time_us": 100_000, "context_growth": "accumulate", "single_session": False}
    w = generate(users_spec(2, 0, 40, multi_turn=mt), seed=5)
    bridge = follow_up_for(w)
    out = simulate(requests_from_workload(w), CONFIG, MODEL, bridge)
    assert len(out.results) == 40
    by_id = {r.request_id: r for r in out.results}
    later = [r for r in bridge.released if r.round_index > 0]
    assert later
    for req in later:
        result = by_id[req.request_id]
        assert result.input_tokens == req.total_input_tokens
        # The previous round's prompt (at least) is already in the KV cache.
        assert result.cached_tokens >= 64


# ---------------------------------------------------------------------------------------------- blis run


def blis(*args):
    return subprocess.run([sys.executable, "-m", "blis_cal", *args], capture_output=True, text=True)


COEFFS = ("--alpha", "1000,1,100", "--beta", "5000,10,200")


def test_cli_run_concurrency_keeps_users_in_flight(tmp_path):
    out = blis(
        "run", "--concurrency", "3", "--num-requests", "40", "--results", str(tmp_path / "r.json"), *COEFFS
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["completed"] == 40
    rows = json.loads((tmp_path / "r.json").read_text())
    assert len(rows) == 40
    assert max_in_flight([SimpleNamespace(**r) for r in rows]) == 3


def test_cli_run_workload_spec_and_preset(tmp_path):
    spec = tmp_path / "w.yaml"
    spec.write_text(spec_to_yaml(users_spec(2, 5000, 30)))
    out = blis("run", "--workload-spec", str(spec), *COEFFS)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["completed"] == 30  # the spec's own num_requests
    out = blis("run", "--preset", "prefix-heavy", "--rate", "4", "--num-requests", "25", *COEFFS)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["completed"] == 25


def test_cli_run_default_is_1000_poisson_chatbot_requests(tmp_path):
    out = blis("run", "--rate", "50", "--results", str(tmp_path / "r.json"), *COEFFS)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "r.json").read_text())
    assert len(rows) == 1000
    assert min(r["input_tokens"] for r in rows) >= 2 and max(r["input_tokens"] for r in rows) <= 800


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "chatbot"], "--preset needs --rate"),
        (["--preset", "nope", "--rate", "1"], "unknown workload preset 'nope'"),
        (["--rate", "1", "--concurrency", "2"], "--rate cannot be combined with --concurrency"),
        (["--workload-spec", "/nonexistent.yaml"], "cannot read workload spec"),
        ([], "give a workload"),
        (["--rate", "1", "--think-time-ms", "100"], "--think-time-ms needs --concurrency"),
        (["--concurrency", "2", "--think-time-ms", "-5"], "--think-time-ms: must be >= 0 ms, got -5.0"),
        (["--concurrency", "2", "--think-time-ms", "nan"], "--think-time-ms: must be >= 0 ms, got nan"),
    ],
)
def test_cli_run_bad_workload_flags(args, message):
    out = blis("run", *args, *COEFFS)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


def test_cli_run_trace_output_keeps_workload_identity(tmp_path):
    prefix = tmp_path / "sim"
    out = blis(
        "run",
        "--preset",
        "prefix-heavy",
        "--rate",
        "4",
        "--num-requests",
        "20",
        "--trace-output",
        str(prefix),
        *COEFFS,
    )
    assert out.returncode == 0, out.stderr
    trace = read_trace(tmp_path / "sim.csv")
    w = workload_from_options(preset="prefix-heavy", rate=4, num_requests=20)
    assert trace.header.workload_spec == "preset:prefix-heavy" and trace.header.workload_seed == 0
    got = [
        (r.client_id, r.prefix_group, r.prefix_length, r.input_tokens, r.arrival_time_us)
        for r in trace.records
    ]
    assert got == [
        (r.client_id, r.prefix_group, r.prefix_length, r.input_tokens, r.arrival_us) for r in w.requests
    ]


def test_bridge_on_rejection_releases_the_users_next_request_at_once():
    w = generate(users_spec(1, 700, 10), seed=1)
    bridge = follow_up_for(w)
    first = w.requests[0]
    rejected = RequestResult(
        request_id=first.request_id, status="rejected", instance=-1, arrival_us=1000, queued_us=-1,
        scheduled_us=-1, first_token_us=-1, finish_us=-1, ttft_us=-1, e2e_us=-1, itl_mean_us=0.0,
        input_tokens=first.total_input_tokens, output_tokens=0, num_preemptions=0, cached_tokens=0,
    )  # fmt: skip
    (nxt,) = bridge(rejected)
    assert nxt.arrival_us == 1000 + 700 and nxt.request_id == 1
    assert bridge(rejected) == []  # each result releases at most once
