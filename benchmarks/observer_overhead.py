"""How late does the observer timestamp a streamed chunk, and how many chunks per second can it take?

A local aiohttp server (its own process) streams vLLM-shaped completion events (cumulative usage on every
event, like `continuous_usage_stats`) to N concurrent streams: one token per stream per engine "step" of
`--itl-ms`, as vLLM's engine emits one token for every running request per step. The server notes the
CLOCK_MONOTONIC time of each write; the observer's recorded chunk time (same clock) minus that time is the
observation overhead (it includes loopback delivery and the server's own write path, so it is an upper
bound). Like vLLM's, the server is asyncio (TCP_NODELAY) and answers /version, so the observer treats it as
vLLM (delayed ACKs on the httptools client). Client: the real observer (`blis_cal.observe.Observer`:
dispatcher, client, flushed trace writer) on each of its HTTP clients (`--http-client httptools`, the
default, `aiohttp` and `httpx`).

Columns: `cpu µs/chunk` is the whole run's observer CPU (set-up and trace writing included) per chunk;
`streaming cpu` the observer's CPU use while every stream flows (100 % = one core busy: above ~80 % it falls
behind and events of one stream start sharing a read), and `µs/chunk` that CPU per chunk.

Targets (issue 8): p99 < 1 ms at 256 streams, >= 20,000 chunks/s sustained.

    .venv/bin/python benchmarks/observer_overhead.py [--streams 16,64,256] [--tokens 200] [--itl-ms 10,40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from blis_cal.observe import ClientConfig, ObserveConfig, Observer, new_event_loop  # noqa: E402
from blis_cal.trace import read_trace  # noqa: E402
from blis_cal.workload import Workload, WorkloadRequest  # noqa: E402

# ---------------------------------------------------------------------------------------------- server


def serve(port: int, itl_ms: float, ready, cpus: set[int] | None) -> None:
    from aiohttp import web

    if cpus:
        os.sched_setaffinity(0, cpus)

    writes: dict[str, list[int]] = {}
    state = {"step": None}

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        period = itl_ms / 1000
        next_at = loop.time()
        while True:
            fut, state["step"] = state["step"], loop.create_future()
            if fut is not None:
                fut.set_result(None)
            next_at += period
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rid = request.headers.get("X-Request-Id", "")
        n_prompt, max_tokens = len(body["prompt"]), int(body["max_tokens"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        times = writes.setdefault(rid, [])
        head = f'{{"id":"cmpl-{rid}","object":"text_completion","created":0,"model":"bench","choices":[{{"index":0,'
        for i in range(1, max_tokens + 1):
            await state["step"]
            finish = '"length"' if i == max_tokens else "null"
            event = (
                f'data: {head}"text":" tok","logprobs":null,"finish_reason":{finish},"stop_reason":null,'
                f'"prompt_token_ids":null,"token_ids":null}}],"usage":{{"prompt_tokens":{n_prompt},'
                f'"total_tokens":{n_prompt + i},"completion_tokens":{i}}}}}\n\n'
            )
            times.append(time.perf_counter_ns())
            await resp.write(event.encode())
        usage = {
            "prompt_tokens": n_prompt,
            "completion_tokens": max_tokens,
            "total_tokens": n_prompt + max_tokens,
        }
        final = {"id": f"cmpl-{rid}", "choices": [], "usage": usage}
        await resp.write(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
        return resp

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "benchmark"})  # as vLLM's: the observer treats it as vLLM

    async def get_times(request: web.Request) -> web.Response:
        out = dict(writes)
        writes.clear()
        return web.json_response(out)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/times", get_times)
        app.router.add_get("/version", version)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        tick = asyncio.create_task(ticker())
        ready.set()
        await tick

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- clients


def requests(n: int, tokens: int) -> list[WorkloadRequest]:
    return [
        WorkloadRequest(
            request_id=i, client_id="b", tenant_id="", slo_class="", arrival_us=0, prefix_group="",
            prefix_length=0, input_tokens=32, output_tokens=tokens, session_id="", round_index=0,
            streaming=True, think_time_us=0, token_seed=1, context=((f"req:{i}", 32),),
        )
        for i in range(n)
    ]  # fmt: skip


async def run_observer(
    url: str, n: int, tokens: int, http_client: str
) -> tuple[dict[str, list[int]], int, float]:
    """The real observer (dispatcher, client, flushed trace writer) on the given HTTP client; returns
    x_request_id -> recorded chunk times (perf_counter ns), chunks seen and the run's CPU seconds."""
    reqs = requests(n, tokens)
    workload = Workload(requests=reqs, num_requests=n, horizon_us=None, seed=0)
    client = ClientConfig(endpoint=url, model="bench", http_client=http_client)
    cfg = ObserveConfig(client, max_concurrency=n, metrics_interval_s=0)
    with tempfile.TemporaryDirectory() as tmp:
        observer = Observer(workload, cfg, Path(tmp) / "bench.csv")
        cpu0 = time.process_time()
        await observer.run()
        cpu_s = time.process_time() - cpu0
        trace = read_trace(Path(tmp) / "bench.csv")
    t0 = observer.clock.t0_ns
    recorded = {
        r.x_request_id: [t0 + c.timestamp_us * 1000 for c in trace.itl.get(r.request_id, [])]
        for r in trace.records
    }
    return recorded, sum(len(v) for v in recorded.values()), cpu_s


