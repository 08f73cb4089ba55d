"""The digital twin: an aiohttp server speaking vLLM's OpenAI API, backed by the live simulator.

Requests enter the simulation at the simulated time that corresponds to their arrival on the wall clock
(`TwinClock`: sim µs = wall seconds since start × 1e6 × speed). A background task advances the
simulation to "now" and delivers each token to its request's queue at the token's simulated delivery
time, so a client sees the simulator's TTFT and ITL in real time (divided by `speed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from aiohttp import web

from blis_cal.errors import BlisError, ConfigError
from blis_cal.twin import api
from blis_cal.twin.metrics import TwinMetrics

VLLM_API_VERSION = "0.32.0"  # the vLLM release whose API the twin mirrors
TWIN_VERSION = f"{VLLM_API_VERSION}+blis-twin"  # PEP 440 local version: vLLM-compatible, and says what it is


class LiveEngine(Protocol):
    """The simulator's live engine contract (simulate/engine.py `Simulation`)."""

    now_us: int

    def add_request(self, req: Any) -> None: ...

    def run_until(self, t_us: int) -> None: ...


# (on_token, on_finish, on_reject) -> a live engine wired to those callbacks
EngineFactory = Callable[..., LiveEngine]
# (request_id, arrival_us, input_len, output_len, segments, priority, session_id) -> SimRequest
RequestFactory = Callable[..., Any]


