"""Replaying rows that answer an earlier row (closed-loop users, chat sessions): links and session modes."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from closed_loop_capture import CONFIG, MODEL, captured
from conftest import TRACES
from sim_results import max_in_flight

from blis_cal.calibrate.compare import compare
from blis_cal.calibrate.fit import NamedTrace, model_forms, trace_simulator
from blis_cal.calibrate.pipeline import run_fit
from blis_cal.calibrate.synthetic import poisson_requests, simulated_trace
from blis_cal.errors import ConfigError
from blis_cal.replay import (
    config_from_trace,
    replay_trace,
    requests_from_trace,
    results_to_trace,
    session_modes,
    trace_requests,
)
from blis_cal.replay.from_workload import requests_from_workload, workload_trace
from blis_cal.replay.sessions import ALIGN_ANSWERS, ALIGN_LINE_MIN
from blis_cal.simulate import BlackboxModel, simulate
from blis_cal.trace import Trace, TraceHeader, TraceRecord, read_trace, write_trace
from blis_cal.trace_links import Link, trace_links
from blis_cal.workload import generate, parse_spec

SLOW = BlackboxModel((1500.0, 1.5, 150.0), (7500.0, 15.0, 300.0))  # every coefficient × 1.5
SLOW_FLAGS = ("--alpha", "1500,1.5,150", "--beta", "7500,15,300")
USERS = 4


def blis(*args):
    return subprocess.run([sys.executable, "-m", "blis_cal", *args], capture_output=True, text=True)


def replay(trace, model, mode):
    return replay_trace(trace, CONFIG, model, session_mode=mode).results


def test_closed_loop_users_are_linked_to_the_answer_they_waited_for():
    trace = captured()
    links = trace_links(trace)
    by_id = {r.request_id: r for r in trace.records}
    assert len(links) == len(trace.records) - USERS  # every row but each user's first
    for child, link in links.items():
        parent = by_id[link.parent_id]
        assert by_id[child].arrival_time_us == parent.last_chunk_time_us + by_id[child].think_time_us
        assert link.gap_us == by_id[child].send_time_us - parent.last_chunk_time_us == 200_000


def test_session_rounds_are_linked_by_session_and_round():
    trace = captured(multi_turn={"max_rounds": 3, "context_growth": "accumulate"})
    links = trace_links(trace)
    by_id = {r.request_id: r for r in trace.records}
    assert len(links) == len(trace.records) - USERS  # every row but each user's first
    for child, link in links.items():
        parent, rec = by_id[link.parent_id], by_id[child]
        if rec.round_index > 0:
            assert (parent.session_id, parent.round_index) == (rec.session_id, rec.round_index - 1)
        else:  # a user's next session starts after the last answer of its previous one
            assert parent.round_index == 2 and parent.session_id != rec.session_id
            assert rec.arrival_time_us == parent.last_chunk_time_us + rec.think_time_us


def row(rid, arrival, last, client="c", session="", round_index=0, think=0):
    return TraceRecord(
        request_id=rid,
        client_id=client,
        session_id=session,
        round_index=round_index,
        input_tokens=100,
        output_tokens=10,
        arrival_time_us=arrival,
        send_time_us=arrival + 5,
        first_chunk_time_us=arrival + 100,
        last_chunk_time_us=last,
        num_chunks=10,
        think_time_us=think,
    )


def test_open_loop_rows_and_early_rounds_are_not_linked():
    rows = [
        row(0, 1000, 5000),
        row(1, 5000, 9000, client="other"),  # arrives at row 0's answer, but another client's
        row(2, 7000, 9500, think=2000),  # answer of row 0 + 2000 µs think: linked
        row(3, 2000, 8000, client="d", session="s", round_index=0),
        row(4, 6000, 9900, client="d", session="s", round_index=1),  # before round 0: open-loop session
        row(5, 10000, 12000, client="d", session="s", round_index=2),  # after round 1's answer: linked
    ]
    trace = Trace(header=TraceHeader(), records=rows, itl=None, notes=[])
    assert trace_links(trace) == {2: Link(0, 7005 - 5000, 2000), 5: Link(4, 10005 - 9900, 0)}


@pytest.mark.parametrize("mode", ["fixed", "closed-loop", "causal", "adaptive", "aligned"])
def test_same_speed_replay_reproduces_the_capture_in_every_mode(mode):
    trace = captured()
    results = replay(trace, MODEL, mode)
    rep = compare(trace, results)
    assert rep.trace_info["compared"] == len(trace.records)  # conservation: every row replayed once
    for metric in ("ttft", "itl", "e2e"):
        assert rep.mape(metric) < 0.01


def test_causal_never_sends_before_the_recorded_time_or_the_predecessors_simulated_answer():
    trace = captured()
    links = trace_links(trace)
    recorded = {r.request_id: r.send_time_us for r in trace.records}
    for model in (SLOW, BlackboxModel((500.0, 0.5, 50.0), (2500.0, 5.0, 100.0))):
        causal = {r.request_id: r for r in replay(trace, model, "causal")}
        loop = {r.request_id: r for r in replay(trace, model, "closed-loop")}
        fixed = {r.request_id: r for r in replay(trace, model, "fixed")}
        assert len(causal) == len(loop) == len(fixed) == len(trace.records)
        for rid, res in causal.items():
            assert fixed[rid].arrival_us == recorded[rid]
            link = links.get(rid)
            if link is None:
                assert res.arrival_us == loop[rid].arrival_us == recorded[rid]
                continue
            released = causal[link.parent_id].finish_us + link.gap_us
            assert res.arrival_us == max(recorded[rid], released)
            assert loop[rid].arrival_us == loop[link.parent_id].finish_us + link.gap_us


def test_a_slower_server_keeps_closed_loop_users_waiting_instead_of_piling_up():
    """Replayed at recorded times, a 1.5x slower simulation has users send before their answer is in: more
    requests in flight than there are users, and E2E beyond the model's 1.5x; causal keeps both."""
    trace = captured()
    fixed = replay(trace, SLOW, "fixed")
    causal = replay(trace, SLOW, "causal")
    assert max_in_flight(causal) <= USERS < max_in_flight(fixed)
    e2e_error = {}
    for name, results in (("fixed", fixed), ("causal", causal)):
        real, sim = compare(trace, results).pairs.arrays("e2e")
        e2e_error[name] = float(np.mean(sim / real))
    assert 1.4 < e2e_error["causal"] < 1.6 and e2e_error["fixed"] > e2e_error["causal"]


