"""Replay: trace rows -> requests, header -> engine settings, results JSON and replayed traces, the CLI."""

import json
import subprocess
import sys

import pytest
from conftest import TRACES

from blis_cal.errors import ConfigError
from blis_cal.replay import (
    config_from_trace,
    read_results_json,
    replay_trace,
    requests_from_trace,
    results_to_trace,
    write_results_json,
)
from blis_cal.simulate import BlackboxModel, SimConfig
from blis_cal.trace import Trace, TraceHeader, TraceRecord, read_trace, write_trace

MODEL = BlackboxModel((20000, 0, 0), (10000, 30, 500))


def test_requests_follow_the_trace(trace_c):
    trace = read_trace(trace_c)
    reqs = requests_from_trace(trace)
    assert len(reqs) == len(trace.records)
    by_id = {r.request_id: r for r in trace.records}
    for r in reqs:
        rec = by_id[r.request_id]
        assert r.arrival_us == rec.send_time_us
        assert r.input_len == rec.server_input_tokens
        assert r.output_len == rec.output_tokens
        assert r.segments[0] == (f"prefix:{rec.prefix_group}", rec.prefix_length)
        assert sum(n for _, n in r.segments) == r.input_len


def test_header_sets_engine_and_flags_override(trace_a):
    header = read_trace(trace_a).header
    config = config_from_trace(header)
    assert (config.block_size, config.num_gpu_blocks, config.max_num_seqs) == (128, 1024, 64)
    assert (config.max_num_batched_tokens, config.max_model_len) == (2048, 4096)
    assert config_from_trace(header, max_num_seqs=8, block_size=None).max_num_seqs == 8
    assert config.long_prefill_token_threshold == 0  # not in the header: vLLM's default, no cap
    header.server.long_prefill_token_threshold = 256  # --server-info long_prefill_token_threshold=256
    assert config_from_trace(header).long_prefill_token_threshold == 256
    assert config_from_trace(header, long_prefill_token_threshold=0).long_prefill_token_threshold == 0
    assert not config_from_trace(header).long_prefill_token_threshold_adaptive
    header.server.long_prefill_token_threshold_adaptive = True
    assert config_from_trace(header).long_prefill_token_threshold_adaptive


def test_unknown_seats_are_capped_at_the_headers_token_budget(trace_a):
    # vLLM refuses a budget below max_num_seqs, so a 32-token server ran with at most 32 seats.
    header = read_trace(trace_a).header
    header.server.max_num_seqs = 0
    header.server.max_num_batched_tokens = 32
    assert config_from_trace(header).max_num_seqs == 32
    assert config_from_trace(header, max_num_seqs=16).max_num_seqs == 16
    with pytest.raises(ConfigError, match=r"must be >= max_num_seqs \(64\)"):
        config_from_trace(header, max_num_seqs=64)


def test_prefix_groups_hit_the_simulated_cache(trace_a, trace_c):
    run_c = replay_trace(read_trace(trace_c), config_from_trace(read_trace(trace_c).header), MODEL)
    run_a = replay_trace(read_trace(trace_a), config_from_trace(read_trace(trace_a).header), MODEL)
    assert run_c.summary["prefix_hit_rate"] > 0.5  # 768-token shared prefixes, 128-token blocks
    assert run_a.summary["prefix_hit_rate"] == 0.0  # no prefix groups
    assert run_c.summary["completed"] == len(run_c.results) == 150
    # a request of a group seen before hits the 6 full blocks of its 768-token prefix
    assert max(r.cached_tokens for r in run_c.results) == 768


def test_zero_output_rows_are_skipped_with_a_note():
    records = [
        TraceRecord(request_id=0, input_tokens=10, output_tokens=5, send_time_us=1, arrival_time_us=1),
        TraceRecord(
            request_id=1, input_tokens=10, output_tokens=0, send_time_us=2, arrival_time_us=2, status="error"
        ),
    ]
    notes: list[str] = []
    reqs = requests_from_trace(Trace(TraceHeader(), records), notes)
    assert [r.request_id for r in reqs] == [0]
    assert "0 output tokens" in notes[0]


