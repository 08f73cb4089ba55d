"""Cluster policies in isolation: admission, routing, scorers, prefix index, priorities, policy YAML, summaries.

Instances are stand-in snapshots here (the engine-level laws are in test_cluster_laws.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blis_cal.errors import ConfigError
from blis_cal.simulate.cluster import ClusterRouter, PolicyConfig, build_router, parse_policy_config
from blis_cal.simulate.cluster.admission import AdmissionParams, TokenBucket, admission_policies
from blis_cal.simulate.cluster.decisions import read_decisions
from blis_cal.simulate.cluster.prefix_index import PrefixIndex, block_keys
from blis_cal.simulate.cluster.routing import DEFAULT_SCORERS, ScorerSpec, parse_scorers, routing_policies
from blis_cal.simulate.cluster.scheduling import priority_policies
from blis_cal.simulate.cluster.scorers import ScorerContext, routing_scorers
from blis_cal.simulate.cluster.summary import cluster_summary, jain_index, per_slo_class, tenant_fairness
from blis_cal.simulate.router import InstanceSnapshot

CTX4 = ScorerContext(num_instances=4, block_size=4, prefix_cache_blocks=100)


@dataclass
class Req:
    """Stand-in for SimRequest: the fields policies read."""

    request_id: int
    input_len: int = 8
    arrival_us: int = 0
    segments: tuple = ()
    slo_class: str = ""
    priority: int = 0
    tenant_id: str = ""
    output_len: int = 4
    extra: dict = field(default_factory=dict)


def snap(index, waiting=0, running=0, in_flight=0, kv=0.0, taken_at_us=0):
    return InstanceSnapshot(
        index=index,
        waiting=waiting,
        running=running,
        in_flight=in_flight,
        kv_utilization=kv,
        free_blocks=int(100 * (1 - kv)),
        num_gpu_blocks=100,
        taken_at_us=taken_at_us,
    )


# ------------------------------------------------------------------------------------------ admission


def test_always_admit_and_reject_all():
    params = AdmissionParams()
    assert all(admission_policies.get("always-admit")(params).admit(Req(i), i) for i in range(10))
    assert not any(admission_policies.get("reject-all")(params).admit(Req(i), i) for i in range(10))


def test_token_bucket_burst_then_refill_by_hand():
    bucket = TokenBucket(AdmissionParams(token_bucket_capacity=100, token_bucket_refill_rate=10))
    # Full bucket of 100: 40 + 40 fit, the third 40 does not (20 left), a 20 does.
    assert [bucket.admit(Req(i, input_len=40), 0) for i in range(3)] == [True, True, False]
    assert bucket.admit(Req(3, input_len=20), 0)
    assert not bucket.admit(Req(4, input_len=1), 0)
    # 10 tokens/s: after 0.5 s there are exactly 5 tokens.
    assert not bucket.admit(Req(5, input_len=6), 500_000)
    assert bucket.admit(Req(6, input_len=5), 500_000)
    # Refill is capped at capacity even after a long idle period.
    assert bucket.admit(Req(7, input_len=100), 10**12)
    assert not bucket.admit(Req(8, input_len=1), 10**12)


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 5000),
    rate=st.integers(0, 5000),
    reqs=st.lists(st.tuples(st.integers(0, 2_000_000), st.integers(1, 800)), min_size=1, max_size=60),
)
def test_token_bucket_admits_exactly_what_the_budget_allows(capacity, rate, reqs):
    """Law: a request is admitted iff the exact budget (capacity, refilled at `rate`/s, capped) covers it."""
    bucket = TokenBucket(AdmissionParams(token_bucket_capacity=capacity, token_bucket_refill_rate=rate))
    level, last = Fraction(capacity), 0
    now = 0
    for i, (gap, cost) in enumerate(reqs):
        now += gap
        level = min(Fraction(capacity), level + Fraction(rate * (now - last), 1_000_000))
        last = now
        expected = level >= cost
        if expected:
            level -= cost
        assert bucket.admit(Req(i, input_len=cost), now) is expected
        # Never more admitted than capacity plus everything refilled so far.
        assert level >= 0


def test_admission_params_reject_bad_values():
    for bad in (
        dict(token_bucket_capacity=0),
        dict(token_bucket_capacity=math.nan),
        dict(token_bucket_refill_rate=-1),
    ):
        with pytest.raises(ConfigError, match="token_bucket"):
            AdmissionParams(**bad)


# -------------------------------------------------------------------------------------------- routing


def test_round_robin_cycles_in_order():
    rr = routing_policies.get("round-robin")(CTX4)
    snaps = [snap(i) for i in range(4)]
    assert [rr.choose(Req(i), snaps, 0).instance for i in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.integers(0, 5)), min_size=1, max_size=8))
def test_least_loaded_never_picks_a_strictly_busier_instance(loads):
    snaps = [snap(i, w, r, f) for i, (w, r, f) in enumerate(loads)]
    chosen = routing_policies.get("least-loaded")(CTX4).choose(Req(0), snaps, 0).instance
    total = [w + r + f for w, r, f in loads]
    assert total[chosen] == min(total)


def test_ties_are_broken_at_random_from_the_seed():
    idle = [snap(i) for i in range(4)]
    for name in ("least-loaded", "weighted"):
        pol = routing_policies.get(name)(CTX4)
        picks = [pol.choose(Req(i), idle, 0).instance for i in range(40)]
        assert set(picks) == {0, 1, 2, 3}  # every tied instance gets chosen
        again = routing_policies.get(name)(CTX4)
        assert [again.choose(Req(i), idle, 0).instance for i in range(40)] == picks  # same seed, same picks
        other = routing_policies.get(name)(ScorerContext(4, 4, 100, seed=7))
        assert [other.choose(Req(i), idle, 0).instance for i in range(40)] != picks


def test_weighted_picks_the_highest_weighted_sum():
    pol = routing_policies.get("weighted")(
        CTX4, (ScorerSpec("queue-depth", 1), ScorerSpec("kv-utilization", 1))
    )
    snaps = [snap(0, waiting=4, kv=0.1), snap(1, waiting=0, kv=0.9), snap(2, waiting=2, kv=0.2)]
    d = pol.choose(Req(0), snaps, 0)
    # queue-depth: 0, 1, 0.5; kv: 0.9, 0.1, 0.8 -> totals 0.45, 0.55, 0.65
    assert d.scores["queue-depth"] == [0.0, 1.0, 0.5]
    assert [round(t, 9) for t in d.totals] == [0.45, 0.55, 0.65]
    assert d.instance == 2


def test_scorer_formulas():
    snaps = [snap(0, waiting=1, running=1), snap(1, waiting=3, running=1, in_flight=2), snap(2)]
    qd = routing_scorers.get("queue-depth")(CTX4).score(Req(0), snaps, 0)
    lb = routing_scorers.get("load-balance")(CTX4).score(Req(0), snaps, 0)
    assert qd == [(6 - 2) / 6, 0.0, 1.0]
    assert lb == [1 / 3, 1 / 7, 1.0]
    equal = [snap(0, waiting=2), snap(1, running=2)]
    assert routing_scorers.get("queue-depth")(CTX4).score(Req(0), equal, 0) == [1.0, 1.0]


def test_prefix_affinity_scores_the_fraction_of_leading_blocks_seen():
    scorer = routing_scorers.get("prefix-affinity")(CTX4)
    snaps = [snap(i) for i in range(4)]
    first = Req(1, input_len=16, segments=(("prefix:sys", 12), ("req:1", 4)))
    assert scorer.score(first, snaps, 0) == [0.0] * 4
    scorer.observe(first, 2, 0)
    # Same 12-token prefix (3 blocks of 4), different own tokens: 3 of 4 blocks match on instance 2 only.
    second = Req(2, input_len=16, segments=(("prefix:sys", 12), ("req:2", 4)))
    assert scorer.score(second, snaps, 0) == [0.0, 0.0, 0.75, 0.0]
    # A different prefix matches nothing, even where the suffix text coincides.
    other = Req(3, input_len=16, segments=(("prefix:other", 12), ("req:1", 4)))
    assert scorer.score(other, snaps, 0) == [0.0] * 4


def test_weighted_prefix_affinity_follows_the_prefix_until_load_outweighs_it():
    pol = routing_policies.get("weighted")(
        CTX4, (ScorerSpec("prefix-affinity", 3), ScorerSpec("queue-depth", 1))
    )
    r1 = Req(1, segments=(("prefix:a", 16), ("req:1", 4)))
    pol.observe(r1, 2, 0)
    r2 = Req(2, segments=(("prefix:a", 16), ("req:2", 4)))
    # Instance 2 has the prefix but is the busiest: 3·1.0 + 1·0 beats 3·0 + 1·1.
    busy = [snap(i, waiting=5 if i == 2 else 0) for i in range(4)]
    assert pol.choose(r2, busy, 0).instance == 2
    # With load weighted above affinity the idle instances win: 1·1 + 2·0 < 1·0 + 2·1.
    even = routing_policies.get("weighted")(
        CTX4, (ScorerSpec("prefix-affinity", 1), ScorerSpec("queue-depth", 2))
    )
    even.observe(r1, 2, 0)
    assert even.choose(r2, busy, 0).instance != 2


def test_parse_scorers_and_errors():
    assert parse_scorers("prefix-affinity:3, queue-depth:2,kv-utilization:2") == DEFAULT_SCORERS
    for bad, match in (
        ("queue-depth", "name:weight"),
        ("nope:1", "allowed: kv-utilization, load-balance, prefix-affinity, queue-depth"),
        ("queue-depth:x", "not a number"),
        ("queue-depth:0", "> 0"),
        ("queue-depth:nan", "> 0"),
        ("queue-depth:1,queue-depth:2", "more than once"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_scorers(bad)


# -------------------------------------------------------------------------------------- prefix index


_segment = st.tuples(st.sampled_from(["prefix:a", "prefix:b", "req:1", "req:2", "out:1"]), st.integers(0, 40))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_segment, max_size=4), min_size=2, max_size=5), st.sampled_from([1, 4, 16]))
def test_router_block_keys_identify_blocks_as_the_kv_cache_hashes_do(prompts, block_size):
    """Law: two prompts share the router key of block b iff they share the KV cache's hash of block b."""
    from blis_cal.simulate.kv_cache import block_hashes

    keys = [block_keys(p, block_size) for p in prompts]
    hashes = [block_hashes(p, block_size) for p in prompts]
    for k, h in zip(keys, hashes, strict=True):
        assert len(k) == len(h)
    for a in range(len(prompts)):
        for b in range(len(prompts)):
            for i in range(min(len(keys[a]), len(keys[b]))):
                assert (keys[a][i] == keys[b][i]) == (hashes[a][i] == hashes[b][i])


