"""TraceV2 contract: round-trips, both BLIS layouts and time bases, derived latencies, bad input."""

import csv
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from decode_traces import lockstep_trace

from blis_cal.errors import TraceFormatError
from blis_cal.trace import (
    BASE_COLUMNS,
    FEB_COLUMNS,
    Chunk,
    ServerInfo,
    Trace,
    TraceHeader,
    TraceRecord,
    TraceWriter,
    is_user_session,
    itl_means_us,
    read_trace,
    trace_frame,
    user_session_id,
    write_trace,
)
from blis_cal.trace_analysis import (
    PromptToLay,
    decode_speed_drift,
    decode_steps,
    duplicated_prefix_tokens,
    estimate_cached_tokens,
    lay_prompt_chunks,
    prefill_chunk_cap,
    single_decode_step_us,
    trace_summary,
)


def _record(i: int, **kw) -> TraceRecord:
    base = dict(
        request_id=i,
        client_id="c0",
        input_tokens=100 + i,
        output_tokens=4,
        server_input_tokens=100 + i,
        arrival_time_us=1000 * i,
        send_time_us=1000 * i + 10,
        first_chunk_time_us=1000 * i + 510,
        last_chunk_time_us=1000 * i + 810,
        num_chunks=4,
        finish_reason="length",
    )
    base.update(kw)
    return TraceRecord(**base)


def _rich_trace() -> Trace:
    header = TraceHeader(
        created_at="2026-11-23T10:00:00Z",
        workload_seed=7,
        workload_spec="preset:chatbot",
        server=ServerInfo(
            type="vllm",
            model="tiny",
            max_num_seqs=64,
            block_size=128,
            num_gpu_blocks=1024,
            max_num_batched_tokens=2048,
            max_model_len=4096,
            gpu="cpu",
            vllm_version="0.32.0",
            enable_prefix_caching=True,
        ),
        network={"measured_rtt_ms": 0.25},
        goodput_slo_targets={"critical": {"ttft_ms": 100.0, "e2e_ms": 2000.0}},
        observed_kv_metrics={
            "source": "vllm",
            "hit_rate": 0.5,
            "preemptions": 0.0,
            "engine_steps_before": 0.0,
        },
    )
    records = [
        _record(
            0,
            slo_class="critical",
            vllm_priority=0,
            slo_target_us=5000,
            x_request_id="abc",
            think_time_us=7,
            cached_tokens=64,
            server_queue_us=12,
            reason_ratio=0.25,
            error_message='with, comma "quoted"',
        ),
        _record(1, prefix_group="g", prefix_length=768, streaming=False),
        _record(
            2,
            status="error",
            first_chunk_time_us=0,
            last_chunk_time_us=0,
            num_chunks=0,
            output_tokens=0,
            error_message="HTTP 500: boom",
        ),
    ]
    itl = {0: [Chunk(510, 1), Chunk(610, 1), Chunk(710, 2)], 1: [Chunk(1510), Chunk(1810)]}
    return Trace(header=header, records=records, itl=itl)


def test_round_trip_is_lossless(tmp_path):
    trace = _rich_trace()
    write_trace(trace, tmp_path / "t.csv")
    back = read_trace(tmp_path / "t.csv")
    assert back.header == trace.header
    assert back.records == trace.records
    assert back.itl == trace.itl
    # and writing again gives the same bytes
    write_trace(back, tmp_path / "u.csv")
    for suffix in (".csv", ".yaml", ".itl.csv"):
        assert (tmp_path / f"t{suffix}").read_bytes() == (tmp_path / f"u{suffix}").read_bytes()


def test_writer_layout_is_27_base_columns_plus_used_optionals(tmp_path):
    write_trace(Trace(TraceHeader(), [_record(0)]), tmp_path / "plain.csv")
    assert next(csv.reader((tmp_path / "plain.csv").open())) == BASE_COLUMNS
    write_trace(_rich_trace(), tmp_path / "rich.csv")
    cols = next(csv.reader((tmp_path / "rich.csv").open()))
    assert cols[cols.index("slo_class") + 1] == "vllm_priority"
    assert cols[cols.index("deadline_us") + 1] == "slo_target_us"
    assert cols[-1] == "server_queue_us"