def test_aligned_never_sends_before_the_recorded_time_or_the_predecessors_simulated_answer():
    """Causality and conservation in the default mode, on a slower and on a faster simulation: a user sends
    only after its simulated answer (+ its recorded client overhead), and (on a cache that never preempts)
    never before its recorded time; a slower simulation keeps the users waiting as causal does."""
    trace = captured(think_us=200_000)
    links = trace_links(trace)
    by_id = {r.request_id: r for r in trace.records}
    for model in (SLOW, BlackboxModel((500.0, 0.5, 50.0), (2500.0, 5.0, 100.0))):
        aligned = {r.request_id: r for r in replay(trace, model, "aligned")}
        assert len(aligned) == len(trace.records)
        for rid, res in aligned.items():
            link = links.get(rid)
            if link is None:
                assert res.arrival_us == by_id[rid].send_time_us
                continue
            overhead = link.gap_us - link.think_us
            assert res.arrival_us >= max(
                by_id[rid].send_time_us, aligned[link.parent_id].finish_us + overhead
            )
    assert max_in_flight(replay(trace, SLOW, "aligned")) <= USERS


def test_aligned_shifts_a_paused_row_by_the_lateness_of_recent_answers():
    """The rule itself: each answer's lateness (simulated − recorded) joins a window of ALIGN_ANSWERS; until
    ALIGN_LINE_MIN answers have come, a row sent after a pause goes at its recorded time + their mean (never
    earlier until the replay has preempted a request, earlier too from then on), or right after its own answer
    (+ the recorded overhead) if that is later; a row sent as soon as its answer came goes at that answer."""
    send = session_modes.get("aligned").new_sender()
    paused = Link(parent_id=0, gap_us=200_000, think_us=195_000)  # 5 ms of client overhead
    # answer 30 ms late: shifted 30 ms
    assert send(1_000_000, 1_030_000, paused, False) == 1_030_000
    # answer 50 ms early: the mean lateness −10 ms shifts nothing (never earlier than recorded)
    assert send(2_000_000, 1_950_000, paused, False) == 2_000_000
    # answer 400 ms late: mean (30 − 50 + 400) / 3 = 126.7 ms, but its own answer + 5 ms is later
    assert send(3_000_000, 3_400_000, paused, False) == 3_400_000 - 200_000 + 5_000
    # as soon as its answer came: at the simulated answer + the gap (closed-loop), and its lateness counts too
    assert send(4_000_000, 4_090_000, Link(parent_id=0, gap_us=3_000, think_us=0), False) == 4_090_000
    # the oldest answers leave the window: ALIGN_ANSWERS on-time answers later the shift is 0 again
    for k in range(ALIGN_ANSWERS):
        send(5_000_000 + k, 5_000_000 + k, paused, False)
    assert send(6_000_000, 6_000_000, paused, False) == 6_000_000
    # a fresh sender per replay: nothing carried over
    assert session_modes.get("aligned").new_sender()(1_000_000, 1_000_000, paused, False) == 1_000_000


def test_aligned_follows_a_line_through_the_answers_lateness():
    """From ALIGN_LINE_MIN answers on, a paused row's shift is the least-squares line through the answers'
    (release, lateness) read at its release, not their mean: a simulation falling steadily behind is followed
    without lag."""
    send = session_modes.get("aligned").new_sender()
    paused = Link(parent_id=0, gap_us=200_000, think_us=195_000)
    at_once = Link(parent_id=0, gap_us=3_000, think_us=0)
    # answers released each second, each 10 ms later than the one before
    for k in range(ALIGN_LINE_MIN - 1):
        assert send(k * 990_000, k * 1_000_000, at_once, False) == k * 1_000_000
    # released at 8 s, 40 ms late: the line through the eight (x in s, lateness in ms: 0-6 → 0-60, 8 → 40) is
    # 7.719 + 6.491·x ms, 59.649 ms at 8 s (their mean: 31.25 ms)
    assert send(7_960_000, 8_000_000, paused, False) == 7_960_000 + 59_649


