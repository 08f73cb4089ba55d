"""Simulator: hand-computed cases of the vLLM V1 scheduler + blackbox model, prefix caching, preemption,
rejection, coefficients, the live engine."""

import pytest

from blis_cal.errors import ConfigError
from blis_cal.simulate import (
    BlackboxModel,
    SimConfig,
    SimRequest,
    Simulation,
    SimulationError,
    block_hashes,
    load_coefficients,
    simulate,
)


def req(rid, arrival, n_in, n_out, segments=None):
    return SimRequest(rid, arrival, n_in, n_out, segments or ((f"req:{rid}", n_in),))


def test_single_request_hand_computed():
    # queued at int(1000 + 1·100) = 1100; prefill step 5000 + 10·100 = 6000 -> ends 7100, token delivered
    # +100; each decode step 5000 + 20·1 = 5020; E2E ends at the third token's delivery.
    model = BlackboxModel((1000, 1, 100), (5000, 10, 20))
    (r,) = simulate([req(0, 0, 100, 3)], SimConfig(), model).results
    assert (r.queued_us, r.scheduled_us, r.first_token_us) == (1100, 1100, 7200)
    assert r.ttft_us == 7200
    assert r.e2e_us == 7100 + 5020 + 5020 + 100
    assert r.itl_mean_us == 5020.0
    assert r.status == "ok" and r.output_tokens == 3


def test_chunked_prefill_and_budget_hand_computed():
    # Budget 64: r0's 100-token prompt is split 64 + 36; r1 gets the 28 left in step 2, 63 in step 3
    # (r0 decodes first), its last 9 in step 4.
    model = BlackboxModel((0, 0, 0), (1000, 10, 1))
    config = SimConfig(max_num_batched_tokens=64)
    r0, r1 = simulate([req(0, 0, 100, 2), req(1, 0, 100, 2)], config, model).results
    assert r0.ttft_us == 1640 + 1640
    assert r0.e2e_us == 3280 + 1631
    assert r1.ttft_us == 4911 + 1090
    assert r1.e2e_us == 6001 + 1001


@pytest.mark.parametrize(("adaptive", "chunks"), [(False, [128, 128]), (True, [512, 288])])
def test_the_long_prefill_threshold_caps_chunks_and_adaptive_floors_it_at_a_fair_share(adaptive, chunks):
    # vLLM: two 400-token prompts through a 512-token budget, --long-prefill-token-threshold 64: 64 each per
    # step; with --long-prefill-token-threshold-adaptive the cap is at least 512 // 2 requests = 256: 256 each,
    # then the 144 left of each.
    steps = []
    config = SimConfig(
        max_num_batched_tokens=512,
        long_prefill_token_threshold=64,
        long_prefill_token_threshold_adaptive=adaptive,
    )
    sim = Simulation(config, BlackboxModel((0, 0, 0), (1000, 10, 1)), on_step=lambda *a: steps.append(a[2]))
    sim.add_requests([req(0, 0, 400, 1), req(1, 0, 400, 1)])
    sim.run()
    assert [b.num_prefill_tokens for b in steps[:2]] == chunks
    # alone, a prompt is never capped (nobody to starve), adaptive or not
    steps.clear()
    sim = Simulation(config, BlackboxModel((0, 0, 0), (1000, 10, 1)), on_step=lambda *a: steps.append(a[2]))
    sim.add_requests([req(0, 0, 400, 1)])
    sim.run()
    assert steps[0].num_prefill_tokens == 400


def test_attention_pairs_of_a_chunked_prompt_sum_to_the_whole_prompts():
    # β10 = 1 µs per pair. Budget 64: chunks 64 (64·63/2 = 2016 pairs) + 36 after 64 (36·64 + 36·35/2 = 2934),
    # steps 1000 + 640 + 2016 and 1000 + 360 + 2934; unchunked: 1000 + 1000 + 100·99/2, one β0 less.
    model = BlackboxModel((0, 0, 0), (1000, 10, 1, 0, 0, 0, 0, 0, 0, 0, 1.0))
    (chunked,) = simulate([req(0, 0, 100, 1)], SimConfig(max_num_batched_tokens=64), model).results
    (whole,) = simulate([req(0, 0, 100, 1)], SimConfig(), model).results
    assert chunked.ttft_us == 3656 + 4294
    assert whole.ttft_us == 1000 + 1000 + 4950 == chunked.ttft_us - 1000


