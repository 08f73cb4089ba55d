"""The observe run: send a workload to a live server and record everything into a TraceV2 trace.

Open loop: each pre-generated request is sent at its scheduled arrival (the trace keeps both the scheduled
arrival and the actual send time). Closed loop: when a request finishes `ok`, `Workload.follow_up` gives
the user's / session's next request (arrival = finish + think time), merged with the pre-generated ones by
arrival time (on a tie the follow-up goes first, as BLIS does). `max_concurrency` caps requests in flight.
Rows are appended and flushed as requests finish; a stop (Ctrl+C, `max_errors`) ends sending, drains
in-flight requests for up to `drain_timeout_s`, then cancels and records the rest as `cancelled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from blis_cal.errors import ConfigError
from blis_cal.observe.client import (
    ClientConfig,
    Outcome,
    budget_prompt,
    budget_prompt_tokens,
    build_body,
    build_headers,
    clip_text,
    make_client,
    make_session,
    measure_tokens_per_word,
    new_request_id,
    post_unstreamed,
    send,
)
from blis_cal.observe.clock import Clock, new_event_loop
from blis_cal.observe.http1 import Http1Session
from blis_cal.observe.recorder import MetricsSampler, build_record, kv_deltas, scrape_metrics, server_facts
from blis_cal.trace import (
    FRESH_SERVER,
    LATE_SEND_US,
    ServerInfo,
    TraceHeader,
    TraceWriter,
    captured_fresh,
    sibling,
    unstated_engine_settings,
    with_server_facts,
)


@dataclass
class ObserveConfig:
    client: ClientConfig
    max_concurrency: int = 256
    drain_timeout_s: float = 30.0
    warmup_requests: int = (
        0  # requests with id < N: sent and recorded, excluded from statistics (trace.ok_records)
    )
    prewarm_duration_s: float = 0.0  # unrecorded load before the run (4 workers), to warm the server
    record_itl: bool = True
    rtt_ms: float = 0.0
    max_errors: int = 0  # stop after this many error/timeout requests (0 = never)
    metrics_interval_s: float = 0.0  # /metrics sidecar period (0 = none: scrapes can slow a CPU-bound server)
    workload_spec: str = ""  # for the header: spec path or preset:<name>
    server_overrides: dict[str, Any] = field(default_factory=dict)  # ServerInfo fields the server hides

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ConfigError(f"--max-concurrency: must be >= 1, got {self.max_concurrency}")
        if self.drain_timeout_s < 0:
            raise ConfigError(f"--drain-timeout: must be >= 0, got {self.drain_timeout_s}")
        if self.warmup_requests < 0:
            raise ConfigError(f"--warmup-requests: must be >= 0, got {self.warmup_requests}")
        if self.prewarm_duration_s < 0:
            raise ConfigError(f"--prewarm-duration: must be >= 0, got {self.prewarm_duration_s}")
        if self.max_errors < 0:
            raise ConfigError(f"--max-errors: must be >= 0, got {self.max_errors}")
        if self.metrics_interval_s < 0:
            raise ConfigError(f"--metrics-interval: must be >= 0, got {self.metrics_interval_s}")
        if self.rtt_ms < 0:
            raise ConfigError(f"--rtt-ms: must be >= 0, got {self.rtt_ms}")
        if self.record_itl and not self.client.streaming:
            raise ConfigError("--record-itl needs streaming; pass --no-record-itl with --no-streaming")


@dataclass
class Progress:
    """Live counters for a progress display (read by the CLI; the library never prints)."""

    sent: int = 0
    done: int = 0
    errors: int = 0  # error + timeout
    in_flight: int = 0
    ttft_us: list[int] = field(default_factory=list)  # ok requests past warm-up
    e2e_us: list[int] = field(default_factory=list)
    stopping: str = ""


@dataclass
class ObserveResult:
    csv_path: Path
    header: TraceHeader
    recorded: int
    by_status: dict[str, int]
    stopped: str  # "" = ran to completion; else why it stopped early
    notes: list[str]
    metrics_path: Path | None


class Observer:
    def __init__(
        self,
        workload: Any,
        config: ObserveConfig,
        csv_path: str | Path,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.workload = workload
        self.config = config
        self.csv_path = Path(csv_path)
        self.progress = Progress()
        self._on_progress = on_progress
        self._stop_reason = ""
        self._stop = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._by_status: dict[str, int] = {}
        self._in_flight: set[asyncio.Task[None]] = set()
        self._recording = asyncio.Lock()  # one record written per event-loop pass (_recording_turn)
        self._answers: dict[int, Any] = {}  # request id -> the server's answer (accumulating sessions)
        self.notes: list[str] = []
        self._late_sends_us: list[int] = []  # lags past LATE_SEND_US: the client was held up
        self.clock: Clock | None = None  # the run's clock, once started

    # ------------------------------------------------------------------ control

    def request_stop(self, reason: str = "interrupted") -> None:
        """Stop sending and drain; a second call cancels in-flight requests at once."""
        if self._stop.is_set():
            self._hard_stop.set()
        else:
            self._stop_reason = reason
            self.progress.stopping = reason
            self._stop.set()
        self._wake.set()
        self._emit()

    def _emit(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self.progress)

    # ------------------------------------------------------------------ run

    async def run(self, handle_signals: bool = False) -> ObserveResult:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop, "interrupted")
        try:
            if cfg.client.http_client == "httpx":
                async with make_client(cfg.max_concurrency + 4) as client:
                    return await self._run(client, client)
            plain = cfg.client.endpoint.startswith("http://")
            if cfg.client.http_client == "aiohttp" or not plain:
                if not plain and cfg.client.http_client == "httptools":
                    self.notes.append(
                        "https endpoint: requests go through aiohttp (httptools speaks plain HTTP)"
                    )
                async with make_client(8) as client, make_session(cfg.max_concurrency) as session:
                    return await self._run(client, session)
            async with make_client(8) as client, Http1Session(cfg.client.endpoint) as session:
                return await self._run(client, session)
        finally:
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    async def _run(
        self, client: httpx.AsyncClient, transport: Http1Session | httpx.AsyncClient | aiohttp.ClientSession
    ) -> ObserveResult:
        """`client` makes the side requests (facts, /metrics, calibration); `transport` the workload's."""
        cfg, ccfg = self.config, self.config.client
        auth = {"Authorization": f"Bearer {ccfg.api_key}"} if ccfg.api_key else {}
        aux_headers = {**ccfg.headers, **auth}
        facts = await server_facts(client, ccfg.endpoint, ccfg.model, aux_headers)
        self.notes.extend(facts.notes)
        info = with_server_facts(facts.info, cfg.server_overrides)
        if missing := unstated_engine_settings(info):
            self.notes.append(
                f"the server did not state its {', '.join(missing)} (vLLM serves its scheduler's only at "
                "/server_info, in dev mode: VLLM_SERVER_DEV_MODE=1), so the trace header will lack them and a "
                "replay will take vLLM's serving defaults; pass what the server was started with: "
                f"{' '.join(f'--server-info {name}=N' for name in missing)} (vLLM logs them at startup)"
            )
        if isinstance(transport, Http1Session) and info.vllm_version:
            transport.lazy_acks = True  # vLLM's API server sends with TCP_NODELAY (uvicorn on asyncio/uvloop)
        if ccfg.prompt_mode == "text":
            ccfg.tokens_per_word, note = await measure_tokens_per_word(client, ccfg)
            self.notes.append(note)
        if cfg.prewarm_duration_s > 0:
            if note := await _prewarm(client, ccfg, cfg.prewarm_duration_s, info):
                self.notes.append(note)
            facts.metrics = (
                await scrape_metrics(client, ccfg.endpoint, aux_headers) if facts.metrics else None
            )
        accumulate = _accumulates(self.workload)
        ccfg.collect_answers = accumulate
        header = TraceHeader(
            created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            mode="real",
            warm_up_requests=cfg.warmup_requests,
            workload_seed=getattr(self.workload, "seed", None),
            workload_spec=cfg.workload_spec,
            session_context_growth="accumulate" if accumulate else "",
            server=info,
            network={"measured_rtt_ms": float(cfg.rtt_ms)} if cfg.rtt_ms else {},
        )
        # A full collection walks every long-lived object (numpy, the workload...) and stalled every stream
        # for ~75 ms in benchmarks/observer_overhead.py: fake ITL spikes. Freeze what exists now.
        gc.collect()
        gc.freeze()
        clock = self.clock = Clock()
        sampler = sampler_task = None
        if facts.metrics is not None and cfg.metrics_interval_s > 0:
            sampler = MetricsSampler(
                client, ccfg.endpoint, aux_headers, self.csv_path, clock, cfg.metrics_interval_s
            )
            sampler_task = asyncio.create_task(sampler.run())
        # this run replaces any trace at this path: an old sibling it will not rewrite must not be read with it
        for suffix, rewritten in ((".itl.csv", cfg.record_itl), (".metrics.csv", sampler is not None)):
            if not rewritten:
                sibling(self.csv_path, suffix).unlink(missing_ok=True)
        writer = TraceWriter(self.csv_path, header, record_itl=cfg.record_itl)
        try:
            await self._dispatch(transport, clock, writer)
        finally:
            gc.unfreeze()
            duration_s = clock.now_us() / 1e6
            if sampler_task is not None:
                sampler_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler_task
            if facts.metrics is not None:
                after = await scrape_metrics(client, ccfg.endpoint, aux_headers)
                if after is not None:
                    header.observed_kv_metrics = kv_deltas(facts.metrics, after, duration_s)
            writer.close(header)
        if captured_fresh(header):
            self.notes.append(
                f"the server had run no engine step since it started: {FRESH_SERVER}, so this capture's first "
                "large steps ran slow; to calibrate, capture after --prewarm-duration S (it starts with a step as "
                "large as the token budget) or after another run on the same server"
            )
        if sampler is not None and sampler.failures:
            self.notes.append(f"/metrics sidecar: {sampler.failures} scrape(s) failed")
        if late := self._late_sends_us:
            self.notes.append(
                f"{len(late)} request(s) were sent more than {LATE_SEND_US // 1000} ms late (up to "
                f"{max(late) / 1e6:.2f} s): this client was held up (starved of CPU?), so what it read meanwhile "
                "came late and in bulk; on a CPU-bound server's machine, leave the client spare CPU or run it "
                "elsewhere (`blis trace info` shows the lags)"
            )
        return ObserveResult(
            csv_path=self.csv_path,
            header=header,
            recorded=writer.count,
            by_status=dict(sorted(self._by_status.items())),
            stopped=self._stop_reason,
            notes=self.notes,
            metrics_path=sampler.path if sampler is not None else None,
        )

    async def _dispatch(self, client: Any, clock: Clock, writer: TraceWriter) -> None:
        cfg = self.config
        # heap of (arrival_us, 0 = follow-up / 1 = pre-generated, sequence, request)
        pending: list[tuple[int, int, int, Any]] = []
        seq = 0
        for req in self.workload.requests:
            pending.append((req.arrival_us, 1, seq, req))
            seq += 1
        heapq.heapify(pending)
        sem = asyncio.Semaphore(cfg.max_concurrency)
        in_flight = self._in_flight

        def on_done(req: Any, out: Outcome) -> None:
            nonlocal seq
            if out.status == "cancelled":
                return
            # a failed round ends its session (BLIS); a closed-loop user then starts a new one
            finished_at = max(out.last_us, out.send_us)
            nxt = self.workload.follow_up(req, out.completion_tokens, finished_at, ok=out.status == "ok")
            if nxt is not None:
                heapq.heappush(pending, (nxt.arrival_us, 0, seq, nxt))
                seq += 1
                self._wake.set()

        while not self._stop.is_set():
            if not pending:
                if not in_flight:
                    break
                self._wake.clear()
                await self._wake.wait()
                continue
            delay_us = pending[0][0] - clock.now_us()
            if delay_us > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay_us / 1e6):
                        await self._wake.wait()
                continue
            capped = sem.locked()
            if not await self._acquire(sem):
                break
            arrival_us, _, _, req = heapq.heappop(pending)
            # from when it could go: a wait for a --max-concurrency slot is by design, not a held-up client
            ready_us = max(arrival_us, clock.now_us()) if capped else arrival_us
            task = asyncio.create_task(
                self._one(client, clock, writer, req, arrival_us, ready_us, sem, on_done)
            )
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await self._drain(in_flight)

    async def _acquire(self, sem: asyncio.Semaphore) -> bool:
        """A concurrency slot, or False when a stop comes first."""
        if not sem.locked():
            await sem.acquire()
            return True
        acquire = asyncio.create_task(sem.acquire())
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if acquire.done() and not acquire.cancelled():
            if self._stop.is_set():
                sem.release()
                return False
            return True
        acquire.cancel()
        return False

    async def _drain(self, in_flight: set[asyncio.Task[None]]) -> None:
        if not in_flight:
            return
        if not self._stop.is_set():  # normal end: every request finishes or hits its own --timeout
            done_or_stop = asyncio.create_task(self._stop.wait())
            while in_flight and not self._stop.is_set():
                await asyncio.wait({*in_flight, done_or_stop}, return_when=asyncio.FIRST_COMPLETED)
            done_or_stop.cancel()
            if not in_flight:
                return
        hard = asyncio.create_task(self._hard_stop.wait())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        while in_flight and not hard.done() and loop.time() < deadline:
            await asyncio.wait(
                {*in_flight, hard}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
        hard.cancel()
        for task in list(in_flight):
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)

    async def _one(
        self,
        client: Any,
        clock: Clock,
        writer: TraceWriter,
        req: Any,
        arrival_us: int,
        ready_us: int,
        sem: asyncio.Semaphore,
        on_done: Callable[[Any, Outcome], None],
    ) -> None:
        cfg = self.config
        ccfg = cfg.client
        try:
            body = build_body(req, ccfg, self._answers)
            headers = build_headers(req, ccfg, new_request_id())
            self.progress.sent += 1
            self.progress.in_flight += 1
            self._emit()
            try:
                out = await send(client, ccfg, body, headers, clock)
                if out.send_us - ready_us > LATE_SEND_US:
                    self._late_sends_us.append(out.send_us - ready_us)
            except Exception as exc:  # a bug or an unforeseen library error: record it, keep observing
                out = Outcome(status="error", error_message=f"observer error: {type(exc).__name__}: {exc}")
                out.x_request_id = headers.get("X-Request-Id", "")
        finally:
            sem.release()
        self.progress.in_flight -= 1
        gated = await self._recording_turn()
        try:
            record = build_record(req, out, ccfg.model, arrival_us, ccfg.streaming)
            writer.append(record, out.chunks if out.status == "ok" else None)
        finally:
            if gated:
                self._recording.release()
        self._by_status[out.status] = self._by_status.get(out.status, 0) + 1
        if ccfg.collect_answers and out.status == "ok":
            answer = out.answer_ids if ccfg.prompt_mode == "tokens" else "".join(out.answer_text)
            if ccfg.prompt_mode == "text" or len(answer) == out.completion_tokens:
                self._answers[req.request_id] = answer
        self.progress.done += 1
        if out.status == "ok" and req.request_id >= cfg.warmup_requests and out.first_us:
            self.progress.ttft_us.append(out.first_us - out.send_us)
            self.progress.e2e_us.append(out.last_us - out.send_us)
        if out.status in ("error", "timeout"):
            self.progress.errors += 1
            if cfg.max_errors and self.progress.errors >= cfg.max_errors:
                self.request_stop(f"stopped after {self.progress.errors} failed requests (--max-errors)")
        if not self._stop.is_set():
            on_done(req, out)
        self._in_flight.discard(asyncio.current_task())  # before waking the dispatcher, which checks it
        self._wake.set()
        self._emit()

    async def _recording_turn(self) -> bool:
        """Wait for this request's turn to be written: one record per event-loop pass, so a burst of requests
        ending together never keeps the loop from reading the other streams (their events would share reads
        and timestamps). False when a stop cancelled the wait: the record is written at once."""
        try:
            await self._recording.acquire()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return False
        return True


