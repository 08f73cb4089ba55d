"""`blis replay --think-time-ms / --think-time-dist`: a closed loop replayed as if its users paused differently."""

import json
import subprocess
import sys

import pytest
from closed_loop_capture import CONFIG, MODEL, captured
from conftest import TRACES

from blis_cal.errors import ConfigError
from blis_cal.replay import replay_trace, results_to_trace, with_think_time
from blis_cal.trace import injection_time_us, read_trace, write_trace
from blis_cal.trace_links import trace_links
from blis_cal.workload.think_time import parse_think_time_dist

COEFFS = ("--alpha", "1000,1,100", "--beta", "5000,10,200", "--num-gpu-blocks", "4096")


def capture(think_us: int, num_requests: int = 48):
    """Four users pausing `think_us` after each answer, all starting at 0."""
    return captured(think_us=think_us, num_requests=num_requests, start_together=True)


def by_round(trace):
    return {(r.session_id, r.round_index): r for r in trace.records}


REAL = [
    "real_day22/closed12_s2201.csv",  # BLIS user sessions, 1 s think time
    "real_day20/closed16z_s2003.csv",  # users without session ids, no think time
    "real_day22/chat4_s2203.csv",  # multi-turn chat sessions
    "real_day22/kv40_closed24z_s2211.csv",  # preempted closed loop
]


@pytest.mark.parametrize("path", REAL)
@pytest.mark.parametrize("dist", ["lognormal:mu=0,sigma=1", "constant:value=0", "constant:value=4s"])
def test_new_pauses_keep_every_link_overhead_and_duration_and_the_trace_causal(path, dist):
    trace = read_trace(TRACES / path)
    moved = with_think_time(trace, parse_think_time_dist(dist), seed=1)
    links, after = trace_links(trace), trace_links(moved)
    assert {c: ln.parent_id for c, ln in after.items()} == {c: ln.parent_id for c, ln in links.items()}
    old, new = {r.request_id: r for r in trace.records}, {r.request_id: r for r in moved.records}
    assert len(new) == len(old)
    for rid, rec in new.items():
        was = old[rid]
        link = links.get(rid)
        if link is None:
            assert rec == was
            continue
        parent = new[link.parent_id]
        assert rec.arrival_time_us == parent.last_chunk_time_us + rec.think_time_us
        overhead = link.gap_us - link.think_us if link.think_us or not link.waited else 0
        assert injection_time_us(rec) - rec.arrival_time_us == overhead
        assert rec.last_chunk_time_us - rec.send_time_us == was.last_chunk_time_us - was.send_time_us
        assert rec.first_chunk_time_us - rec.send_time_us == was.first_chunk_time_us - was.send_time_us
        assert (rec.input_tokens, rec.output_tokens, rec.session_id) == (
            was.input_tokens,
            was.output_tokens,
            was.session_id,
        )
    if dist.startswith("constant"):
        assert {new[c].think_time_us for c in links} == {int(parse_think_time_dist(dist).params["value"])}


def test_draws_repeat_for_a_seed_and_differ_across_seeds():
    trace = read_trace(TRACES / REAL[0])
    dist = parse_think_time_dist("lognormal:mu=0,sigma=1,max=10s")

    def pauses(seed):
        return [r.think_time_us for r in with_think_time(trace, dist, seed).records]

    assert pauses(3) == pauses(3) != pauses(4)


def test_replaying_with_another_think_time_reproduces_the_capture_made_with_it():
    """Users are what the trace shows (prompt and output lengths per round); the think time is a what-if knob.
    Replayed closed-loop on the server that made it, a capture at 100 ms pauses given 600 ms is the capture
    made at 600 ms, round for round."""
    short, long = capture(100_000), capture(600_000)
    moved = with_think_time(short, parse_think_time_dist("constant:value=600ms"), seed=0)
    replayed = results_to_trace(replay_trace(moved, CONFIG, MODEL, session_mode="closed-loop"), moved)
    got, want = by_round(replayed), by_round(long)
    assert got.keys() == want.keys() and len(got) == 48
    for key, rec in want.items():
        sim = got[key]
        assert sim.send_time_us == rec.send_time_us, key
        assert sim.last_chunk_time_us == rec.last_chunk_time_us, key


def test_no_linked_rows_is_an_error_not_a_silent_no_op():
    with pytest.raises(ConfigError, match="rows sent after an earlier row's answer"):
        with_think_time(
            read_trace(TRACES / "real_day22/a08_s2204.csv"), parse_think_time_dist("constant:value=1"), 0
        )


def blis(*args):
    return subprocess.run([sys.executable, "-m", "blis_cal", *args], capture_output=True, text=True)


def test_cli_replay_with_the_recorded_think_time_is_the_plain_replay(tmp_path):
    write_trace(capture(200_000), tmp_path / "t.csv")
    plain = blis("replay", str(tmp_path / "t.csv"), *COEFFS, "--results", str(tmp_path / "a.json"))
    same = blis(
        "replay",
        str(tmp_path / "t.csv"),
        *COEFFS,
        "--think-time-ms",
        "200",
        "--results",
        str(tmp_path / "b.json"),
    )
    longer = blis("replay", str(tmp_path / "t.csv"), *COEFFS, "--think-time-dist", "constant:value=2s")
    assert plain.returncode == same.returncode == longer.returncode == 0, (
        plain.stderr + same.stderr + longer.stderr
    )
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert "44 row(s) sent after an earlier answer now pause" in same.stderr
    # Four users pausing 2 s after each of their 11 later rounds: the run lasts 22 s longer.
    delta = json.loads(longer.stdout)["duration_s"] - json.loads(plain.stdout)["duration_s"]
    assert delta == pytest.approx(11 * 1.8, abs=1.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--think-time-ms", "5", "--think-time-dist", "constant:value=1"], "mutually exclusive"),
        (["--think-time-ms", "-1"], "--think-time-ms: must be >= 0 ms"),
        (
            ["--think-time-dist", "gamma:k=2"],
            "unknown think-time distribution 'gamma'; allowed: constant, lognormal",
        ),
    ],
)
def test_cli_replay_bad_think_time_flags(tmp_path, args, message):
    write_trace(capture(200_000, 12), tmp_path / "t.csv")
    out = blis("replay", str(tmp_path / "t.csv"), *COEFFS, *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_cli_replay_think_time_on_an_open_loop_trace_says_why_it_cannot(tmp_path):
    out = blis("replay", str(TRACES / "real_day22/a08_s2204.csv"), *COEFFS, "--think-time-ms", "100")
    assert out.returncode == 2 and "this trace has none" in out.stderr and "Traceback" not in out.stderr