def test_a_chunked_prompt_pays_the_per_request_prefill_term_once():
    # β5 = 500 µs per prefill request: vLLM sets a request up when it is admitted, so the 36-token second
    # chunk of a 100-token prompt through a 64-token budget does not pay it again (steps 1000 + 640 + 500,
    # 1000 + 360); a request preempted and readmitted starts its prefill over and pays it again (test_preempted_request_resumes_from_its_surviving_head_block).
    model = BlackboxModel((0, 0, 0), (1000, 10, 1, 0, 0, 500))
    (chunked,) = simulate([req(0, 0, 100, 1)], SimConfig(max_num_batched_tokens=64), model).results
    (whole,) = simulate([req(0, 0, 100, 1)], SimConfig(), model).results
    assert chunked.ttft_us == 2140 + 1360
    assert whole.ttft_us == 1000 + 1000 + 500 == chunked.ttft_us - 1000
    steps = []
    sim = Simulation(
        SimConfig(max_num_batched_tokens=64),
        model,
        on_step=lambda i, t, batch, used, free: steps.append(batch),
    )
    sim.add_requests([req(0, 0, 100, 1)])
    sim.run()
    assert [(b.num_prefill_reqs, b.continued_prefill_reqs) for b in steps] == [(1, 0), (1, 1)]


def test_prefix_hit_only_full_blocks():
    shared = (("prefix:g", 40),)
    a = req(0, 0, 50, 2, (*shared, ("req:0", 10)))
    b = req(1, 10**6, 50, 2, (*shared, ("req:1", 10)))
    model = BlackboxModel((0, 0, 0), (100, 1, 1))
    ra, rb = simulate([a, b], SimConfig(block_size=16), model).results
    assert ra.cached_tokens == 0
    assert rb.cached_tokens == 32  # two full blocks of the 40-token prefix
    assert rb.ttft_us == 100 + (50 - 32)  # only the uncached tokens are prefilled


def test_pairs_with_prefix_hits_cost_beta44_those_within_the_new_tokens_beta10():
    # b's 18 new tokens after a 32-token hit: 18·32 = 576 pairs with cached tokens, 18·17/2 = 153 among themselves.
    shared = (("prefix:g", 40),)
    a = req(0, 0, 50, 1, (*shared, ("req:0", 10)))
    b = req(1, 10**6, 50, 1, (*shared, ("req:1", 10)))
    line = (100, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1.0)
    old = simulate([a, b], SimConfig(block_size=16), BlackboxModel((0, 0, 0), line)).results[1]
    new = simulate(
        [a, b], SimConfig(block_size=16), BlackboxModel((0, 0, 0), (*line, *[0] * 33, 0.25))
    ).results[1]
    assert old.ttft_us == 100 + 18 + (576 + 153)  # an entry without β44 prices every pair at β10
    assert new.ttft_us == 100 + 18 + 153 + 576 // 4


def test_full_prompt_hit_recomputes_last_token():
    # vLLM: at most num_tokens − 1 tokens hit, so a 32-token prompt seen before hits one block, not two.
    same = (("doc", 32),)
    run = simulate(
        [req(0, 0, 32, 1, same), req(1, 10**6, 32, 1, same)],
        SimConfig(block_size=16),
        BlackboxModel((0, 0, 0), (0, 1, 0)),
    )
    assert [r.cached_tokens for r in run.results] == [0, 16]
    assert run.summary["prefix_hit_rate"] == pytest.approx(16 / 64)


def test_no_prefix_caching_means_no_hits():
    same = (("doc", 64),)
    run = simulate(
        [req(0, 0, 64, 1, same), req(1, 10**6, 64, 1, same)],
        SimConfig(block_size=16, enable_prefix_caching=False),
        BlackboxModel((0, 0, 0), (0, 1, 0)),
    )
    assert [r.cached_tokens for r in run.results] == [0, 0]


