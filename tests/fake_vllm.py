"""An aiohttp server speaking vLLM's OpenAI API (0.32 framing) that misbehaves on demand, for observer tests.

Faults are chosen per request by prompt length (number of token ids, or of words for text prompts), so a
test decides which request fails regardless of timing: `FakeVLLM(faults={7: "reset"})`.

Faults: "500", "503" (HTTP error bodies as vLLM writes them), "reset" (connection dropped mid-stream),
"stall" (stops sending after two events; the client's --timeout fires), "malformed" (a non-JSON event),
"error_event" (`data: {"error": …}` inside a 200 stream), "slow_first" (first byte after `slow_first_s`),
"no_done" (the stream ends cleanly without [DONE] and without a finish_reason).
The server runs in its own thread and event loop so the client under test is timed alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web

FAULTS = ("500", "503", "reset", "stall", "malformed", "error_event", "slow_first", "no_done")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeVLLM:
    faults: dict[int, str] = field(default_factory=dict)  # prompt length -> fault
    ttft_s: float = 0.01
    itl_s: float = 0.002
    stream_interval: int = 1  # tokens per event, like vLLM's --stream-interval
    slow_first_s: float = 0.3
    stall_s: float = 30.0
    block_size: int = 16
    metrics: bool = True
    # vLLM's dev-mode /server_info engine config (VLLM_SERVER_DEV_MODE=1); None: no such endpoint, as by default
    engine_config: dict | None = None
    max_model_len: int = 2048
    port: int = 0
    received: list[dict] = field(default_factory=list)  # request bodies
    headers: list[dict] = field(default_factory=list)  # request headers, lower-case names
    prefix_seen: set[tuple[int, ...]] = field(default_factory=set)
    counters: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeVLLM:
        self.port = self.port or free_port()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake vLLM did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/version", self._version)
        if self.metrics:
            app.router.add_get("/metrics", self._metrics)
        if self.engine_config is not None:
            app.router.add_get("/server_info", self._server_info)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.counters = {"prompt": 0, "gen": 0, "queries": 0, "hits": 0, "steps": 0, "running": 0}
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    # ------------------------------------------------------------------ endpoints

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "fake", "object": "model", "max_model_len": self.max_model_len}],
            }
        )

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.32.0"})

    async def _server_info(self, request: web.Request) -> web.Response:
        assert request.query.get("config_format") == "json"
        return web.json_response({"vllm_config": self.engine_config, "vllm_env": {}, "system_env": {}})

    async def _metrics(self, request: web.Request) -> web.Response:
        c = self.counters
        labels = 'engine="0",model_name="fake"'
        text = "\n".join(
            [
                "# HELP vllm:num_requests_running Number of requests in model execution batches.",
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running{{{labels}}} {float(c['running'])}",
                f"vllm:num_requests_waiting{{{labels}}} 0.0",
                f"vllm:kv_cache_usage_perc{{{labels}}} {0.01 * c['running']}",
                f"vllm:prefix_cache_queries_total{{{labels}}} {float(c['queries'])}",
                f"vllm:prefix_cache_hits_total{{{labels}}} {float(c['hits'])}",
                f"vllm:num_preemptions_total{{{labels}}} 0.0",
                f"vllm:prompt_tokens_total{{{labels}}} {float(c['prompt'])}",
                f"vllm:generation_tokens_total{{{labels}}} {float(c['gen'])}",
                f"vllm:iteration_tokens_total_count{{{labels}}} {float(c['steps'])}",
                f"vllm:iteration_tokens_total_sum{{{labels}}} {float(c['prompt'] + c['gen'])}",
                f'vllm:cache_config_info{{block_size="{self.block_size}",enable_prefix_caching="True",'
                f'engine="0",gpu_memory_utilization="0.9",num_gpu_blocks="512"}} 1.0',
                "",
            ]
        )
        return web.Response(text=text, content_type="text/plain")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        chat = "messages" in body
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        prompt_ids = prompt if isinstance(prompt, list) else prompt.split()
        n_prompt = len(prompt_ids)
        fault = self.faults.get(n_prompt, "")
        if fault in ("500", "503"):
            kind = "InternalServerError" if fault == "500" else "ServiceUnavailableError"
            return web.json_response(
                {"error": {"message": f"fake {fault}", "type": kind, "param": None, "code": int(fault)}},
                status=int(fault),
            )
        cached = self._prefix_hits(prompt_ids) if not chat and isinstance(prompt, list) else 0
        max_tokens = int(body.get("max_tokens") or 16)
        rid = request.headers.get("X-Request-Id", "x")
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "object": obj, "created": 0, "model": "fake"}
        self.counters["prompt"] += n_prompt
        self.counters["steps"] += 1
        queued = time.monotonic()
        if not body.get("stream"):
            await asyncio.sleep(self.ttft_s + self.itl_s * (max_tokens - 1))
            self.counters["gen"] += max_tokens
            choice = {"index": 0, "finish_reason": "length"}
            choice.update(
                {"message": {"role": "assistant", "content": "x " * max_tokens}}
                if chat
                else {"text": "x " * max_tokens}
            )
            return web.json_response(
                {**base, "choices": [choice], "usage": _usage(n_prompt, max_tokens, cached)}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if fault == "slow_first":
            await asyncio.sleep(self.slow_first_s)
        await resp.prepare(request)
        continuous = (body.get("stream_options") or {}).get("continuous_usage_stats", False)
        include_usage = (body.get("stream_options") or {}).get("include_usage", False)
        self.counters["running"] += 1
        try:
            await asyncio.sleep(self.ttft_s)
            first = time.monotonic()
            if chat:
                role = {
                    **base,
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    ],
                }
                if continuous:
                    role["usage"] = _usage(n_prompt, 0, None)
                await resp.write(_event(role))
            sent = 0
            events = 0
            while sent < max_tokens:
                k = min(self.stream_interval, max_tokens - sent)
                sent += k
                events += 1
                if fault == "stall" and events == 3:
                    with contextlib.suppress(TimeoutError):  # until the test ends the server
                        await asyncio.wait_for(self._stop.wait(), self.stall_s)
                if fault == "reset" and events == 3:
                    request.transport.close()  # the connection drops mid-stream
                    return resp
                if fault == "malformed" and events == 3:
                    await resp.write(b"data: {not json\n\n")
                    continue
                if fault == "error_event" and events == 3:
                    err = {
                        "error": {
                            "message": "fake engine failure",
                            "type": "InternalServerError",
                            "code": 500,
                        }
                    }
                    await resp.write(_event(err) + b"data: [DONE]\n\n")
                    return resp
                finish = "length" if sent == max_tokens and fault != "no_done" else None
                text = " t" * k
                choice = {"index": 0, "finish_reason": finish}
                if body.get("return_token_ids"):  # deterministic "generated" ids: 1000 + position
                    choice["token_ids"] = list(range(1000 + sent - k, 1000 + sent))
                choice.update(
                    {"delta": {"content": text}}
                    if chat
                    else {"text": text, "logprobs": None, "stop_reason": None}
                )
                msg = {**base, "choices": [choice]}
                if continuous:
                    msg["usage"] = _usage(n_prompt, sent, None)
                await resp.write(_event(msg))
                self.counters["gen"] += k
                self.counters["steps"] += 1
                if sent < max_tokens:
                    await asyncio.sleep(self.itl_s * k)
            if fault == "no_done":
                return resp
            if isinstance(prompt, list):  # like vLLM, the generated tokens' KV is cached too
                self._cache(prompt + list(range(1000, 1000 + sent)))
            if include_usage:
                last = time.monotonic()
                metrics = {
                    "time_to_first_token_ms": (first - queued) * 1000,
                    "generation_time_ms": (last - first) * 1000,
                    "queue_time_ms": 0.05,
                    "mean_itl_ms": (last - first) * 1000 / max(1, sent - 1),
                    "tokens_per_second": 100.0,
                }
                final = {**base, "choices": [], "usage": _usage(n_prompt, sent, cached), "metrics": metrics}
                await resp.write(_event(final))
            await resp.write(b"data: [DONE]\n\n")
        finally:
            self.counters["running"] -= 1
        return resp

    def _prefix_hits(self, ids: list[int]) -> int:
        """Full blocks already cached (vLLM's prefix cache hits whole blocks, never the last token)."""
        hits = 0
        for end in range(self.block_size, len(ids), self.block_size):
            if tuple(ids[:end]) in self.prefix_seen:
                hits = end
        self.counters["queries"] += len(ids)
        self.counters["hits"] += hits
        self._cache(ids)
        return hits

    def _cache(self, ids: list) -> None:
        for end in range(self.block_size, len(ids) + 1, self.block_size):
            self.prefix_seen.add(tuple(ids[:end]))


def _usage(prompt: int, completion: int, cached: int | None) -> dict:
    out = {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def _event(msg: dict) -> bytes:
    return b"data: " + json.dumps(msg, separators=(",", ":")).encode() + b"\n\n"