def test_aligned_follows_early_answers_too_once_the_replay_preempted():
    """After a preemption the shift goes both ways: a row is sent early by how early the recent answers came,
    but never before its own simulated answer (+ the recorded client overhead)."""
    send = session_modes.get("aligned").new_sender()
    paused = Link(parent_id=0, gap_us=200_000, think_us=195_000)
    assert send(1_000_000, 960_000, paused, True) == 960_000  # 40 ms early: sent 40 ms early
    # on time after a 15 ms think: the mean (−40 + 0) / 2 = −20 ms would send it before its own answer + 5 ms
    short = Link(parent_id=0, gap_us=20_000, think_us=15_000)
    assert send(2_000_000, 2_000_000, short, True) == 2_000_000 - 20_000 + 5_000
    assert send(3_000_000, 2_990_000, paused, False) == 3_000_000  # no preemption: never earlier


def test_aligned_on_a_small_cache_sends_users_a_faster_replay_answered_early():
    """Eight users on a 64-block cache: replayed at the capture's speed every row goes at its recorded time and
    the capture is reproduced, preemptions included; replayed faster, the replay preempts and users answered
    early send early (the requests holding blocks stay as many), never before their simulated answer."""
    small = dataclasses.replace(CONFIG, num_gpu_blocks=64)
    trace = captured(users=8, num_requests=80, config=small)
    links = trace_links(trace)
    by_id = {r.request_id: r for r in trace.records}
    same = replay_trace(trace, small, MODEL, session_mode="aligned").results
    assert sum(r.num_preemptions for r in same) > 0
    assert all(r.arrival_us == by_id[r.request_id].send_time_us for r in same)
    rep = compare(trace, same)
    assert rep.trace_info["compared"] == len(trace.records)
    assert max(rep.mape(m) for m in ("ttft", "itl", "e2e")) < 0.01
    fast = {
        r.request_id: r
        for r in replay_trace(
            trace, small, BlackboxModel((500.0, 0.5, 50.0), (2500.0, 5.0, 100.0)), session_mode="aligned"
        ).results
    }
    assert len(fast) == len(trace.records) and sum(r.num_preemptions for r in fast.values()) > 0
    early = 0
    for rid, link in links.items():
        overhead = link.gap_us - link.think_us
        assert fast[rid].arrival_us >= fast[link.parent_id].finish_us + overhead
        early += fast[rid].arrival_us < by_id[rid].send_time_us
    assert early > len(links) // 2


def test_session_mode_is_deterministic_and_notes_the_linked_rows():
    trace = captured(multi_turn={"max_rounds": 3, "context_growth": "accumulate"})
    notes: list[str] = []
    first, bridge = trace_requests(trace, CONFIG, notes, "causal")
    assert bridge is not None and len(first) == len(trace.records) - len(trace_links(trace))
    assert any("session mode 'causal'" in n for n in notes)
    a = [dataclasses.asdict(r) for r in replay(trace, SLOW, "causal")]
    b = [dataclasses.asdict(r) for r in replay(trace, SLOW, "causal")]
    assert a == b
    first, bridge = trace_requests(trace, CONFIG, [], "fixed")
    assert bridge is None and len(first) == len(trace.records)


def test_unknown_session_mode_lists_the_registered_ones(tmp_path):
    trace = captured(num_requests=12)
    with pytest.raises(
        ConfigError,
        match="unknown session mode 'open'; allowed: adaptive, aligned, causal, closed-loop, fixed",
    ):
        replay_trace(trace, config_from_trace(trace.header), MODEL, session_mode="open")
    write_trace(trace, tmp_path / "t.csv")
    out = blis(
        "replay",
        str(tmp_path / "t.csv"),
        "--alpha",
        "1000,1,100",
        "--beta",
        "5000,10,200",
        "--session-mode",
        "open",
    )
    assert (
        out.returncode == 2
        and "unknown session mode 'open'; allowed: adaptive, aligned, causal, closed-loop, fixed"
        in out.stderr
    )
    policies = json.loads(blis("policies").stdout)
    assert sorted(policies["session_modes"]) == session_modes.names()


def test_cli_replay_follows_the_session_mode(tmp_path):
    trace = captured()
    write_trace(trace, tmp_path / "t.csv")
    summaries = {}
    for mode in ("fixed", "causal"):
        out = blis(
            "replay",
            str(tmp_path / "t.csv"),
            *SLOW_FLAGS,
            "--session-mode",
            mode,
        )
        assert out.returncode == 0, out.stderr
        summaries[mode] = json.loads(out.stdout)
    assert summaries["causal"]["completed"] == summaries["fixed"]["completed"] == len(trace.records)
    assert summaries["causal"]["e2e_mean_ms"] < summaries["fixed"]["e2e_mean_ms"]