def test_prefix_index_chain_match_and_lru_capacity():
    idx = PrefixIndex(num_instances=2, capacity_blocks=3)
    idx.record([1, 2, 3], 0)
    assert idx.match_length([1, 2, 3, 4], 0) == 3
    assert idx.match_length([2, 3], 0) == 2
    assert idx.match_length([9, 1, 2], 0) == 0  # a chain must start at the first block
    assert idx.match_length([1, 2], 1) == 0
    idx.record([1], 0)  # touch 1 so 2 is now the oldest
    idx.record([7], 0)
    assert idx.size(0) == 3
    assert idx.match_length([1], 0) == 1 and idx.match_length([2], 0) == 0
    with pytest.raises(ConfigError, match="prefix_cache_blocks"):
        PrefixIndex(2, 0)


# ---------------------------------------------------------------------------------------- priorities


def test_priority_policies():
    const = priority_policies.get("constant")()
    slo = priority_policies.get("slo-based")()
    vllm = priority_policies.get("vllm")()
    crit = Req(1, slo_class="critical", arrival_us=0)
    batch = Req(2, slo_class="batch", arrival_us=0, priority=5)
    assert const.compute(crit, 10**6) == const.compute(batch, 10**6) == 0.0
    assert slo.compute(crit, 0) == 4.0 and slo.compute(batch, 0) == -1.0
    assert slo.compute(Req(3, slo_class="mystery"), 0) == 3.0
    assert slo.compute(batch, 3_000_000) == pytest.approx(2.0)  # waited 3 s at 1/s
    assert vllm.compute(batch, 0) < vllm.compute(crit, 0)  # vLLM serves the lower value first


