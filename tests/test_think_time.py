"""Think-time distributions: BLIS's `--think-time-dist` text, the spec key, and the pauses closed-loop users take."""

import math
import subprocess
import sys

import numpy as np
import pytest
import yaml

from blis_cal.errors import ConfigError
from blis_cal.trace import read_trace
from blis_cal.workload import generate, parse_spec, spec_to_yaml, workload_from_options
from blis_cal.workload.spec import Distribution
from blis_cal.workload.think_time import parse_think_time_dist

LN_1E6 = math.log(1e6)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("constant:value=500ms", Distribution("constant", {"value": 500_000})),
        ("constant:value=2", Distribution("constant", {"value": 2_000})),  # bare number: ms, as BLIS
        ("constant:value=1.5s", Distribution("constant", {"value": 1_500_000})),
        ("constant:value=250us", Distribution("constant", {"value": 250})),
        ("constant:value=0", Distribution("constant", {"value": 0})),
        ("lognormal:mu=2.0,sigma=0.6", Distribution("lognormal", {"mu": 2.0 + LN_1E6, "sigma": 0.6})),
        (
            "lognormal: mu=2.0, sigma=0.6, min=3s, max=30s",
            Distribution(
                "lognormal", {"mu": 2.0 + LN_1E6, "sigma": 0.6, "min": 3_000_000, "max": 30_000_000}
            ),
        ),
        (
            "lognormal:mu=0,sigma=1,min=0s",
            Distribution("lognormal", {"mu": LN_1E6, "sigma": 1.0}),
        ),  # 0: no bound
    ],
)
def test_blis_think_time_text_becomes_a_distribution_in_microseconds(text, expected):
    assert parse_think_time_dist(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("constant", "expected TYPE:KEY=VALUE"),
        ("weibull:k=1", "unknown think-time distribution 'weibull'; allowed: constant, lognormal"),
        ("lognormal:mu=1", "lognormal needs sigma="),
        ("constant:", "constant needs value="),
        ("constant:value=-3ms", "value must be a finite time >= 0, got '-3ms'"),
        ("constant:value=5h", "value='5h' is not a time"),
        ("constant:value=inf", "value must be a finite time >= 0"),
        ("constant:value=1,value=2", "value given twice"),
        ("constant:value=1,x=2", "constant has no parameter 'x'; allowed: value"),
        ("constant:value=1,junk", "'junk' is not KEY=VALUE"),
        ("lognormal:mu=1,sigma=0", "sigma must be > 0"),
        ("lognormal:mu=nan,sigma=1", "mu must be finite"),
        ("lognormal:mu=x,sigma=1", "mu='x' is not a number"),
        ("lognormal:mu=1,sigma=1,min=5s,max=1s", "min (5s) must be <= max (1s)"),
    ],
)
def test_bad_think_time_text_names_the_flag_and_the_fault(text, message):
    with pytest.raises(ConfigError) as err:
        parse_think_time_dist(text)
    assert str(err.value).startswith("--think-time-dist: ") and message in str(err.value)


def play(workload, answers=40):
    """The follow-ups users send over `answers` rounds, each request answered 1 s after it arrives."""
    released, pending = [], list(workload.requests)
    while pending and len(released) < answers:
        req = pending.pop(0)
        nxt = workload.follow_up(req, 5, req.arrival_us + 1_000_000)
        if nxt is not None:
            assert nxt.arrival_us == req.arrival_us + 1_000_000 + nxt.think_time_us
            released.append(nxt)
            pending.append(nxt)
    return released


def pauses(workload, answers=40):
    """Each user's think times over `answers` rounds."""
    out: dict[str, list[int]] = {}
    for req in play(workload, answers):
        out.setdefault(req.session_id, []).append(req.think_time_us)
    return out


def test_drawn_think_times_stay_in_bounds_follow_the_median_and_leave_lengths_alone():
    def users(**think):
        return workload_from_options(concurrency=4, num_requests=2000, seed=7, **think)

    drawn = users(think_time_dist="lognormal:mu=-1.0,sigma=0.5,min=200ms,max=800ms")
    assert [r.arrival_us for r in drawn.requests] == [0, 0, 0, 0]  # no u·think/N stagger (BLIS)
    got = pauses(drawn, 1600)
    assert sorted(got) == [f"concurrency_distribution_user_{u}" for u in range(4)]
    every = np.concatenate([np.array(v) for v in got.values()])
    assert every.min() >= 200_000 and every.max() <= 800_000
    assert abs(np.median(every) / (math.exp(-1.0) * 1e6) - 1) < 0.05  # e^mu s, inside both bounds
    assert (every == 200_000).mean() > 0.01 and (every == 800_000).mean() > 0.01  # clamped tails
    assert len({tuple(v[:5]) for v in got.values()}) == 4  # each user draws its own pauses

    # The pauses come from their own stream: each user's prompt and output lengths are those without them.
    def lengths(workload):
        reqs = [*workload.requests, *play(workload, 200)]
        return sorted((r.session_id, r.round_index, r.input_tokens, r.output_tokens) for r in reqs)

    assert lengths(users(think_time_dist="lognormal:mu=-1.0,sigma=0.5")) == lengths(users())


