"""Recorder: Prometheus parsing and counter deltas on a real vLLM 0.32 /metrics capture, server facts, rows."""

import asyncio
import json

import httpx
import pytest
import respx

from blis_cal.errors import BlisError, ConfigError
from blis_cal.observe.client import Outcome
from blis_cal.observe.recorder import (
    build_record,
    kv_deltas,
    parse_prometheus,
    server_facts,
    sidecar_row,
)
from blis_cal.trace import Chunk
from blis_cal.workload import WorkloadRequest
from tests.conftest import shared_dir

RAW = shared_dir() / "traces" / "vllm-cpu-tiny" / "C_prefix_1.0.raw.jsonl"


@pytest.fixture(scope="module")
def capture():
    lines = RAW.read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def test_counter_deltas_of_a_real_run_equal_its_requests_usage(capture):
    head, requests = capture
    before, after = parse_prometheus(head["metrics_before"]), parse_prometheus(head["metrics_after"])
    kv = kv_deltas(before, after, 150.0)
    assert kv["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in requests) == kv["token_queries"]
    assert kv["generation_tokens"] == sum(r["usage"]["completion_tokens"] for r in requests)
    # every engine-step token is a prompt token not served from the prefix cache, or a generated one
    assert kv["step_tokens"] == kv["token_queries"] - kv["token_hits"] + kv["generation_tokens"]
    assert kv["hit_rate"] == round(kv["token_hits"] / kv["token_queries"], 6) and 0.5 < kv["hit_rate"] < 1
    assert kv["engine_steps"] > 0 and kv["preemptions"] == 0


def test_sidecar_row_reads_gauges_and_counters(capture):
    row = sidecar_row(parse_prometheus(capture[0]["metrics_after"]))
    assert row["running"] == row["waiting"] == row["kv_usage"] == 0.0
    assert row["prefix_queries"] == row["prompt_tokens"] == 224179.0 and row["engine_steps"] == 12815.0


def test_prometheus_parser_handles_labels_escapes_and_junk():
    text = '# HELP x y\nm{a="1",b="q\\"uote, comma"} 2.5\nplain 3\nbroken{ 4\nnan_value{} NaN\nbad x\n'
    samples = parse_prometheus(text)
    assert [(s.name, s.value) for s in samples[:2]] == [("m", 2.5), ("plain", 3.0)]
    assert samples[0].labels == {"a": "1", "b": 'q\\"uote, comma'}


def test_old_metric_names_are_read_too():
    samples = parse_prometheus(
        'vllm:gpu_cache_usage_perc{engine="0"} 0.5\nvllm:gpu_prefix_cache_hits_total 7\n'
    )
    row = sidecar_row(samples)
    assert row["kv_usage"] == 0.5 and row["prefix_hits"] == 7.0 and row["running"] is None


def test_server_facts_from_a_real_vllm(capture):
    async def go():
        with respx.mock:
            base = "http://v:1"
            models = {"data": [{"id": "tiny", "max_model_len": 4096}, {"id": "other", "max_model_len": 9}]}
            respx.get(f"{base}/v1/models").mock(return_value=httpx.Response(200, json=models))
            respx.get(f"{base}/version").mock(return_value=httpx.Response(200, json={"version": "0.32.0"}))
            respx.get(f"{base}/metrics").mock(
                return_value=httpx.Response(200, text=capture[0]["metrics_before"])
            )
            # Without VLLM_SERVER_DEV_MODE=1 vLLM has no /server_info; with it, its engine config (the part of
            # vLLM 0.32's answer that is read, from a server run with --max-num-seqs 24
            # --long-prefill-token-threshold 192).
            dev = {
                "vllm_config": {
                    "scheduler_config": {
                        "max_num_batched_tokens": 2048,
                        "max_num_seqs": 24,
                        "long_prefill_token_threshold": 192,
                        "long_prefill_token_threshold_adaptive": False,
                        "enable_chunked_prefill": True,
                    },
                    "parallel_config": {"tensor_parallel_size": 1},
                    "model_config": {"max_model_len": 4096},
                }
            }
            route = respx.get(f"{base}/server_info", params={"config_format": "json"})
            route.mock(return_value=httpx.Response(200, json=dev) if dev_mode else httpx.Response(404))
            async with httpx.AsyncClient() as client:
                return await server_facts(client, base, "tiny", {})

    for dev_mode in (False, True):
        facts = asyncio.run(go())
        info = facts.info
        assert (info.type, info.model, info.vllm_version, info.max_model_len) == (
            "vllm",
            "tiny",
            "0.32.0",
            4096,
        )
        assert (info.block_size, info.num_gpu_blocks, info.enable_prefix_caching) == (128, 1024, True)
        assert info.gpu_memory_utilization == 0.92 and facts.notes == [] and facts.metrics
        scheduler = (info.max_num_seqs, info.max_num_batched_tokens, info.long_prefill_token_threshold)
        assert scheduler == ((24, 2048, 192) if dev_mode else (0, 0, 0))  # 0: unknown
        assert info.tensor_parallel == (1 if dev_mode else 0)


def test_missing_endpoints_are_notes_not_errors():
    async def go():
        with respx.mock:
            respx.get("http://v:1/v1/models").mock(return_value=httpx.Response(404))
            respx.get("http://v:1/version").mock(side_effect=httpx.ConnectError("no"))
            respx.get("http://v:1/metrics").mock(return_value=httpx.Response(404))
            respx.get("http://v:1/server_info").mock(return_value=httpx.Response(200, text="not json"))
            async with httpx.AsyncClient() as client:
                return await server_facts(client, "http://v:1", "m", {})

    facts = asyncio.run(go())
    assert facts.info.type == "openai" and facts.metrics is None and len(facts.notes) == 2


def test_an_unreachable_server_or_an_unserved_model_stops_before_anything_is_sent():
    async def facts(models_route):
        with respx.mock:
            models = respx.get("http://v:1/v1/models").mock(side_effect=models_route)
            sent = respx.post("http://v:1/v1/completions").mock(return_value=httpx.Response(200))
            async with httpx.AsyncClient() as client:
                try:
                    return await server_facts(client, "http://v:1", "tiny", {})
                finally:
                    assert models.called and not sent.called

    with pytest.raises(BlisError, match=r"cannot connect to http://v:1 \(refused\): start the server or fix"):
        asyncio.run(facts(httpx.ConnectError("refused")))
    with pytest.raises(
        BlisError, match=r"cannot connect to http://v:1 \(ConnectTimeout\)"
    ):  # no message of its own
        asyncio.run(facts(httpx.ConnectTimeout("")))
    listing = {"data": [{"id": "other"}, {"id": "lora-a"}]}
    with pytest.raises(
        ConfigError, match=r"--model 'tiny' is not served at http://v:1; it serves: other, lora-a"
    ):
        asyncio.run(facts(lambda request: httpx.Response(200, json=listing)))


def test_record_keeps_workload_facts_client_times_and_server_truth():
    req = WorkloadRequest(
        request_id=7, client_id="c", tenant_id="t", slo_class="batch", arrival_us=100, prefix_group="g",
        prefix_length=64, input_tokens=30, output_tokens=3, session_id="s1", round_index=2, streaming=True,
        think_time_us=500, token_seed=0, context=(("prefix:g", 64), ("req:7", 30)),
    )  # fmt: skip
    out = Outcome(
        send_us=150, first_us=900, last_us=1500, chunks=[Chunk(900, 1), Chunk(1500, 2)], prompt_tokens=94,
        completion_tokens=3, cached_tokens=64, finish_reason="length", x_request_id="rid",
        server_metrics={"queue_time_ms": 0.25, "time_to_first_token_ms": 0.5, "generation_time_ms": 0.6, "mean_itl_ms": 0.3},
    )  # fmt: skip
    rec = build_record(req, out, "tiny", 100, True)
    assert (rec.request_id, rec.tenant_id, rec.slo_class, rec.session_id, rec.round_index) == (
        7,
        "t",
        "batch",
        "s1",
        2,
    )
    assert (rec.prefix_group, rec.prefix_length, rec.input_tokens, rec.server_input_tokens) == (
        "g",
        64,
        30,
        94,
    )
    assert (rec.output_tokens, rec.num_chunks, rec.cached_tokens, rec.think_time_us) == (3, 2, 64, 500)
    assert (rec.arrival_time_us, rec.send_time_us, rec.first_chunk_time_us, rec.last_chunk_time_us) == (
        100,
        150,
        900,
        1500,
    )
    assert (rec.server_queue_us, rec.server_ttft_us, rec.server_generation_us, rec.server_mean_itl_us) == (
        250,
        500,
        600,
        300,
    )
    assert rec.model == "tiny" and rec.x_request_id == "rid" and rec.status == "ok"