def test_preemption_of_last_running_request_and_recovery():
    # 4 usable blocks of 16 tokens (one of 5 is vLLM's null block): both requests are admitted, grow, and
    # the later one is preempted (recompute) when the earlier needs a block; both still finish.
    config = SimConfig(block_size=16, num_gpu_blocks=5)
    model = BlackboxModel((0, 0, 0), (100, 1, 1))
    run = simulate([req(0, 0, 16, 40), req(1, 0, 16, 40)], config, model)
    r0, r1 = run.results
    assert r0.num_preemptions == 0 and r1.num_preemptions >= 1
    assert run.summary["preemptions"] == r1.num_preemptions
    assert all(r.status == "ok" and r.output_tokens == 40 for r in run.results)
    assert r1.first_token_us < r0.finish_us < r1.finish_us


@pytest.mark.parametrize("jump", [True, False])
def test_preempted_request_resumes_from_its_surviving_head_block(jump):
    # Checked against a real vLLM 0.32 iteration log (a request preempted at 171 tokens resumed computing 43).
    # 4 usable 16-token blocks; both decode to 32 computed tokens (2 blocks each). At token 33 r0 needs a
    # third block: r1 (last running) is preempted, its blocks freed tail first, and r0 takes r1's tail block.
    # r1 (33 tokens incl. output) needs its full sequence (3 blocks) to fit before it is readmitted: only after
    # r0 finishes. It then hits its own head block (16 tokens) and recomputes the other 17.
    steps = []
    sim = Simulation(
        SimConfig(block_size=16, num_gpu_blocks=5, jump_decode=jump),
        BlackboxModel((0, 0, 0), (100, 1, 1)),
        on_step=lambda inst, start, batch, used, free: steps.append(batch),
    )
    sim.add_requests([req(0, 0, 16, 30), req(1, 0, 16, 30)])
    run = sim.run()
    assert [r.num_preemptions for r in run.results] == [0, 1]
    prefills = [
        (b.num_prefill_reqs, b.num_prefill_tokens, b.num_decode_reqs) for b in steps if b.num_prefill_reqs
    ]
    assert prefills == [(2, 32, 0), (1, 17, 0)]
    assert [b.continued_prefill_reqs for b in steps if b.num_prefill_reqs] == [0, 0]  # a resume starts over
    # Step 17 (the one computing token 33) preempts r1 and admits nobody, although r1 waits at the head.
    assert [b.num_decode_reqs for b in steps[16:18]] == [2, 1]
    assert len(steps) == 17 + 13 + 1 + 12  # both to 32 tokens; r0 alone to 30 outputs; r1's resume and rest


def test_requests_that_can_never_fit_are_rejected_not_hung():
    config = SimConfig(block_size=16, num_gpu_blocks=5, max_model_len=100)
    model = BlackboxModel((0, 0, 0), (100, 1, 1))
    run = simulate([req(0, 0, 90, 20), req(1, 0, 70, 20), req(2, 0, 10, 5)], config, model)
    assert [r.status for r in run.results] == ["rejected", "rejected", "ok"]
    assert run.summary["rejected"] == 2 and run.summary["completed"] == 1


def test_bad_requests_are_errors():
    model = BlackboxModel((0, 0, 0), (1, 1, 1))
    with pytest.raises(SimulationError, match="output_len"):
        simulate([req(0, 0, 10, 0)], SimConfig(), model)
    with pytest.raises(SimulationError, match="sum to 5"):
        simulate([SimRequest(0, 0, 10, 1, (("a", 5),))], SimConfig(), model)
    with pytest.raises(SimulationError, match="twice"):
        simulate([req(0, 0, 10, 1), req(0, 5, 10, 1)], SimConfig(), model)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("block_size", 0),
        ("num_gpu_blocks", 1),
        ("max_num_seqs", -1),
        ("max_num_batched_tokens", 2.5),
        ("long_prefill_token_threshold", -1),
        ("long_prefill_token_threshold_adaptive", "yes"),
    ],
)
def test_bad_config_is_a_clear_error(field, value):
    with pytest.raises(ConfigError, match=field):
        SimConfig(**{field: value})