def test_real_sample_traces_load(trace_a, trace_c):
    a = read_trace(trace_a)
    assert len(a.records) == 150 and all(r.status == "ok" for r in a.records)
    assert a.header.server.num_gpu_blocks == 1024 and a.header.server.block_size == 128
    assert a.itl is not None and sum(len(v) for v in a.itl.values()) == sum(
        r.output_tokens for r in a.records
    )
    c = read_trace(trace_c)
    assert len(c.records) == 150
    assert all(r.prefix_length == 768 and r.total_input_tokens == r.input_tokens + 768 for r in c.records)


def test_derived_latencies_match_hand_computed(trace_a):
    trace = read_trace(trace_a)
    r0 = trace.records[0]  # row: send 754372, first 850813, last 2750115, 88 chunks
    assert r0.ttft_us == 850813 - 754372
    assert r0.e2e_us == 2750115 - 754372
    chunks = trace.itl[0]
    assert itl_means_us(trace)[0] == pytest.approx((chunks[-1].timestamp_us - chunks[0].timestamp_us) / 87)
    frame = trace_frame(trace)
    assert frame.loc[0, "ttft_us"] == 96441 and frame.loc[0, "e2e_us"] == 1995743
    # without the ITL file: (last-first)/(num_chunks-1)
    trace.itl = None
    assert itl_means_us(trace)[0] == pytest.approx((2750115 - 850813) / 87)


def test_itl_counts_tokens_not_chunks():
    trace = _rich_trace()
    # request 0: events at 510, 610, 710 carrying 1, 1, 2 tokens -> 200 µs over 3 tokens
    assert itl_means_us(trace)[0] == pytest.approx(200 / 3)


def test_feb_22_column_layout(tmp_path):
    path = tmp_path / "feb.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FEB_COLUMNS)
        w.writerow(
            [3, "c", "", "", "", 0, "", "true", 120, 9, 0, 0, 0, 0, "0", 100, 150, 400, 900, 9, "ok", ""]
        )
    trace = read_trace(path)
    (r,) = trace.records
    assert (r.request_id, r.input_tokens, r.output_tokens, r.ttft_us, r.e2e_us) == (3, 120, 9, 250, 750)
    assert any("22-column" in n for n in trace.notes) and any("no header" in n for n in trace.notes)


def test_absolute_epoch_times_normalised(tmp_path):
    epoch = 1_763_900_000_000_000
    trace = Trace(
        TraceHeader(),
        [
            _record(
                0,
                arrival_time_us=0,
                send_time_us=epoch + 5,
                first_chunk_time_us=epoch + 105,
                last_chunk_time_us=epoch + 405,
            ),
            _record(
                1,
                arrival_time_us=1000,
                send_time_us=epoch + 1020,
                first_chunk_time_us=epoch + 1120,
                last_chunk_time_us=epoch + 1320,
            ),
        ],
        itl={0: [Chunk(epoch + 105), Chunk(epoch + 405)]},
    )
    write_trace(trace, tmp_path / "abs.csv")
    back = read_trace(tmp_path / "abs.csv")
    r0, r1 = back.records
    assert (r0.send_time_us, r0.first_chunk_time_us, r0.last_chunk_time_us) == (0, 100, 400)
    assert (r1.send_time_us, r1.ttft_us, r1.e2e_us) == (1015, 100, 300)
    assert [c.timestamp_us for c in back.itl[0]] == [100, 400]
    assert any("epoch" in n for n in back.notes)


def test_trace_writer_is_readable_mid_run_and_after_close(tmp_path):
    path = tmp_path / "live.csv"
    writer = TraceWriter(path, TraceHeader(mode="real"))
    writer.append(_record(0), [Chunk(510), Chunk(810)])
    partial = read_trace(path)  # as after a crash
    assert [r.request_id for r in partial.records] == [0] and partial.itl[0][1].timestamp_us == 810
    writer.append(_record(1))
    writer.close(TraceHeader(mode="real", warm_up_requests=0, observed_kv_metrics={"hit_rate": 0.1}))
    final = read_trace(path)
    assert len(final.records) == 2 and final.header.observed_kv_metrics == {"hit_rate": 0.1}