def test_accumulated_sessions_reuse_history():
    # A simulated trace (`blis run --trace-output`): the next round carries the answer's token ids.
    header = TraceHeader(mode="generated", session_context_growth="accumulate")
    records = [
        TraceRecord(
            request_id=0, session_id="s", round_index=0, input_tokens=300, output_tokens=50, send_time_us=0
        ),
        TraceRecord(
            request_id=1,
            session_id="s",
            round_index=1,
            input_tokens=400,
            output_tokens=10,
            send_time_us=10**7,
        ),
    ]
    reqs = requests_from_trace(Trace(header, records))
    assert reqs[1].segments == (("req:0", 300), ("out:0", 50), ("req:1", 50))
    run = replay_trace(Trace(header, records), SimConfig(block_size=16), MODEL)
    assert run.results[1].cached_tokens == 16 * (
        349 // 16
    )  # history blocks written by round 0 (prompt+output−1)


def chat_rounds(cached: list[int | None]) -> Trace:
    """Two sessions of three rounds (prompts 300, 500, 700 tokens; answers 100) with these recorded hits."""
    records = []
    for i, hit in enumerate(cached):
        session, round_index = divmod(i, 3)
        records.append(
            TraceRecord(
                request_id=i,
                session_id=f"s{session}",
                round_index=round_index,
                input_tokens=300 + 200 * round_index,
                output_tokens=100,
                send_time_us=10**7 * round_index + session,
                cached_tokens=hit,
            )
        )
    return Trace(TraceHeader(session_context_growth="accumulate"), records)


def test_rounds_that_hit_only_their_previous_prompt_are_replayed_so():
    # 128-token blocks: the previous prompt (300, 500 tokens) holds 2 and 3 full blocks, with its answer 3 and 4;
    # a chat API round re-tokenizes the answer's text, so vLLM found the prompt's blocks only.
    trace = chat_rounds([0, 256, 384, 0, 256, 384])
    notes: list[str] = []
    reqs = {r.request_id: r for r in requests_from_trace(trace, notes, block_size=128)}
    assert reqs[1].segments == (("req:0", 300), ("req:1", 200))
    assert reqs[2].segments == (("req:0", 300), ("req:1", 200), ("req:2", 200))
    assert "previous prompt in vLLM's prefix cache but not its answer (4 round(s)" in notes[0]
    run = replay_trace(trace, SimConfig(block_size=128), MODEL)
    assert [r.cached_tokens for r in run.results] == [0, 256, 384, 0, 256, 384]


PROMPT_ONLY = (("req:0", 300), ("req:1", 200))
WITH_ANSWER = (("req:0", 300), ("out:0", 100), ("req:1", 100))


def test_without_hits_per_row_the_runs_hit_rate_decides():
    # BLIS's observe records no cached_tokens and sends placeholder words for an answer; its --scrape-kv-metrics
    # hit rate says what vLLM found: 1,280 of 3,000 prompt tokens are the previous prompts' blocks, 1,792 with
    # their answers; far fewer hits than either (evictions in a small cache) tell nothing.
    for rate, prefix in ((0.43, PROMPT_ONLY), (0.6, WITH_ANSWER), (0.2, WITH_ANSWER)):
        trace = chat_rounds([None] * 6)
        trace.header.observed_kv_metrics = {"hit_rate": rate}
        notes: list[str] = []
        reqs = {r.request_id: r for r in requests_from_trace(trace, notes, block_size=128)}
        assert reqs[1].segments == prefix
        assert bool(notes) == (prefix == PROMPT_ONLY)
        assert not notes or "its hit rate over the run (1290 tokens) is nearer the 1280" in notes[0]


def test_a_capture_without_any_recorded_hits_is_read_as_blis_observes_rounds():
    # Ours records vLLM's hits per row and over the run; a capture with neither is BLIS's observe without
    # --scrape-kv-metrics, whose rounds carry placeholder words for the answer. A simulated trace keeps it.
    for mode, prefix in (("real", PROMPT_ONLY), ("generated", WITH_ANSWER), ("replayed", WITH_ANSWER)):
        trace = chat_rounds([None] * 6)
        trace.header.mode = mode
        notes: list[str] = []
        reqs = {r.request_id: r for r in requests_from_trace(trace, notes, block_size=128)}
        assert reqs[1].segments == prefix
        assert any("no prefix-cache hits recorded" in n for n in notes) == (mode == "real")


