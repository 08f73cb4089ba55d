"""Cluster laws on the real engine: conservation, N=1 identity, spread, prefix affinity, least-loaded,
token bucket, snapshot staleness, schedulers, determinism."""

from __future__ import annotations

import json
from collections import defaultdict
from fractions import Fraction

import numpy as np
import pytest

from blis_cal.replay import results_to_json
from blis_cal.simulate import BlackboxModel, SimConfig, SimRequest, simulate
from blis_cal.simulate.cluster import PolicyConfig, parse_scorers, run_cluster
from blis_cal.simulate.cluster.admission import AdmissionParams
from blis_cal.simulate.cluster.decisions import read_decisions

MODEL = BlackboxModel((500.0, 0.1, 20.0), (2000.0, 15.0, 80.0))


def engine(**kw) -> SimConfig:
    base = dict(block_size=16, num_gpu_blocks=4096, max_num_seqs=32, max_num_batched_tokens=1024, seed=1)
    return SimConfig(**(base | kw))


def make_requests(
    n: int,
    seed: int,
    *,
    rate_rps: float = 40.0,
    groups: int = 0,
    prefix_len: int = 0,
    own: tuple[int, int] = (16, 256),
    out: tuple[int, int] = (1, 48),
    tenants: tuple[str, ...] = ("",),
    slos: tuple[str, ...] = ("",),
) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    reqs, t = [], 0
    for i in range(n):
        t += int(rng.exponential(1e6 / rate_rps))
        segs: list[tuple[str, int]] = []
        if groups:
            segs.append((f"prefix:g{int(rng.integers(groups))}", prefix_len))
        segs.append((f"req:{i}", int(rng.integers(*own))))
        reqs.append(
            SimRequest(
                request_id=i,
                arrival_us=t,
                input_len=sum(length for _, length in segs),
                output_len=int(rng.integers(*out)),
                segments=tuple(segs),
                tenant_id=tenants[int(rng.integers(len(tenants)))],
                slo_class=slos[int(rng.integers(len(slos)))],
            )
        )
    return reqs


def group_of(req: SimRequest) -> str:
    return req.segments[0][0]


# ------------------------------------------------------------------------------------------ conservation


@pytest.mark.parametrize(
    "seed, instances, admission, routing",
    [
        (1, 2, "always-admit", "round-robin"),
        (2, 3, "token-bucket", "least-loaded"),
        (3, 4, "token-bucket", "weighted"),
        (4, 3, "reject-all", "weighted"),
        (5, 5, "always-admit", "weighted"),
    ],
)
def test_conservation_across_the_cluster(seed, instances, admission, routing):
    reqs = make_requests(
        150, seed, rate_rps=80, groups=3, prefix_len=64, tenants=("a", "b"), slos=("critical", "batch")
    )
    policy = PolicyConfig(
        instances=instances,
        admission=admission,
        admission_params=AdmissionParams(token_bucket_capacity=3000, token_bucket_refill_rate=8000),
        routing=routing,
        admission_latency_us=seed * 100,
        routing_latency_us=seed * 50,
        snapshot_refresh_us=seed * 1000,
    )
    run = run_cluster(reqs, engine(), MODEL, policy)
    c = run.summary["cluster"]
    statuses = [r.status for r in run.results]
    assert "incomplete" not in statuses
    assert c["arrived"] == len(reqs) == len(run.results)
    assert c["admitted"] + c["rejected"] == c["arrived"]
    assert c["admitted"] == sum(c["requests_per_instance"]) == statuses.count("ok")
    assert c["rejected"] == c["rejected_by_admission"] == statuses.count("rejected")
    for r in run.results:
        assert (0 <= r.instance < instances) if r.status == "ok" else r.instance == -1
    assert [p["requests"] for p in c["per_instance"]] == c["requests_per_instance"]
    assert sum(p["completed"] for p in c["per_instance"]) == run.summary["completed"]
    assert sum(v["requests"] for v in c["per_slo_class"].values()) == len(reqs)
    if admission == "reject-all":
        assert c["admitted"] == 0
    if admission == "always-admit":
        assert c["rejected"] == 0