def test_summary_counts_and_rates():
    s = trace_summary(_rich_trace())
    assert s["requests"] == 3 and s["by_status"] == {"error": 1, "ok": 2}
    assert s["ttft_mean_ms"] == 0.5 and s["e2e_mean_ms"] == 0.8


def test_summary_splits_off_ttft_outside_vllms_engine():
    """TTFT less vLLM's queue and scheduled→first-token: hand-computed; absent without server times."""
    # TTFT is 500 µs for each; vLLM's parts 12 + 300 and 0 + 420 (no queue time recorded) leave 188 and 80
    records = [_record(0, server_queue_us=12, server_ttft_us=300), _record(1, server_ttft_us=420)]
    assert [r.outside_engine_us for r in records] == [188, 80]
    s = trace_summary(Trace(TraceHeader(), records))
    assert s["ttft_outside_engine_mean_ms"] == 0.134 and s["ttft_outside_engine_p50_ms"] == 0.134
    plain = trace_summary(Trace(TraceHeader(), [_record(0), _record(1)]))
    assert _record(0).outside_engine_us is None and not any("outside" in k for k in plain)


def test_single_request_decode_step_ignores_batched_and_coalesced_events():
    # Request 0 decodes alone for 30 steps of 15 ms, then alongside request 1 (its steps interleave with
    # 1's events and so never count), and one event carrying 2 tokens is left out too.
    alone = [Chunk(100_000 + 15_000 * k, 1) for k in range(31)]
    together = [Chunk(600_000 + 20_000 * k, 1) for k in range(10)]
    records = [_record(0, output_tokens=42), _record(1, output_tokens=10)]
    itl = {
        0: alone + together + [Chunk(820_000, 2)],
        1: [Chunk(590_000 + 20_000 * k + 5_000, 1) for k in range(10)],
    }
    trace = Trace(TraceHeader(), records, itl)
    assert single_decode_step_us(trace) == 15_000
    assert trace_summary(trace)["single_decode_step_ms"] == 15.0
    few = Trace(TraceHeader(), records[:1], {0: alone[:10]})
    assert single_decode_step_us(few) is None and "single_decode_step_ms" not in trace_summary(few)


def test_single_request_decode_step_leaves_out_steps_that_computed_another_prompts_chunks():
    # Request 0 streams alone: 25 gaps of 15 ms, then 30 of 40 ms while request 1 (sent at 370 ms, first token
    # at 1,600 ms) prefills 1,458 tokens through a 48-token budget: 47 beside request 0's decode in each of
    # those 30 steps (all begun after its send) and 48 in the step of its first token. They stream nothing, so
    # only the first 25 gaps are request 0's own steps.
    times = [15_000 * k for k in range(26)] + [375_000 + 40_000 * k for k in range(1, 31)]
    prompt = {"input_tokens": 1458, "server_input_tokens": 1458}
    records = [
        _record(0, output_tokens=len(times), send_time_us=0, first_chunk_time_us=0),
        _record(1, output_tokens=1, send_time_us=370_000, first_chunk_time_us=1_600_000, **prompt),
    ]
    itl = {0: [Chunk(t, 1) for t in times], 1: [Chunk(1_600_000, 1)]}
    header = TraceHeader(server=ServerInfo(max_num_batched_tokens=48))
    assert single_decode_step_us(Trace(header, records, itl)) == 15_000
    # Through a 2,048-token budget the prompt is one step, that of its first token: the gaps are request 0's.
    assert single_decode_step_us(Trace(TraceHeader(), records, itl)) == 40_000
    alone = Trace(header, records[:1], {0: itl[0]})
    assert single_decode_step_us(alone) == 40_000  # without request 1 the gaps read as request 0's steps