def test_seats_default_to_at_most_the_budget_and_more_are_refused_as_vllm_does():
    assert SimConfig().max_num_seqs == 256
    assert SimConfig(max_num_batched_tokens=32).max_num_seqs == 32  # vLLM caps its default at the budget
    assert SimConfig(max_num_batched_tokens=32, max_num_seqs=8).max_num_seqs == 8
    with pytest.raises(ConfigError, match=r"max_num_batched_tokens \(32\) must be >= max_num_seqs \(64\)"):
        SimConfig(max_num_batched_tokens=32, max_num_seqs=64)


def test_unknown_scheduler_lists_allowed():
    with pytest.raises(ConfigError, match=r"allowed: .*fcfs"):
        SimConfig(scheduler="lottery")


@pytest.mark.parametrize(
    ("alpha", "beta", "match"),
    [
        ((1, 2), (1, 2, 3), "3 coefficients"),
        ((1, 2, float("nan")), (1, 2, 3), "finite"),
        ((1, 2, 3), (1, -2, 3), ">= 0"),
        (
            (1, 2, 3),
            (1, 2, 3, *[0] * 7, -1),
            r"beta\[10\] is -1.0; .*only beta\[11:44\], offsets, may be negative",
        ),
        (
            (1, 2, 3),
            (1, 2, 3, *[0] * 41, -1),
            r"beta\[44\] is -1.0; .*only beta\[11:44\], offsets, may be negative",
        ),
    ],
)
def test_bad_coefficients(alpha, beta, match):
    with pytest.raises(ConfigError, match=match):
        BlackboxModel(alpha, beta)


def test_extra_betas_add_context_terms():
    model = BlackboxModel((0, 0, 0), (100, 1, 2, 0.5, 0.25))
    from blis_cal.simulate import StepBatch

    assert model.step_time_us(StepBatch(10, 4, 1, 4, 20, 400)) == (100 + 10 + 8 + 10 + 100)


def test_pure_decode_steps_cost_at_least_the_floor_steps_with_a_prefill_pay_every_decode():
    from blis_cal.simulate import StepBatch

    model = BlackboxModel((0, 0, 0), (1000, 0, 300, 0, 0, 0, 0, 300, 1200))  # floor of 4 requests
    steps = [model.decode_only_step_us(n, 0) for n in range(1, 8)]
    assert steps == [2200, 2200, 2200, 2200, 2500, 2800, 3100]
    assert steps == [model.step_time_us(StepBatch(0, n, 0, n, 0, 0)) for n in range(1, 8)]
    assert model.step_time_us(StepBatch(100, 2, 1, 2, 0, 0)) == 1600  # a prefill: no floor


def test_batch_size_offsets_move_pure_decode_steps_of_that_size_only_and_never_below_zero():
    from blis_cal.simulate import StepBatch

    line = (1000, 0, 300)
    table = (-200, 500, 0, 0, 0, 0, 0, 80)  # β11-β18: steps of 1, 2 and 8 decoding requests
    model = BlackboxModel((0, 0, 0), (*line, *[0] * 8, *table))
    plain = BlackboxModel((0, 0, 0), line)
    moved = [model.decode_only_step_us(n, 0) - plain.decode_only_step_us(n, 0) for n in range(1, 10)]
    assert moved == [-200, 500, 0, 0, 0, 0, 0, 80, 0]
    assert [model.step_time_us(StepBatch(0, n, 0, n, 0, 0)) for n in range(1, 10)] == [
        model.decode_only_step_us(n, 0) for n in range(1, 10)
    ]
    assert model.step_time_us(StepBatch(100, 2, 1, 2, 0, 0)) == plain.step_time_us(
        StepBatch(100, 2, 1, 2, 0, 0)
    )
    assert BlackboxModel((0, 0, 0), (*line, *[0] * 8, -5000)).decode_only_step_us(1, 0) == 0


