"""Observer against our aiohttp vLLM stand-in: every fault is recorded and the run goes on; stop/drain,
closed loops, the /metrics sidecar and the header's server facts."""

import asyncio
import csv
import itertools
import os
import signal
import subprocess
import sys
import time

import pytest

from blis_cal.observe import ClientConfig, ObserveConfig, Observer, observe
from blis_cal.replay import config_from_trace, unstated_settings_note
from blis_cal.trace import ok_records, read_trace
from blis_cal.trace_analysis import trace_summary
from blis_cal.workload import Workload, generate, parse_spec, workload_from_options
from tests.fake_vllm import FakeVLLM
from tests.workload_requests import workload_request


def wreq(rid, arrival_us, n_in, n_out=6, **kw):
    return workload_request(rid, arrival_us=arrival_us, n_in=n_in, n_out=n_out, token_seed=5, **kw)


def workload(reqs):
    return Workload(requests=reqs, num_requests=len(reqs), horizon_us=None, seed=1)


def config(server, **kw):
    names = ("timeout_s", "api", "streaming", "api_key", "http_client")
    client_kw = {k: kw.pop(k) for k in names if k in kw}
    return ObserveConfig(ClientConfig(endpoint=server.url, model="fake", **client_kw), **kw)


def by_id(trace):
    return {r.request_id: r for r in trace.records}


FAULTS = {
    11: "500",
    12: "503",
    13: "reset",
    14: "stall",
    15: "malformed",
    16: "error_event",
    17: "slow_first",
    18: "no_done",
}


@pytest.mark.parametrize("http_client", ["httptools", "aiohttp", "httpx"])
def test_every_fault_is_recorded_and_the_run_goes_on(tmp_path, http_client):
    # request i has prompt length 10 + i: request 0 is healthy, 1..8 hit one fault each, 9 healthy again
    reqs = [wreq(i, i * 20_000, 10 + i) for i in range(10)]
    with FakeVLLM(faults=FAULTS, stall_s=5.0) as server:
        cfg = config(server, timeout_s=1.0, http_client=http_client)
        result = observe(workload(reqs), cfg, tmp_path / "f.csv", handle_signals=False)
    trace = read_trace(tmp_path / "f.csv")
    rows = by_id(trace)
    assert len(rows) == 10 and result.recorded == 10
    assert rows[0].status == rows[9].status == rows[7].status == "ok"  # slow first byte is only slow
    assert rows[7].ttft_us >= 300_000 > rows[0].ttft_us
    assert rows[1].status == "error" and rows[1].error_message == "HTTP 500: fake 500"
    assert rows[2].status == "error" and rows[2].error_message.startswith("HTTP 503")
    assert rows[3].status == "error" and "HTTP error" in rows[3].error_message and rows[3].num_chunks == 2
    assert rows[4].status == "timeout" and rows[4].num_chunks == 2
    assert rows[5].status == "error" and "malformed SSE event" in rows[5].error_message
    assert rows[6].status == "error" and "fake engine failure" in rows[6].error_message
    assert rows[8].status == "error" and "before [DONE]" in rows[8].error_message
    assert result.by_status == {"error": 6, "ok": 3, "timeout": 1}
    # chunk times are only kept for ok requests (BLIS's ITL file rule)
    assert set(trace.itl) == {0, 7, 9}