def test_drawn_think_times_repeat_for_a_seed():
    def run(seed):
        return pauses(
            workload_from_options(
                concurrency=3, think_time_dist="lognormal:mu=0,sigma=1", num_requests=60, seed=seed
            )
        )

    assert run(3) == run(3) != run(4)


def test_a_constant_distribution_is_the_constant_think_time_without_the_stagger():
    drawn = workload_from_options(
        concurrency=3, think_time_dist="constant:value=300ms", num_requests=30, seed=1
    )
    fixed = workload_from_options(concurrency=3, think_time_ms=300, num_requests=30, seed=1)
    assert [r.arrival_us for r in fixed.requests] == [0, 100_000, 200_000]
    assert [r.arrival_us for r in drawn.requests] == [0, 0, 0]
    assert {t for ts in pauses(drawn).values() for t in ts} == {300_000}


def spec_with(**client_keys):
    client = {
        "id": "users",
        "concurrency": 2,
        "input_distribution": {"type": "constant", "params": {"value": 100}},
        "output_distribution": {"type": "constant", "params": {"value": 10}},
        **client_keys,
    }
    return {"num_requests": 20, "clients": [client]}


def test_spec_think_time_distribution_round_trips_and_drives_the_users():
    dist = {"type": "gaussian", "params": {"mean": 50000, "std_dev": 10000, "min": 20000, "max": 90000}}
    spec = parse_spec(spec_with(think_time_distribution=dist), "t")
    assert spec.clients[0].think_time_distribution == Distribution("gaussian", dist["params"])
    assert parse_spec(yaml.safe_load(spec_to_yaml(spec)), "again") == spec
    got = [t for ts in pauses(generate(spec)).values() for t in ts]
    assert got and all(20_000 <= t <= 90_000 for t in got) and len(set(got)) > 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            spec_with(think_time_us=5, think_time_distribution={"type": "constant", "params": {"value": 5}}),
            "t.clients[0]: think_time_us and think_time_distribution are mutually exclusive",
        ),
        (
            spec_with(think_time_distribution={"type": "zipf", "params": {}}),
            "t.clients[0].think_time_distribution.type",
        ),
        (
            spec_with(think_time_distribution={"type": "constant", "params": {"value": -1}}),
            "t.clients[0].think_time_distribution.params.value",
        ),
    ],
)
def test_bad_spec_think_time_distribution_names_the_key(data, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
    ):
        parse_spec(data, "t")


def test_spec_think_time_distribution_only_for_concurrency_clients():
    data = spec_with(think_time_distribution={"type": "constant", "params": {"value": 5}})
    client = data["clients"][0]
    del client["concurrency"]
    with pytest.raises(ConfigError, match=r"think_time_distribution: only for concurrency clients"):
        parse_spec(data, "t")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "1", "--think-time-dist", "constant:value=1"], "--think-time-dist needs --concurrency"),
        (
            ["--concurrency", "2", "--think-time-ms", "5", "--think-time-dist", "constant:value=1"],
            "--think-time-ms and --think-time-dist are mutually exclusive",
        ),
        (
            ["--concurrency", "2", "--think-time-dist", "pareto:a=1"],
            "unknown think-time distribution 'pareto'",
        ),
    ],
)
def test_cli_bad_think_time_dist_flags(args, message):
    out = subprocess.run(
        [sys.executable, "-m", "blis_cal", "run", *args, "--alpha", "1000,1,100", "--beta", "5000,10,200"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_cli_run_records_the_drawn_think_times(tmp_path):
    out = subprocess.run(
        [
            sys.executable, "-m", "blis_cal", "run", "--concurrency", "3", "--num-requests", "30",
            "--think-time-dist", "lognormal:mu=-2,sigma=0.8,min=50ms,max=400ms",
            "--alpha", "1000,1,100", "--beta", "5000,10,200", "--trace-output", str(tmp_path / "sim"),
        ],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = read_trace(tmp_path / "sim.csv").records
    later = [r for r in rows if r.round_index > 0]
    assert len(rows) == 30 and len(later) == 27
    assert (
        all(50_000 <= r.think_time_us <= 400_000 for r in later)
        and len({r.think_time_us for r in later}) > 10
    )
    finish = {(r.session_id, r.round_index): r.last_chunk_time_us for r in rows}
    for r in later:
        assert r.arrival_time_us == finish[r.session_id, r.round_index - 1] + r.think_time_us