# ------------------------------------------------------------------------------------- N = 1 identity


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_one_instance_with_default_policies_matches_the_single_instance_simulator(seed):
    reqs = make_requests(200, seed, rate_rps=60, groups=4, prefix_len=96)
    cfg = engine(num_gpu_blocks=300)  # small cache: preemptions and evictions happen too
    single = simulate(reqs, cfg, MODEL)
    cluster = run_cluster(reqs, cfg, MODEL, PolicyConfig())
    assert json.dumps(results_to_json(cluster)) == json.dumps(results_to_json(single))
    assert [r.to_dict() for r in cluster.results] == [r.to_dict() for r in single.results]
    summary = dict(cluster.summary)
    per_instance = summary.pop("cluster")["per_instance"][0]
    assert summary == single.summary
    assert {k: v for k, v in per_instance.items() if k != "instance"} == {
        k: v for k, v in single.summary.items() if k in per_instance
    }


# ------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("instances", [2, 3, 5])
def test_round_robin_spreads_within_one_request(tmp_path, instances):
    reqs = make_requests(101, instances, rate_rps=200)
    path = tmp_path / "d.jsonl"
    run = run_cluster(reqs, engine(), MODEL, PolicyConfig(instances=instances), trace_decisions=path)
    counts = run.summary["cluster"]["requests_per_instance"]
    assert max(counts) - min(counts) <= 1 and sum(counts) == len(reqs)
    assert [d["chosen"] for d in read_decisions(path)] == [k % instances for k in range(len(reqs))]


def _affinity_stats(run, reqs):
    by_group = defaultdict(set)
    for req, res in zip(reqs, run.results, strict=True):
        by_group[group_of(req)].add(res.instance)
    return np.mean([len(s) for s in by_group.values()]), run.summary["prefix_hit_rate"]


def test_prefix_affinity_concentrates_shared_prefixes_and_raises_the_hit_rate():
    reqs = make_requests(300, 21, rate_rps=30, groups=6, prefix_len=512, own=(8, 64), out=(1, 16))
    cfg = engine(num_gpu_blocks=200)  # room for ~2 prefixes per instance: spreading them costs hits
    rr = run_cluster(reqs, cfg, MODEL, PolicyConfig(instances=4, routing="round-robin"))
    pa = run_cluster(
        reqs,
        cfg,
        MODEL,
        PolicyConfig(
            instances=4,
            routing="weighted",
            scorers=parse_scorers("prefix-affinity:3,queue-depth:2,kv-utilization:2"),
        ),
    )
    rr_spread, rr_hits = _affinity_stats(rr, reqs)
    pa_spread, pa_hits = _affinity_stats(pa, reqs)
    assert rr_spread == 4.0  # round-robin puts every prefix group on every instance
    assert pa_spread < rr_spread
    assert pa_hits > rr_hits


def test_prefix_affinity_without_shared_prefixes_spreads_like_load_balancing():
    reqs = make_requests(200, 22, rate_rps=60, own=(64, 512))
    pa = run_cluster(reqs, engine(), MODEL, PolicyConfig(instances=4, routing="weighted"))
    rr = run_cluster(reqs, engine(), MODEL, PolicyConfig(instances=4))
    counts = pa.summary["cluster"]["requests_per_instance"]
    assert min(counts) > 0.15 * len(reqs)
    assert pa.summary["prefix_hit_rate"] == rr.summary["prefix_hit_rate"] == 0.0


def test_least_loaded_never_picks_a_strictly_busier_instance_under_fresh_snapshots(tmp_path):
    reqs = make_requests(250, 31, rate_rps=120, out=(8, 96))
    path = tmp_path / "d.jsonl"
    run_cluster(
        reqs, engine(), MODEL, PolicyConfig(instances=4, routing="least-loaded"), trace_decisions=path
    )
    decisions = read_decisions(path)
    assert len(decisions) == len(reqs)
    busy_seen = False
    for d in decisions:
        loads = [c["waiting"] + c["running"] + c["in_flight"] for c in d["candidates"]]
        assert loads[d["chosen"]] == min(loads)
        assert all(c["snapshot_at_us"] == d["time_us"] for c in d["candidates"])  # fresh
        busy_seen |= max(loads) > 0
    assert busy_seen  # the law was exercised under load, not only on an idle cluster


