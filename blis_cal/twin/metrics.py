"""The twin's /metrics: Prometheus text with vLLM 0.32's metric names, labels and histogram buckets.

Names, help strings and buckets are those a real vLLM 0.32 server emits (see the `/metrics` dumps in
`shared/traces/vllm-cpu-tiny/*.raw.jsonl`); labels are `engine="0"` and `model_name`, sorted as
prometheus_client prints them. Latencies are wall-clock seconds, as the client sees them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TOKEN_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
ITERATION_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out, cumulative = [], 0
        for upper, n in zip(self.buckets, self.counts, strict=True):
            cumulative += n
            out.append(f"{name}_bucket{_labels({**labels, 'le': str(upper)})} {float(cumulative)}")
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {float(self.count)}")
        out.append(f"{name}_count{_labels(labels)} {float(self.count)}")
        out.append(f"{name}_sum{_labels(labels)} {float(self.total)}")
        return out


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{labels[k]}"' for k in sorted(labels)) + "}"


_HELP = {
    "vllm:num_requests_running": ("gauge", "Number of requests in model execution batches."),
    "vllm:num_requests_waiting": ("gauge", "Number of requests waiting to be processed."),
    "vllm:kv_cache_usage_perc": ("gauge", "KV-cache usage. 1 means 100 percent usage."),
    "vllm:prefix_cache_queries": ("counter", "Prefix cache queries, in terms of number of queried tokens."),
    "vllm:prefix_cache_hits": ("counter", "Prefix cache hits, in terms of number of cached tokens."),
    "vllm:num_preemptions": ("counter", "Cumulative number of preemption from the engine."),
    "vllm:prompt_tokens": ("counter", "Number of prefill tokens processed."),
    "vllm:prompt_tokens_cached": ("counter", "Number of cached prompt tokens (local prefix cache hits)."),
    "vllm:generation_tokens": ("counter", "Number of generation tokens processed."),
    "vllm:request_success": ("counter", "Count of successfully processed requests."),
    "vllm:request_prompt_tokens": ("histogram", "Number of prefill tokens processed."),
    "vllm:request_generation_tokens": ("histogram", "Number of generation tokens processed."),
    "vllm:iteration_tokens_total": ("histogram", "Histogram of number of tokens per engine_step."),
    "vllm:time_to_first_token_seconds": ("histogram", "Histogram of time to first token in seconds."),
    "vllm:inter_token_latency_seconds": ("histogram", "Histogram of inter-token latency in seconds."),
    "vllm:e2e_request_latency_seconds": ("histogram", "Histogram of e2e request latency in seconds."),
    "vllm:request_queue_time_seconds": ("histogram", "Histogram of time spent in WAITING phase for request."),
    "vllm:cache_config_info": ("gauge", "Information of the LLMEngine CacheConfig"),
}


class TwinMetrics:
    """Counters and histograms the server updates as requests finish; gauges are read at scrape time."""

    def __init__(self, model_name: str, cache_config: dict[str, str]) -> None:
        self.labels = {"engine": "0", "model_name": model_name}
        self.cache_config = cache_config
        self.counters = {
            name: 0.0
            for name in (
                "vllm:prefix_cache_queries",
                "vllm:prefix_cache_hits",
                "vllm:num_preemptions",
                "vllm:prompt_tokens",
                "vllm:prompt_tokens_cached",
                "vllm:generation_tokens",
            )
        }
        self.success = dict.fromkeys(FINISH_REASONS, 0.0)
        self.histograms = {
            "vllm:request_prompt_tokens": Histogram(TOKEN_BUCKETS),
            "vllm:request_generation_tokens": Histogram(TOKEN_BUCKETS),
            "vllm:iteration_tokens_total": Histogram(ITERATION_BUCKETS),
            "vllm:time_to_first_token_seconds": Histogram(TTFT_BUCKETS),
            "vllm:inter_token_latency_seconds": Histogram(ITL_BUCKETS),
            "vllm:e2e_request_latency_seconds": Histogram(E2E_BUCKETS),
            "vllm:request_queue_time_seconds": Histogram(E2E_BUCKETS),
        }

    def record_step(self, tokens: int) -> None:
        """One engine step that scheduled `tokens` tokens (prefill + decode)."""
        self.histograms["vllm:iteration_tokens_total"].observe(tokens)

    def record_finished(
        self,
        *,
        finish_reason: str,
        prompt_tokens: int,
        cached_tokens: int,
        generation_tokens: int,
        preemptions: int,
        ttft_s: float,
        e2e_s: float,
        queue_s: float,
        itls_s: list[float],
    ) -> None:
        c = self.counters
        c["vllm:prefix_cache_queries"] += prompt_tokens
        c["vllm:prefix_cache_hits"] += cached_tokens
        c["vllm:prompt_tokens_cached"] += cached_tokens
        c["vllm:prompt_tokens"] += prompt_tokens
        c["vllm:generation_tokens"] += generation_tokens
        c["vllm:num_preemptions"] += preemptions
        self.success[finish_reason] = self.success.get(finish_reason, 0.0) + 1
        h = self.histograms
        h["vllm:request_prompt_tokens"].observe(prompt_tokens)
        h["vllm:request_generation_tokens"].observe(generation_tokens)
        h["vllm:time_to_first_token_seconds"].observe(ttft_s)
        h["vllm:e2e_request_latency_seconds"].observe(e2e_s)
        h["vllm:request_queue_time_seconds"].observe(queue_s)
        for gap in itls_s:
            h["vllm:inter_token_latency_seconds"].observe(gap)

    def render(self, *, running: int, waiting: int, kv_usage: float) -> str:
        """The /metrics body (text exposition format 0.0.4)."""
        lines: list[str] = []

        def head(name: str, exposed: str | None = None) -> None:
            kind, text = _HELP[name]
            lines.append(f"# HELP {exposed or name} {text}")
            lines.append(f"# TYPE {exposed or name} {kind}")

        lab = _labels(self.labels)
        for name, value in (
            ("vllm:num_requests_running", running),
            ("vllm:num_requests_waiting", waiting),
            ("vllm:kv_cache_usage_perc", kv_usage),
        ):
            head(name)
            lines.append(f"{name}{lab} {float(value)}")
        for name, value in self.counters.items():
            head(name, f"{name}_total")
            lines.append(f"{name}_total{lab} {float(value)}")
        head("vllm:request_success", "vllm:request_success_total")
        for reason, value in self.success.items():
            lines.append(
                f"vllm:request_success_total{_labels({**self.labels, 'finished_reason': reason})} {value}"
            )
        for name, hist in self.histograms.items():
            head(name)
            lines += hist.lines(name, self.labels)
        head("vllm:cache_config_info")
        lines.append(f"vllm:cache_config_info{_labels({**self.cache_config, 'engine': '0'})} 1.0")
        return "\n".join(lines) + "\n"