def test_healthy_run_records_server_truth_tokens_and_facts(tmp_path):
    reqs = [wreq(i, i * 5_000, 40, n_out=9, prefix=32, group="g") for i in range(6)]
    # 20 ms per token: the run lasts ~0.2 s, several 50 ms sidecar intervals on any host (at the fake's default
    # 2 ms it could end before the second row, whose busy fractions are the first ones)
    with FakeVLLM(stream_interval=2, block_size=16, itl_s=0.02) as server:
        result = observe(
            workload(reqs), config(server, metrics_interval_s=0.05), tmp_path / "h.csv", handle_signals=False
        )
        bodies = list(server.received)
    trace = read_trace(tmp_path / "h.csv")
    assert result.stopped == "" and all(r.status == "ok" for r in trace.records)
    for r in trace.records:
        assert (r.prefix_length, r.input_tokens, r.server_input_tokens, r.output_tokens) == (32, 40, 72, 9)
        chunks = trace.itl[r.request_id]
        assert [c.tokens for c in chunks] == [2, 2, 2, 2, 1]  # stream_interval 2: tokens, not events
        assert r.num_chunks == 5 and r.finish_reason == "length" and r.x_request_id
        assert r.server_queue_us == 50 and r.server_ttft_us > 0 and r.server_mean_itl_us > 0
        assert r.arrival_time_us <= r.send_time_us < r.first_chunk_time_us <= r.last_chunk_time_us
    # the shared 32-token prefix is two full 16-token blocks: every later request hits them
    assert sorted(r.cached_tokens for r in trace.records) == [0, 32, 32, 32, 32, 32]
    assert all(b["prompt"][:32] == bodies[0]["prompt"][:32] for b in bodies)
    server_info = trace.header.server
    assert (server_info.type, server_info.vllm_version, server_info.max_model_len) == ("vllm", "0.32.0", 2048)
    assert (server_info.block_size, server_info.num_gpu_blocks, server_info.enable_prefix_caching) == (
        16,
        512,
        True,
    )
    kv = trace.header.observed_kv_metrics
    assert kv["token_queries"] == 6 * 72 and kv["token_hits"] == 5 * 32
    assert kv["hit_rate"] == round(160 / 432, 6) and kv["generation_tokens"] == 54
    with result.metrics_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and rows[0].keys() >= {
        "time_us",
        "running",
        "waiting",
        "kv_usage",
        "prefix_hits",
        "engine_steps",
    }
    # busy fractions: of the machine's CPUs, and of one CPU by the observer itself; blank when /proc/stat's
    # jiffies did not advance over a (here 50 ms) interval
    busy = [float(r["host_cpu_busy"]) for r in rows if r["host_cpu_busy"]]
    own = [float(r["observer_cpu"]) for r in rows if r["observer_cpu"]]
    assert busy and own and all(0 <= b <= 1 for b in busy) and all(0 <= o <= 2 for o in own)
    times = [int(r["time_us"]) for r in rows]
    assert times == sorted(times)


def test_closed_loop_users_never_exceed_concurrency_and_respect_budget(tmp_path):
    w = workload_from_options(concurrency=3, num_requests=12, input_tokens=30, output_tokens=4, seed=2)
    with FakeVLLM(ttft_s=0.02) as server:
        result = observe(w, config(server, max_concurrency=3), tmp_path / "c.csv", handle_signals=False)
    trace = read_trace(tmp_path / "c.csv")
    assert result.recorded == 12 and sorted(r.request_id for r in trace.records) == list(range(12))
    spans = sorted(
        [(r.send_time_us, 1) for r in trace.records] + [(r.last_chunk_time_us, -1) for r in trace.records]
    )
    level = peak = 0
    for _, d in spans:
        level += d
        peak = max(peak, level)
    assert peak == 3
    # a follow-up arrives when its user's previous request ended (no think time) and is sent then
    for r in trace.records:
        assert r.send_time_us - r.arrival_time_us < 50_000


def test_max_errors_stops_a_hopeless_run(tmp_path):
    reqs = [wreq(i, i * 10_000, 11) for i in range(40)]  # every prompt has length 11: all get HTTP 500
    with FakeVLLM(faults={11: "500"}) as server:
        result = observe(
            workload(reqs), config(server, max_errors=5), tmp_path / "e.csv", handle_signals=False
        )
    trace = read_trace(tmp_path / "e.csv")
    assert "max-errors" in result.stopped
    assert 5 <= len(trace.records) < 40 and all(r.status == "error" for r in trace.records)