# --------------------------------------------------------------------------------------- policy YAML

GOOD_YAML = """\
instances: 4
admission:
  policy: token-bucket
  token_bucket_capacity: 5000
  token_bucket_refill_rate: 250.5
  latency_us: 100
routing:
  policy: weighted
  scorers:
    - {name: prefix-affinity, weight: 3}
    - {name: load-balance, weight: 1}
  latency_us: 50
  snapshot_refresh_us: 50000
  prefix_cache_blocks: 2000
priority:
  policy: slo-based
scheduler: priority-fcfs
"""


def test_policy_yaml_round_trip_and_overrides():
    cfg = parse_policy_config(GOOD_YAML, "p.yaml")
    assert cfg.instances == 4 and cfg.admission == "token-bucket" and cfg.routing == "weighted"
    assert cfg.admission_params == AdmissionParams(5000.0, 250.5)
    assert cfg.scorers == (ScorerSpec("prefix-affinity", 3.0), ScorerSpec("load-balance", 1.0))
    assert (cfg.admission_latency_us, cfg.routing_latency_us, cfg.snapshot_refresh_us) == (100, 50, 50000)
    assert (cfg.priority, cfg.scheduler) == ("slo-based", "priority-fcfs")
    import yaml

    assert parse_policy_config(yaml.safe_dump(cfg.to_dict())) == cfg
    over = cfg.with_overrides(instances=2, routing="round-robin", scorers=None)
    assert over.instances == 2 and over.routing == "round-robin" and over.scorers == cfg.scorers
    assert parse_policy_config("") == PolicyConfig()


