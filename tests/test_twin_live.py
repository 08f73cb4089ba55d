"""The twin on the real live simulator: its timing is the offline simulator's, clients never see a token
before the twin delivers it, and /metrics reflects the engine's queues."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from blis_cal.simulate import BlackboxModel, SimConfig, SimRequest, simulate
from blis_cal.twin import api
from blis_cal.twin.live import simulated_twin, twin_config_for
from blis_cal.twin.server import TwinServerThread

SPEED = 10.0
ALPHA = (2000.0, 2.0, 0.0)
BETA = (8000.0, 20.0, 500.0)


def engine_config(**kw) -> SimConfig:
    base = dict(
        block_size=16, num_gpu_blocks=512, max_num_seqs=4, max_num_batched_tokens=256, max_model_len=2048
    )
    return SimConfig(**(base | kw))


def start_twin(config: SimConfig, speed: float = SPEED) -> TwinServerThread:
    model = BlackboxModel(ALPHA, BETA)
    twin = twin_config_for(config, model_name="twin", speed=speed, keep_served_log=True)
    return TwinServerThread(lambda: simulated_twin(config, model, twin))


def prompts() -> list[tuple[str, list[int], int, float]]:
    """(request id, prompt ids, max_tokens, send offset s): a shared 64-token prefix on every third."""
    out = []
    prefix = list(range(1000, 1064))
    for i in range(18):
        own = [(i * 37 + j) % 900 for j in range(20 + 13 * (i % 5))]
        ids = prefix + own if i % 3 == 0 else own
        out.append((f"req-{i}", ids, 4 + (i * 7) % 23, 0.015 * i))
    return out


async def send_all(url: str, plan) -> dict[str, tuple[float, float, dict]]:
    """Send every request at its offset; per request id: (client TTFT s, client E2E s, usage)."""
    results: dict[str, tuple[float, float, dict]] = {}
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(rid: str, ids: list[int], max_tokens: int, offset: float) -> None:
            await asyncio.sleep(offset)
            body = {
                "model": "twin",
                "prompt": ids,
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            t0 = time.perf_counter()
            first = last = None
            usage = {}
            async with client.stream(
                "POST", url + "/v1/completions", json=body, headers={"X-Request-Id": rid}
            ) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.perf_counter()
                    event = json.loads(line[6:])
                    if event["choices"]:
                        first = first or now
                        last = now
                    else:
                        usage = event["usage"]
            results[rid] = (first - t0, last - t0, usage)

        await asyncio.gather(*(one(*p) for p in plan))
    return results


def test_twin_timing_is_the_offline_simulators_and_clients_never_see_tokens_early():
    config = engine_config()
    plan = prompts()
    server = start_twin(config)
    with server as url:
        seen = asyncio.run(send_all(url, plan))
        served = {s.request_id: s for s in server.engine.served}
    assert set(served) == {rid for rid, *_ in plan}
    # Replay the same arrivals offline: the twin runs the simulator, so every time matches to the µs.
    by_rid = {rid: (ids, n) for rid, ids, n, _ in plan}
    requests = [
        SimRequest(
            request_id=s.sim_id,
            arrival_us=s.arrival_us,
            input_len=len(by_rid[rid][0]),
            output_len=by_rid[rid][1],
            segments=api.prompt_segments(by_rid[rid][0], config.block_size),
        )
        for rid, s in served.items()
    ]
    offline = {r.request_id: r for r in simulate(requests, config, BlackboxModel(ALPHA, BETA)).results}
    hits = 0
    for rid, s in served.items():
        r = offline[s.sim_id]
        assert (s.first_token_us, s.last_token_us) == (r.first_token_us, r.finish_us), rid
        assert s.cached_tokens == r.cached_tokens and s.output_tokens == r.output_tokens == by_rid[rid][1]
        hits += s.cached_tokens
        ttft, e2e, usage = seen[rid]
        assert usage["completion_tokens"] == by_rid[rid][1]
        assert usage["prompt_tokens_details"]["cached_tokens"] == s.cached_tokens
        # Causality across the wire: a client cannot see a token before the twin delivers it.
        assert ttft >= (s.first_token_us - s.arrival_us) / SPEED / 1e6 - 1e-6, rid
        assert e2e >= (s.last_token_us - s.arrival_us) / SPEED / 1e6 - 1e-6, rid
    assert hits >= 64  # the shared prefix was served from the cache at least once


def test_metrics_show_queues_and_kv_usage_while_busy():
    config = engine_config(max_num_seqs=1)
    server = start_twin(config, speed=2.0)

    def gauge(text: str, name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    async def scenario(url: str) -> list[tuple[float, float, float]]:
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [
                {
                    "model": "twin",
                    "prompt": list(range(k * 100, k * 100 + 100)),
                    "max_tokens": 40,
                    "ignore_eos": True,
                }
                for k in range(3)
            ]  # distinct prompts: no prefix-cache hits, so every step's tokens are known
            tasks = [asyncio.create_task(client.post(url + "/v1/completions", json=b)) for b in bodies]
            samples = []
            while not all(t.done() for t in tasks):
                text = (await client.get(url + "/metrics")).text
                samples.append(
                    tuple(
                        gauge(text, n)
                        for n in (
                            "vllm:num_requests_running",
                            "vllm:num_requests_waiting",
                            "vllm:kv_cache_usage_perc",
                        )
                    )
                )
                await asyncio.sleep(0.02)
            assert all(t.result().status_code == 200 for t in tasks)
            text = (await client.get(url + "/metrics")).text
            samples.append(
                tuple(gauge(text, n) for n in ("vllm:num_requests_running", "vllm:num_requests_waiting"))
            )
            assert (
                gauge(text, "vllm:iteration_tokens_total_count") == 3 * 40
            )  # 1 prefill + 39 decode steps each
            assert gauge(text, "vllm:iteration_tokens_total_sum") == 3 * (100 + 39)
            return samples

    with server as url:
        samples = asyncio.run(scenario(url))
    assert any(s[0] == 1 and s[1] == 2 and s[2] > 0 for s in samples[:-1]), samples
    assert all(s[0] <= 1 for s in samples)  # max_num_seqs = 1
    assert samples[-1] == (0.0, 0.0)


def test_server_thread_stops_listening_on_exit():
    server = start_twin(engine_config())
    with server as url:
        assert httpx.get(url + "/health").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def test_cluster_twin_routes_requests_over_instances():
    from blis_cal.simulate.cluster import PolicyConfig

    config = engine_config()
    policy = PolicyConfig().with_overrides(instances=2, routing="least-loaded")
    model = BlackboxModel(ALPHA, BETA)
    twin = twin_config_for(config, model_name="twin", speed=SPEED, keep_served_log=True)
    server = TwinServerThread(lambda: simulated_twin(config, model, twin, policy))
    with server as url:
        seen = asyncio.run(send_all(url, prompts()[:8]))
        instances = server.engine.sim.instances
        assert len(instances) == 2
        assert sum(inst.stats.steps for inst in instances) > 0 and all(inst.stats.steps for inst in instances)
    assert len(seen) == 8 and all(usage["completion_tokens"] > 0 for *_, usage in seen.values())