def test_stale_snapshots_are_never_older_than_the_refresh_interval(tmp_path):
    reqs = make_requests(200, 32, rate_rps=150)
    path = tmp_path / "d.jsonl"
    policy = PolicyConfig(instances=3, routing="least-loaded", snapshot_refresh_us=20_000)
    run_cluster(reqs, engine(), MODEL, policy, trace_decisions=path)
    ages = [d["time_us"] - c["snapshot_at_us"] for d in read_decisions(path) for c in d["candidates"]]
    assert min(ages) >= 0 and max(ages) < 20_000
    assert max(ages) > 0  # some decisions really did see old state


# ------------------------------------------------------------------------------------------ admission


@pytest.mark.parametrize("latency_us", [0, 700])
def test_token_bucket_admits_exactly_what_its_budget_allows(latency_us):
    reqs = make_requests(300, 41, rate_rps=100, own=(50, 400))
    capacity, rate = 2500, 6000  # tokens, tokens/s
    policy = PolicyConfig(
        instances=2,
        admission="token-bucket",
        admission_params=AdmissionParams(capacity, rate),
        admission_latency_us=latency_us,
    )
    run = run_cluster(reqs, engine(), MODEL, policy)
    level, last, expected = Fraction(capacity), None, set()
    for req in sorted(reqs, key=lambda r: (r.arrival_us, r.request_id)):
        now = req.arrival_us + latency_us
        if last is not None:
            level = min(Fraction(capacity), level + Fraction(rate * (now - last), 1_000_000))
        last = now
        if level >= req.input_len:
            level -= req.input_len
            expected.add(req.request_id)
    admitted = {r.request_id for r in run.results if r.status != "rejected"}
    assert admitted == expected
    assert 0 < len(admitted) < len(reqs)  # the budget really bound
    admitted_tokens = sum(r.input_len for r in reqs if r.request_id in admitted)
    span_s = (max(r.arrival_us for r in reqs) - min(r.arrival_us for r in reqs)) / 1e6
    assert admitted_tokens <= capacity + rate * span_s


# ----------------------------------------------------------------------------------------- schedulers


def test_sjf_serves_the_shortest_waiting_prompt_first():
    # One seat: everything that arrives while the first request runs waits, and is then served by length.
    burst = [
        SimRequest(i, 10 * i, n, 4, ((f"req:{i}", n),))
        for i, n in enumerate([300, 900, 100, 700, 200, 500, 50])
    ]
    run = run_cluster(burst, engine(max_num_seqs=1), MODEL, PolicyConfig(scheduler="sjf"))
    later = sorted(run.results, key=lambda r: r.scheduled_us)[1:]  # all queued while the first one ran
    assert [r.input_tokens for r in later] == sorted(r.input_tokens for r in later)
    fcfs = run_cluster(burst, engine(max_num_seqs=1), MODEL, PolicyConfig())
    by_start = sorted(fcfs.results, key=lambda r: r.scheduled_us)
    assert [r.request_id for r in by_start] == [
        r.request_id for r in sorted(fcfs.results, key=lambda r: r.queued_us)
    ]
    assert [r.input_tokens for r in by_start[1:]] != sorted(r.input_tokens for r in by_start[1:])


def test_priority_fcfs_with_slo_priorities_serves_critical_before_batch():
    # One seat and a burst: after the first request, every critical one starts before every batch one
    # (they waited about as long, so the tier gap of 5 dominates aging), FCFS within a class.
    classes = ["batch", "critical", "batch", "critical", "batch", "critical", "batch"]
    burst = [SimRequest(i, 10 * i, 100, 4, ((f"req:{i}", 100),), slo_class=c) for i, c in enumerate(classes)]
    policy = PolicyConfig(scheduler="priority-fcfs", priority="slo-based")
    run = run_cluster(burst, engine(max_num_seqs=1), MODEL, policy)
    order = [r.request_id for r in sorted(run.results, key=lambda r: r.scheduled_us)]
    assert order == [0, 1, 3, 5, 2, 4, 6]
    constant = run_cluster(burst, engine(max_num_seqs=1), MODEL, PolicyConfig(scheduler="priority-fcfs"))
    assert [r.request_id for r in sorted(constant.results, key=lambda r: r.scheduled_us)] == list(range(7))