def test_past_the_table_a_pure_decode_step_takes_the_last_offset_and_beta43_per_request_beyond():
    line = (1000, 0, 300)
    table = (*[0] * 31, 700)  # β42: steps of 32 or more decoding requests
    old = BlackboxModel((0, 0, 0), (*line, *[0] * 8, *table))  # an entry from before β43
    grown = BlackboxModel((0, 0, 0), (*line, *[0] * 8, *table, 50))
    flatter = BlackboxModel((0, 0, 0), (*line, *[0] * 8, *table, -50))  # growth below the line's
    plain = BlackboxModel((0, 0, 0), line)
    for n in (32, 33, 64):
        assert old.decode_only_step_us(n, 0) - plain.decode_only_step_us(n, 0) == 700
        assert grown.decode_only_step_us(n, 0) - plain.decode_only_step_us(n, 0) == 700 + 50 * (n - 32)
        assert flatter.decode_only_step_us(n, 0) - plain.decode_only_step_us(n, 0) == 700 - 50 * (n - 32)


def test_coefficients_lookup_and_missing_triple():
    coeffs = load_coefficients(None, "meta-llama/Llama-3.1-8B-Instruct", "H100", 2)
    assert coeffs.alpha[0] == pytest.approx(1601.350510688092)
    assert len(coeffs.beta) == 3
    with pytest.raises(ConfigError, match=r"available for this model: .*GPU=H100 TP=2"):
        load_coefficients(None, "meta-llama/llama-3.1-8b-instruct", "H100", 3)
    with pytest.raises(ConfigError, match="did you mean"):
        load_coefficients(None, "llama-3.1-8b", "H100", 1)
    # a trace header without a vLLM version (the shared A/C) finds the entry of any version
    assert load_coefficients(None, "tiny", "cpu", 1, "").entry["vllm_version"] == "0.32.0"
    with pytest.raises(ConfigError, match=r"vllm_version=0\.1"):
        load_coefficients(None, "tiny", "cpu", 1, "0.1")


def test_block_hashes_depend_on_content_chain_only():
    a = block_hashes((("p", 40), ("x", 10)), 16)
    b = block_hashes((("p", 32), ("p2", 18)), 16)
    c = block_hashes((("p", 40), ("y", 10)), 16)
    assert len(a) == 3 and a[:2] == c[:2] and a[2] != c[2]
    assert a[:2] == b[:2]  # same key at the same positions = same tokens


def test_live_simulation_callbacks_and_run_until():
    tokens, finished = [], []
    sim = Simulation(
        SimConfig(),
        BlackboxModel((1000, 1, 100), (5000, 10, 20)),
        on_token=lambda rid, i, t: tokens.append((rid, i, t)),
        on_finish=finished.append,
    )
    sim.add_request(req(0, 0, 100, 3))
    sim.run_until(7100)
    assert tokens == [(0, 0, 7200)] and not finished
    assert sim.now_us == 7100
    with pytest.raises(SimulationError, match="before the clock"):
        sim.add_request(req(1, 50, 10, 1))
    run = sim.run()
    assert [t[1] for t in tokens] == [0, 1, 2]
    assert finished[0].e2e_us == run.results[0].e2e_us == 17240


def _tiny_roofline(bandwidth_tbs=1e-6, tp=1):
    from blis_cal.simulate.roofline import ModelShape, RooflineModel

    shape = ModelShape(
        layers=1,
        hidden=4,
        heads=2,
        kv_heads=1,
        head_dim=2,
        ffn=8,
        vocab=10,
        bytes_per_param=2,
        gated_mlp=True,
    )
    hw = {"TFlopsPeak": 1e-6, "BwPeakTBs": bandwidth_tbs, "mfuPrefill": 0.5, "mfuDecode": 0.25}  # 1e6 FLOP/s
    return RooflineModel(shape, hw, tp, (0, 0, 0))