def test_stop_drains_in_flight_then_cancels_the_rest(tmp_path):
    # 3 quick requests, 2 that stall past the drain timeout, then more that must never be sent
    reqs = [wreq(i, 0, 10) for i in range(3)] + [wreq(3 + i, 0, 14) for i in range(2)]
    reqs += [wreq(5 + i, 2_000_000, 10) for i in range(5)]
    with FakeVLLM(faults={14: "stall"}, stall_s=10.0) as server:

        async def go():
            obs = Observer(workload(reqs), config(server, drain_timeout_s=0.3), tmp_path / "d.csv")
            task = asyncio.create_task(obs.run())
            await asyncio.sleep(0.4)
            obs.request_stop()
            return await task

        t0 = time.monotonic()
        result = asyncio.run(go())
        elapsed = time.monotonic() - t0
    trace = read_trace(tmp_path / "d.csv")
    rows = by_id(trace)
    assert elapsed < 3.0 and result.stopped == "interrupted"
    assert sorted(rows) == [0, 1, 2, 3, 4]  # never-sent requests are not in the trace
    assert [rows[i].status for i in range(5)] == ["ok", "ok", "ok", "cancelled", "cancelled"]
    assert rows[3].num_chunks == 2 and rows[3].last_chunk_time_us > 0


def test_api_key_never_reaches_the_trace(tmp_path):
    with FakeVLLM() as server:
        observe(
            workload([wreq(0, 0, 10)]),
            config(server, api_key="sk-secret-123"),
            tmp_path / "k.csv",
            handle_signals=False,
        )
        assert server.headers[0]["authorization"] == "Bearer sk-secret-123"
    for path in tmp_path.iterdir():
        assert "sk-secret-123" not in path.read_text()


def test_server_without_metrics_or_streaming(tmp_path):
    (tmp_path / "n.itl.csv").write_text("request_id,chunk_index,timestamp_us\n0,0,5\n")  # an older run's
    (tmp_path / "n.metrics.csv").write_text("time_us\n1\n")
    with FakeVLLM(metrics=False) as server:
        cfg = config(server, streaming=False, record_itl=False)
        result = observe(
            workload([wreq(i, 0, 10, n_out=4) for i in range(3)]),
            cfg,
            tmp_path / "n.csv",
            handle_signals=False,
        )
    trace = read_trace(tmp_path / "n.csv")
    assert any("/metrics did not answer" in n for n in result.notes) and result.metrics_path is None
    assert trace.itl is None and not trace.header.observed_kv_metrics
    assert not (tmp_path / "n.metrics.csv").exists()
    assert all(
        (r.status, r.streaming, r.num_chunks, r.output_tokens) == ("ok", False, 1, 4) for r in trace.records
    )


def test_a_dev_mode_server_info_fills_the_scheduler_facts_and_server_info_still_wins(tmp_path):
    # vLLM started with VLLM_SERVER_DEV_MODE=1 serves its engine config at /server_info (shape as vLLM 0.32's).
    engine = {
        "scheduler_config": {
            "max_num_seqs": 24,
            "max_num_batched_tokens": 512,
            "long_prefill_token_threshold": 192,
        },
        "parallel_config": {"tensor_parallel_size": 1},
        "model_config": {"max_model_len": 2048},
        "cache_config": {"block_size": 16},
    }
    headers = {}
    for overrides in ({}, {"max_num_seqs": 8}):
        with FakeVLLM(engine_config=engine) as server:
            cfg = config(server, server_overrides=overrides)
            observe(workload([wreq(0, 0, 10)]), cfg, tmp_path / "d.csv", handle_signals=False)
        headers[len(overrides)] = read_trace(tmp_path / "d.csv").header.server
    found = headers[0]
    assert (found.max_num_seqs, found.max_num_batched_tokens, found.long_prefill_token_threshold) == (
        24,
        512,
        192,
    )
    assert (found.tensor_parallel, found.max_model_len, found.block_size) == (1, 2048, 16)
    assert (headers[1].max_num_seqs, headers[1].max_num_batched_tokens) == (8, 512)  # --server-info over it