def test_priority_fcfs_preempts_the_lowest_priority_request():
    # A KV cache too small for everyone: preemptions happen, and they hit batch requests, not critical ones.
    reqs = make_requests(80, 61, rate_rps=400, own=(200, 400), out=(100, 200), slos=("critical", "batch"))
    policy = PolicyConfig(scheduler="priority-fcfs", priority="slo-based")
    run = run_cluster(reqs, engine(num_gpu_blocks=120, max_num_seqs=16), MODEL, policy)
    by_class = defaultdict(int)
    for r in run.results:
        by_class[r.slo_class] += r.num_preemptions
    assert run.summary["preemptions"] > 0
    assert by_class["batch"] > by_class["critical"]
    assert (
        run.summary["cluster"]["per_slo_class"]["critical"]["e2e_mean_ms"]
        < (run.summary["cluster"]["per_slo_class"]["batch"]["e2e_mean_ms"])
    )


def test_in_flight_stays_current_between_snapshot_refreshes(tmp_path):
    # Snapshots never refresh during the burst, but the router's own in-flight count does: least-loaded
    # still spreads the burst evenly instead of sending it all to one instance.
    burst = [SimRequest(i, i, 64, 8, ((f"req:{i}", 64),)) for i in range(40)]
    path = tmp_path / "d.jsonl"
    policy = PolicyConfig(instances=4, routing="least-loaded", snapshot_refresh_us=10**9)
    run = run_cluster(burst, engine(), MODEL, policy, trace_decisions=path)
    assert run.summary["cluster"]["requests_per_instance"] == [10, 10, 10, 10]
    decisions = read_decisions(path)
    assert {c["snapshot_at_us"] for d in decisions for c in d["candidates"]} == {0}
    assert [sum(c["in_flight"] for c in d["candidates"]) for d in decisions] == list(range(40))


# ---------------------------------------------------------------------------------------- determinism


def test_same_inputs_give_byte_identical_results_and_decision_traces(tmp_path):
    reqs = make_requests(250, 51, rate_rps=90, groups=5, prefix_len=128, tenants=("a", "b", "c"))
    policy = PolicyConfig(
        instances=3,
        admission="token-bucket",
        routing="weighted",
        admission_latency_us=300,
        routing_latency_us=200,
        snapshot_refresh_us=10_000,
    )
    outs = []
    for k in range(2):
        path = tmp_path / f"d{k}.jsonl"
        run = run_cluster(reqs, engine(num_gpu_blocks=500), MODEL, policy, trace_decisions=path)
        outs.append((json.dumps(results_to_json(run)), json.dumps(run.summary), path.read_bytes()))
    assert outs[0] == outs[1]
    assert json.loads(outs[0][1])["cluster"]["tenant_fairness_jain"] > 0


def test_closed_loop_users_continue_after_rejections_behind_an_admission_latency():
    from blis_cal.replay.from_workload import follow_up_for, requests_from_workload
    from blis_cal.workload import workload_from_options

    workload = workload_from_options(
        concurrency=6, num_requests=120, input_tokens=200, output_tokens=20, seed=3
    )
    follow_up = follow_up_for(workload)
    assert follow_up is not None
    policy = PolicyConfig(
        instances=2,
        admission="token-bucket",
        admission_params=AdmissionParams(token_bucket_capacity=1000, token_bucket_refill_rate=4000),
        admission_latency_us=5_000,  # longer than the think time: follow-ups of rejections are moved up
    )
    run = run_cluster(requests_from_workload(workload), engine(), MODEL, policy, follow_up=follow_up)
    c = run.summary["cluster"]
    assert c["arrived"] == len(run.results) == 120  # every user went on to spend the whole budget
    assert c["rejected"] > 0 and c["admitted"] > 0
    assert c["admitted"] + c["rejected"] == c["arrived"]
    assert all(r.status in ("ok", "rejected") for r in run.results)