def test_prompts_are_laid_over_the_steps_before_their_first_token_each_chunk_but_the_last_filling_its_step():
    # Steps' events at 10, 20, ..., 80 ms; room beside the decodes 5 tokens per step (the last 2). vLLM
    # schedules chunks forward: a prompt's first chunks take all the room, its last one the rest.
    begins = [10_000 * k for k in range(1, 9)]
    room = [5] * 7 + [2]
    prompts = [
        PromptToLay(first_token_step=3, send_us=15_000, new_tokens=9),  # steps 2 and 3 begun after its send
        PromptToLay(first_token_step=7, send_us=35_000, new_tokens=30),  # more than steps 4-7 can hold
        PromptToLay(first_token_step=7, send_us=75_000, new_tokens=4),  # sent as step 7 began: no room
    ]
    laid = lay_prompt_chunks(begins, room, prompts)
    assert laid[0] == [(3, 4), (2, 5)]  # the first chunk fills its step, the last is the rest
    # Steps 4-6 (begun after its send) are full; the 15 left, more than step 7's room, go there (a wrong budget).
    assert laid[1] == [(7, 15), (6, 5), (5, 5), (4, 5)]
    assert laid[2] == [(7, 4)]  # no room left: all of it in the step of its first token, past the budget
    for prompt, taken in zip(prompts, laid, strict=True):  # conservation
        assert sum(tokens for _, tokens in taken) == prompt.new_tokens
    assert room == [5, 5, 0, 1, 0, 0, 0, -17]  # consumed
    # A step with more room than the prompt needed before it computes the prompt's first chunk; no step is
    # left holding an empty one.
    wide = lay_prompt_chunks([10_000, 20_000, 30_000, 40_000], [0, 100, 3, 2], [PromptToLay(3, 5_000, 10)])
    assert wide == [[(3, 1), (1, 9)]]


def test_with_a_long_prefill_threshold_no_chunk_is_larger_than_it():
    # vLLM --long-prefill-token-threshold 3: a 9-token prompt with 5 tokens of room per step takes 3 per step.
    room = [5] * 6
    laid = lay_prompt_chunks([10_000 * k for k in range(1, 7)], room, [PromptToLay(5, 5_000, 9)], cap=3)
    assert laid == [[(5, 3), (4, 3), (3, 3)]]
    assert room == [5, 5, 5, 2, 2, 2]
    # The header's threshold is the cap; adaptive too (its floor, the cap under load); none without one.
    server = ServerInfo(long_prefill_token_threshold=3)
    assert prefill_chunk_cap(Trace(TraceHeader(server=server), [])) == 3
    server.long_prefill_token_threshold_adaptive = True
    assert prefill_chunk_cap(Trace(TraceHeader(server=server), [])) == 3
    assert prefill_chunk_cap(Trace(TraceHeader(), [])) == 0


def test_decode_steps_are_timed_from_the_previous_step_and_count_the_batch():
    trace = lockstep_trace([(3, 40, 25_000)])
    steps = decode_steps(trace)
    # The first tokens' step was a prefill and does not count; every later step decodes all three.
    assert len(steps) == 40 and {(s.duration_us, s.num_decode) for s in steps} == {(25_000, 3)}
    assert [s.time_us for s in steps] == sorted(s.time_us for s in steps)


def test_speed_drift_compares_equal_batches_so_a_load_change_is_no_drift():
    # One request alone at 15 ms per step, then three together at 25 ms: a heavier load at the same speed.
    steady = decode_speed_drift(lockstep_trace([(1, 100, 15_000), (3, 100, 25_000)]))
    assert steady is not None and steady.drift == 0.0 and steady.parts == (1.0, 1.0, 1.0, 1.0)
    assert trace_summary(lockstep_trace([(1, 100, 15_000)]))["decode_speed_drift"] == 0.0


def test_speed_drift_accounts_for_context_so_longer_prompts_are_no_drift():
    # Two requests with 64-token prompts, then two with 2,000: each step also reads their KV caches at
    # 2 µs per token, so the later steps take ≈ 28 ms against ≈ 20.5 ms at the same speed.
    trace = lockstep_trace([(2, 100, 20_000), (2, 100, 20_000, 2_000)], us_per_context_token=2.0)
    assert {round(s.context_tokens / 2) for s in decode_steps(trace)} >= {65, 164, 2_001, 2_100}
    drift = decode_speed_drift(trace)
    assert drift is not None and drift.drift < 0.001
    prices = [drift.context_price, *drift.context_parts]
    assert [price for price, _ in prices] == pytest.approx([2.0] * 5, rel=0.01)
    assert all(spread > 0 for _, spread in prices)
    assert trace_summary(trace)["decode_context_us_per_token"] == pytest.approx(2.0, rel=0.01)