def test_rounds_that_hit_their_previous_answer_keep_it_in_their_prefix():
    # As recorded by a token-id observer; the run's hit rate as vLLM counts it (1,792 of 3,000 prompt tokens).
    for cached, rate in (([0, 384, 512, 0, 384, 512], None), ([None] * 6, 1792 / 3000)):
        trace = chat_rounds(cached)
        if rate is not None:
            trace.header.observed_kv_metrics = {"hit_rate": rate}
        notes: list[str] = []
        reqs = {r.request_id: r for r in requests_from_trace(trace, notes, block_size=128)}
        assert reqs[1].segments == WITH_ANSWER
        assert not notes
        run = replay_trace(trace, SimConfig(block_size=128), MODEL)
        assert [r.cached_tokens for r in run.results] == [0, 384, 512, 0, 384, 512]


def test_a_chat_api_capture_replays_vllms_prefix_hits():
    # vLLM 0.32 through /v1/chat/completions: each round hit its previous prompt's blocks only (the answer came
    # back as text, re-tokenized to other ids); before, the replay hit the answer too in 28 of its 80 rows.
    trace = read_trace(TRACES / "real_day43" / "chatapi_chat4_s4307.csv")
    run = replay_trace(trace, config_from_trace(trace.header), MODEL)
    recorded = {r.request_id: r.cached_tokens for r in trace.records}
    assert sum(r.cached_tokens == recorded[r.request_id] for r in run.results) >= 78
    assert sum(r.cached_tokens for r in run.results) == pytest.approx(sum(recorded.values()), rel=0.02)


def test_results_json_and_replayed_trace_round_trip(tmp_path, trace_a):
    trace = read_trace(trace_a)
    run = replay_trace(trace, config_from_trace(trace.header), MODEL)
    path = tmp_path / "r.json"
    write_results_json(run, path)
    rows = json.loads(path.read_text())
    assert list(rows[0])[:6] == [
        "request_id",
        "ttft_us",
        "e2e_us",
        "input_tokens",
        "output_tokens",
        "itl_mean_us",
    ]
    assert read_results_json(path) == run.results
    sim_trace = results_to_trace(run, trace)
    write_trace(sim_trace, tmp_path / "sim.csv")
    back = read_trace(tmp_path / "sim.csv")
    assert back.header.mode == "replayed"
    for rec, res in zip(back.records, run.results, strict=True):
        assert rec.ttft_us == res.ttft_us and rec.e2e_us == res.e2e_us
        assert rec.client_id == "client-0"


def test_bad_results_json(tmp_path):
    from blis_cal.errors import TraceFormatError

    bad = tmp_path / "bad.json"
    bad.write_text('[{"request_id": 1}]')
    with pytest.raises(TraceFormatError, match="entry 0"):
        read_results_json(bad)
    bad.write_text("{")
    with pytest.raises(TraceFormatError, match="not valid JSON"):
        read_results_json(bad)


