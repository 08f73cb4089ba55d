"""Observer client: request bodies for both APIs and prompt modes, SSE decoding, response parsing (respx)."""

import asyncio
import json
import socket
import sys
import time
from types import SimpleNamespace

import httpx
import pytest
import respx

from blis_cal.errors import ConfigError
from blis_cal.observe.client import (
    ClientConfig,
    SSEDecoder,
    _ReadTap,
    build_body,
    build_headers,
    send,
    text_prompt,
)
from blis_cal.observe.clock import Clock, new_event_loop, rx_stamped_socket
from blis_cal.workload.request import WORDS
from tests.workload_requests import workload_request

URL = "http://fake:8000"


def wreq(rid=0, n_in=20, n_out=5, **kw):
    return workload_request(rid, n_in=n_in, n_out=n_out, token_seed=3, **kw)


def cfg(**kw):
    return ClientConfig(endpoint=URL, model="m", **kw)


# ---------------------------------------------------------------------------------------------- bodies


def test_completions_token_body_asks_for_exact_lengths_and_per_event_usage():
    body = build_body(wreq(n_in=20, n_out=7, prefix=16, group="g"), cfg(vocab_size=100))
    assert body["model"] == "m"
    assert len(body["prompt"]) == 36 and all(4 <= t < 100 for t in body["prompt"])
    assert body["max_tokens"] == body["min_tokens"] == 7 and body["ignore_eos"] is True
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_prefix_group_members_send_identical_leading_tokens_and_text():
    a, b = wreq(rid=1, prefix=32, group="g"), wreq(rid=2, prefix=32, group="g")
    ba, bb = build_body(a, cfg()), build_body(b, cfg())
    assert ba["prompt"][:32] == bb["prompt"][:32] and ba["prompt"][32:] != bb["prompt"][32:]
    ta, tb = text_prompt(a, 1.5), text_prompt(b, 1.5)
    shared = " ".join(ta.split()[: round(32 / 1.5)])
    assert tb.startswith(shared + " ")


def test_chat_defaults_to_text_prompt_scaled_by_tokens_per_word():
    c = cfg(api="chat", tokens_per_word=2.0)
    body = build_body(wreq(n_in=40, n_out=3), c)
    assert c.prompt_mode == "text" and "prompt" not in body
    [message] = body["messages"]
    words = message["content"].split()
    assert message["role"] == "user" and len(words) == 20 and set(words) <= set(WORDS)


def test_text_prompt_at_one_token_per_word_is_the_workloads_own_text():
    r = wreq(n_in=25, prefix=10, group="g")
    assert text_prompt(r, 1.0) == r.prompt_text()


def test_no_streaming_and_no_ignore_eos_bodies():
    body = build_body(wreq(n_out=9), cfg(streaming=False, ignore_eos=False))
    assert body["stream"] is False and "stream_options" not in body
    assert body["max_tokens"] == 9 and "min_tokens" not in body and "ignore_eos" not in body


def test_headers_carry_request_id_key_gateway_hints_and_extras():
    h = build_headers(wreq(tenant="t1", slo="critical"), cfg(api_key="sk-1", headers={"X-A": "b"}), "rid-1")
    assert h["X-Request-Id"] == "rid-1" and h["Authorization"] == "Bearer sk-1" and h["X-A"] == "b"
    assert h["x-gateway-inference-fairness-id"] == "t1" and h["x-gateway-inference-objective"] == "critical"


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"api": "grpc"}, "--api"),
        ({"prompt_mode": "images"}, "--prompt-mode"),
        ({"api": "chat", "prompt_mode": "tokens"}, "--prompt-mode"),
        ({"timeout_s": 0}, "--timeout"),
        ({"vocab_size": 4}, "--vocab-size"),
        ({"http_client": "requests"}, "--http-client"),
        ({"headers": {"X-A": "b\r\nX-Evil: 1"}}, "--header X-A"),
    ],
)
def test_bad_client_options_name_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        cfg(**kw)


def test_endpoint_must_be_http():
    with pytest.raises(ConfigError, match="--endpoint"):
        ClientConfig(endpoint="localhost:8000", model="m")


# ---------------------------------------------------------------------------------------------- SSE