def test_speed_drift_is_robust_to_stalls_and_to_a_batch_size_of_scattered_steps():
    # One request alone at 20 ms ± 50 µs, then two requests whose steps alternate 20 and 40 ms (coalesced
    # reads): every step of the second batch size is far off the first's tight spread, yet it keeps its own
    # typical step; and 3 s stalls every 50 steps are not a change of speed.
    tight = lockstep_trace([(1, 400, [19_950, 20_000, 20_050]), (2, 100, [20_000, 40_000])])
    stalls = lockstep_trace([(1, 300, [19_950, 20_000, 20_050] * 16 + [20_000, 3_000_000])])
    for trace in (tight, stalls):
        drift = decode_speed_drift(trace)
        assert drift is not None and drift.drift < 0.01 and max(drift.parts) < 1.01


def test_speed_drift_measures_a_server_slowing_down_mid_run():
    # The same two-request batch steps in 20 ms, then in 26 ms: 30 % slower in the second half.
    drift = decode_speed_drift(lockstep_trace([(2, 100, 20_000), (2, 100, 26_000)]))
    assert drift is not None and drift.steps == 200
    assert drift.parts[0] == drift.parts[1] < 1 < drift.parts[2] == drift.parts[3]
    assert drift.drift == pytest.approx(0.3, abs=1e-3)


def test_speed_drift_needs_enough_steps():
    assert decode_speed_drift(lockstep_trace([(2, 60, 20_000)])) is None  # 15 per quarter
    assert "decode_speed_drift" not in trace_summary(lockstep_trace([(2, 60, 20_000)]))


# ------------------------------------------------------------------------------------------ bad input


def _write_rows(path: Path, rows: list[list], columns=BASE_COLUMNS) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return path


def _good_row(**kw) -> list:
    rec = dataclasses.asdict(_record(0, **kw))
    return [str(rec[c]).lower() if isinstance(rec[c], bool) else rec[c] for c in BASE_COLUMNS]


def test_negative_cached_tokens_are_a_bad_row(tmp_path):
    path = tmp_path / "cached.csv"
    write_trace(Trace(TraceHeader(), [_record(0, cached_tokens=7), _record(1, cached_tokens=3)]), path)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    rows[2][rows[0].index("cached_tokens")] = "-3"
    _write_rows(path, rows[1:], columns=rows[0])
    with pytest.raises(TraceFormatError, match="field cached_tokens: must be >= 0, got -3"):
        read_trace(path)
    assert [r.cached_tokens for r in read_trace(path, skip_bad_rows=True).records] == [7]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r[:-1], "wrong column count"),
        (lambda r: [*r[:10], "many", *r[11:]], "field output_tokens"),
        (lambda r: [*r[:20], "-5", *r[21:]], "field send_time_us: negative time"),
        (lambda r: [*r[:21], "1", *r[22:]], "first_chunk_time_us: 1 is before send_time_us"),
        (lambda r: [*r[:24], "lost", *r[25:]], "field status"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, mutate, message):
    path = _write_rows(tmp_path / "bad.csv", [_good_row(), mutate(_good_row())])
    with pytest.raises(TraceFormatError, match=message) as err:
        read_trace(path)
    assert "bad.csv" in str(err.value)
    assert ":3:" in str(err.value) or "row 2" in str(err.value)
    # the good row survives with --skip-bad-rows, and the skip is reported
    trace = read_trace(path, skip_bad_rows=True)
    assert len(trace.records) == 1 and any("skipped" in n for n in trace.notes)