def _accumulates(workload: Any) -> bool:
    """Whether some session's prompt carries its earlier prompts and answers (workload spec multi_turn)."""
    spec = getattr(workload, "spec", None)
    clients = getattr(spec, "clients", None) or []
    return any(getattr(c.multi_turn, "context_growth", "") == "accumulate" for c in clients if c.multi_turn)


async def _prewarm(
    client: httpx.AsyncClient, ccfg: ClientConfig, duration_s: float, info: ServerInfo
) -> str | None:
    """Unrecorded load so the run starts warm: first one prompt as long as the token budget (a fresh vLLM runs
    each step larger than any before it slower), then 4 workers sending BLIS's `"warm "`×256 prompt for 64
    tokens until `duration_s` has passed. A note when the server refused the budget prompt."""
    started = time.monotonic()
    try:
        resp = await post_unstreamed(client, ccfg, budget_prompt(ccfg, info), 1, ccfg.timeout_s)
        refused = None if resp.status_code == 200 else f"HTTP {resp.status_code}: {clip_text(resp.text)}"
    except httpx.HTTPError as exc:
        refused = str(exc) or type(exc).__name__

    async def worker() -> None:
        while True:
            try:
                await post_unstreamed(client, ccfg, "warm " * 256, 64, ccfg.timeout_s)
            except httpx.HTTPError:
                await asyncio.sleep(0.5)

    workers = [asyncio.create_task(worker()) for _ in range(4)]
    await asyncio.sleep(max(0.0, duration_s - (time.monotonic() - started)))
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    if refused is None:
        return None
    return (
        f"--prewarm-duration: the server refused its prompt of ~{budget_prompt_tokens(info)} tokens ({refused}), "
        "so the run may be the first to make steps that large; give the server's --max-num-batched-tokens with "
        "--server-info max_num_batched_tokens=N"
    )


def observe(
    workload: Any,
    config: ObserveConfig,
    csv_path: str | Path,
    on_progress: Callable[[Progress], None] | None = None,
    handle_signals: bool = True,
) -> ObserveResult:
    """Run an observation to completion (or Ctrl+C) and return what was recorded."""
    observer = Observer(workload, config, csv_path, on_progress)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:  # chunk times from the loop's wake-ups
        return runner.run(observer.run(handle_signals=handle_signals))