def _blis(*args):
    return subprocess.run(
        [sys.executable, "-m", "blis_cal", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_replay(tmp_path, trace_a):
    out = _blis(
        "replay",
        str(trace_a),
        "--alpha",
        "20000,0,0",
        "--beta",
        "10000,30,500",
        "--results",
        str(tmp_path / "r.json"),
        "--trace-output",
        str(tmp_path / "sim"),
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    for key in (
        "requests",
        "completed",
        "rejected",
        "duration_s",
        "throughput_rps",
        "output_tokens_per_s",
        "ttft_p99_ms",
        "itl_p50_ms",
        "e2e_mean_ms",
        "preemptions",
        "kv_utilization_mean",
        "prefix_hit_rate",
    ):
        assert key in summary
    assert summary["completed"] == 150
    assert len(json.loads((tmp_path / "r.json").read_text())) == 150
    assert (tmp_path / "sim.csv").exists() and (tmp_path / "sim.yaml").exists()
    # as a capture records vLLM's per-request times: what they leave of a TTFT is the queue delay α0 = 20 ms
    written = read_trace(tmp_path / "sim.csv")
    assert {r.outside_engine_us for r in written.records} == {20_000}


def test_cli_missing_coefficients_says_what_exists(trace_a):
    out = _blis(
        "replay", str(trace_a), "--model", "meta-llama/llama-3.1-8b-instruct", "--gpu", "H100", "--tp", "8"
    )
    assert out.returncode == 2
    assert "available for this model" in out.stderr and "TP=2" in out.stderr


def test_cli_run_and_bad_flags():
    out = _blis("run", "--rate", "5", "--num-requests", "50", "--alpha", "1000,1,100", "--beta", "6000,18,3")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["completed"] == 50
    out = _blis("run", "--rate", "0", "--alpha", "1,1,1", "--beta", "1,1,1")
    assert out.returncode == 2 and "--rate" in out.stderr
    out = _blis("run", "--rate", "5", "--alpha", "1,x,1", "--beta", "1,1,1")
    assert out.returncode == 2 and "--alpha" in out.stderr
    small = ("run", "--rate", "5", "--num-requests", "5", "--alpha", "1,1,1", "--beta", "1,1,1")
    out = _blis(*small, "--max-num-batched-tokens", "64")  # seats default to the budget, as in vLLM
    assert out.returncode == 0, out.stderr
    out = _blis(*small, "--max-num-batched-tokens", "64", "--max-num-seqs", "128")
    assert out.returncode == 2 and "must be >= max_num_seqs (128)" in out.stderr


def test_replayed_trace_carries_per_token_times(tmp_path, trace_c):
    trace = read_trace(trace_c)
    run = replay_trace(trace, config_from_trace(trace.header), MODEL, record_tokens=True)
    write_trace(results_to_trace(run, trace), tmp_path / "sim.csv")
    back = read_trace(tmp_path / "sim.csv")
    assert back.itl is not None
    for res in run.results:
        chunks = back.itl[res.request_id]
        assert len(chunks) == res.output_tokens
        assert chunks[0].timestamp_us == res.first_token_us and chunks[-1].timestamp_us == res.finish_us
    # the ITL file gives the same mean gap as the (E2E − TTFT)/(M − 1) definition
    from blis_cal.trace import itl_means_us

    means = itl_means_us(back)
    assert all(
        means[r.request_id] == pytest.approx(r.itl_mean_us) for r in run.results if r.output_tokens > 1
    )


def _prometheus_delta(raw: dict, name: str) -> float:
    def value(text: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    return value(raw["metrics_after"]) - value(raw["metrics_before"])


def test_simulated_prefix_cache_hits_exactly_what_vllm_hit(trace_c):
    """vLLM's own counters over the real run of trace C (prefix groups of 768 tokens, 128-token blocks):
    the replayed prefix cache hits the same number of prompt tokens out of the same queries."""
    from conftest import shared_dir

    raw_path = shared_dir() / "traces" / "vllm-cpu-tiny" / "C_prefix_1.0.raw.jsonl"
    if not raw_path.exists():
        pytest.skip(f"{raw_path} not present")
    raw = json.loads(raw_path.read_text().splitlines()[0])
    trace = read_trace(trace_c)
    run = replay_trace(trace, config_from_trace(trace.header), MODEL)
    assert sum(r.input_tokens for r in run.results) == _prometheus_delta(
        raw, "vllm:prefix_cache_queries_total"
    )
    assert sum(r.cached_tokens for r in run.results) == _prometheus_delta(raw, "vllm:prefix_cache_hits_total")


def _warm_trace(cached: list[int | None], group: str = "") -> Trace:
    """Three 300-token prompts 1 s apart (16-token blocks), with their recorded cached tokens."""
    records = [
        TraceRecord(
            request_id=i,
            input_tokens=300 - (256 if group else 0),
            prefix_group=group,
            prefix_length=256 if group else 0,
            server_input_tokens=300,
            output_tokens=4,
            send_time_us=1_000_000 * i + 1,
            arrival_time_us=1_000_000 * i + 1,
            cached_tokens=c,
        )
        for i, c in enumerate(cached)
    ]
    return Trace(TraceHeader(), records, {})


def _replayed(trace: Trace) -> dict:
    notes: list[str] = []
    reqs = requests_from_trace(trace, notes, block_size=16)
    run = replay_trace(trace, SimConfig(block_size=16), MODEL)
    return {"warm": [r.warm_tokens for r in reqs], "results": run.results, "notes": notes}


def test_cached_tokens_no_earlier_row_explains_start_out_cached():
    # vLLM served 288 and 160 tokens of rows 1 and 2 from a cache warm from an earlier run (their prompts are
    # their own): the replay starts with those blocks cached; row 0 found nothing.
    warm = _replayed(_warm_trace([0, 288, 160]))
    cold = _replayed(_warm_trace([None, None, None]))
    assert warm["warm"] == [0, 288, 160] and cold["warm"] == [0, 0, 0]
    assert [r.cached_tokens for r in warm["results"]] == [0, 288, 160]
    assert [r.cached_tokens for r in cold["results"]] == [0, 0, 0]
    w, c = warm["results"], cold["results"]
    assert w[0].ttft_us == c[0].ttft_us and w[1].ttft_us < c[1].ttft_us and w[2].ttft_us < c[2].ttft_us
    assert any("2 row(s) hit vLLM's prefix cache on content no earlier row sent" in n for n in warm["notes"])


def test_cached_tokens_an_earlier_row_explains_are_left_to_the_simulated_cache():
    # A shared 256-token prefix: row 0 computed it, rows 1 and 2 hit it; nothing starts out cached, and the
    # replay is the same as without the recorded column.
    recorded = _replayed(_warm_trace([0, 256, 256], group="g"))
    absent = _replayed(_warm_trace([None, None, None], group="g"))
    assert recorded["warm"] == [0, 0, 0] and not recorded["notes"]
    assert recorded["results"] == absent["results"]
    assert [r.cached_tokens for r in recorded["results"]] == [0, 256, 256]


def test_cached_tokens_beyond_a_shared_prefix_start_out_cached():
    # The same prefix-group prompts sent again: vLLM hit 288 tokens of each, 32 more than the shared prefix,
    # which earlier rows cannot explain (their own content was cached by the earlier run).
    replayed = _replayed(_warm_trace([288, 288, 288], group="g"))
    assert replayed["warm"] == [288, 288, 288]
    assert [r.cached_tokens for r in replayed["results"]] == [288, 288, 288]


def test_nothing_starts_out_cached_without_prefix_caching():
    trace = _warm_trace([0, 288, 160])
    notes: list[str] = []
    reqs = requests_from_trace(trace, notes, block_size=16, prefix_caching=False)
    assert [r.warm_tokens for r in reqs] == [0, 0, 0] and not notes
    run = replay_trace(trace, SimConfig(block_size=16, enable_prefix_caching=False), MODEL)
    assert [r.cached_tokens for r in run.results] == [0, 0, 0]


def test_warm_tokens_out_of_range_are_rejected():
    from blis_cal.simulate import SimRequest, SimulationError, simulate

    bad = SimRequest(0, 0, 100, 2, (("req:0", 100),), warm_tokens=101)
    with pytest.raises(SimulationError, match=r"warm_tokens must be in 0\.\.input_len"):
        simulate([bad], SimConfig(), MODEL)


def test_a_header_without_the_engine_settings_is_replayed_on_defaults_and_says_so(tmp_path):
    """BLIS's observe records only the server type and model: the replay says which settings it took and
    their values, leaves out what a flag gave, and says nothing when the header states them all."""
    from blis_cal.replay import unstated_settings_note
    from blis_cal.trace import ServerInfo

    full = read_trace(TRACES / "real_day48" / "kv24_closed8t_s4804.csv")
    assert unstated_settings_note(full.header, config_from_trace(full.header), "flags") is None
    bare = TraceHeader(server=ServerInfo(type="vllm", model="tiny", num_gpu_blocks=24))
    note = unstated_settings_note(
        bare, config_from_trace(bare, max_num_seqs=8), "flags", given=["max_num_seqs"]
    )
    assert note is not None and "num_gpu_blocks" not in note and "max_num_seqs" not in note
    assert "block_size, max_num_batched_tokens, max_model_len: replayed with block_size=16" in note
    assert note.endswith("(flags; vLLM logs them at startup)")
    write_trace(
        Trace(header=TraceHeader(server=ServerInfo(type="vllm", model="tiny")), records=full.records),
        tmp_path / "t.csv",
    )
    out = _blis(
        "replay",
        str(tmp_path / "t.csv"),
        "--alpha",
        "20000,0,0",
        "--beta",
        "10000,30,500",
        "--num-gpu-blocks",
        "24",
    )
    assert out.returncode == 0, out.stderr
    said = " ".join(out.stderr.split())
    assert (
        "does not state the server's block_size, max_num_batched_tokens, max_num_seqs, max_model_len" in said
    )
    assert "--num-gpu-blocks, --block-size" in said and "num_gpu_blocks=" not in said