def test_fit_on_closed_loop_traces_recovers_the_coefficients_in_the_session_mode():
    alpha, beta = (
        (3000.0, 1.5, 0.0),
        (6000.0, 20.0, 150.0),
    )  # α2 is not separable from α0 (test_calibrate_fit)
    traces = [
        NamedTrace("users", captured(num_requests=80, model=BlackboxModel(alpha, beta))),
        NamedTrace("chat", captured({"max_rounds": 3}, num_requests=60, model=BlackboxModel(alpha, beta))),
    ]
    for mode in ("causal", "closed-loop", "aligned"):
        result, report, _ = run_fit(
            traces, model="m", gpu="g", tp=1, bootstrap=0, prediction_draws=0, session_mode=mode
        )
        for got, want in zip((*result.alpha, *result.beta), (*alpha, *beta), strict=True):
            assert got == pytest.approx(want, rel=0.02, abs=1e-6)
        assert report["calibration"]["entry"]["fit"]["session_mode"] == mode


def test_validate_reports_the_session_mode_it_replayed_in(tmp_path):
    write_trace(captured(), tmp_path / "t.csv")
    out = blis(
        "validate",
        str(tmp_path / "t.csv"),
        "--alpha",
        "1000,1,100",
        "--beta",
        "5000,10,200",
        "--session-mode",
        "closed-loop",
        "--report",
        str(tmp_path / "v.json"),
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["coefficients"]["session_mode"] == "closed-loop"
    assert report["summary"]["e2e_mape"] < 0.01


def test_open_loop_traces_replay_identically_in_every_mode():
    """Even with a row that arrives exactly when an earlier row's answer came (chance, as with ms-rounded
    times): one such row does not make a closed loop."""
    trace = simulated_trace(poisson_requests(120, 8.0, seed=9), CONFIG, MODEL)
    answer = next(r.last_chunk_time_us for r in trace.records)
    chance = next(r for r in trace.records if r.arrival_time_us > answer)
    chance.arrival_time_us = chance.send_time_us = answer
    assert trace_links(trace) == {}
    runs = [[dataclasses.asdict(r) for r in replay(trace, SLOW, mode)] for mode in session_modes.names()]
    assert all(run == runs[0] for run in runs)


def test_answers_ending_at_the_same_microsecond_release_one_row_each_whatever_the_row_order():
    rows = [
        row(0, 1000, 5000),
        row(1, 1000, 5000),  # two users answered in the same µs (one engine step)
        row(2, 5000, 9000),
        row(3, 5000, 9500),
    ]
    forward = Trace(header=TraceHeader(), records=rows, itl=None, notes=[])
    backward = Trace(header=TraceHeader(), records=rows[::-1], itl=None, notes=[])
    assert trace_links(forward) == trace_links(backward) == {2: Link(0, 5, 0), 3: Link(1, 5, 0)}


def test_open_loop_sessions_are_not_linked():
    """Rounds of an open-loop session are sent on schedule (previous round's arrival + think time), not after
    the answer: linking them would delay them in a slower simulation."""
    trace = captured(multi_turn={"max_rounds": 3, "think_time_us": 2_000_000}, think_us=0)
    client = {
        "id": "u",
        "rate_fraction": 1.0,
        "arrival": {"process": "poisson"},
        "input_distribution": {"type": "constant", "params": {"value": 200}},
        "output_distribution": {"type": "constant", "params": {"value": 60}},
        "reasoning": {"multi_turn": {"max_rounds": 3, "think_time_us": 2_000_000}},
        "closed_loop": False,
    }
    spec = parse_spec({"num_requests": 60, "seed": 3, "aggregate_rate": 4.0, "clients": [client]}, "t")
    workload = generate(spec)
    assert not workload.closed_loop and sum(r.round_index > 0 for r in workload.requests) > 20
    run = simulate(requests_from_workload(workload), CONFIG, MODEL, record_tokens=True)
    open_loop = results_to_trace(run, workload_trace(workload))
    assert trace_links(open_loop) == {}
    assert trace_links(trace)  # the closed-loop sessions of the same shape are


def test_rows_that_point_at_each_other_are_all_replayed():
    """Inconsistent times (no send time, chunks before the arrival) make two rows each other's candidate:
    predecessors must be sent first, so no cycle forms and no row waits forever."""
    rows = [row(0, 3000, 2000), row(1, 2000, 3000), row(2, 4000, 6000)]
    for r in rows[:2]:
        r.send_time_us, r.first_chunk_time_us = 0, r.last_chunk_time_us - 500
    trace = Trace(header=TraceHeader(), records=rows, itl=None, notes=[])
    assert len(replay(trace, MODEL, "causal")) == 3


def test_a_long_chain_of_rejected_requests_is_conserved_on_one_instance():
    """One instance rejects a request that can never fit as it is added; each rejection releases the user's
    next request: 1,500 of them in chains must neither overflow the stack nor be lost."""
    trace = captured(num_requests=1500, think_us=0)
    tiny = dataclasses.replace(CONFIG, max_model_len=10)  # every prompt is longer: all are rejected
    for mode in session_modes.names():
        results = replay_trace(trace, tiny, MODEL, session_mode=mode).results
        assert len(results) == 1500 and {r.status for r in results} == {"rejected"}


def test_rejected_parents_on_a_cluster_still_release_their_rows(tmp_path):
    trace = captured()
    write_trace(trace, tmp := tmp_path / "t.csv")
    for admission in ("reject-all", "always-admit"):
        out = blis(
            "replay",
            str(tmp),
            *SLOW_FLAGS,
            "--instances",
            "2",
            "--admission-policy",
            admission,
            "--session-mode",
            "causal",
        )
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["completed"] + summary["rejected"] == len(trace.records)
        assert summary["rejected"] == (len(trace.records) if admission == "reject-all" else 0)


def test_a_row_whose_predecessor_is_not_replayed_keeps_its_recorded_time():
    trace = captured()
    links = trace_links(trace)
    child, link = next(iter(links.items()))
    parent = next(r for r in trace.records if r.request_id == link.parent_id)
    parent.output_tokens = 0  # never ran: not replayed
    results = {r.request_id: r for r in replay(trace, SLOW, "closed-loop")}
    assert link.parent_id not in results and len(results) == len(trace.records) - 1
    assert results[child].arrival_us == next(r.send_time_us for r in trace.records if r.request_id == child)


def test_calibration_replays_in_the_mode_asked_for():
    trace = captured()
    form = model_forms.get("blackbox")
    for mode in session_modes.names():
        via_fit = trace_simulator(mode)(trace, form, SLOW.alpha, SLOW.beta)
        assert [dataclasses.asdict(r) for r in via_fit] == [
            dataclasses.asdict(r) for r in replay(trace, SLOW, mode)
        ]
    fixed = compare(trace, trace_simulator("fixed")(trace, form, SLOW.alpha, SLOW.beta)).mape("e2e")
    loop = compare(trace, trace_simulator("closed-loop")(trace, form, SLOW.alpha, SLOW.beta)).mape("e2e")
    assert fixed != loop


def test_validate_and_calibrate_replay_in_the_mode_asked_for(tmp_path):
    trace = captured()
    write_trace(trace, tmp_path / "t.csv")
    e2e = {}
    for mode in ("fixed", "closed-loop"):
        out = blis(
            "validate",
            str(tmp_path / "t.csv"),
            *SLOW_FLAGS,
            "--session-mode",
            mode,
            "--report",
            str(tmp_path / f"{mode}.json"),
        )
        assert out.returncode == 0, out.stderr
        e2e[mode] = json.loads((tmp_path / f"{mode}.json").read_text())["summary"]["e2e_mape"]
        assert e2e[mode] == pytest.approx(compare(trace, replay(trace, SLOW, mode)).mape("e2e"))
    assert e2e["closed-loop"] < e2e["fixed"]
    out = blis(
        "calibrate",
        str(tmp_path / "t.csv"),
        "--sim-results",
        str(tmp_path / "r.json"),
        "--session-mode",
        "fixed",
    )
    assert out.returncode == 2 and "--sim-results are replayed already" in out.stderr


def test_hits_on_a_previous_rounds_answer_are_not_taken_for_a_warm_cache():
    trace = captured(multi_turn={"max_rounds": 3, "context_growth": "accumulate"})
    assert sum(r.cached_tokens > 0 for r in trace.records) > 10  # later rounds hit prompt and answer blocks
    notes: list[str] = []
    requests = requests_from_trace(trace, notes, block_size=CONFIG.block_size)
    assert all(r.warm_tokens == 0 for r in requests) and not notes


def test_replay_in_causal_mode_is_byte_identical_across_processes(tmp_path):
    write_trace(captured(multi_turn={"max_rounds": 3, "context_growth": "accumulate"}), tmp_path / "t.csv")
    outputs = []
    for k in range(2):
        out = blis(
            "replay",
            str(tmp_path / "t.csv"),
            *SLOW_FLAGS,
            "--results",
            str(tmp_path / f"r{k}.json"),
        )
        assert out.returncode == 0, out.stderr
        outputs.append((out.stdout, (tmp_path / f"r{k}.json").read_bytes()))
    assert outputs[0] == outputs[1]


def test_blis_concurrency_users_are_linked_by_session_across_its_two_clocks():
    """BLIS's observe writes arrival_time_us relative to its start but send and chunk times in epoch µs; its
    `--concurrency` users are sessions whose rounds follow each other."""
    epoch = 1_700_000_000_000_000
    rows = []
    for user in range(2):
        arrival, send = 0, epoch + 10 + user
        for round_index in range(3):
            rec = row(len(rows), arrival, send + 40_000, session=f"concurrency_distribution_user_{user}")
            rec.round_index, rec.send_time_us, rec.first_chunk_time_us = round_index, send, send + 5_000
            rec.think_time_us = 1_000 if round_index else 0
            rows.append(rec)
            arrival, send = arrival + 41_000, send + 41_200  # answer + think (1 ms) + 200 µs to send
    trace = Trace(header=TraceHeader(), records=rows, itl=None, notes=[])
    links = trace_links(trace)
    assert links == {r.request_id: Link(r.request_id - 1, 1_200, 1_000) for r in rows if r.round_index > 0}


def sent_late(trace, overhead_us=1500):
    """The trace with every send `overhead_us` after the arrival (client overhead, as in real captures)."""
    records = [dataclasses.replace(r, send_time_us=r.arrival_time_us + overhead_us) for r in trace.records]
    return dataclasses.replace(trace, records=records)


def foreign(trace, overhead_us=1500):
    """The trace as a client without session ids or think times records a closed loop: every row on one
    client, arrival = send, a little after the answer that released it."""
    records = [
        dataclasses.replace(
            r,
            client_id="client-0",
            session_id="",
            round_index=0,
            think_time_us=0,
            arrival_time_us=r.send_time_us + overhead_us,
            send_time_us=r.send_time_us + overhead_us,
        )
        for r in trace.records
    ]
    return dataclasses.replace(trace, records=records)


def test_a_closed_loop_recorded_without_sessions_or_think_times_is_linked_by_time():
    trace = captured(think_us=0)
    recorded = trace_links(trace)
    links = trace_links(foreign(trace))
    assert {c: ln.parent_id for c, ln in links.items()} == {c: ln.parent_id for c, ln in recorded.items()}
    assert {ln.gap_us for ln in links.values()} == {1500}
    slow = replay(foreign(trace), SLOW, "causal")
    assert len(slow) == len(trace.records) and max_in_flight(slow) <= USERS


def test_a_chance_exact_match_does_not_keep_a_closed_loop_from_being_linked_by_time():
    trace = captured(think_us=0)
    stripped = foreign(trace)
    answers = sorted(r.last_chunk_time_us for r in stripped.records)
    chance = stripped.records[-1]  # its recorded arrival coincides with an unrelated earlier answer
    chance.arrival_time_us = next(t for t in answers if chance.send_time_us - t > 100_000)
    parents = {c: ln.parent_id for c, ln in trace_links(stripped).items()}
    assert parents == {c: ln.parent_id for c, ln in trace_links(trace).items()}


def test_many_users_sending_a_few_ms_after_their_answer_are_linked_by_time():
    """Sixteen users: answers come every ~33 ms, a tenth of which is shorter than the client's 6 ms overhead."""
    trace = captured(think_us=0, num_requests=160, users=16)
    answered = {r.request_id: r.last_chunk_time_us for r in trace.records}
    recorded = {c: answered[ln.parent_id] for c, ln in trace_links(trace).items()}
    assert len(recorded) == 160 - 16
    # Without session ids, two answers in the same step are interchangeable: each row follows an answer of the
    # same µs as its own user's.
    by_time = trace_links(foreign(trace, overhead_us=6000))
    assert {c: answered[ln.parent_id] for c, ln in by_time.items()} == recorded


def test_a_closed_loop_with_think_times_but_inexact_arrivals_is_linked_by_time():
    """Think times recorded, arrivals at the send (not the answer + think time): the think time is kept."""
    trace = sent_late(captured(think_us=200_000))
    records = [dataclasses.replace(r, arrival_time_us=r.send_time_us) for r in trace.records]
    links = trace_links(dataclasses.replace(trace, records=records))
    assert {c: ln.parent_id for c, ln in links.items()} == {
        c: ln.parent_id for c, ln in trace_links(trace).items()
    }
    assert {(ln.gap_us, ln.think_us) for ln in links.values()} == {(201_500, 200_000)}


def test_adaptive_keeps_a_long_unrecorded_pause_causal():
    """Session rounds sent 200 ms after the answer without a think-time column: the user paused, so a
    faster simulation does not pull the round forward."""
    fast = BlackboxModel((500.0, 0.5, 50.0), (2500.0, 5.0, 100.0))
    trace = captured(multi_turn={"max_rounds": 3, "think_time_us": 200_000}, think_us=200_000)
    for r in trace.records:
        r.think_time_us = 0
    links = trace_links(trace)
    assert links and all(ln.waited and ln.think_us == 0 for ln in links.values())
    adaptive = [dataclasses.asdict(r) for r in replay(trace, fast, "adaptive")]
    assert adaptive == [dataclasses.asdict(r) for r in replay(trace, fast, "causal")]


def test_a_real_closed_loop_made_foreign_is_linked_as_recorded():
    """closed4z_s602: four users of real vLLM without think time; their sends came 1.1-4.9 ms after the answer."""
    trace = read_trace(TRACES / "real_day6" / "closed4z_s602.csv")
    stripped = foreign(trace, overhead_us=0)
    assert stripped.records[5].think_time_us == 0 and not stripped.records[5].session_id
    recorded = {c: ln.parent_id for c, ln in trace_links(trace).items()}
    assert len(recorded) == 96 and {c: ln.parent_id for c, ln in trace_links(stripped).items()} == recorded


def test_a_closed_loop_with_unrecorded_think_times_is_linked_by_its_users():
    """Think times neither recorded nor short enough for the time window: the four users are found as the four
    rows sent before the first answer, of which never more were in flight."""
    trace = captured(think_us=200_000)
    links = trace_links(foreign(trace))
    assert {c: ln.parent_id for c, ln in links.items()} == {
        c: ln.parent_id for c, ln in trace_links(trace).items()
    }
    assert {ln.gap_us for ln in links.values()} == {201_500} and all(ln.waited for ln in links.values())
    slow = replay(foreign(trace), SLOW, "adaptive")
    assert len(slow) == len(trace.records) and max_in_flight(slow) <= USERS


def test_a_real_closed_loop_with_think_times_made_foreign_is_linked_as_recorded():
    """closed12_s2201: twelve users of real vLLM pausing 1 s; each row follows the oldest unclaimed answer."""
    trace = read_trace(TRACES / "real_day22" / "closed12_s2201.csv")
    recorded = {c: ln.parent_id for c, ln in trace_links(trace).items()}
    assert len(recorded) == 108
    assert {c: ln.parent_id for c, ln in trace_links(foreign(trace, overhead_us=0)).items()} == recorded


@pytest.mark.parametrize("think_us, users", [(1_000_000, 4), (2_000_000, 8), (5_000_000, 6)])
def test_users_started_staggered_with_an_unrecorded_think_time_are_linked_by_their_pause(think_us, users):
    """BLIS's --concurrency N --think-time-ms starts user u at u·think/N: answers come before the last user's
    first row, so neither the time window nor the users rule finds them; one pause after an answer does."""
    trace = captured(think_us=think_us, users=users)
    first_rows = sorted(r.send_time_us for r in trace.records)[:users]
    assert min(r.last_chunk_time_us for r in trace.records) < first_rows[-1]
    links = trace_links(foreign(trace))
    assert {c: ln.parent_id for c, ln in links.items()} == {
        c: ln.parent_id for c, ln in trace_links(trace).items()
    }
    # the pause is the shortest gap: here every user's, think time + the 1.5 ms client overhead
    assert {(ln.gap_us, ln.think_us) for ln in links.values()} == {(think_us + 1500, think_us + 1500)}
    slow = replay(foreign(trace), SLOW, "aligned")
    assert len(slow) == len(trace.records) and max_in_flight(slow) <= users


def test_a_real_closed_loop_too_rarely_all_in_flight_for_its_users_is_linked_by_its_pause():
    """budget96_closed12_s3503: twelve users pausing 1 s through a 96-token budget, all twelve in flight too
    briefly to tell them from an open loop by their number; some rows went out 20-300 ms late (a busy client),
    past the time window, and follow the oldest answer left, their own."""
    trace = read_trace(TRACES / "real_day35" / "budget96_closed12_s3503.csv")
    recorded = {c: ln.parent_id for c, ln in trace_links(trace).items()}
    assert len(recorded) == 108
    links = trace_links(foreign(trace, overhead_us=0))
    assert {c: ln.parent_id for c, ln in links.items()} == recorded
    assert all(ln.waited and ln.gap_us >= ln.think_us >= 1_000_000 for ln in links.values())


def test_trace_info_reports_the_users_and_pause_a_replay_will_chain(tmp_path):
    """Day 41's sixteen users pausing 2 s, as another tool records them: `trace info` says what the replay
    will find, with and without their sessions."""
    trace = read_trace(TRACES / "real_day41" / "closed16w2_s4104.csv")
    write_trace(foreign(trace, overhead_us=0), tmp_path / "foreign.csv")
    for path, think_ms in (
        (TRACES / "real_day41" / "closed16w2_s4104.csv", 2000.0),
        (tmp_path / "foreign.csv", None),
    ):
        proc = blis("trace", "info", str(path), "--json")
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert (summary["rows_after_an_answer"], summary["users_or_sessions"]) == (240, 16)
        if think_ms is None:  # the pause found: 2 s and the quickest user's client overhead
            assert 2000 <= summary["think_time_p50_ms"] < 2005
        else:
            assert summary["think_time_p50_ms"] == think_ms


def test_a_closed_loop_recorded_with_a_client_per_user_is_linked_one_user_each():
    """Another tool's users as client ids, without sessions or think times: each client is one user."""
    trace = read_trace(TRACES / "real_day22" / "closed12_s2201.csv")
    per_user = dataclasses.replace(
        trace,
        records=[
            dataclasses.replace(
                r, client_id=r.session_id, session_id="", think_time_us=0, arrival_time_us=r.send_time_us
            )
            for r in trace.records
        ],
    )
    assert {c: ln.parent_id for c, ln in trace_links(per_user).items()} == {
        c: ln.parent_id for c, ln in trace_links(trace).items()
    }


# After each answer, by round: no one pause (nor one time back to any earlier answer) explains the users.
PAUSES_US = tuple(200_000 + 25_000 * int(k) for k in np.random.default_rng(3).integers(0, 6, 40))


def round_start_us(k):
    return sum(100_000 + PAUSES_US[j] for j in range(k))


def two_users(rounds, extra_send_us=None):
    """Two users without ids or think times, 10 ms apart: each answer 100 ms after its arrival, the next request
    PAUSES_US after the answer; optionally one more row arriving at `extra_send_us`."""
    rows = []
    for k in range(rounds):
        for u in range(2):
            send = round_start_us(k) + 10_000 * u
            rows.append(row(len(rows), send, send + 100_000))
    if extra_send_us is not None:
        rows.append(row(len(rows), extra_send_us, extra_send_us + 100_000))
    return Trace(header=TraceHeader(), records=rows, itl=None, notes=[])


def test_users_are_found_only_while_no_more_are_ever_in_flight():
    links = trace_links(two_users(20))
    assert links == {r: Link(r - 2, PAUSES_US[r // 2 - 1] + 5, 0) for r in range(2, 40)}
    # A third row in flight while both users wait for their answers: not two users, and not linked.
    assert trace_links(two_users(20, extra_send_us=round_start_us(10) + 50_000)) == {}


def test_users_are_not_assumed_where_an_open_loop_would_rarely_have_exceeded_them():
    """Two rounds: both users were in flight together for 90 ms of the 410 ms run, where an open loop at the
    same rate would have sent 0.7 more on average; never exceeding 2 in flight is no evidence of a closed loop,
    nor are two rows sent one pause after an answer."""
    assert trace_links(two_users(2)) == {}


@pytest.mark.parametrize(
    "path",
    [
        "A_poisson_0.8.csv",
        "C_prefix_1.0.csv",
        "real/r12.csv",
        "real_day3/burst15.csv",
        "real_day24/r40_s2401.csv",  # never more in flight than its first 13 rows (evidence 2.2)
        "real_day17/prefix10_s1702.csv",  # nor than its first 7 (0.2)
    ],
)
def test_open_loop_captures_are_not_linked(path):
    """Some of an open loop's rows are sent just after another's answer by chance (up to 16 of 150 in r12 with
    a 50 ms window); too few to be a closed loop."""
    trace = foreign(read_trace(TRACES / path), overhead_us=0)
    assert trace_links(trace) == {}


def test_a_fast_open_loop_is_not_linked_by_time():
    """At 400 requests/s answers come every few ms: a fixed window would match most rows by chance."""
    requests = poisson_requests(400, 400.0, seed=4, input_mean=64, output_mean=16, max_output=32)
    trace = simulated_trace(requests, CONFIG, BlackboxModel((100.0, 0.0, 0.0), (500.0, 1.0, 5.0)))
    assert trace_links(foreign(trace, overhead_us=0)) == {}


@pytest.mark.parametrize("mode", ["causal", "closed-loop", "adaptive", "aligned"])
def test_a_replayed_closed_loop_is_written_as_a_closed_loop(mode):
    """The written trace links every row to its predecessor, and replaying it again with the same
    model reproduces it: the follow-ups arrive at their parent's simulated answer + think time."""
    trace = sent_late(captured(think_us=150_000))
    first, bridge = trace_requests(trace, CONFIG, [], mode)
    run = simulate(first, CONFIG, SLOW, bridge, record_tokens=True)
    written = results_to_trace(run, trace, released_by=bridge.released_by)
    links = trace_links(written)
    answered = {r.request_id: r.finish_us for r in run.results}
    # the predecessor of each row, or one whose simulated answer came in the same µs
    assert {c: answered[ln.parent_id] for c, ln in links.items()} == {
        c: answered[ln.parent_id] for c, ln in trace_links(trace).items()
    }
    by_id = {r.request_id: r for r in written.records}
    for child, link in links.items():
        rec = by_id[child]
        assert rec.arrival_time_us == by_id[link.parent_id].last_chunk_time_us + rec.think_time_us
        assert rec.send_time_us >= rec.arrival_time_us
    again = {r.request_id: r for r in replay(written, SLOW, mode)}
    for r in run.results:
        assert (again[r.request_id].arrival_us, again[r.request_id].finish_us) == (r.arrival_us, r.finish_us)


def test_cli_trace_output_of_a_closed_loop_replay_keeps_its_links(tmp_path):
    trace = sent_late(captured(think_us=100_000))
    write_trace(trace, tmp_path / "t.csv")
    out = blis(
        "replay",
        str(tmp_path / "t.csv"),
        *SLOW_FLAGS,
        "--session-mode",
        "closed-loop",
        "--trace-output",
        str(tmp_path / "out"),
    )
    assert out.returncode == 0, out.stderr
    written = read_trace(tmp_path / "out.csv")
    assert len(trace_links(written)) == len(trace_links(trace)) == len(trace.records) - USERS


def test_adaptive_sends_rows_without_think_time_as_closed_loop_and_the_rest_as_causal():
    """A faster simulation: causal would hold a user who never left the server to its recorded send time."""
    fast = BlackboxModel((500.0, 0.5, 50.0), (2500.0, 5.0, 100.0))
    for think, like, unlike in ((0, "closed-loop", "causal"), (200_000, "causal", "closed-loop")):
        trace = sent_late(captured(think_us=think))
        adaptive = [dataclasses.asdict(r) for r in replay(trace, fast, "adaptive")]
        assert adaptive == [dataclasses.asdict(r) for r in replay(trace, fast, like)]
        assert adaptive != [dataclasses.asdict(r) for r in replay(trace, fast, unlike)]
    rows = [
        row(0, 1000, 100_000),
        row(1, 1000, 100_000, client="d"),
        row(2, 100_000, 200_000),  # sent 5 µs after row 0's answer, without think time
        row(3, 100_300, 200_000, client="d", think=300),  # sent 305 µs after row 1's, 300 of them thinking
    ]
    trace = Trace(header=TraceHeader(), records=rows, itl=None, notes=[])
    results = {r.request_id: r for r in replay(trace, fast, "adaptive")}
    assert results[2].arrival_us == results[0].finish_us + 5 < 100_005
    assert results[3].arrival_us == 100_305 > results[1].finish_us + 305