def test_roofline_hand_computed():
    from blis_cal.simulate import StepBatch

    # Weights per layer: attention 4·(2·2 + 2·2) + 4·4 = 48, gated MLP 3·4·8 = 96 -> 288 FLOPs per token;
    # LM head 2·4·10 = 80 FLOPs per request; attention (4·2·2 + 5·2) = 26 FLOPs per (query, key) pair.
    # Weight bytes (144 + 40 LM head)·2 = 368; KV 2·1·2·2 = 8 B per token; activations 4·2 = 8 B per token.
    model = _tiny_roofline()
    decode = StepBatch(0, 2, 0, 2, 0, 10)  # 2 decodes over 10 cached tokens in all
    compute_us = ((288 + 80) * 2 + 26 * (10 + 2)) / 0.25  # 4192 µs at 1e6 FLOP/s
    memory_us = 368 + 8 * (2 + 10) + 8 * 2  # 480 B at 1e6 B/s
    assert model.step_time_us(decode) == max(compute_us, memory_us) == 4192
    prefill = StepBatch(3, 0, 1, 0, 4, 0, 3 * 4 + 3)  # a 3-token chunk after 4 cached tokens
    assert model.step_time_us(prefill) == (288 * 3 + 80 + 26 * 15) / 0.5 == 2668
    slow_memory = _tiny_roofline(bandwidth_tbs=1e-7)  # memory-bound now: 480 B at 1e5 B/s
    assert slow_memory.step_time_us(decode) == 4800
    assert _tiny_roofline(tp=2).step_time_us(decode) == 4192 // 2  # TP shards FLOPs and bytes


def test_roofline_from_shipped_configs_and_errors():
    from blis_cal.simulate import LatencyOptions, StepBatch, build_latency_model

    opts = LatencyOptions(model="meta-llama/llama-3.1-8b-instruct", gpu="H100", tp=2)
    model = build_latency_model("roofline", opts)
    # decode of one request is memory-bound: ~16 GB of bf16 weights over 2 × 3.35 TB/s ≈ 2.4 ms
    assert 2000 < model.step_time_us(StepBatch(0, 1, 0, 1, 0, 100)) < 3000
    assert model.queue_delay_us(0) == int(load_coefficients(None, opts.model, "H100", 2).alpha[0])
    with pytest.raises(ConfigError, match="known: H100"):
        build_latency_model("roofline", LatencyOptions(model=opts.model, gpu="B999", tp=1))
    with pytest.raises(ConfigError, match="shipped: "):
        build_latency_model("roofline", LatencyOptions(model="acme/unknown", gpu="H100", tp=1))
    with pytest.raises(ConfigError, match="allowed: blackbox, roofline"):
        build_latency_model("analytic", opts)