async def fetch_times(url: str) -> dict[str, list[int]]:
    import httpx

    async with httpx.AsyncClient() as client:
        return (await client.get(url + "/times", timeout=30)).json()


class CpuSampler:
    """(perf_counter ns, process CPU s) every 50 ms from a thread: the observer's CPU while streams flow,
    without its start-up (imports, client set-up) and end (trace writing)."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter_ns(), time.process_time()))
            self._stop.wait(0.05)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_per_s(self, start_ns: int, end_ns: int) -> float:
        """CPU seconds per second between two times (0 if the window holds too few samples)."""
        inside = [(t, c) for t, c in self.samples if start_ns <= t <= end_ns]
        if len(inside) < 2:
            return 0.0
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / ((t1 - t0) / 1e9)


def measure(url: str, client: str, n: int, tokens: int) -> dict[str, float]:
    with CpuSampler() as sampler, asyncio.Runner(loop_factory=new_event_loop) as runner:  # as `blis observe`
        recorded, chunks, cpu_s = runner.run(run_observer(url, n, tokens, client))
    cpu_us = cpu_s * 1e6
    truth = asyncio.run(fetch_times(url))
    lags, firsts, lasts, wrote_first, wrote_last, firsts_lag = [], [], [], [], [], []
    for rid, times in recorded.items():
        true = truth.get(rid, [])
        if len(true) != len(times):
            raise RuntimeError(f"{rid}: {len(times)} recorded chunks, server wrote {len(true)}")
        lags.extend(r - t for r, t in zip(times, true, strict=True))
        if times:
            firsts_lag.append(times[0] - true[0])  # the first event: what TTFT's error is made of
            firsts.append(times[0])
            lasts.append(times[-1])
            wrote_first.append(true[0])
            wrote_last.append(true[-1])
    lag_ms = np.asarray(lags) / 1e6
    span_s = (max(lasts) - min(firsts)) / 1e9
    served_s = (max(wrote_last) - min(wrote_first)) / 1e9
    # the middle 80 % of the serving window: every stream flowing
    trim = (max(wrote_last) - min(wrote_first)) // 10
    streaming_cpu = sampler.cpu_per_s(min(wrote_first) + trim, max(wrote_last) - trim)
    return {
        "chunks": chunks,
        "p50_ms": float(np.percentile(lag_ms, 50)),
        "p99_ms": float(np.percentile(lag_ms, 99)),
        "first_p99_ms": float(np.percentile(np.asarray(firsts_lag) / 1e6, 99)),
        "max_ms": float(lag_ms.max()),
        "chunks_per_s": chunks / span_s if span_s > 0 else 0.0,
        "served_per_s": chunks / served_s if served_s > 0 else 0.0,
        "cpu_us_per_chunk": cpu_us / chunks,
        "streaming_cpu": streaming_cpu,
        "streaming_us_per_chunk": streaming_cpu * 1e6 / (chunks / served_s) if served_s > 0 else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="16,64,256", help="Concurrent streams, comma-separated.")
    ap.add_argument("--tokens", type=int, default=200, help="Tokens (events) per stream.")
    ap.add_argument(
        "--itl-ms",
        default="10,40",
        help="Server steps (one token per stream per step), comma-separated: 10 ms offers 25,600 chunks/s at "
        "256 streams (the throughput target), 40 ms a large batch's pace on a GPU.",
    )
    ap.add_argument("--clients", default="httptools,aiohttp,httpx", help="Observer HTTP clients to measure.")
    ap.add_argument(
        "--no-pin", action="store_true", help="Do not pin the server and the observer to separate CPUs."
    )
    args = ap.parse_args()
    # On a machine with 2+ CPUs the server gets one and the observer another, as when the server runs on its
    # own host: the figures are then the observer's, not the two fighting over one CPU.
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    print(f"{args.tokens} tokens per stream; lag = recorded - server write time")
    print(
        f"{'step ms':>7} {'client':<9} {'streams':>7} {'offered/s':>10} {'served/s':>9} {'recorded/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'1st p99':>8} {'cpu µs/chunk':>12} {'streaming cpu':>13} {'µs/chunk':>8}"
    )
    for itl_ms in (float(x) for x in args.itl_ms.split(",")):
        port = free_port()
        ready = multiprocessing.Event()
        server = multiprocessing.Process(
            target=serve, args=(port, itl_ms, ready, {cpus[0]} if pin else None), daemon=True
        )
        server.start()
        if not ready.wait(20):
            raise SystemExit("benchmark server did not start")
        if pin:
            os.sched_setaffinity(0, set(cpus[1:]))
        url = f"http://127.0.0.1:{port}"
        try:
            for n in (int(x) for x in args.streams.split(",")):
                for client in args.clients.split(","):
                    r = measure(url, client, n, args.tokens)
                    offered = n * 1000 / itl_ms
                    print(
                        f"{itl_ms:>7g} {client:<9} {n:>7} {offered:>10.0f} {r['served_per_s']:>9.0f} {r['chunks_per_s']:>10.0f} "
                        f"{r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['max_ms']:>8.3f} {r['first_p99_ms']:>8.3f} {r['cpu_us_per_chunk']:>12.1f} {r['streaming_cpu']:>12.0%} {r['streaming_us_per_chunk']:>8.1f}",
                        flush=True,
                    )
        finally:
            server.terminate()
            if pin:
                os.sched_setaffinity(0, set(cpus))  # the next server process inherits this


if __name__ == "__main__":
    main()
