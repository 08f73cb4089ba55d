"""HTTP side of the observer: request bodies for the OpenAI APIs, SSE parsing, one timed request.

Every SSE event is timestamped on a monotonic clock with the arrival of the network read that completed it
(events arriving in one read share the time): the kernel's receive time of the read (SO_TIMESTAMPNS on
Linux) on the httptools and aiohttp clients, else the moment the event loop found the socket readable. A
busy event loop delays the parsing of an event, not its timestamp. Token counts per event come from vLLM's
cumulative `usage` (`stream_options.continuous_usage_stats`), so one event carrying several tokens
(stream_interval, speculative decoding, a busy API server) is recorded as such, never as one token.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import aiohttp
import httpx
import orjson

from blis_cal.errors import ConfigError
from blis_cal.observe.clock import Clock, rx_stamped_socket, stamped_socket
from blis_cal.observe.http1 import EachRead, Http1Session, HTTPStreamError, OnRead
from blis_cal.trace import Chunk, ServerInfo
from blis_cal.workload.request import TOKEN_ID_FLOOR, WORDS

APIS = ("completions", "chat")
HTTP_CLIENTS = ("httptools", "aiohttp", "httpx")
PROMPT_MODES = ("tokens", "text")
_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_ERROR_TEXT_LIMIT = 500
UNKNOWN_BUDGET_TOKENS = 8192  # the budget prompt's length when the server does not say its token budget
BUDGET_PROMPT_MARGIN = 64  # tokens left in the context for a chat template and the answer


class RequestLike(Protocol):
    """What the client needs of a workload request (blis_cal.workload.WorkloadRequest)."""

    request_id: int
    tenant_id: str
    slo_class: str
    output_tokens: int
    context: tuple[tuple[str, int], ...]

    def token_ids(
        self, vocab_size: int, *, floor: int = ..., answers: Mapping[int, Any] | None = ...
    ) -> list[int]: ...


@dataclass
class ClientConfig:
    endpoint: str
    model: str
    api: str = "completions"
    prompt_mode: str = ""  # "" = tokens for completions, text for chat
    streaming: bool = True
    ignore_eos: bool = True
    continuous_usage: bool = True  # vLLM: cumulative usage on every event -> exact tokens per event
    timeout_s: float = 300.0
    http_client: str = "httptools"  # transport for the workload's requests (HTTP_CLIENTS)
    collect_answers: bool = False  # keep generated ids / text (sessions whose context accumulates)
    api_key: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    vocab_size: int = 8192
    tokens_per_word: float = 1.0  # text prompts: measured at start by measure_tokens_per_word

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ConfigError(f"--api: {self.api!r} is not one of {', '.join(APIS)}")
        if not self.prompt_mode:
            self.prompt_mode = "tokens" if self.api == "completions" else "text"
        if self.prompt_mode not in PROMPT_MODES:
            raise ConfigError(f"--prompt-mode: {self.prompt_mode!r} is not one of {', '.join(PROMPT_MODES)}")
        if self.api == "chat" and self.prompt_mode == "tokens":
            raise ConfigError(
                "--prompt-mode tokens needs --api completions (chat takes text; use --prompt-mode text)"
            )
        if not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"--endpoint: {self.endpoint!r} must start with http:// or https://")
        if self.http_client not in HTTP_CLIENTS:
            raise ConfigError(f"--http-client: {self.http_client!r} is not one of {', '.join(HTTP_CLIENTS)}")
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout: must be > 0 seconds, got {self.timeout_s}")
        for key, value in self.headers.items():
            if any(c in key + value for c in "\r\n\0"):
                raise ConfigError(f"--header {key}: names and values cannot contain line breaks")
        if self.vocab_size <= TOKEN_ID_FLOOR:
            raise ConfigError(
                f"--vocab-size: must be > {TOKEN_ID_FLOOR} (lower ids are special tokens), got {self.vocab_size}"
            )
        self.endpoint = self.endpoint.rstrip("/")


@dataclass
class Outcome:
    """What happened to one request on the wire. Times are Clock µs; 0 = did not happen."""

    status: str = "ok"
    error_message: str = ""
    http_status: int = 0
    send_us: int = 0
    first_us: int = 0
    last_us: int = 0
    chunks: list[Chunk] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None
    finish_reason: str = ""
    x_request_id: str = ""
    server_metrics: dict[str, float] = field(default_factory=dict)  # vLLM's per-request `metrics` block
    answer_ids: list[int] = field(default_factory=list)  # generated ids (collect_answers, token prompts)
    answer_text: list[str] = field(default_factory=list)  # generated text (collect_answers)


# ---------------------------------------------------------------------------------------------- prompts


def text_prompt(req: RequestLike, tokens_per_word: float, answers: Mapping[int, str] | None = None) -> str:
    """The prompt as words (the workload's one-token-per-word vocabulary), scaled so the server counts about
    as many tokens as the workload asked for; identical segments give byte-identical text (prefix hits).

    A segment of L tokens becomes max(1, round(L / tokens_per_word)) words, word i being WORDS[id_i] (ids
    reused cyclically when there are more words than tokens); at 1 token per word this is exactly
    `WorkloadRequest.prompt_text()`. `answers` (request id -> the text the server generated) replace the
    synthetic ("out:<id>", k) segments of accumulated chat history.
    """
    ids = req.token_ids(len(WORDS), floor=0)
    words: list[str] = []
    pos = 0
    for key, length in req.context:
        seg = ids[pos : pos + length]
        pos += length
        if answers and key.startswith("out:") and int(key[4:]) in answers:
            words.append(answers[int(key[4:])])
            continue
        if length <= 0:
            continue
        count = max(1, round(length / tokens_per_word))
        words.extend(WORDS[seg[i % length]] for i in range(count))
    return " ".join(words)


def build_body(
    req: RequestLike, cfg: ClientConfig, answers: Mapping[int, Any] | None = None
) -> dict[str, Any]:
    """The JSON body for one request: exact output length (vLLM: min_tokens + ignore_eos), usage on.

    `answers` (request id -> generated token ids, or text for text prompts) put the server's real answers
    into accumulated chat history, as a chat client does: vLLM caches generated tokens' KV too, so the next
    round hits the cache on them.
    """
    max_tokens = max(1, req.output_tokens)
    if cfg.prompt_mode == "tokens":
        prompt: Any = req.token_ids(cfg.vocab_size, answers=answers)
    else:
        prompt = text_prompt(req, cfg.tokens_per_word, answers)
    body: dict[str, Any] = {"model": cfg.model}
    if cfg.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body["max_tokens"] = max_tokens
    if cfg.ignore_eos:
        body["min_tokens"] = max_tokens
        body["ignore_eos"] = True
    if cfg.collect_answers and cfg.prompt_mode == "tokens":
        body["return_token_ids"] = True  # vLLM: the generated ids, for the session's next round
    body["stream"] = cfg.streaming
    if cfg.streaming:
        options = {"include_usage": True}
        if cfg.continuous_usage:
            options["continuous_usage_stats"] = True
        body["stream_options"] = options
    return body


def budget_prompt_tokens(info: ServerInfo) -> int:
    """The engine's token budget (`info.max_num_batched_tokens`, else UNKNOWN_BUDGET_TOKENS, which vLLM chunks
    when it is larger), within the context length."""
    tokens = info.max_num_batched_tokens or UNKNOWN_BUDGET_TOKENS
    return max(1, min(tokens, info.max_model_len - BUDGET_PROMPT_MARGIN)) if info.max_model_len else tokens


def budget_prompt(cfg: ClientConfig, info: ServerInfo) -> list[int] | str:
    """A prompt that fills the token budget (`budget_prompt_tokens`): answered with one token, the server
    then runs a step as large as any a run can make it."""
    tokens = budget_prompt_tokens(info)
    if cfg.prompt_mode == "tokens":
        return [TOKEN_ID_FLOOR + i % (cfg.vocab_size - TOKEN_ID_FLOOR) for i in range(tokens)]
    return " ".join(WORDS[i % len(WORDS)] for i in range(max(1, int(tokens / cfg.tokens_per_word))))


async def post_unstreamed(
    client: httpx.AsyncClient, cfg: ClientConfig, prompt: list[int] | str, max_tokens: int, timeout_s: float
) -> httpx.Response:
    """One unrecorded, non-streamed request (a calibration or warm-up one) for `prompt`: token ids or text,
    the chat API's user message."""
    body: dict[str, Any] = {"model": cfg.model, "max_tokens": max_tokens, "stream": False}
    if cfg.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    headers = {"Content-Type": "application/json", **cfg.headers}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    return await client.post(cfg.endpoint + _PATHS[cfg.api], json=body, headers=headers, timeout=timeout_s)