def test_sse_decoder_several_events_in_one_read_and_split_events():
    d = SSEDecoder()
    assert d.feed(b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: {"c"') == [b'{"a":1}', b'{"b":2}']
    assert d.pending == b'data: {"c"'
    assert d.feed(b":3}\n") == []
    assert d.feed(b"\ndata: [DONE]\n\n") == [b'{"c":3}', b"[DONE]"]
    assert d.pending == b""


def test_sse_decoder_crlf_comments_fields_and_multiline_data():
    d = SSEDecoder()
    raw = b': keep-alive\r\n\r\nevent: message\r\nid: 7\r\ndata: {"x":\r\ndata: 1}\r\n\r'
    assert d.feed(raw) == []  # the last CR may be half of a CRLF
    assert d.feed(b"\n") == [b'{"x":\n1}']


def test_sse_decoder_ignores_comment_only_events():
    assert SSEDecoder().feed(b": ping\n\n: ping\n\ndata: 1\n\n") == [b"1"]


# ---------------------------------------------------------------------------------------------- send


class Reads(httpx.AsyncByteStream):
    """A response body arriving in the given network reads."""

    def __init__(self, parts):
        self.parts = parts

    async def __aiter__(self):
        for p in self.parts:
            await asyncio.sleep(0.001)
            yield p


def ev(msg):
    return b"data: " + json.dumps(msg).encode() + b"\n\n"


def chunk(text, completion, finish=None, prompt=10):
    return ev(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    )


USAGE = ev(
    {
        "id": "cmpl-1",
        "choices": [],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 8},
        },
        "metrics": {
            "time_to_first_token_ms": 12.5,
            "generation_time_ms": 40.0,
            "queue_time_ms": 0.5,
            "mean_itl_ms": 10.0,
        },
    }
)


def run_send(parts, status=200, **kw):
    async def go():
        with respx.mock:
            respx.post(f"{URL}/v1/completions").mock(return_value=httpx.Response(status, stream=Reads(parts)))
            async with httpx.AsyncClient() as client:
                c = cfg(**kw)
                return await send(client, c, build_body(wreq(n_out=5), c), {"X-Request-Id": "r1"}, Clock())

    return asyncio.run(go())


def test_stream_with_multi_token_events_records_tokens_per_event_and_server_truth():
    parts = [
        chunk("a", 1),
        chunk("bc", 3) + chunk("", 4),
        chunk("e", 5, "length") + USAGE + b"data: [DONE]\n\n",
    ]
    out = run_send(parts)
    assert out.status == "ok" and out.http_status == 200
    assert [c.tokens for c in out.chunks] == [1, 2, 1, 1]  # "" text with a token still counts
    assert out.completion_tokens == 5 == sum(c.tokens for c in out.chunks)
    assert out.prompt_tokens == 10 and out.cached_tokens == 8 and out.finish_reason == "length"
    assert out.server_metrics["queue_time_ms"] == 0.5 and out.x_request_id == "r1"
    times = [c.timestamp_us for c in out.chunks]
    assert out.send_us <= out.first_us == times[0] <= times[-1] == out.last_us
    assert times == sorted(times)


def test_chat_role_chunk_carries_no_token():
    role = ev(
        {
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 0},
        }
    )
    tok = ev(
        {
            "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1},
        }
    )

    async def go():
        with respx.mock:
            respx.post(f"{URL}/v1/chat/completions").mock(
                return_value=httpx.Response(200, stream=Reads([role, tok, b"data: [DONE]\n\n"]))
            )
            async with httpx.AsyncClient() as client:
                c = cfg(api="chat")
                return await send(client, c, build_body(wreq(n_out=1), c), {}, Clock())

    out = asyncio.run(go())
    assert (
        out.status == "ok" and len(out.chunks) == 1 and out.completion_tokens == 1 and out.prompt_tokens == 9
    )


def test_stream_without_usage_counts_one_token_per_content_event():
    parts = [
        ev({"choices": [{"index": 0, "text": "a"}]}),
        ev({"choices": [{"index": 0, "text": "b", "finish_reason": "stop"}]}),
        b"data: [DONE]\n\n",
    ]
    out = run_send(parts, continuous_usage=False)
    assert out.status == "ok" and out.completion_tokens == 2 and out.finish_reason == "stop"


def test_error_event_inside_200_stream_is_an_error():
    err = ev({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}})
    out = run_send([chunk("a", 1), err, b"data: [DONE]\n\n"])
    assert out.status == "error" and "engine died" in out.error_message
    assert len(out.chunks) == 1 and out.completion_tokens == 1


def test_malformed_event_is_an_error():
    out = run_send([chunk("a", 1), b"data: {oops\n\n"])
    assert out.status == "error" and "malformed SSE event" in out.error_message


def test_stream_cut_before_done_is_an_error():
    out = run_send([chunk("a", 1), b'data: {"choi'])
    assert out.status == "error" and "inside an event" in out.error_message


