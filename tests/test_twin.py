"""The twin's HTTP layer against a stand-in engine that follows the Live engine contract.

The stand-in produces each request's tokens on a fixed schedule, so these tests pin the API shapes, the
error bodies, the clock and the delivery loop independently of the simulator.
"""

from __future__ import annotations

import heapq
import json
import time
from dataclasses import dataclass

import httpx
import pytest

from blis_cal.errors import ConfigError
from blis_cal.simulate import SimulationError
from blis_cal.twin import api
from blis_cal.twin.metrics import Histogram
from blis_cal.twin.server import TwinConfig, TwinEngine, TwinServerThread

TTFT_US = 200_000
ITL_US = 20_000


@dataclass
class FakeRequest:
    request_id: int
    arrival_us: int
    input_len: int
    output_len: int
    segments: tuple
    priority: int = 0
    session_id: str = ""


@dataclass
class FakeResult:
    request_id: int
    status: str
    arrival_us: int
    queued_us: int
    scheduled_us: int
    first_token_us: int
    finish_us: int
    cached_tokens: int
    num_preemptions: int = 0


class FakeSimulation:
    """Token i of a request is delivered at arrival + TTFT + i·ITL and computed half an ITL earlier;
    cached_tokens counts the leading segments already seen (so prefix sharing is visible)."""

    def __init__(self, *, on_token, on_finish, on_reject):
        self.now_us = 0
        self.on_token, self.on_finish, self.on_reject = on_token, on_finish, on_reject
        self._events: list[tuple[int, int, int, int, int]] = []
        self._requests: dict[int, FakeRequest] = {}
        self._seen: set[tuple] = set()
        self._cached: dict[int, int] = {}
        self.added: list[FakeRequest] = []

    def add_request(self, req: FakeRequest) -> None:
        assert req.arrival_us >= self.now_us, "contract: arrival must not be in the simulated past"
        self.added.append(req)
        self._requests[req.request_id] = req
        cached, chain = 0, ()
        for seg in req.segments:
            chain = (*chain, seg)
            if chain in self._seen:
                cached += seg[1]
            self._seen.add(chain)
        self._cached[req.request_id] = cached
        for i in range(req.output_len):
            delivery = req.arrival_us + TTFT_US + i * ITL_US
            heapq.heappush(
                self._events, (delivery - ITL_US // 2, req.request_id, i, delivery, req.output_len)
            )

    def run_until(self, t_us: int) -> None:
        while self._events and self._events[0][0] <= t_us:
            _, rid, i, delivery, n = heapq.heappop(self._events)
            self.now_us = max(self.now_us, delivery - ITL_US // 2)
            self.on_token(rid, i, delivery)
            if i == n - 1:
                req = self._requests[rid]
                self.on_finish(
                    FakeResult(
                        request_id=rid,
                        status="ok",
                        arrival_us=req.arrival_us,
                        queued_us=req.arrival_us + 1000,
                        scheduled_us=req.arrival_us + 5000,
                        first_token_us=req.arrival_us + TTFT_US,
                        finish_us=delivery,
                        cached_tokens=self._cached[rid],
                    )
                )
        self.now_us = max(self.now_us, t_us)


SPEED = 4.0


@pytest.fixture(scope="module")
def twin():
    holder: dict = {}

    def make() -> TwinEngine:
        engine = TwinEngine(
            lambda **cb: FakeSimulation(**cb),
            FakeRequest,
            TwinConfig(model_name="tiny", speed=SPEED, max_model_len=512, block_size=16, num_gpu_blocks=100),
        )
        holder["engine"] = engine
        return engine

    with TwinServerThread(make) as url:
        yield url, holder["engine"]


def sse_events(text: str) -> list[str]:
    """Split an SSE body into event payloads, checking vLLM's framing on the way."""
    assert text.endswith("data: [DONE]\n\n")
    raw = text.split("\n\n")
    assert raw[-1] == ""
    payloads = []
    for event in raw[:-1]:
        assert event.startswith("data: ") and "\n" not in event, f"bad SSE event {event!r}"
        payloads.append(event[len("data: ") :])
    return payloads


def post(url: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30, **kw)


def test_streamed_completion_matches_vllm_framing(twin):
    url, _ = twin
    body = {
        "model": "tiny",
        "prompt": list(range(40)),
        "max_tokens": 5,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    resp = post(url, "/v1/completions", body, headers={"X-Request-Id": "abc"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["id"] == "cmpl-abc" and usage["object"] == "text_completion"
    assert usage["usage"]["prompt_tokens"] == 40 and usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["total_tokens"] == 45
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert set(usage["metrics"]) >= {
        "time_to_first_token_ms",
        "generation_time_ms",
        "queue_time_ms",
        "mean_itl_ms",
    }
    token_chunks = chunks[:-1]
    # continuous usage: cumulative completion tokens on every event, finish_reason only on the last
    counts = [c["usage"]["completion_tokens"] for c in token_chunks]
    assert counts == sorted(counts) and counts[-1] == 5
    assert [c["choices"][0]["finish_reason"] for c in token_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in token_chunks[:-1])
    assert set(token_chunks[0]["choices"][0]) == {
        "index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids", "token_ids"
    }  # fmt: skip
    text = "".join(c["choices"][0]["text"] for c in token_chunks)
    assert text.split() == [api.filler_word(i) for i in range(5)]


def test_streamed_tokens_arrive_at_simulated_times_scaled_by_speed(twin):
    url, _ = twin
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True, "stream": True}
    arrivals = []
    with httpx.Client(timeout=30) as client:
        client.get(url + "/health")  # connection set-up is not part of the measurement
        t0 = time.perf_counter()
        with client.stream("POST", url + "/v1/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter() - t0)
    assert len(arrivals) == 4  # one event per token; no usage chunk without include_usage
    # Never early (the twin paces tokens by the simulated clock / speed); late only by scheduling noise,
    # far less than the 4x a wrong speed scaling would give.
    ttft, itl = TTFT_US / 1e6 / SPEED, ITL_US / 1e6 / SPEED
    assert ttft - 0.001 <= arrivals[0] <= 2 * ttft
    assert 3 * itl - 0.002 <= arrivals[-1] - arrivals[0] <= 6 * itl


def test_chat_stream_opens_with_role_chunk(twin):
    url, _ = twin
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello there, twin"}],
        "max_tokens": 3,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(post(url, "/v1/chat/completions", body).text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = [c for c in chunks[1:] if c["choices"]]
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in content[0]  # only with continuous_usage_stats
    # role marker + 5 word tokens ("hello", "there", ",", "twin" ...) + end marker + generation prompt
    assert chunks[-1]["usage"]["prompt_tokens"] == 1 + 4 + 1 + 1
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_non_streaming_completion_body(twin):
    url, _ = twin
    body = {
        "model": "tiny",
        "prompt": "one two three",
        "max_tokens": 3,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    resp = post(url, "/v1/completions", body)
    assert resp.status_code == 200
    data = resp.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    choice = data["choices"][0]
    assert choice["text"] == "alpha bravo charlie" and choice["finish_reason"] == "length"
    assert len(choice["token_ids"]) == 3 and len(choice["prompt_token_ids"]) == 3
    assert data["usage"]["prompt_tokens"] == 3 and data["usage"]["completion_tokens"] == 3
    assert data["metrics"]["mean_itl_ms"] == pytest.approx(ITL_US / 1000 / SPEED, rel=1e-6)


def test_shared_prefix_is_reported_as_cached_tokens(twin):
    url, _ = twin
    prefix = list(range(100, 164))  # four full 16-token blocks
    first = post(url, "/v1/completions", {"prompt": [*prefix, 1, 2], "max_tokens": 1}).json()
    second = post(url, "/v1/completions", {"prompt": [*prefix, 3, 4], "max_tokens": 1}).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 64


def test_output_length_honours_ignore_eos_min_tokens_and_the_context_window(twin):
    url, engine = twin
    # prompt + max_tokens over the window: vLLM clamps max_tokens, generation ends with "length"
    clamp = post(
        url, "/v1/completions", {"prompt": list(range(500)), "max_tokens": 50, "ignore_eos": True}
    ).json()
    assert clamp["usage"]["completion_tokens"] == 12 and clamp["choices"][0]["finish_reason"] == "length"
    # without ignore_eos: a seeded EOS draw, never below min_tokens, never above max_tokens
    for _ in range(5):
        out = post(url, "/v1/completions", {"prompt": [5, 6], "max_tokens": 60, "min_tokens": 7}).json()
        n = out["usage"]["completion_tokens"]
        assert 7 <= n <= 60
        assert out["choices"][0]["finish_reason"] == ("length" if n == 60 else "stop")
    assert engine.sim.added[-1].output_len == out["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "message"),
    [
        (
            "/v1/completions",
            {"prompt": list(range(600)), "max_tokens": 4},
            400,
            "input_tokens",
            "This model's maximum context length is 512 tokens. However, your prompt contains 600 input tokens, "
            "which exceeds this limit even without any output tokens. Please reduce the length of the input "
            "prompt. (parameter=input_tokens, value=600)",
        ),
        (
            "/v1/completions",
            {"prompt": [1], "max_tokens": 1000},
            400,
            "max_tokens",
            "max_tokens=1000 cannot be greater than max_model_len=512. Please request fewer output tokens. "
            "(parameter=max_tokens, value=1000)",
        ),
        (
            "/v1/completions",
            {"prompt": list(range(513)), "max_tokens": 4},
            400,
            "input_tokens",
            "This model's maximum context length is 512 tokens. However, your prompt contains at least 513 input "
            "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the "
            "input prompt. (parameter=input_tokens, value=513)",
        ),
        ("/v1/completions", {"prompt": list(range(512))}, 400, "max_tokens",
         "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
        ("/v1/completions", {"model": "other", "prompt": [1]}, 404, "model", "The model `other` does not exist."),
        ("/v1/completions", {"prompt": [1], "stream_options": {"include_usage": True}}, 400, "stream_options", None),
        ("/v1/completions", {"prompt": [1], "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens", None),
        ("/v1/completions", {"prompt": [1], "max_tokens": 0}, 400, "max_tokens", None),
        ("/v1/completions", {"prompt": [1], "n": 2}, 400, "n", None),
        ("/v1/completions", {"max_tokens": 2}, 400, "prompt", None),
        ("/v1/completions", {"prompt": [1, 99999999]}, 400, "prompt", None),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages", None),
    ],
)  # fmt: skip
def test_bad_requests_get_vllm_error_bodies(twin, path, body, status, param, message):
    url, _ = twin
    resp = post(url, path, body)
    assert resp.status_code == status
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["param"] == param
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    if message is not None:
        assert err["message"] == message


def test_invalid_json_is_a_400(twin):
    url, _ = twin
    resp = httpx.post(url + "/v1/completions", content=b"{not json", timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == 400


def test_models_health_version_and_metrics(twin):
    url, _ = twin
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["max_model_len"] == 512
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/version").json()["version"].startswith("0.32.0")
    post(url, "/v1/completions", {"prompt": [9, 9, 9], "max_tokens": 2, "ignore_eos": True})
    text = httpx.get(url + "/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    lab = '{engine="0",model_name="tiny"}'
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert name + lab in samples
    assert samples["vllm:generation_tokens_total" + lab] >= 2
    assert samples["vllm:prompt_tokens_total" + lab] >= 3
    assert samples["vllm:prefix_cache_queries_total" + lab] >= samples["vllm:prefix_cache_hits_total" + lab]
    success = samples['vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"}']
    assert samples["vllm:e2e_request_latency_seconds_count" + lab] == sum(
        v for k, v in samples.items() if k.startswith("vllm:request_success_total")
    )
    assert success >= 1
    info = next(line for line in text.splitlines() if line.startswith("vllm:cache_config_info"))
    assert (
        'block_size="16"' in info
        and 'num_gpu_blocks="100"' in info
        and 'enable_prefix_caching="True"' in info
    )


def test_requests_enter_the_simulation_at_the_scaled_wall_clock(twin):
    url, engine = twin
    before = engine.clock.now_us()
    post(url, "/v1/completions", {"prompt": [1, 2], "max_tokens": 1})
    after = engine.clock.now_us()
    arrival = engine.sim.added[-1].arrival_us
    assert before <= arrival <= after


def test_prompt_segments_share_keys_exactly_for_equal_blocks():
    a = api.prompt_segments(list(range(40)), 16)
    b = api.prompt_segments([*range(32), 7, 7, 7], 16)
    assert [n for _, n in a] == [16, 16, 8] and [n for _, n in b] == [16, 16, 3]
    assert a[:2] == b[:2] and a[2] != b[2]


def test_histogram_is_cumulative():
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.5, 1.5, 9.0):
        h.observe(v)
    lines = h.lines("x", {"engine": "0"})
    assert lines[:3] == ['x_bucket{engine="0",le="1.0"} 1.0', 'x_bucket{engine="0",le="2.0"} 3.0',
                         'x_bucket{engine="0",le="+Inf"} 4.0']  # fmt: skip
    assert lines[-1] == 'x_sum{engine="0"} 12.5'


@pytest.mark.parametrize("field", ["speed", "poll_ms"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
def test_bad_twin_config_is_a_config_error(field, value):
    with pytest.raises(ConfigError, match=field):
        TwinConfig(**{field: value})


def test_a_client_that_disconnects_mid_stream_is_forgotten(twin):
    url, engine = twin
    body = {"prompt": [1, 2, 3], "max_tokens": 50, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first token
    deadline = time.perf_counter() + 5
    while engine._states and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert not engine._states  # released once the next write found the connection gone
    assert post(url, "/v1/completions", {"prompt": [1], "max_tokens": 2}).status_code == 200


class FailingSimulation(FakeSimulation):
    """Raises like a stuck engine once a 13-token prompt has been added."""

    def run_until(self, t_us: int) -> None:
        if any(r.input_len == 13 for r in self.added):
            raise SimulationError("instance 0 cannot schedule its waiting requests")
        super().run_until(t_us)


def test_a_failing_simulation_fails_requests_as_vllm_reports_errors():
    def make() -> TwinEngine:
        return TwinEngine(
            lambda **cb: FailingSimulation(**cb), FakeRequest, TwinConfig(model_name="tiny", speed=SPEED)
        )

    with TwinServerThread(make) as url:
        body = {"prompt": list(range(13)), "max_tokens": 3, "stream": True}
        events = sse_events(post(url, "/v1/completions", body).text)  # the stream had started: HTTP 200
        error = json.loads(events[0])["error"]
        assert error["code"] == 500 and error["type"] == "InternalServerError"
        assert "cannot schedule" in error["message"] and events[1:] == ["[DONE]"]
        later = post(url, "/v1/completions", {"prompt": [1], "max_tokens": 1})
        assert later.status_code == 500 and "cannot schedule" in later.json()["error"]["message"]