def build_headers(req: RequestLike, cfg: ClientConfig, x_request_id: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Request-Id": x_request_id}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    # llm-d gateway hints, as BLIS sends them
    if req.tenant_id:
        headers["x-gateway-inference-fairness-id"] = req.tenant_id
    if req.slo_class:
        headers["x-gateway-inference-objective"] = req.slo_class
    headers.update(cfg.headers)
    return headers


def new_request_id() -> str:
    return str(uuid.uuid4())


# ---------------------------------------------------------------------------------------------- SSE


class SSEDecoder:
    """Incremental server-sent-events decoder: bytes in, the `data` payload of each complete event out.

    Handles CRLF / CR line ends, several events in one read, events split across reads, comment lines
    (`: keep-alive`), other fields (`event:`, `id:`, `retry:`) and multi-line data.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            held = buf.endswith(b"\r")  # maybe the first half of CRLF: decide on the next read
            if held:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if held:
                buf += b"\r"
        parts = buf.split(b"\n\n")
        self._buf = parts.pop()
        return [payload for block in parts if (payload := _event_data(block)) is not None]

    @property
    def pending(self) -> bytes:
        """Bytes of an unfinished event (non-empty at end of stream = truncated event)."""
        return self._buf.strip(b"\r\n")


def _event_data(block: bytes) -> bytes | None:
    if block.startswith(b"data: ") and b"\n" not in block:  # fast path: vLLM's one-line events
        return block[6:]
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if name == b"data":
            data.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(data) if data else None


# ---------------------------------------------------------------------------------------------- parsing


class _StreamState:
    """Folds parsed events into an Outcome."""

    def __init__(self, out: Outcome, collect: bool = False) -> None:
        self.out = out
        self.collect = collect
        self.seen_tokens = 0  # cumulative completion tokens reported by continuous usage
        self.done = False

    def event(self, payload: bytes, now_us: int) -> None:
        try:
            msg = orjson.loads(payload)  # the hot path: a few µs less per event than json keeps stamps honest
        except ValueError:
            if payload.strip() == b"[DONE]":
                self.done = True
                return
            raise _StreamError(
                f"malformed SSE event: {clip_text(payload.decode('utf-8', 'replace'))}"
            ) from None
        if type(msg) is not dict:
            raise _StreamError(f"malformed SSE event (not a JSON object): {clip_text(str(msg))}")
        if "error" in msg:  # vLLM: an error after the stream started keeps HTTP 200
            raise _StreamError(f"server error in stream: {_error_text(msg)}")
        try:
            self._message(msg, now_us)
        except (TypeError, ValueError, AttributeError) as exc:
            raise _StreamError(
                f"malformed SSE event ({exc}): {clip_text(payload.decode('utf-8', 'replace'))}"
            ) from None

    def _message(self, msg: dict[str, Any], now_us: int) -> None:
        out = self.out
        choices = msg.get("choices")
        usage = msg.get("usage")
        tokens = 0
        if choices:
            choice = choices[0]
            finish = choice.get("finish_reason")
            if finish:
                out.finish_reason = str(finish)
            if type(usage) is dict and "completion_tokens" in usage:
                total = int(usage["completion_tokens"])
                seen = self.seen_tokens
                if total > seen:
                    tokens = total - seen
                    self.seen_tokens = total
            elif _carries_output(choice):
                tokens = 1  # no per-event usage: one token per content event is all we can say
            if self.collect:
                _collect(out, choice)
        if usage is not None and not choices:
            self.final_usage(msg)
        elif type(usage) is dict:
            out.prompt_tokens = int(usage.get("prompt_tokens") or out.prompt_tokens)
        if tokens > 0:
            if not out.chunks:
                out.first_us = now_us
            out.last_us = now_us
            out.chunks.append(Chunk(now_us, tokens))

    def final_usage(self, msg: dict[str, Any]) -> None:
        out = self.out
        usage = msg.get("usage") or {}
        out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        out.completion_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            out.cached_tokens = int(details["cached_tokens"])
        metrics = msg.get("metrics")
        if isinstance(metrics, dict):
            out.server_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}

    def finish(self) -> None:
        """End of a stream: fill what the usage event did not say."""
        out = self.out
        if not out.completion_tokens:
            out.completion_tokens = sum(c.tokens for c in out.chunks)


def _collect(out: Outcome, choice: dict[str, Any]) -> None:
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        out.answer_ids.extend(int(i) for i in ids)
    text = choice.get("text")
    if text is None:
        part = choice.get("delta") or choice.get("message") or {}
        text = part.get("content") if isinstance(part, dict) else None
    if text:
        out.answer_text.append(str(text))


def _carries_output(choice: dict[str, Any]) -> bool:
    if choice.get("text") or choice.get("token_ids"):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and bool(delta.get("content") or delta.get("reasoning_content"))


class _StreamError(Exception):
    pass


def clip_text(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_TEXT_LIMIT else text[:_ERROR_TEXT_LIMIT] + "…"


def _error_text(msg: dict[str, Any]) -> str:
    err = msg.get("error")
    if isinstance(err, dict):
        return clip_text(str(err.get("message") or err))
    return clip_text(str(err if err is not None else msg.get("message", msg)))


def parse_response_body(body: bytes, out: Outcome, now_us: int, collect: bool = False) -> None:
    """A non-streaming response: one chunk carrying every completion token."""
    try:
        msg = json.loads(body)
    except ValueError:
        raise _StreamError(f"malformed JSON response: {clip_text(body.decode('utf-8', 'replace'))}") from None
    if not isinstance(msg, dict) or "error" in msg:
        raise _StreamError(
            f"server error: {_error_text(msg) if isinstance(msg, dict) else clip_text(str(msg))}"
        )
    state = _StreamState(out)
    state.final_usage(msg)
    choices = msg.get("choices") or []
    if choices and choices[0].get("finish_reason"):
        out.finish_reason = str(choices[0]["finish_reason"])
    if choices and collect:
        _collect(out, choices[0])
    out.last_us = now_us
    out.chunks = [Chunk(now_us, max(1, out.completion_tokens))]


# ---------------------------------------------------------------------------------------------- sending


@asynccontextmanager
async def _post_httpx(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str], clock: Clock
) -> AsyncIterator[tuple[int, EachRead]]:
    async with client.stream("POST", url, json=body, headers=headers) as resp:

        async def each_read(on_read: OnRead) -> None:
            async for data in resp.aiter_raw():
                # stamped when our task saw them: later than their arrival if the loop was busy
                if on_read(clock.now_us(), data):
                    return

        yield resp.status_code, each_read


class _ReadTap:
    """Every network read of one aiohttp response body, handed to an OnRead as it arrives.

    Wrapping the connection protocol's `data_received` for the life of the body runs the OnRead right after
    aiohttp's parser has decoded the read, so each event keeps the time its last byte arrived, and the task
    sleeps until the body ends instead of waking per event. The arrival is the kernel's receive time of the
    read (`rx_stamped_socket`), else the moment the event loop found the socket readable.
    """

    def __init__(self, resp: aiohttp.ClientResponse, clock: Clock) -> None:
        self._clock = clock
        self._content = resp.content
        conn = resp.connection
        transport = conn.transport if conn is not None else None
        self._sock = stamped_socket(transport.get_extra_info("socket") if transport is not None else None)
        protocol = conn.protocol if conn is not None else None
        self._protocol = protocol if protocol is not None and hasattr(protocol, "__dict__") else None

    async def each_read(self, on_read: OnRead) -> None:
        content, protocol = self._content, self._protocol
        if protocol is None:  # nothing to hook (a released connection): the time the task sees the bytes
            async for data in content.iter_any():
                if on_read(self._clock.now_us(), data):
                    return
            return
        stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def deliver(arrival_us: int) -> None:
            data = content.read_nowait()  # the body bytes this read completed (aiohttp has de-chunked them)
            if data and on_read(arrival_us, data):
                stopped.set_result(None)

        received = protocol.data_received

        def data_received(data: bytes) -> None:
            received(data)
            if data and not stopped.done():  # aiohttp calls it with b"" to resume parsing: no read
                try:
                    deliver(self._clock.read_arrival_us(self._sock))
                except Exception as exc:  # the OnRead's or the body's error: raised in the task, not the loop
                    stopped.set_exception(exc)

        protocol.data_received = data_received  # type: ignore[method-assign]
        eof = asyncio.ensure_future(content.wait_eof())  # the body's end, or the connection's error
        try:
            deliver(self._clock.read_arrival_us(self._sock))  # what came with the headers
            if not stopped.done():
                await asyncio.wait((stopped, eof), return_when=asyncio.FIRST_COMPLETED)
            if stopped.done():
                stopped.result()
            else:
                eof.result()
                deliver(self._clock.now_us())
        finally:
            protocol.__dict__.pop("data_received", None)  # the class's method again
            eof.cancel()
            if eof.done() and not eof.cancelled():
                eof.exception()  # seen: an error after the OnRead stopped is not the request's


@asynccontextmanager
async def _post_aiohttp(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str], clock: Clock
) -> AsyncIterator[tuple[int, EachRead]]:
    async with session.post(url, json=body, headers=headers) as resp:
        yield resp.status, _ReadTap(resp, clock).each_read


async def send(
    client: Http1Session | httpx.AsyncClient | aiohttp.ClientSession,
    cfg: ClientConfig,
    body: dict[str, Any],
    headers: dict[str, str],
    clock: Clock,
) -> Outcome:
    """Send one request and record it. Errors are data (status error/timeout, the run goes on); a task
    cancellation is recorded as `cancelled` with what arrived so far."""
    out = Outcome(x_request_id=headers.get("X-Request-Id", ""))
    url = cfg.endpoint + _PATHS[cfg.api]
    state = _StreamState(out, cfg.collect_answers)
    if isinstance(client, Http1Session):
        post = client.post
    elif isinstance(client, httpx.AsyncClient):
        post = partial(_post_httpx, client)
    else:
        post = partial(_post_aiohttp, client)
    try:
        async with asyncio.timeout(cfg.timeout_s):
            out.send_us = clock.now_us()
            async with post(url, body, headers, clock) as (status, each_read):
                out.http_status = status
                if status != 200:
                    text = (await _read_all(each_read))[2].decode("utf-8", "replace")
                    out.last_us = clock.now_us()
                    out.status = "error"
                    out.error_message = f"HTTP {status}: {_body_error(text)}"
                    return out
                if cfg.streaming:
                    await _read_stream(each_read, state)
                else:
                    first_us, last_us, data = await _read_all(each_read)
                    parse_response_body(data, out, last_us or clock.now_us(), cfg.collect_answers)
                    out.first_us = first_us or out.last_us
    except TimeoutError:
        out.status = "timeout"
        out.error_message = f"no complete response within --timeout {cfg.timeout_s:g} s"
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # the dispatcher cancelled us to record the request; the task ends normally
        out.status = "cancelled"
        out.error_message = "cancelled (run stopped before the request finished)"
    except _StreamError as exc:
        out.status = "error"
        out.error_message = str(exc)
    except httpx.TimeoutException as exc:
        out.status = "timeout"
        out.error_message = f"HTTP timeout: {type(exc).__name__}"
    except (HTTPStreamError, httpx.HTTPError, aiohttp.ClientError) as exc:
        out.status = "error"
        out.error_message = f"HTTP error: {type(exc).__name__}: {clip_text(str(exc)) or 'connection failed'}"
    if out.status != "ok":
        state.finish()
    return out


async def _read_stream(each_read: EachRead, state: _StreamState) -> None:
    decoder = SSEDecoder()
    event = state.event

    def on_read(now_us: int, data: bytes) -> bool:
        # every event completed by these bytes arrived by now_us
        if (
            data[:6] == b"data: "
            and data.find(b"\n") == len(data) - 2
            and data[-1:] == b"\n"
            and not decoder.pending
        ):
            event(data[6:-2], now_us)  # the usual read: one whole one-line event (vLLM's), no decoder needed
        else:
            for payload in decoder.feed(data):
                event(payload, now_us)
        return state.done

    await each_read(on_read)
    if not state.done:
        if decoder.pending:
            pending = clip_text(decoder.pending.decode("utf-8", "replace"))
            raise _StreamError(f"stream ended inside an event: {pending}")
        if not state.out.finish_reason:
            raise _StreamError("stream ended before [DONE] and before a finish_reason")
    state.finish()


async def _read_all(each_read: EachRead) -> tuple[int, int, bytes]:
    """A whole body: (arrival of its first read, of its last read, bytes); times 0 for an empty body."""
    arrivals: list[int] = []
    parts: list[bytes] = []

    def on_read(now_us: int, data: bytes) -> bool:
        arrivals.append(now_us)
        parts.append(data)
        return False

    await each_read(on_read)
    return (arrivals[0], arrivals[-1], b"".join(parts)) if arrivals else (0, 0, b"")


def _body_error(text: str) -> str:
    try:
        msg = json.loads(text)
    except ValueError:
        return clip_text(text)
    return _error_text(msg) if isinstance(msg, dict) else clip_text(text)


def make_client(max_connections: int) -> httpx.AsyncClient:
    """An httpx client for the run's side requests (/metrics, /v1/models, calibration, prewarm) and, with
    `--http-client httpx`, the workload itself. Per-request deadlines are `send`'s whole-request timeout."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None))


def make_session(max_connections: int) -> aiohttp.ClientSession:
    """The aiohttp session for the workload's requests: its C HTTP parser costs about a third of httpx's
    CPU per streamed event (benchmarks/observer_overhead.py), which keeps chunk timestamps honest at load."""
    connector = aiohttp.TCPConnector(
        limit=max_connections, limit_per_host=0, force_close=False, socket_factory=rx_stamped_socket
    )
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


async def measure_tokens_per_word(client: httpx.AsyncClient, cfg: ClientConfig) -> tuple[float, str]:
    """Tokens per WORDS word on this server: prompt_tokens of 200 words minus that of 100, over 100 (the
    difference cancels BOS and chat-template tokens). Returns (ratio, note); 1.0 with a note on failure."""
    counts = []
    for n in (100, 200):
        text = " ".join(WORDS[i % len(WORDS)] for i in range(n))
        try:
            resp = await post_unstreamed(client, cfg, text, 1, 60.0)
            counts.append(int(resp.json()["usage"]["prompt_tokens"]))
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            return 1.0, f"tokens-per-word calibration request failed ({type(exc).__name__}); assuming 1.0"
    ratio = (counts[1] - counts[0]) / 100
    if not 0.2 <= ratio <= 10.0:
        return 1.0, f"tokens-per-word measured as {ratio:g} (implausible); assuming 1.0"
    return ratio, f"text prompts: {ratio:g} tokens per word (measured)"