def test_http_error_status_records_the_servers_message():
    body = json.dumps(
        {"error": {"message": "This model's maximum context length is 4096 tokens.", "code": 400}}
    )
    out = run_send([body.encode()], status=400)
    assert out.status == "error" and out.http_status == 400
    assert out.error_message.startswith("HTTP 400: This model's maximum context length")


def test_non_streaming_response_is_one_chunk_with_all_tokens():
    body = {
        "choices": [{"index": 0, "text": "abcde", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}},
    }
    out = run_send([json.dumps(body).encode()], streaming=False)
    assert out.status == "ok" and out.completion_tokens == 5 and out.cached_tokens == 0
    assert [c.tokens for c in out.chunks] == [5] and out.send_us <= out.first_us <= out.last_us


def test_connection_error_is_data():
    async def go():
        with respx.mock:
            respx.post(f"{URL}/v1/completions").mock(side_effect=httpx.ConnectError("refused"))
            async with httpx.AsyncClient() as client:
                c = cfg()
                return await send(client, c, build_body(wreq(), c), {}, Clock())

    out = asyncio.run(go())
    assert out.status == "error" and "ConnectError" in out.error_message


def test_whole_request_timeout_is_status_timeout():
    class Slow(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield chunk("a", 1)
            await asyncio.sleep(5)
            yield b"data: [DONE]\n\n"

    async def go():
        with respx.mock:
            respx.post(f"{URL}/v1/completions").mock(return_value=httpx.Response(200, stream=Slow()))
            async with httpx.AsyncClient() as client:
                c = cfg(timeout_s=0.2)
                return await send(client, c, build_body(wreq(), c), {}, Clock())

    out = asyncio.run(go())
    assert out.status == "timeout" and len(out.chunks) == 1 and "--timeout" in out.error_message


def test_event_with_wrong_types_is_a_malformed_event_not_a_crash():
    bad = ev({"choices": [{"index": 0, "text": "a"}], "usage": {"completion_tokens": "many"}})
    out = run_send([chunk("a", 1), bad, b"data: [DONE]\n\n"])
    assert out.status == "error" and "malformed SSE event" in out.error_message and len(out.chunks) == 1


def test_cli_server_info_and_header_flags_are_typed_and_strict():
    from blis_cal.cli import _observe_headers
    from blis_cal.trace import parse_server_facts

    assert parse_server_facts(["max_num_seqs=64", "gpu=A100", "enable_prefix_caching=false"]) == {
        "max_num_seqs": 64,
        "gpu": "A100",
        "enable_prefix_caching": False,
    }
    assert _observe_headers(["X-A: b:c"]) == {"X-A": "b:c"}
    with pytest.raises(ConfigError, match="max_num_seqs must be int"):
        parse_server_facts(["max_num_seqs=many"])
    with pytest.raises(ConfigError, match=r"KEY one of .*long_prefill_token_threshold"):
        parse_server_facts(["num_gpus=2"])
    for bad in ("long_prefill_token_threshold=-1", "gpu_memory_utilization=nan"):
        with pytest.raises(ConfigError, match="must be >= 0"):
            parse_server_facts([bad])


# ---------------------------------------------------------------------------------------------- arrival times


def test_wake_clock_reports_when_the_loop_woke_not_when_a_callback_ran():
    async def main():
        clock = Clock()
        await asyncio.sleep(0.01)  # the loop sleeps in select() and wakes for this task
        woke = clock.woke_us()
        time.sleep(0.05)  # a busy callback in the same loop iteration
        return woke, clock.woke_us(), clock.now_us()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        woke, again, now = runner.run(main())
    assert again == woke and now - woke >= 50_000


def test_wake_clock_outside_a_stamping_loop_is_now():
    async def main():
        clock = Clock()
        before = clock.now_us()
        return before, clock.woke_us(), clock.now_us()

    before, woke, after = asyncio.run(main())
    assert before <= woke <= after


class FakeClock:
    def __init__(self):
        self.t = 0

    def now_us(self):
        return self.t

    def read_arrival_us(self, sock):
        return self.t


class FakeBody:
    """What _ReadTap uses of an aiohttp body stream: decoded bytes so far, end of body."""

    def __init__(self):
        self.buffer, self.eof = b"", asyncio.Event()

    def read_nowait(self):
        data, self.buffer = self.buffer, b""
        return data

    async def wait_eof(self):
        await self.eof.wait()


def fake_response():
    content = FakeBody()

    class Protocol:
        def data_received(self, data):
            content.buffer += data  # aiohttp's parser feeding the body stream

    return SimpleNamespace(content=content, connection=SimpleNamespace(protocol=Protocol(), transport=None))


def test_each_read_is_handed_over_as_it_arrives_with_its_time_not_when_the_task_runs():
    clock, resp = FakeClock(), fake_response()
    protocol = resp.connection.protocol
    a, b = chunk(" a", 1), chunk(" b", 2)
    seen = []

    def on_read(t, data):
        seen.append((t, data))
        return False

    async def main():
        task = asyncio.create_task(_ReadTap(resp, clock).each_read(on_read))
        await asyncio.sleep(0)  # the tap is in place
        for t, data in ((100, a[:10]), (250, a[10:]), (400, b)):  # three reads; the task does not run between
            clock.t = t
            protocol.data_received(data)
        assert seen == [(100, a[:10]), (250, a[10:]), (400, b)]  # handed over inside data_received
        resp.content.eof.set()
        await task
        assert "data_received" not in vars(protocol)  # the connection's own method again

    asyncio.run(main())


def test_a_reader_that_stops_or_fails_ends_the_wait_and_its_error_reaches_the_task():
    clock, resp = FakeClock(), fake_response()

    async def run(on_read):
        task = asyncio.create_task(_ReadTap(resp, clock).each_read(on_read))
        await asyncio.sleep(0)
        resp.connection.protocol.data_received(b"data: x\n\n")
        await asyncio.wait_for(task, 1)  # no end of body needed

    asyncio.run(run(lambda t, data: True))

    def broken(t, data):
        raise ValueError("bad event")

    with pytest.raises(ValueError, match="bad event"):
        asyncio.run(run(broken))


@pytest.mark.skipif(sys.platform != "linux", reason="kernel receive timestamps (SO_TIMESTAMPNS) are Linux's")
def test_socket_reads_carry_the_kernels_receive_time_not_the_read_time():
    clock = Clock()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = rx_stamped_socket((socket.AF_INET, socket.SOCK_STREAM, 0, "", ()))
        with client:
            client.connect(server.getsockname())
            peer, _ = server.accept()
            with peer:
                # Linux turns receive stamping on for the system a moment after the first socket asks (deferred
                # work): until then reads come unstamped, so let one exchange pass first
                for _ in range(50):
                    peer.sendall(b"ping")
                    client.recv(100)
                    if client.rx_realtime_ns:
                        break
                    time.sleep(0.01)
                sent_us = clock.now_us()
                peer.sendall(b"data: x\n\n")
                time.sleep(0.05)  # a busy reader gets to it late
                assert client.recv(100) == b"data: x\n\n"
                read_us = clock.now_us()
    arrived_us = clock.from_realtime_ns(client.rx_realtime_ns)
    assert sent_us - 2_000 <= arrived_us < sent_us + 20_000 and read_us - arrived_us > 30_000


def test_the_budget_prompt_fills_the_token_budget_within_the_context_in_every_api():
    from blis_cal.observe.client import (
        BUDGET_PROMPT_MARGIN,
        UNKNOWN_BUDGET_TOKENS,
        budget_prompt,
        post_unstreamed,
    )
    from blis_cal.trace import ServerInfo
    from blis_cal.workload.request import TOKEN_ID_FLOOR

    def sent_body(cfg: ClientConfig, info: ServerInfo) -> dict:
        async def post() -> dict:
            async with httpx.AsyncClient() as client:
                with respx.mock:
                    route = respx.post(
                        url=f"http://x{'/v1/chat/completions' if cfg.api == 'chat' else '/v1/completions'}"
                    )
                    route.mock(return_value=httpx.Response(200, json={}))
                    await post_unstreamed(client, cfg, budget_prompt(cfg, info), 1, 5.0)
                    return json.loads(route.calls.last.request.content)

        return asyncio.run(post())

    tokens = ClientConfig(endpoint="http://x", model="m", vocab_size=300)
    body = sent_body(tokens, ServerInfo(max_num_batched_tokens=512, max_model_len=4096))
    assert len(body["prompt"]) == 512 and body["max_tokens"] == 1 and body["stream"] is False
    # Ids the model knows, no special tokens.
    assert min(body["prompt"]) >= TOKEN_ID_FLOOR and max(body["prompt"]) < 300
    assert len(budget_prompt(tokens, ServerInfo(max_model_len=1024))) == 1024 - BUDGET_PROMPT_MARGIN
    assert len(budget_prompt(tokens, ServerInfo())) == UNKNOWN_BUDGET_TOKENS
    chat = ClientConfig(endpoint="http://x", model="m", api="chat", tokens_per_word=2.0)
    words = sent_body(chat, ServerInfo(max_num_batched_tokens=512))["messages"][0]["content"].split()
    assert len(words) == 256 and set(words) <= set(WORDS)  # 2 tokens a word: the budget's 512 tokens