def test_missing_file_and_bad_headers(tmp_path):
    with pytest.raises(TraceFormatError, match="cannot read trace data"):
        read_trace(tmp_path / "nope.csv")
    data = _write_rows(tmp_path / "t.csv", [_good_row()])
    (tmp_path / "t.yaml").write_text("mode: real\nserver: {model: tiny, colour: blue}\n")
    with pytest.raises(TraceFormatError, match="unknown key 'colour'"):
        read_trace(data)
    (tmp_path / "t.yaml").write_text("trace_version: 2\nbogus_key: 1\n")
    with pytest.raises(TraceFormatError, match="unknown key 'bogus_key'"):
        read_trace(data)
    (tmp_path / "t.yaml").write_text("mode: [unclosed\n")
    with pytest.raises(TraceFormatError, match="unreadable YAML"):
        read_trace(data)
    with pytest.raises(TraceFormatError, match="cannot read trace header"):
        read_trace(data, header_path=tmp_path / "absent.yaml")
    (tmp_path / "t.yaml").write_text("server: {max_num_seqs: many}\n")
    with pytest.raises(TraceFormatError, match="max_num_seqs"):
        read_trace(data)


def test_bad_itl_file(tmp_path):
    data = _write_rows(tmp_path / "t.csv", [_good_row()])
    (tmp_path / "t.itl.csv").write_text("request_id,chunk_index,timestamp_us\n0,0,-4\n")
    with pytest.raises(TraceFormatError, match=r"t.itl.csv:2: negative"):
        read_trace(data)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    path = _write_rows(tmp_path / "bad.csv", [_good_row()[:-2]])
    proc = subprocess.run(
        [sys.executable, "-m", "blis_cal", "trace", "info", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "bad.csv:2" in proc.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "blis_cal", "trace", "info", str(path), "--skip-bad-rows", "--json"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "skipped 1 bad row" in ok.stderr


def test_cli_info_json_on_sample(trace_a):
    proc = subprocess.run(
        [sys.executable, "-m", "blis_cal", "trace", "info", str(trace_a), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    summary = json.loads(proc.stdout)
    assert summary["requests"] == 150 and summary["by_status"] == {"ok": 150}
    assert summary["ttft_p99_ms"] >= summary["ttft_p50_ms"] > 0
    assert summary["rows_after_an_answer"] == 0 and "users_or_sessions" not in summary  # an open loop


def test_duplicated_prefix_tokens_counts_each_shared_prefix_past_its_first_holder():
    shares = {1: ("g", 256), 2: ("g", 256), 3: ("g", 128), 4: ("h", 512), 5: ("h", 512)}
    assert duplicated_prefix_tokens([1, 2, 3, 4, 5, 6], shares) == (256 + 256 + 128 - 256) + (512 + 512 - 512)
    assert duplicated_prefix_tokens([1, 4, 6], shares) == 0
    assert duplicated_prefix_tokens([], shares) == 0


@pytest.mark.parametrize(
    ("growth", "mode", "cached"),
    [("accumulate", "generated", 160), ("accumulate", "real", 96), ("", "generated", 0)],
)
def test_a_later_round_reuses_the_previous_rounds_blocks_only_when_sessions_accumulate(growth, mode, cached):
    """Round 1 sent after round 0's first token: with accumulated context its prompt starts with round 0's
    100 + 70 tokens (10 full blocks cached; a capture without recorded hits is BLIS's observe, whose rounds
    carry placeholder words for the answer: 6 blocks of the prompt); without, its prompt is new and nothing is
    cached."""
    times = {"first_chunk_time_us": 50_000, "last_chunk_time_us": 90_000}
    later = {"send_time_us": 100_000, "first_chunk_time_us": 140_000, "last_chunk_time_us": 150_000}
    rows = [
        TraceRecord(0, session_id="s", input_tokens=100, output_tokens=70, **times),
        TraceRecord(1, session_id="s", round_index=1, input_tokens=300, output_tokens=10, **later),
    ]
    trace = Trace(TraceHeader(mode=mode, session_context_growth=growth), rows)
    assert estimate_cached_tokens(trace, rows) == {0: 0, 1: cached}


def test_closed_loop_user_session_ids_follow_blis():
    assert user_session_id("distribution", 3) == "concurrency_distribution_user_3"
    assert is_user_session(user_session_id("a_b", 12))
    assert not any(map(is_user_session, ["", "sess_42", "u/u0/s1", "concurrency_x_user_", "user_1"]))
