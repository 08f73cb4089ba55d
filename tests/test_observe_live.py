"""The observer against a real vLLM (CPU build, tiny model) started by ../shared/vllm-cpu/serve.sh.

Starting the server takes about 2.5 minutes (5 the first time). Set BLIS_LIVE=0 to skip, or
BLIS_VLLM_URL=http://127.0.0.1:PORT to use a server that is already running.
"""

import itertools
import os
import subprocess
import urllib.request

import pytest

from blis_cal.observe import ClientConfig, ObserveConfig, observe
from blis_cal.trace import read_trace
from blis_cal.workload import generate, parse_spec
from tests.conftest import shared_dir
from tests.fake_vllm import free_port

pytestmark = pytest.mark.live

PREFIX = 256  # two full 128-token KV blocks: later members of the group must hit the prefix cache


@pytest.fixture(scope="session")
def vllm_url():
    if os.environ.get("BLIS_LIVE") == "0":
        pytest.skip("BLIS_LIVE=0")
    if os.environ.get("BLIS_VLLM_URL"):
        yield os.environ["BLIS_VLLM_URL"].rstrip("/")
        return
    serve = shared_dir() / "vllm-cpu" / "serve.sh"
    if not serve.exists():
        pytest.skip(f"{serve} not found")
    port = free_port()
    proc = subprocess.run([str(serve), str(port)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"serve.sh failed: {proc.stderr[-2000:]}")
    pid = int(proc.stdout.split()[-1])
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["kill", "--", f"-{pid}"], check=False)


def metrics_text(url):
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_thirty_requests_with_a_prefix_group_have_exact_counts_and_cache_hits(vllm_url, tmp_path):
    spec = parse_spec(
        {
            "aggregate_rate": 4.0,
            "num_requests": 30,
            "seed": int.from_bytes(os.urandom(3), "little"),  # fresh prompts: hits come from this run
            "clients": [
                {
                    "id": "shared",
                    "rate_fraction": 1.0,
                    "arrival": {"process": "poisson"},
                    "prefix_group": "sys",
                    "prefix_length": PREFIX,
                    "input_distribution": {
                        "type": "gaussian",
                        "params": {"mean": 64, "std_dev": 24, "min": 8, "max": 160},
                    },
                    "output_distribution": {
                        "type": "gaussian",
                        "params": {"mean": 16, "std_dev": 6, "min": 2, "max": 32},
                    },
                }
            ],
        },
        "live",
    )
    workload = generate(spec)
    wanted = {r.request_id: r for r in workload.requests}
    cfg = ObserveConfig(ClientConfig(endpoint=vllm_url, model="tiny", timeout_s=120), metrics_interval_s=1.0)
    result = observe(workload, cfg, tmp_path / "live.csv", handle_signals=False)
    trace = read_trace(tmp_path / "live.csv")

    assert result.by_status == {"ok": 30} and len(trace.records) == 30
    for r in trace.records:
        w = wanted[r.request_id]
        assert (r.prefix_length, r.input_tokens) == (PREFIX, w.input_tokens)
        assert r.server_input_tokens == PREFIX + w.input_tokens  # token-id prompts: exact
        assert r.output_tokens == w.output_tokens and r.finish_reason == "length"  # ignore_eos + min_tokens
        chunks = trace.itl[r.request_id]
        # tokens, not events: a busy API server may put several tokens in one event
        assert (
            sum(c.tokens for c in chunks) == r.output_tokens
            and len(chunks) == r.num_chunks <= r.output_tokens
        )
        assert r.send_time_us >= r.arrival_time_us and r.first_chunk_time_us > r.send_time_us
        assert r.server_ttft_us is not None and r.server_queue_us is not None
    hits = sorted(r.cached_tokens for r in trace.records)
    assert hits[-1] >= PREFIX and sum(h >= PREFIX for h in hits) >= 28  # all but the first one or two
    kv = trace.header.observed_kv_metrics
    assert kv["hit_rate"] > 0 and kv["prompt_tokens"] == sum(r.server_input_tokens for r in trace.records)
    assert kv["generation_tokens"] == sum(r.output_tokens for r in trace.records) and kv["engine_steps"] > 0
    server = trace.header.server
    assert (server.type, server.vllm_version, server.max_model_len) == ("vllm", "0.32.0", 4096)
    assert (server.block_size, server.num_gpu_blocks, server.enable_prefix_caching) == (128, 1024, True)
    assert result.metrics_path.read_text().count("\n") >= 3
    assert "vllm:iteration_tokens_total_count" in metrics_text(vllm_url)


def test_chat_text_prompts_land_near_the_requested_length(vllm_url, tmp_path):
    spec = parse_spec(
        {
            "aggregate_rate": 4.0,
            "num_requests": 4,
            "seed": 3,
            "clients": [
                {
                    "id": "chat",
                    "rate_fraction": 1.0,
                    "input_distribution": {"type": "constant", "params": {"value": 200}},
                    "output_distribution": {"type": "constant", "params": {"value": 8}},
                }
            ],
        },
        "live-chat",
    )
    cfg = ObserveConfig(ClientConfig(endpoint=vllm_url, model="tiny", api="chat", timeout_s=120))
    result = observe(generate(spec), cfg, tmp_path / "chat.csv", handle_signals=False)
    trace = read_trace(tmp_path / "chat.csv")
    assert result.by_status == {"ok": 4}
    assert any("tokens per word (measured)" in n for n in result.notes)
    for r in trace.records:
        assert r.output_tokens == 8 == sum(c.tokens for c in trace.itl[r.request_id])
        assert (
            180 <= r.server_input_tokens <= 240
        )  # words scaled by the measured ratio, plus the chat template


def test_accumulating_chat_sessions_hit_the_cache_on_the_real_answers(vllm_url, tmp_path):
    spec = parse_spec(
        {
            "num_requests": 8,
            "seed": int.from_bytes(os.urandom(3), "little"),
            "clients": [
                {
                    "id": "chat",
                    "concurrency": 2,
                    "input_distribution": {"type": "constant", "params": {"value": 150}},
                    "output_distribution": {"type": "constant", "params": {"value": 120}},
                    "reasoning": {"multi_turn": {"max_rounds": 4, "context_growth": "accumulate"}},
                }
            ],
        },
        "live-sessions",
    )
    cfg = ObserveConfig(ClientConfig(endpoint=vllm_url, model="tiny", timeout_s=120))
    result = observe(generate(spec), cfg, tmp_path / "s.csv", handle_signals=False)
    trace = read_trace(tmp_path / "s.csv")
    assert result.by_status == {"ok": 8} and trace.header.session_context_growth == "accumulate"
    rounds = {}
    for r in sorted(trace.records, key=lambda r: r.send_time_us):
        rounds.setdefault(r.session_id, []).append(r)
    pairs = 0
    for session in rounds.values():
        for prev, nxt in itertools.pairwise(session):
            assert nxt.server_input_tokens == prev.server_input_tokens + prev.output_tokens + 150
            # vLLM keeps the KV of generated tokens: every full block of prompt + answer (minus the last
            # token, never computed) is a hit, because we sent back the ids the server generated
            assert nxt.cached_tokens >= (prev.server_input_tokens + prev.output_tokens - 1) // 128 * 128
            pairs += 1
    assert pairs >= 4
