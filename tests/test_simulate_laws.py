"""Laws of the simulator over random traces and configs: conservation, causality, KV conservation, token
accounting, determinism, monotonicity on average, and jumping == stepping."""

import json
from collections import Counter

import numpy as np
import pytest

from blis_cal.replay import results_to_json
from blis_cal.simulate import BlackboxModel, SimConfig, SimRequest, Simulation, simulate

SEEDS = range(12)


def random_case(seed: int, rate_scale: float = 1.0, beta_scale: float = 1.0, jump: bool = True):
    """A random workload (prefix groups, multi-turn-like shared history) on a random, often tight, engine."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 60))
    block_size = int(rng.choice([4, 8, 16]))
    rate = float(rng.uniform(5, 60)) * rate_scale
    arrivals = np.cumsum(rng.exponential(1e6 / rate, size=n)).astype(int)
    group_len = {g: int(rng.integers(1, 120)) for g in range(int(rng.integers(1, 4)))}
    reqs = []
    for i in range(n):
        own = int(rng.integers(1, 200))
        segments: tuple[tuple[str, int], ...] = ((f"req:{i}", own),)
        if rng.random() < 0.5:
            g = int(rng.integers(0, len(group_len)))
            segments = ((f"prefix:{g}", group_len[g]), *segments)
        elif (
            i and rng.random() < 0.3
        ):  # a later round of an earlier request: its prompt and output as history
            j = int(rng.integers(0, i))
            segments = (
                *reqs[j].segments,
                (f"out:{j}", int(rng.integers(1, reqs[j].output_len + 1))),
                *segments,
            )
        n_in = sum(length for _, length in segments)
        reqs.append(SimRequest(i, int(arrivals[i]), n_in, int(rng.integers(1, 60)), segments))
    biggest = max(r.input_len + r.output_len for r in reqs)
    config = SimConfig(
        block_size=block_size,
        num_gpu_blocks=int(rng.integers(biggest // block_size // 2 + 2, 4 * biggest // block_size + 3)),
        max_num_seqs=int(rng.integers(1, 16)),
        max_num_batched_tokens=int(rng.integers(16, 512)),
        max_model_len=int(rng.choice([4096, 300])),
        enable_prefix_caching=bool(rng.random() < 0.8),
        long_prefill_token_threshold=int(rng.choice([0, 0, 8, 64])),
        long_prefill_token_threshold_adaptive=bool(rng.random() < 0.5),
        jump_decode=jump,
    )
    alpha = (float(rng.uniform(0, 5000)), float(rng.uniform(0, 5)), float(rng.uniform(0, 500)))
    beta = tuple(
        x * beta_scale
        for x in (float(rng.uniform(500, 8000)), float(rng.uniform(1, 40)), float(rng.uniform(1, 300)))
    )
    return reqs, config, BlackboxModel(alpha, beta)


@pytest.mark.parametrize("seed", SEEDS)
def test_conservation_causality_kv_and_tokens(seed):
    reqs, config, model = random_case(seed)
    steps = []
    tokens: dict[int, list[tuple[int, int]]] = {}
    usable = config.num_gpu_blocks - 1

    def on_step(index, start, batch, used, free):
        steps.append((start, used, free, batch))

    sim = Simulation(
        config, model, on_step=on_step, on_token=lambda rid, i, t: tokens.setdefault(rid, []).append((i, t))
    )
    sim.add_requests(reqs)
    # Mid-run: every injected request is exactly one of pending / waiting / running / finished / rejected.
    sim.run_until(reqs[len(reqs) // 2].arrival_us)
    states = Counter(s.status for s in sim._states.values())
    inst = sim.instances[0]
    assert states["waiting"] == len(inst.waiting) and states["running"] == len(inst.running)
    assert sum(states.values()) == len(reqs)
    for r in sim.results().results:  # progress so far, lazily tracked decoders included
        assert r.status in ("ok", "rejected", "incomplete")
        assert r.output_tokens == len(tokens.get(r.request_id, ()))
    run = sim.run()

    assert Counter(r.status for r in run.results) == Counter(
        {"ok": run.summary["completed"], "rejected": run.summary["rejected"]}
    )
    assert len(run.results) == len(reqs)
    clock = [s[0] for s in steps]
    assert clock == sorted(clock)  # the clock never goes back
    for _start, used, free, batch in steps:
        assert used + free == usable  # KV conservation at every step
        assert batch.num_prefill_tokens + batch.num_decode_tokens <= config.max_num_batched_tokens
        assert batch.num_prefill_reqs + batch.num_decode_reqs <= config.max_num_seqs
    assert inst.kv.num_used == 0  # everything finished frees its blocks
    inst.kv.check()
    by_id = {r.request_id: r for r in reqs}
    for r in run.results:
        if r.status != "ok":
            assert r.request_id not in tokens
            continue
        assert r.arrival_us <= r.queued_us <= r.scheduled_us <= r.first_token_us <= r.finish_us
        assert 0 < r.ttft_us <= r.e2e_us
        emitted = tokens[r.request_id]
        assert (
            [i for i, _ in emitted]
            == list(range(by_id[r.request_id].output_len))
            == list(range(r.output_tokens))
        )
        assert emitted[0][1] == r.first_token_us and emitted[-1][1] == r.finish_us
        assert [t for _, t in emitted] == sorted(t for _, t in emitted)
        assert r.cached_tokens <= r.input_tokens - 1


@pytest.mark.parametrize("seed", SEEDS)
def test_determinism(seed):
    reqs, config, model = random_case(seed)
    first = json.dumps(results_to_json(simulate(reqs, config, model)))
    second = json.dumps(results_to_json(simulate(list(reversed(reqs)), config, model)))
    assert first == second


def _means(seed: int, **scales) -> tuple[float, float]:
    run = simulate(*random_case(seed, **scales))
    return run.summary["ttft_mean_ms"], run.summary["e2e_mean_ms"]


@pytest.mark.parametrize("scale", [{"beta_scale": 2.0}, {"rate_scale": 3.0}])
def test_latency_grows_with_beta_and_rate_on_average(scale):
    base = np.array([_means(seed) for seed in SEEDS])
    more = np.array([_means(seed, **scale) for seed in SEEDS])
    assert (more.mean(axis=0) > base.mean(axis=0)).all()
    assert (more[:, 1] >= base[:, 1]).mean() >= 0.75  # E2E: most cases individually


@pytest.mark.parametrize("seed", range(30))
def test_jumping_over_decode_steps_changes_nothing(seed):
    stepped = simulate(*random_case(seed, jump=False))
    jumped = simulate(*random_case(seed, jump=True))
    assert jumped.results == stepped.results
    assert jumped.summary == stepped.summary


class RoundRobin:
    """A minimal Router: admit everything, alternate instances, stale snapshots."""

    admission_latency_us = 100
    routing_latency_us = 50
    snapshot_refresh_us = 10_000

    def __init__(self) -> None:
        self.count = 0
        self.seen: list[tuple[int, int]] = []

    def admit(self, req, now_us):
        return req.request_id % 7 != 3  # some rejections

    def route(self, req, snapshots, now_us):
        assert all(s.taken_at_us <= now_us for s in snapshots)
        self.count += 1
        return self.count % len(snapshots)

    def on_routed(self, req, instance, now_us):
        self.seen.append((req.request_id, instance))


def _live(seed: int, jump: bool, instances: int = 1):
    reqs, config, model = random_case(seed, jump=jump)
    config.instances = instances
    tokens: dict[int, list[tuple[int, int]]] = {}
    router = RoundRobin() if instances > 1 else None
    sim = Simulation(
        config, model, router=router, on_token=lambda rid, i, t: tokens.setdefault(rid, []).append((i, t))
    )
    sim.add_requests(reqs)
    # advance in slices, as a live driver would
    for t in range(0, reqs[-1].arrival_us, max(1, reqs[-1].arrival_us // 7)):
        sim.run_until(t)
    return sim.run(), tokens, router


@pytest.mark.parametrize("seed", range(8))
def test_jumping_is_invisible_to_live_callbacks_and_clusters(seed):
    stepped, stepped_tokens, _ = _live(seed, jump=False)
    jumped, jumped_tokens, _ = _live(seed, jump=True)
    assert jumped.results == stepped.results and jumped_tokens == stepped_tokens
    stepped, _, r1 = _live(seed, jump=False, instances=3)
    jumped, _, r2 = _live(seed, jump=True, instances=3)
    assert jumped.results == stepped.results and r1.seen == r2.seen
    assert {r.instance for r in jumped.results if r.status == "ok"} <= {0, 1, 2}
    assert sum(r.status == "rejected" for r in jumped.results) >= sum(
        r.request_id % 7 == 3 for r in jumped.results
    )


def test_simultaneous_arrivals_do_not_depend_on_listing_order():
    reqs = [SimRequest(i, 0, 40 + i, 5, (("prefix:g", 32), (f"req:{i}", 8 + i))) for i in range(6)]
    config = SimConfig(block_size=16, num_gpu_blocks=12, max_num_batched_tokens=64, max_num_seqs=3)
    model = BlackboxModel((0, 0, 10), (1000, 5, 20))
    first = json.dumps(results_to_json(simulate(reqs, config, model)))
    rng = np.random.default_rng(3)
    for _ in range(3):
        shuffled = [reqs[i] for i in rng.permutation(len(reqs))]
        assert json.dumps(results_to_json(simulate(shuffled, config, model))) == first


@pytest.mark.parametrize("seed", range(20))
def test_untracked_private_content_changes_nothing(seed):
    """simulate() knows every request, so it skips hashing content no other request has; a live Simulation
    (which must hash everything) gives the same results."""
    reqs, config, model = random_case(seed)
    live = Simulation(config, model)
    live.add_requests(sorted(reqs, key=lambda r: (r.arrival_us, r.request_id)))
    assert simulate(reqs, config, model).results == live.run().results


@pytest.mark.parametrize("jump", [False, True])
def test_prompt_reusing_a_running_requests_output_hits_its_blocks(jump):
    # Request 1 arrives while request 0 is still decoding and carries 0's prompt and first 40 output tokens:
    # the blocks 0 has filled so far are cached and hit, as vLLM registers full blocks as they fill.
    config = SimConfig(block_size=16, jump_decode=jump)
    sim = Simulation(config, BlackboxModel((0, 0, 0), (1000, 1, 1)))
    sim.add_request(SimRequest(0, 0, 32, 100, (("req:0", 32),)))
    sim.run_until(60_000)  # ~ 55 decode steps of ~1 ms: 0 has produced more than 40 tokens
    sim.add_request(SimRequest(1, 60_000, 80, 2, (("req:0", 32), ("out:0", 40), ("req:1", 8))))
    run = sim.run()
    assert run.results[1].cached_tokens == 64  # 4 full blocks of 0's prompt + output (72 tokens known)