def test_bad_coefficient_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_coefficients(tmp_path / "none.yaml", "m", "H100", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [oops")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_coefficients(bad, "m", "H100", 1)
    bad.write_text("defaults: {}\n")
    with pytest.raises(ConfigError, match="`models:` list"):
        load_coefficients(bad, "m", "H100", 1)
    bad.write_text(
        "models:\n- {id: m, GPU: H100, tensor_parallelism: 1, alpha_coeffs: [1, 2], beta_coeffs: x}\n"
    )
    with pytest.raises(ConfigError, match="bad alpha_coeffs/beta_coeffs"):
        load_coefficients(bad, "m", "H100", 1)


def test_incomplete_requests_when_stopped_early():
    sim = Simulation(SimConfig(), BlackboxModel((0, 0, 0), (1000, 1, 1)))
    sim.add_requests([req(0, 0, 10, 50), req(1, 10**9, 10, 5)])
    sim.run_until(20_000)
    r0, r1 = sim.results().results
    assert r0.status == "incomplete" and 0 < r0.output_tokens < 50 and r0.e2e_us == -1
    assert r1.status == "incomplete" and r1.output_tokens == 0 and r1.first_token_us == -1


def test_free_queue_order_matches_vllm():
    # vLLM frees a request's blocks last-to-first: unhashed (partial) blocks go to the front of the free
    # queue, hashed ones to the back (LRU, deepest block evicted first); new blocks come from the front.
    from blis_cal.simulate.kv_cache import KVCacheManager
    from blis_cal.simulate.request import ReqState

    kv = KVCacheManager(num_gpu_blocks=6, block_size=16, enable_caching=True, max_model_len=1000)
    a = ReqState(req(0, 0, 52, 1))
    assert kv.allocate_slots(a, 52)
    assert kv.blocks_of(0) == [1, 2, 3, 4]  # 3 full blocks (hashed) + 1 partial
    kv.free(a)
    d = ReqState(req(2, 0, 40, 1, (("req:0", 40),)))  # shares a's first two blocks of content
    hit = kv.get_computed_blocks(d)
    assert hit == [1, 2]
    assert kv.allocate_slots(d, 8, hit, full_sequence_must_fit=True)  # touches 1, 2; pops the partial 4
    assert kv.blocks_of(2) == [1, 2, 4]
    c = ReqState(req(1, 0, 32, 1))
    assert kv.allocate_slots(c, 32)
    assert kv.blocks_of(1) == [5, 3]  # never-used block 5, then the LRU: a's deepest hashed block
    kv.check()
    assert kv.num_free == 0 and kv.num_used == 5


def test_blocks_of_a_shared_prefix_count_once_per_holder_past_the_first():
    from blis_cal.simulate.kv_cache import KVCacheManager
    from blis_cal.simulate.request import ReqState

    kv = KVCacheManager(num_gpu_blocks=10, block_size=16, enable_caching=True, max_model_len=1000)
    states = [ReqState(req(i, 0, 40, 1, (("system", 32), (f"own:{i}", 8)))) for i in range(3)]
    assert kv.allocate_slots(states[0], 40)
    assert kv.shared_tokens == 0
    for s in states[1:]:
        hit = kv.get_computed_blocks(s)
        assert len(hit) == 2  # the two full blocks of the 32-token prefix
        assert kv.allocate_slots(s, 8, hit, full_sequence_must_fit=True)
        kv.check()
    assert kv.shared_tokens == 2 * 32  # three holders: counted past the first
    kv.free(states[0])
    kv.check()
    assert kv.shared_tokens == 32
    for s in states[1:]:
        kv.free(s)
    kv.check()
    assert kv.shared_tokens == 0


def test_shared_context_costs_beta9_and_entries_without_it_cost_beta4():
    from blis_cal.simulate import StepBatch

    batch = StepBatch(0, 2, 0, 2, 0, 100, 0, 40)  # 2 decodes over 100 context tokens, 40 of them shared
    assert BlackboxModel((0, 0, 0), (0, 0, 0, 0, 1.0)).step_time_us(batch) == 100
    with_beta9 = BlackboxModel((0, 0, 0), (0, 0, 0, 0, 1.0, 0, 0, 0, 0, 0.25))
    assert with_beta9.step_time_us(batch) == 60 + 10
    assert with_beta9.decode_only_step_us(2, 100, 40) == 70


def test_warm_blocks_are_free_cached_and_evicted_oldest_first():
    # A cache warm from before the run: its blocks are free (nothing holds them) yet hit until reused.
    from blis_cal.simulate.kv_cache import KVCacheManager
    from blis_cal.simulate.request import ReqState

    kv = KVCacheManager(num_gpu_blocks=6, block_size=16, enable_caching=True, max_model_len=1000)
    kv.warm((("req:0", 40),), 40)  # two full blocks
    kv.check()
    assert kv.num_free == 5 and kv.num_used == 0
    assert len(kv.get_computed_blocks(ReqState(req(0, 0, 40, 1)))) == 2
    kv.warm((("req:1", 64),), 64)  # four more: the oldest warm block is the first to go
    kv.check()
    assert kv.num_free == 5
    assert kv.get_computed_blocks(ReqState(req(0, 0, 40, 1))) == []  # its first block was evicted
    assert len(kv.get_computed_blocks(ReqState(req(1, 0, 64, 1)))) == 3  # all but the last token's block