def test_a_server_that_does_not_state_its_scheduler_settings_gets_a_note_naming_them_and_server_info(
    tmp_path,
):
    # vLLM without dev mode has no /server_info: /metrics and /v1/models give the cache and the model length, not
    # the token budget or the seats, which a replay then takes from vLLM's defaults.
    reqs = [wreq(0, 0, 10, n_out=3)]
    phrase = "the server did not state its"
    engine = {"scheduler_config": {"max_num_seqs": 24, "max_num_batched_tokens": 512}}
    runs = {
        "plain": ({}, None),
        "given": ({"max_num_seqs": 8, "max_num_batched_tokens": 256}, None),
        "dev": ({}, engine),
    }
    notes = {}
    for name, (overrides, engine_config) in runs.items():
        with FakeVLLM(engine_config=engine_config) as server:
            cfg = config(server, server_overrides=overrides)
            notes[name] = observe(workload(reqs), cfg, tmp_path / f"{name}.csv", handle_signals=False).notes
    [note] = [n for n in notes["plain"] if phrase in n]
    assert "max_num_batched_tokens, max_num_seqs" in note and "--server-info" in note
    assert "num_gpu_blocks" not in note and "max_model_len" not in note  # stated by /metrics and /v1/models
    assert not any(phrase in n for n in notes["given"] + notes["dev"])
    server = read_trace(tmp_path / "plain.csv").header.server
    assert (server.max_num_seqs, server.max_num_batched_tokens, server.num_gpu_blocks) == (0, 0, 512)
    # the replay's note names the same settings
    trace = read_trace(tmp_path / "plain.csv")
    replay_note = unstated_settings_note(trace.header, config_from_trace(trace.header), "flags")
    assert replay_note is not None and "max_num_batched_tokens, max_num_seqs:" in replay_note


def test_chat_text_prompts_measure_tokens_per_word(tmp_path):
    with FakeVLLM() as server:
        cfg = config(server, api="chat")
        result = observe(
            workload([wreq(i, 0, 30, n_out=3) for i in range(2)]),
            cfg,
            tmp_path / "t.csv",
            handle_signals=False,
        )
    trace = read_trace(tmp_path / "t.csv")
    assert any("1 tokens per word" in n for n in result.notes)  # the fake counts words
    assert all(
        r.status == "ok" and r.server_input_tokens == 30 and r.output_tokens == 3 for r in trace.records
    )


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"max_concurrency": 0}, "--max-concurrency"),
        ({"max_errors": -1}, "--max-errors"),
        ({"drain_timeout_s": -1}, "--drain-timeout"),
    ],
)
def test_bad_observe_options_name_the_flag(kw, flag):
    from blis_cal.errors import ConfigError

    with pytest.raises(ConfigError, match=flag):
        ObserveConfig(ClientConfig(endpoint="http://x", model="m"), **kw)


def test_record_itl_needs_streaming():
    from blis_cal.errors import ConfigError

    with pytest.raises(ConfigError, match="--record-itl"):
        ObserveConfig(ClientConfig(endpoint="http://x", model="m", streaming=False))


# ---------------------------------------------------------------------------------------------- CLI


def cli(*args):
    return [sys.executable, "-m", "blis_cal", "observe", *args]