@dataclass
class TwinConfig:
    """What the twin tells clients about itself and how it turns requests into simulated work."""

    model_name: str = "blis-twin"
    speed: float = 1.0  # simulated seconds per wall second
    max_model_len: int = 4096
    block_size: int = 16
    num_gpu_blocks: int = 0
    enable_prefix_caching: bool = True
    vocab_size: int = 32000
    seed: int = 0
    eos_mean_tokens: int = 128  # natural answer length (geometric mean) when ignore_eos is false
    per_request_metrics: bool = True  # vLLM --enable-per-request-metrics
    prompt_tokens_details: bool = True  # vLLM --enable-prompt-tokens-details
    poll_ms: float = 1.0  # wall ms between simulation advances while work is in flight
    keep_served_log: bool = False  # keep a ServedRequest per finished request (in-process drivers)

    def __post_init__(self) -> None:
        for name in ("speed", "poll_ms"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and np.isfinite(value) and value > 0):
                raise ConfigError(f"twin {name}: must be a finite number > 0, got {value!r}")
        for name in ("max_model_len", "block_size", "vocab_size", "eos_mean_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"twin {name}: must be >= 1, got {getattr(self, name)}")


class TwinClock:
    """Wall time × speed -> simulated µs since the clock started."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self._t0 = time.perf_counter()

    def now_us(self) -> int:
        return int((time.perf_counter() - self._t0) * 1e6 * self.speed)

    def wall_s(self, sim_us: int) -> float:
        """Simulated µs -> wall seconds."""
        return sim_us / 1e6 / self.speed

    def wall_delay_s(self, sim_us: int) -> float:
        """Wall seconds until the clock reads `sim_us` (0 if past)."""
        return max(0.0, (sim_us - self.now_us()) / 1e6 / self.speed)


_TOKEN, _FINISH, _REJECT, _ERROR = 0, 1, 2, 3


@dataclass(frozen=True)
class ServedRequest:
    """The twin's own view of one finished request, in simulated µs (wall = sim / speed): with a client's
    record of the same request (by request id) it gives the client + HTTP overhead exactly, and with the
    offline simulator it shows the twin's timing is the simulator's."""

    request_id: str  # X-Request-Id header, else body request_id, else the twin's id
    sim_id: int  # the request's id inside the simulation
    arrival_us: int
    first_token_us: int
    last_token_us: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int


@dataclass
class RequestState:
    """One in-flight request as the HTTP handler sees it."""

    sim_id: int
    parsed: api.ParsedRequest
    target_tokens: int
    finish_reason: str
    arrival_us: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    delivered: int = 0  # tokens delivered so far
    delivery_us: list[int] = field(default_factory=list)
    computed: int = 0  # tokens the simulation has produced (delivery may be in the future)
    result: Any = None  # RequestResult, at finish or rejection
    client_request_id: str = ""


class TwinEngine:
    """Drives a live simulation on the twin clock and hands tokens to request queues on time."""

    def __init__(
        self,
        engine_factory: EngineFactory,
        request_factory: RequestFactory,
        config: TwinConfig,
        gauges: Callable[[LiveEngine], tuple[int, int, float]] | None = None,
    ) -> None:
        self.config = config
        self.clock = TwinClock(config.speed)
        self.sim = engine_factory(
            on_token=self._on_token, on_finish=self._on_finish, on_reject=self._on_reject
        )
        self._make_request = request_factory
        self._gauges = gauges
        self._states: dict[int, RequestState] = {}
        self._heap: list[tuple[int, int, int, int, int]] = []  # (due_us, seq, kind, sim_id, token_index)
        self._seq = 0
        self._next_id = 0
        self._wake: asyncio.Event | None = None
        self.served: list[ServedRequest] = []  # filled when config.keep_served_log
        self.failure: BlisError | None = None  # the simulation raised: every request now fails with it
        self.metrics = TwinMetrics(
            config.model_name,
            {
                "block_size": str(config.block_size),
                "num_gpu_blocks": str(config.num_gpu_blocks),
                "enable_prefix_caching": str(config.enable_prefix_caching),
                "kv_cache_size_tokens": str(config.num_gpu_blocks * config.block_size),
            },
        )

    # ------------------------------------------------------------------------------ engine callbacks

    def _push(self, due_us: int, kind: int, sim_id: int, index: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due_us, self._seq, kind, sim_id, index))

    def _on_token(self, request_id: int, token_index: int, delivery_us: int) -> None:
        state = self._states.get(request_id)
        # Recompute preemption re-runs the prompt but never re-emits a streamed token (vLLM V1 keeps outputs).
        if state is None or token_index < state.computed:
            return
        state.computed = token_index + 1
        self._push(delivery_us, _TOKEN, request_id, token_index)

    def _on_finish(self, result: Any) -> None:
        state = self._states.get(result.request_id)
        if state is None:
            return
        state.result = result
        self._push(max(result.finish_us, self.sim.now_us), _FINISH, result.request_id)

    def _on_reject(self, result: Any) -> None:
        state = self._states.get(result.request_id)
        if state is None:
            return
        state.result = result
        self._push(self.sim.now_us, _REJECT, result.request_id)

    # ------------------------------------------------------------------------------ requests

    def submit(self, parsed: api.ParsedRequest) -> RequestState:
        """Enter a request into the simulation now; its tokens arrive on `state.queue`."""
        if self.failure is not None:
            raise self.failure_error()
        sim_id = self._next_id
        self._next_id += 1
        target, reason = self._output_length(sim_id, parsed)
        arrival = max(self.clock.now_us(), self.sim.now_us)
        state = RequestState(sim_id, parsed, target, reason, arrival)
        request = self._make_request(
            request_id=sim_id,
            arrival_us=arrival,
            input_len=parsed.prompt_len,
            output_len=target,
            segments=api.prompt_segments(parsed.prompt_token_ids, self.config.block_size),
            priority=parsed.priority,
            session_id=parsed.session_id,
        )
        try:
            self.sim.add_request(request)
        except BlisError as exc:
            raise api.ApiError(
                f"the simulator refused the request: {exc}", status=500, err_type="InternalServerError"
            ) from None
        self._states[sim_id] = state
        if self._wake is not None:
            self._wake.set()
        return state

    def failure_error(self) -> api.ApiError:
        return api.ApiError(
            f"the simulation failed: {self.failure}", status=500, err_type="InternalServerError"
        )

    def _fail(self, exc: BlisError) -> None:
        """The simulation raised: fail every request in flight (and, from now on, every new one)."""
        self.failure = exc
        self._heap.clear()
        for state in self._states.values():
            state.queue.put_nowait(_ERROR)
        self._states.clear()

    def release(self, state: RequestState) -> None:
        """Forget a request whose client is gone (the simulation still runs it to completion)."""
        self._states.pop(state.sim_id, None)

    def _output_length(self, sim_id: int, parsed: api.ParsedRequest) -> tuple[int, str]:
        """Tokens to generate and the finish reason: max_tokens with ignore_eos, else a seeded EOS draw."""
        if parsed.ignore_eos:
            return parsed.max_tokens, "length"
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, sim_id]))
        natural = int(rng.geometric(1.0 / self.config.eos_mean_tokens))
        natural = max(natural, parsed.min_tokens, 1)
        if natural >= parsed.max_tokens:
            return parsed.max_tokens, "length"
        return natural, "stop"

    # ------------------------------------------------------------------------------ the loop

    def _deliver(self, now_us: int) -> None:
        while self._heap and self._heap[0][0] <= now_us:
            due, _, kind, sim_id, index = heapq.heappop(self._heap)
            state = self._states.get(sim_id)
            if state is None:
                continue
            if kind == _TOKEN:
                state.delivered = index + 1
                state.delivery_us.append(due)
                state.queue.put_nowait(_TOKEN)
            else:
                if kind == _FINISH:
                    self._record_finished(state)
                    if self.config.keep_served_log and state.delivery_us:
                        self.served.append(self._served(state))
                self._states.pop(sim_id, None)
                state.queue.put_nowait(kind)

    def _served(self, state: RequestState) -> ServedRequest:
        return ServedRequest(
            request_id=state.client_request_id or str(state.sim_id),
            sim_id=state.sim_id,
            arrival_us=state.arrival_us,
            first_token_us=state.delivery_us[0],
            last_token_us=state.delivery_us[-1],
            input_tokens=state.parsed.prompt_len,
            output_tokens=len(state.delivery_us),
            cached_tokens=int(state.result.cached_tokens),
        )

    def _record_finished(self, state: RequestState) -> None:
        r, wall = state.result, self.clock.wall_s
        times = state.delivery_us
        first = times[0] if times else r.finish_us
        self.metrics.record_finished(
            finish_reason=state.finish_reason,
            prompt_tokens=state.parsed.prompt_len,
            cached_tokens=int(r.cached_tokens),
            generation_tokens=len(times),
            preemptions=int(r.num_preemptions),
            ttft_s=wall(first - state.arrival_us),
            e2e_s=wall((times[-1] if times else r.finish_us) - state.arrival_us),
            queue_s=wall(max(0, r.scheduled_us - r.queued_us)),
            itls_s=[wall(b - a) for a, b in itertools.pairwise(times)],
        )

    async def run(self) -> None:
        """Advance the simulation to the clock and deliver due tokens, until cancelled."""
        self._wake = asyncio.Event()
        poll_us = int(self.config.poll_ms * 1000 * self.config.speed)
        while True:
            now = self.clock.now_us()
            if self.failure is None:
                try:
                    self.sim.run_until(now)
                except BlisError as exc:
                    self._fail(exc)
            self._deliver(now)
            if self._heap:
                wait_s = self.clock.wall_delay_s(min(self._heap[0][0], now + poll_us))
            elif self._states:
                wait_s = self.clock.wall_delay_s(now + poll_us)
            else:
                wait_s = None  # idle: sleep until a request arrives
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait_s)

    def gauges(self) -> tuple[int, int, float]:
        """(running, waiting, KV usage) for /metrics: from the engine when it can say, else from our books."""
        if self._gauges is not None:
            return self._gauges(self.sim)
        waiting = sum(1 for s in self._states.values() if s.computed == 0)
        return len(self._states) - waiting, waiting, 0.0


# -------------------------------------------------------------------------------------------- HTTP


def _sse(data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def _json(data: Any, status: int = 200) -> web.Response:
    """Compact JSON, as Starlette's JSONResponse (vLLM's) writes it."""
    return web.json_response(data, status=status, dumps=_compact_dumps)


def _compact_dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _error_response(err: api.ApiError) -> web.Response:
    return _json(err.body(), status=err.status)


class TwinApp:
    """HTTP handlers over a TwinEngine."""

    def __init__(self, engine: TwinEngine) -> None:
        self.engine = engine
        self.config = engine.config

    def build(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics)
        app.cleanup_ctx.append(self._engine_task)
        return app

    async def _engine_task(self, app: web.Application):
        task = asyncio.create_task(self.engine.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": TWIN_VERSION})

    async def models(self, request: web.Request) -> web.Response:
        name = self.config.model_name
        card = {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": self.config.max_model_len,
            "permission": [],
        }
        return _json({"object": "list", "data": [card]})

    async def metrics(self, request: web.Request) -> web.Response:
        running, waiting, kv = self.engine.gauges()
        text = self.engine.metrics.render(running=running, waiting=waiting, kv_usage=kv)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise api.ApiError(f"Invalid JSON body: {exc}", err_type="Bad Request") from None
            parsed = api.parse_request(
                body,
                chat=chat,
                served_model=self.config.model_name,
                max_model_len=self.config.max_model_len,
                vocab_size=self.config.vocab_size,
            )
            state = self.engine.submit(parsed)
        except api.ApiError as err:
            return _error_response(err)
        base_id = request.headers.get("X-Request-Id") or parsed.request_id or f"twin-{state.sim_id:08d}"
        state.client_request_id = base_id
        response_id = ("chatcmpl-" if chat else "cmpl-") + base_id
        created = int(time.time())
        if parsed.stream:
            return await self._stream(request, state, response_id, created)
        return await self._complete(state, response_id, created)

    def _kind_error(self, kind: int) -> api.ApiError:
        if kind == _ERROR:
            return self.engine.failure_error()
        return api.ApiError(
            "The server rejected the request (admission control).",
            status=503,
            err_type="ServiceUnavailableError",
        )

    def _usage_and_metrics(self, state: RequestState) -> tuple[dict, dict | None]:
        r = state.result
        cached = int(r.cached_tokens) if self.config.prompt_tokens_details else None
        usage = api.usage_block(state.parsed.prompt_len, state.delivered, cached)
        metrics = None
        if self.config.per_request_metrics and state.delivery_us:
            wall = self.engine.clock.wall_s
            metrics = api.per_request_metrics(
                queued_s=wall(r.queued_us),
                scheduled_s=wall(r.scheduled_us),
                first_token_s=wall(state.delivery_us[0]),
                last_token_s=wall(state.delivery_us[-1]),
                num_tokens=state.delivered,
            )
        return usage, metrics

    async def _complete(self, state: RequestState, response_id: str, created: int) -> web.Response:
        try:
            while True:
                kind = await state.queue.get()
                if kind in (_REJECT, _ERROR):
                    return _error_response(self._kind_error(kind))
                if kind == _FINISH:
                    break
        except asyncio.CancelledError:
            self.engine.release(state)
            raise
        usage, metrics = self._usage_and_metrics(state)
        body = api.full_response(
            state.parsed,
            response_id=response_id,
            created=created,
            num_tokens=state.delivered,
            finish_reason=state.finish_reason,
            usage=usage,
            metrics=metrics,
            vocab_size=self.config.vocab_size,
        )
        return _json(body)

    async def _stream(
        self, request: web.Request, state: RequestState, response_id: str, created: int
    ) -> web.StreamResponse:
        parsed = state.parsed
        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"},
        )
        await resp.prepare(request)
        sent = 0
        try:
            while True:
                kind = await state.queue.get()
                # Tokens that arrived while we were writing go out as one event, as vLLM's output
                # collector merges outputs a slow consumer has not yet taken.
                while kind == _TOKEN and not state.queue.empty():
                    kind = state.queue.get_nowait()
                if kind in (_REJECT, _ERROR):
                    # After the stream started, vLLM sends the error as an event (HTTP status stays 200).
                    await resp.write(_sse(self._kind_error(kind).body()))
                    break
                ready = state.delivered
                if ready > sent:
                    if parsed.chat and sent == 0:
                        await resp.write(
                            _sse(api.chat_role_chunk(parsed, response_id=response_id, created=created))
                        )
                    done = ready >= state.target_tokens
                    chunk = api.stream_chunk(
                        parsed,
                        response_id=response_id,
                        created=created,
                        start=sent,
                        stop=ready,
                        finish_reason=state.finish_reason if done else None,
                        first=sent == 0,
                        vocab_size=self.config.vocab_size,
                        prompt_tokens=parsed.prompt_len,
                    )
                    await resp.write(_sse(chunk))
                    sent = ready
                if kind == _FINISH:
                    if parsed.include_usage:
                        usage, metrics = self._usage_and_metrics(state)
                        await resp.write(
                            _sse(
                                api.usage_chunk(
                                    parsed,
                                    response_id=response_id,
                                    created=created,
                                    usage=usage,
                                    metrics=metrics,
                                )
                            )
                        )
                    break
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            # The client went away: stop streaming (the simulation still finishes the request, as the
            # live engine has no abort).
            self.engine.release(state)
        except asyncio.CancelledError:
            self.engine.release(state)
            raise
        return resp


def build_app(engine: TwinEngine) -> web.Application:
    """The aiohttp application for a twin engine (the engine loop starts and stops with the app)."""
    return TwinApp(engine).build()


# ---------------------------------------------------------------------------------------------- running


async def serve_forever(
    engine: TwinEngine, host: str, port: int, ready: Callable[[str], None] | None = None
) -> None:
    """Serve until cancelled; `ready(url)` is called once the socket listens."""
    runner = web.AppRunner(build_app(engine), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        if ready is not None:
            ready(_site_url(site, host))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _site_url(site: web.TCPSite, host: str) -> str:
    server = site._server  # aiohttp keeps the listening sockets here; needed to learn an OS-chosen port
    port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else site._port
    return f"http://{host}:{port}"


class TwinServerThread:
    """The twin on its own event loop in a background thread (in-process use: demo, tests).

    with TwinServerThread(engine_maker) as url: ...   # `engine_maker()` runs on the server's loop
    """

    def __init__(
        self, engine_maker: Callable[[], TwinEngine], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._maker, self._host, self._port = engine_maker, host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._task: asyncio.Task | None = None
        self.url = ""
        self.engine: TwinEngine | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> str:
        self._thread = threading.Thread(target=self._run, name="blis-twin", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self.url

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()

        def ready(url: str) -> None:
            self.url = url
            self._started.set()

        async def main() -> None:
            self.engine = self._maker()
            await serve_forever(self.engine, self._host, self._port, ready)

        self._task = self._loop.create_task(main())
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # surfaced to the caller of __enter__
            self._error = exc
        finally:
            self._started.set()
            self._loop.close()

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            self._thread.join(timeout=10)