@pytest.mark.parametrize(
    "text, match",
    [
        ("instances: 0\n", r"p.yaml:1: instances: must be >= 1"),
        (
            "instances: 2\nrouting:\n  polcy: weighted\n",
            r"p.yaml:3: routing.polcy: unknown key; allowed: latency_us",
        ),
        (
            "routing:\n  policy: random\n",
            r"p.yaml:2: routing.policy: 'random' is not one of: least-loaded, round-robin, weighted",
        ),
        (
            "admission:\n  policy: token-bucket\n  token_bucket_capacity: .nan\n",
            r":3: admission.token_bucket_capacity: must be a finite number",
        ),
        ("admission:\n  token_bucket_refill_rate: -1\n", r"must be >= 0"),
        (
            "routing:\n  scorers:\n    - {name: queue-depth, weight: 0}\n",
            r":3: routing.scorers.0.weight: must be > 0",
        ),
        ("routing:\n  scorers:\n    - {name: queue-depth}\n", r"needs both name and weight"),
        (
            "routing:\n  scorers:\n    - {name: queue-depth, weight: 1}\n    - {name: queue-depth, weight: 2}\n",
            "more than once",
        ),
        ("routing:\n  latency_us: 1.5\n", r"routing.latency_us: must be an integer"),
        ("scheduler: lifo\n", r"scheduler: 'lifo' is not one of: fcfs, priority-fcfs, sjf"),
        (
            "priority:\n  policy: urgent\n",
            r"priority.policy: 'urgent' is not one of: constant, slo-based, vllm",
        ),
        ("priority: fast\n", r"priority: must be a mapping"),
        ("- 1\n- 2\n", r"top level must be a mapping"),
        ("routing: {policy: [\n", r"not valid YAML"),
        ("instances: 2\nrouting:\n  policy: weighted\ninstances: 3\n", r"p.yaml:4: instances: duplicate key"),
        (
            "bogus: 1\n",
            r"p.yaml:1: bogus: unknown key; allowed: admission, instances, priority, routing, scheduler",
        ),
    ],
)
def test_policy_yaml_bad_input(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_policy_config(text, "p.yaml")


def test_policy_config_validates_overrides():
    with pytest.raises(ConfigError, match="unknown routing policy 'nope'; allowed: least-loaded"):
        PolicyConfig().with_overrides(routing="nope")
    with pytest.raises(ConfigError, match="instances must be an integer >= 1"):
        PolicyConfig(instances=0)
    with pytest.raises(ConfigError, match="admission_latency_us"):
        PolicyConfig(admission_latency_us=-1)


# ------------------------------------------------------------------------------------ router + trace


def test_router_writes_one_decision_line_per_route(tmp_path):
    cfg = PolicyConfig(
        instances=3,
        routing="weighted",
        scorers=(ScorerSpec("queue-depth", 2), ScorerSpec("kv-utilization", 1)),
    )
    path = tmp_path / "decisions.jsonl"
    router = build_router(cfg, block_size=4, trace_decisions=path)
    assert isinstance(router, ClusterRouter)
    snaps = [
        snap(0, waiting=2, taken_at_us=5),
        snap(1, kv=0.5, taken_at_us=5),
        snap(2, waiting=1, taken_at_us=5),
    ]
    for i in range(3):
        inst = router.route(Req(i), snaps, 10 + i)
        router.on_routed(Req(i), inst, 10 + i)
    router.close()
    lines = read_decisions(path)
    assert len(lines) == 3 and router.routed == [0, 3, 0]
    first = lines[0]
    assert first["request_id"] == 0 and first["time_us"] == 10 and first["chosen"] == 1
    assert [c["instance"] for c in first["candidates"]] == [0, 1, 2]
    assert first["candidates"][1]["scores"] == {"queue-depth": 1.0, "kv-utilization": 0.5}
    assert first["candidates"][1]["total"] == pytest.approx(2 / 3 + 1 / 6, abs=1e-6)
    assert first["candidates"][0]["snapshot_at_us"] == 5
    assert (
        path.read_text().count("\n") == 3 and json.loads(path.read_text().splitlines()[2])["request_id"] == 2
    )


def test_decision_trace_unwritable_path(tmp_path):
    with pytest.raises(ConfigError, match="--trace-decisions"):
        build_router(PolicyConfig(instances=2), trace_decisions=tmp_path / "missing" / "d.jsonl")


# ------------------------------------------------------------------------------------------ summaries


@dataclass
class Res:
    request_id: int
    status: str = "ok"
    instance: int = 0
    ttft_us: int = 1000
    e2e_us: int = 5000
    output_tokens: int = 10
    tenant_id: str = ""
    slo_class: str = ""


def test_jain_index():
    assert jain_index([5, 5, 5]) == 1.0
    assert jain_index([1, 0, 0]) == pytest.approx(1 / 3, abs=1e-6)
    assert jain_index([7]) == 1.0
    assert jain_index([]) == 0.0 and jain_index([0, 0]) == 0.0
    assert jain_index([3, 1]) == pytest.approx(16 / 20)


def test_tenant_fairness_counts_served_output_tokens_and_starved_tenants():
    res = [Res(0, tenant_id="a", output_tokens=10), Res(1, tenant_id="b", output_tokens=10)]
    assert tenant_fairness(res) == 1.0
    res.append(Res(2, tenant_id="c", status="rejected"))
    assert tenant_fairness(res) == pytest.approx(jain_index([10, 10, 0]))


def test_cluster_summary_conservation_and_slo_classes():
    res = [
        Res(0, instance=0, slo_class="critical", ttft_us=1000),
        Res(1, instance=1, slo_class="batch", ttft_us=3000),
        Res(2, instance=1, slo_class="batch", ttft_us=5000),
        Res(3, status="rejected", slo_class="batch", instance=-1),
        Res(4, status="rejected", slo_class="batch", instance=2),
    ]
    out = cluster_summary(res, 3, lambda i, group: {"requests": len(group)})
    assert out["arrived"] == out["admitted"] + out["rejected"] == 5
    assert out["rejected_by_admission"] == 1
    assert out["requests_per_instance"] == [1, 2, 0]
    assert [p["requests"] for p in out["per_instance"]] == [1, 2, 0]
    assert out["per_slo_class"]["batch"]["rejected"] == 2
    assert out["per_slo_class"]["batch"]["ttft_mean_ms"] == 4.0
    assert per_slo_class(res)["critical"]["ttft_p50_ms"] == 1.0


# ------------------------------------------------------------------------------------------ schedulers


def _state(rid, arrival, n, slo="", priority=0):
    from blis_cal.simulate.request import ReqState, SimRequest

    return ReqState(SimRequest(rid, arrival, n, 4, ((f"req:{rid}", n),), slo_class=slo, priority=priority))


def test_priority_fcfs_queue_order_preemption_victim_and_iteration():
    from blis_cal.simulate.scheduler import scheduler_policies

    q = scheduler_policies.get("priority-fcfs")("slo-based")
    states = [
        _state(0, 0, 10, "batch"),
        _state(1, 5, 10, "critical"),
        _state(2, 6, 10, "standard"),
        _state(3, 7, 10, "critical"),
        # a batch request that has waited 6 s longer outranks even critical ones: −1 + 6 = 5 > 4
        _state(4, -6_000_000, 10, "batch"),
    ]
    for s in states:
        q.add(s)
    assert [s.request_id for s in q] == [4, 1, 3, 2, 0]
    assert len(q) == 5 and q.peek().request_id == 4
    assert q.pop().request_id == 4
    q.add_preempted(states[4])  # a preempted request re-enters by its key, not at the head
    assert [s.request_id for s in q] == [4, 1, 3, 2, 0]
    # vLLM preempts max (priority, arrival): the lowest priority, latest among equals.
    assert q.victim([states[1], states[0], states[2], states[3]]) == 1
    assert q.victim([states[1], states[3]]) == 1


def test_vllm_priority_queue_serves_the_lowest_value_first():
    from blis_cal.simulate.scheduler import scheduler_policies

    q = scheduler_policies.get("priority-fcfs")("vllm")
    for s in (_state(0, 0, 10, priority=2), _state(1, 1, 10, priority=0), _state(2, 2, 10, priority=2)):
        q.add(s)
    assert [q.pop().request_id for _ in range(3)] == [1, 0, 2]


def test_sjf_queue_orders_by_prompt_length():
    from blis_cal.simulate.scheduler import scheduler_policies

    q = scheduler_policies.get("sjf")("constant")
    for s in (_state(0, 0, 300), _state(1, 1, 100), _state(2, 2, 100), _state(3, 3, 50)):
        q.add(s)
    assert [s.request_id for s in q] == [3, 1, 2, 0]
    assert q.victim([_state(9, 0, 1), _state(8, 0, 1)]) == 1
    with pytest.raises(ConfigError, match="unknown priority policy 'urgent'"):
        scheduler_policies.get("sjf")("urgent")