def test_ctrl_c_drains_and_leaves_a_valid_trace(tmp_path):
    out = tmp_path / "int.csv"
    with FakeVLLM(ttft_s=0.05, itl_s=0.05) as server:
        proc = subprocess.Popen(
            cli(
                "--endpoint",
                server.url,
                "--model",
                "fake",
                "--rate",
                "20",
                "--num-requests",
                "400",
                "--input-tokens",
                "20",
                "--output-tokens",
                "10",
                "--out",
                str(out),
                "--no-progress",
                "--drain-timeout",
                "5",
            ),
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    trace = read_trace(out)
    assert 3 <= len(trace.records) < 400
    assert all(r.status == "ok" for r in trace.records)  # in-flight requests finished within the drain
    assert "interrupted" in err and trace_summary(trace)["requests"] == len(trace.records)


def test_killed_run_leaves_a_readable_partial_trace(tmp_path):
    out = tmp_path / "kill.csv"
    with FakeVLLM() as server:
        proc = subprocess.Popen(
            cli(
                "--endpoint",
                server.url,
                "--model",
                "fake",
                "--rate",
                "50",
                "--num-requests",
                "1000",
                "--input-tokens",
                "20",
                "--output-tokens",
                "5",
                "--out",
                str(out),
                "--no-progress",
            ),
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 6):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    trace = read_trace(out)  # header from the start, every flushed row, every flushed chunk
    assert len(trace.records) >= 5 and all(r.status == "ok" for r in trace.records)
    assert trace.header.server is not None and trace.header.server.model == "fake"
    for r in trace.records:
        assert sum(c.tokens for c in trace.itl.get(r.request_id, [])) in (0, 5)


def test_a_held_up_client_says_so_but_a_concurrency_cap_is_no_holdup(tmp_path):
    """Requests sent 50+ ms after their time because the client's loop was blocked (here: a progress callback
    sleeping 0.3 s) are counted in a note and in `trace info`; waits for a --max-concurrency slot are not."""
    reqs = [wreq(0, 0, 10, n_out=3)] + [wreq(i, 80_000 + i * 20_000, 10, n_out=3) for i in range(1, 6)]
    blocked = []

    def block_once(progress):  # request 0 answered (~20 ms): block until ~0.32 s, past 1-5's times
        if progress.done == 1 and not blocked:
            blocked.append(True)
            time.sleep(0.3)

    with FakeVLLM() as server:
        held = observe(
            workload(reqs), config(server), tmp_path / "held.csv", block_once, handle_signals=False
        )
    together = [wreq(i, 1_000, 10, n_out=3) for i in range(4)]
    with FakeVLLM(ttft_s=0.1) as slow:  # one slot: each request waits ~0.1 s more than the one before
        capped = observe(
            workload(together), config(slow, max_concurrency=1), tmp_path / "cap.csv", handle_signals=False
        )
    late = [n for n in held.notes if "ms late" in n]
    assert len(late) == 1 and late[0].startswith("5 request(s) were sent more than 50 ms late")
    assert trace_summary(read_trace(tmp_path / "held.csv"))["late_sends"] == 5
    # the trace shows the cap's waits (it cannot tell why); the observer knows they were by design
    assert trace_summary(read_trace(tmp_path / "cap.csv"))["late_sends"] == 3
    assert not [n for n in capped.notes if "ms late" in n]


def test_cli_scrapes_metrics_only_before_and_after_unless_asked(tmp_path):
    """By default no /metrics sidecar runs during the load (scrapes can slow a CPU-bound server); the header
    still gets the before/after counters. `--metrics-interval S` turns the sidecar on."""
    runs = {"default": (), "sidecar": ("--metrics-interval", "0.05")}
    with FakeVLLM(itl_s=0.02) as server:
        for name, flags in runs.items():
            proc = subprocess.run(
                cli(
                    "--endpoint", server.url, "--model", "fake", "--rate", "20", "--num-requests", "6",
                    "--input-tokens", "20", "--output-tokens", "8", "--out", str(tmp_path / f"{name}.csv"),
                    "--no-progress", *flags,
                ),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
    for name in runs:
        kv = read_trace(tmp_path / f"{name}.csv").header.observed_kv_metrics
        assert kv["generation_tokens"] == 6 * 8 and kv["prompt_tokens"] == 6 * 20
    assert not (tmp_path / "default.metrics.csv").exists()
    with (tmp_path / "sidecar.metrics.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) >= 2


def test_cli_bad_header_flag_is_one_line_error(tmp_path):
    proc = subprocess.run(
        cli(
            "--endpoint",
            "http://127.0.0.1:9",
            "--model",
            "m",
            "--rate",
            "1",
            "--num-requests",
            "1",
            "--out",
            str(tmp_path / "x.csv"),
            "--header",
            "no-colon",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--header" in proc.stderr and "Traceback" not in proc.stderr


def test_warm_up_requests_are_recorded_but_left_out_of_statistics(tmp_path):
    reqs = [wreq(i, i * 5_000, 10, n_out=3) for i in range(6)]
    with FakeVLLM() as server:
        result = observe(
            workload(reqs), config(server, warmup_requests=2), tmp_path / "w.csv", handle_signals=False
        )
    trace = read_trace(tmp_path / "w.csv")
    assert trace.header.warm_up_requests == 2 and result.recorded == 6
    assert trace_summary(trace)["by_status"] == {"ok": 6}
    assert len(ok_records(trace)) == 4


def test_prewarm_load_is_sent_but_not_recorded(tmp_path):
    with FakeVLLM() as server:
        cfg = config(server, prewarm_duration_s=0.3)
        observe(workload([wreq(0, 0, 10, n_out=3)]), cfg, tmp_path / "p.csv", handle_signals=False)
        prewarm = [b for b in server.received if b["prompt"] == "warm " * 256]
    trace = read_trace(tmp_path / "p.csv")
    assert len(prewarm) >= 4 and [r.request_id for r in trace.records] == [0]
    assert trace.header.observed_kv_metrics["prompt_tokens"] == 10  # counters start after the prewarm


def test_prewarm_first_fills_the_token_budget_and_a_refused_budget_prompt_is_a_note(tmp_path):
    from blis_cal.observe.client import BUDGET_PROMPT_MARGIN, UNKNOWN_BUDGET_TOKENS

    # The fake says its context length (2048), not its token budget: the prompt fills the context.
    unknown = min(UNKNOWN_BUDGET_TOKENS, 2048 - BUDGET_PROMPT_MARGIN)
    for overrides, tokens in (({}, unknown), ({"max_num_batched_tokens": 512}, 512)):
        with FakeVLLM() as server:
            cfg = config(server, prewarm_duration_s=0.2, server_overrides=overrides)
            result = observe(
                workload([wreq(0, 0, 10, n_out=3)]), cfg, tmp_path / "b.csv", handle_signals=False
            )
            first = server.received[0]
        assert len(first["prompt"]) == tokens and first["max_tokens"] == 1 and not first["stream"]
        assert not any("refused" in n for n in result.notes)
    with FakeVLLM(faults={unknown: "500"}) as server:
        cfg = config(server, prewarm_duration_s=0.2)
        result = observe(workload([wreq(0, 0, 10, n_out=3)]), cfg, tmp_path / "r.csv", handle_signals=False)
    [note] = [n for n in result.notes if "refused its prompt" in n]
    assert (
        f"~{unknown} tokens" in note and "HTTP 500" in note and "--server-info max_num_batched_tokens" in note
    )
    assert [r.request_id for r in read_trace(tmp_path / "r.csv").records] == [0]  # the run went on


def test_a_capture_from_a_server_that_ran_no_step_yet_says_its_first_large_steps_run_slow(tmp_path):
    phrase = "had run no engine step since it started"
    reqs = [wreq(0, 0, 10, n_out=3)]
    with FakeVLLM() as server:  # its /metrics counters start at 0, as a fresh vLLM's
        fresh = observe(workload(reqs), config(server), tmp_path / "f.csv", handle_signals=False).notes
        used = observe(workload(reqs), config(server), tmp_path / "u.csv", handle_signals=False).notes
    with FakeVLLM() as server:
        cfg = config(server, prewarm_duration_s=0.2)
        warmed = observe(workload(reqs), cfg, tmp_path / "w.csv", handle_signals=False).notes
    with FakeVLLM(metrics=False) as server:  # nothing says how much it has run
        unknown = observe(workload(reqs), config(server), tmp_path / "n.csv", handle_signals=False).notes
    [note] = [n for n in fresh if phrase in n]
    assert "--prewarm-duration" in note
    assert not any(phrase in n for n in used + warmed + unknown)
    # The header keeps it for calibrate and validate (counted after the prewarm when there is one).
    before = {
        name: read_trace(tmp_path / f"{name}.csv").header.observed_kv_metrics.get("engine_steps_before")
        for name in "fuwn"
    }
    assert before["f"] == 0 and before["u"] > 0 and before["w"] > 0 and before["n"] is None


def test_accumulating_sessions_send_the_real_answers_back(tmp_path):
    spec = parse_spec(
        {
            "num_requests": 8,
            "clients": [
                {
                    "id": "chat",
                    "concurrency": 2,
                    "prefix_group": "sys",
                    "prefix_length": 16,
                    "input_distribution": {"type": "constant", "params": {"value": 12}},
                    "output_distribution": {"type": "constant", "params": {"value": 5}},
                    "reasoning": {"multi_turn": {"max_rounds": 4, "context_growth": "accumulate"}},
                }
            ],
        },
        "t",
    )
    with FakeVLLM(block_size=8) as server:
        observe(generate(spec, seed=4), config(server), tmp_path / "s.csv", handle_signals=False)
        prompt_of = {
            h["x-request-id"]: b["prompt"] for h, b in zip(server.headers, server.received, strict=True)
        }
    trace = read_trace(tmp_path / "s.csv")
    assert trace.header.session_context_growth == "accumulate"
    sessions = {}
    for r in sorted(trace.records, key=lambda r: r.send_time_us):
        sessions.setdefault(r.session_id, []).append(r)
    assert all(r.status == "ok" for r in trace.records) and len(sessions) >= 2
    pairs = 0
    for rounds in sessions.values():
        for prev, nxt in itertools.pairwise(rounds):
            before, after = prompt_of[prev.x_request_id], prompt_of[nxt.x_request_id]
            assert nxt.round_index == prev.round_index + 1
            # the previous prompt, then the server's own answer (the fake generates ids 1000..), then new tokens
            assert after[: len(before)] == before and after[len(before) : len(before) + 5] == list(
                range(1000, 1005)
            )
            assert len(after) == len(before) + 5 + 12 == nxt.server_input_tokens
            assert nxt.cached_tokens == (len(before) + 5) // 8 * 8  # every full block of the history hits
            pairs += 1
    assert pairs >= 4


def test_second_stop_cancels_without_waiting_for_the_drain(tmp_path):
    reqs = [wreq(i, 0, 14) for i in range(3)]  # all stall
    with FakeVLLM(faults={14: "stall"}, stall_s=10.0) as server:

        async def go():
            obs = Observer(workload(reqs), config(server, drain_timeout_s=30), tmp_path / "h.csv")
            task = asyncio.create_task(obs.run())
            await asyncio.sleep(0.3)
            obs.request_stop()
            await asyncio.sleep(0.2)
            obs.request_stop()
            return await task

        t0 = time.monotonic()
        result = asyncio.run(go())
        assert time.monotonic() - t0 < 3.0
    assert result.by_status == {"cancelled": 3}


def observe_users(tmp_path, users: int, requests: int, *think: str):
    """`blis observe --concurrency users` with the think-time flags `think` against the fake server: its rows."""
    out = tmp_path / "users.csv"
    with FakeVLLM() as server:
        proc = subprocess.run(
            cli(
                "--endpoint", server.url, "--model", "fake", "--concurrency", str(users), *think,
                "--num-requests", str(requests), "--input-tokens", "20", "--output-tokens", "5",
                "--out", str(out), "--no-progress",
            ),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return read_trace(out).records


def test_cli_concurrency_with_think_time_records_blis_user_sessions(tmp_path):
    """`--concurrency 3 --think-time-ms 50`: user u starts at u·50/3 ms, is session
    concurrency_distribution_user_<u>, and sends round r+1 50 ms after round r's answer."""
    rows = observe_users(tmp_path, 3, 12, "--think-time-ms", "50")
    sessions: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: r.arrival_time_us):
        sessions.setdefault(r.session_id, []).append(r)
    assert sorted(sessions) == [f"concurrency_distribution_user_{u}" for u in range(3)]
    assert sorted(s[0].arrival_time_us for s in sessions.values()) == [0, 16_666, 33_333]
    for user in sessions.values():
        assert [r.round_index for r in user] == list(range(len(user)))
        for prev, nxt in itertools.pairwise(user):
            assert nxt.think_time_us == 50_000
            assert nxt.arrival_time_us == prev.last_chunk_time_us + 50_000 <= nxt.send_time_us


def test_cli_concurrency_with_think_time_dist_draws_each_pause(tmp_path):
    """`--think-time-dist`: every user starts at 0 (BLIS) and pauses a drawn time, within the bounds, after
    each answer before its next round."""
    rows = observe_users(
        tmp_path, 2, 10, "--think-time-dist", "lognormal:mu=-3.5,sigma=0.5,min=20ms,max=60ms"
    )
    assert sorted(r.arrival_time_us for r in rows if r.round_index == 0) == [0, 0]
    later = [r for r in rows if r.round_index > 0]
    assert len(later) == 8 and len({r.think_time_us for r in later}) > 1
    finish = {(r.session_id, r.round_index): r.last_chunk_time_us for r in rows}
    for r in later:
        assert 20_000 <= r.think_time_us <= 60_000
        assert (
            r.arrival_time_us == finish[r.session_id, r.round_index - 1] + r.think_time_us <= r.send_time_us
        )
