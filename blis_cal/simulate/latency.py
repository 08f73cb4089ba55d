"""Step-time models: how long one engine step takes, and the per-request delays around it.

A model answers three questions, all in integer µs:
- `queue_delay_us(input_len)`: from a request's arrival (send) to its joining the waiting queue;
- `step_time_us(batch)`: one engine step computing `batch`;
- `output_delay_us()`: from the end of the step that produced a token to the client receiving it.

Models are a registry (`latency_models`); the CLI's `--latency-model` values come from it.

"blackbox" (BLIS α/β, blis-formats.md §7), with P = prefill tokens computed in the step after prefix-cache
hits and D = decode tokens in the step:
    queue delay = int(α0 + α1·input_len)      output delay = int(α2)
    step time   = int(β0 + β1·P + β2·D + β3·Cp + β10·(Pa − Ph) + β44·Ph + β4·(Cd − Cs) + β9·Cs + β5·Np + β6·Nd
                      + [P = 0]·(max(0, β8 − β7·Nd) + β(10+min(Nd, 32)) + β43·max(0, Nd − 32) for Nd ≥ 1))
where the terms beyond β2 are ours (BLIS's published entries have three betas and these default to 0):
Cp = prefill_context_tokens (tokens already in the KV cache before each prefill chunk: attention over the
cached prefix), Pa = prefill_attention_pairs (Σ over prefill chunks of the (query, key) pairs their causal
attention computes, `attention_pairs`: the cost growing with the square of a prompt), Ph =
prefill_cached_pairs (those of Pa pairing a chunk's tokens with its request's prefix-cache hits), Cd =
decode_context_tokens (Σ context length of the decoding requests: attention reads), Cs =
shared_context_tokens (≤ Cd: tokens of prefix-cached blocks several running requests hold, past the first
holder; vLLM keeps one copy, which a step may read at another price), Np = prefill requests starting in
the step (per-sequence setup: a later chunk of a chunked prefill is not counted again), Nd = decode requests
(per-sequence overheads); the β7/β8 term is a floor under pure-decode steps: with no prefill,
each decoding request short of k = β8/β7 adds β7 (with β7 = β2 such a step costs as if k decoded: it is bound
by reading the weights, not by computing its tokens; the roofline's knee), while a step with a prefill is
compute-bound and pays every decode in full. β11–β43, the only terms that may be negative, are offsets of
pure-decode steps of 1–32 requests (larger ones take the offset of 32, and β43 more per request past 32: the
table's growth carried on, steeper or flatter than the line): what a line and a floor cannot follow
(vLLM's CPU build runs a step of 2 decoding requests ~1.4 ms slower than one of 1 or 3, and its steps grow
more slowly past 8 than a line through the smaller ones; on GPUs vLLM pads decode batches to CUDA-graph
sizes).
β9 defaults to β4 when an entry has fewer than ten betas (shared
tokens then cost what any context token does, as before the term existed); β10 is 0 when an entry has fewer
than eleven, the offsets are 0 where an entry has none (entries of the fifteenth and sixteenth sessions
have eight), β43 is 0 where an entry has 43 or fewer (past 32 requests a step grows by the line alone), and
β44 is β10 where an entry has 44 or fewer (a pair with a cached token costs what any pair does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blis_cal.errors import ConfigError
from blis_cal.registry import Registry

if TYPE_CHECKING:
    from blis_cal.simulate.coefficients import FitCoverage

latency_models: Registry[type[LatencyModel]] = Registry("latency model")

BATCH_TABLE_SIZES = 32  # batch sizes of the pure-decode steps with an offset of their own
BETA_TERMS = (
    "constant",
    "prefill_tokens",
    "decode_tokens",
    "prefill_context_tokens",
    "decode_context_tokens",
    "prefill_starts",  # requests whose prefill starts in the step (not a chunked prompt's later chunks)
    "decode_requests",
    "decode_requests_under_floor",
    "pure_decode_floor",
    "shared_context_tokens",
    "prefill_attention_pairs",
    *(f"pure_decode_step_of_{n}" for n in range(1, BATCH_TABLE_SIZES + 1)),
    f"pure_decode_growth_past_{BATCH_TABLE_SIZES}",
    "prefill_cached_pairs",
)
BATCH_TABLE = BETA_TERMS.index("pure_decode_step_of_1")  # β11-β42 (β43: past them)
OFFSET_TERMS = range(
    BATCH_TABLE, BATCH_TABLE + BATCH_TABLE_SIZES + 1
)  # β11-β43: the only signed coefficients
PAST_TABLE = BATCH_TABLE + BATCH_TABLE_SIZES  # β43
PAIRS_TERM = BETA_TERMS.index("prefill_attention_pairs")  # β10
CACHED_PAIRS_TERM = BETA_TERMS.index("prefill_cached_pairs")  # β44


def attention_pairs(new_tokens: int, cached_tokens: int) -> int:
    """(query, key) pairs of causal attention for `new_tokens` computed after `cached_tokens` already in KV."""
    return new_tokens * cached_tokens + new_tokens * (new_tokens - 1) // 2


@dataclass(frozen=True, slots=True)
class StepBatch:
    """What one engine step computes (the step-time model's input)."""

    num_prefill_tokens: int  # prompt tokens computed this step, after prefix-cache hits
    num_decode_tokens: int
    num_prefill_reqs: int
    num_decode_reqs: int
    prefill_context_tokens: int  # Σ tokens already in KV before each prefill chunk
    decode_context_tokens: int  # Σ context length (tokens in KV) of decoding requests
    # Σ over prefill chunks of attention_pairs(chunk tokens, tokens in KV before the chunk).
    prefill_attention_pairs: int = 0
    # KV tokens in blocks several running requests hold (prefix-cache hits), counted past the first holder.
    shared_context_tokens: int = 0
    # Of prefill_attention_pairs, those of a chunk's tokens with its request's prefix-cache hits.
    prefill_cached_pairs: int = 0
    # Of num_prefill_reqs, chunks continuing a prefill an earlier step began (admitted then: no setup now).
    continued_prefill_reqs: int = 0


@dataclass
class LatencyOptions:
    """Everything a model may be built from (CLI flags); each model takes what it needs."""

    alpha: tuple[float, ...] | None = None
    beta: tuple[float, ...] | None = None
    model: str = ""
    gpu: str = ""
    tp: int = 1
    vllm_version: str | None = None
    coeffs_path: str | None = None
    model_config: str | None = None  # roofline: HF config.json (or its folder)
    hardware_config: str | None = None  # roofline: hardware_config.json


class LatencyModel:
    """Interface of every step-time model."""

    name = ""
    # The batch sizes and contexts the traces the coefficients were fitted on decoded, when their entry says
    # (calibrate notes traces beyond them); None when unknown.
    fit_coverage: FitCoverage | None = None

    def queue_delay_us(self, input_len: int) -> int:
        raise NotImplementedError

    def step_time_us(self, batch: StepBatch) -> int:
        raise NotImplementedError

    def output_delay_us(self) -> int:
        raise NotImplementedError

    def decode_only_step_us(
        self, num_decode: int, decode_context_tokens: int, shared_context_tokens: int = 0
    ) -> int:
        """Step time of a pure-decode batch (hot path when jumping over decode steps)."""
        return self.step_time_us(
            StepBatch(0, num_decode, 0, num_decode, 0, decode_context_tokens, 0, shared_context_tokens)
        )

    def describe(self) -> dict:
        """JSON-able description for run summaries."""
        return {"latency_model": self.name}

    @classmethod
    def from_options(cls, opts: LatencyOptions) -> LatencyModel:
        raise NotImplementedError


def check_coefficients(
    name: str,
    values: tuple[float, ...] | list[float],
    min_len: int,
    max_len: int,
    signed: range = range(0),
) -> tuple[float, ...]:
    """Finite, non-negative (but those at indices in `signed`), right count; raises ConfigError naming the
    offending value."""
    values = tuple(float(v) for v in values)
    if not min_len <= len(values) <= max_len:
        want = str(min_len) if min_len == max_len else f"{min_len} to {max_len}"
        raise ConfigError(f"{name} needs {want} coefficients, got {len(values)}: {list(values)}")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ConfigError(f"{name}[{i}] is {v}; coefficients must be finite numbers")
        if v < 0 and i not in signed:
            which = (
                f" (only {name}[{signed.start}:{signed.stop}], offsets, may be negative)" if signed else ""
            )
            raise ConfigError(
                f"{name}[{i}] is {v}; coefficients must be >= 0{which}: times cannot be negative"
            )
    return values


@latency_models.register("blackbox")
class BlackboxModel(LatencyModel):
    """BLIS α/β linear model (see the module docstring for the terms)."""

    name = "blackbox"

    def __init__(self, alpha: tuple[float, ...] | list[float], beta: tuple[float, ...] | list[float]) -> None:
        self.alpha = check_coefficients("alpha", alpha, 3, 3)
        self.beta = check_coefficients("beta", beta, 3, len(BETA_TERMS), signed=OFFSET_TERMS)
        b = list(self.beta + (0.0,) * (len(BETA_TERMS) - len(self.beta)))
        # Entries from before a term: a shared prefix token costs what any context token does (β9 = β4), a
        # pair with a cached token what any pair does (β44 = β10).
        if len(self.beta) <= 9:
            b[9] = b[4]
        if len(self.beta) <= CACHED_PAIRS_TERM:
            b[CACHED_PAIRS_TERM] = b[PAIRS_TERM]
        self._b = tuple(b)
        self._out = int(self.alpha[2])

    def queue_delay_us(self, input_len: int) -> int:
        return int(self.alpha[0] + self.alpha[1] * input_len)

    def step_time_us(self, batch: StepBatch) -> int:
        b = self._b
        step = int(
            b[0]
            + b[1] * batch.num_prefill_tokens
            + b[2] * batch.num_decode_tokens
            + b[3] * batch.prefill_context_tokens
            + b[PAIRS_TERM] * (batch.prefill_attention_pairs - batch.prefill_cached_pairs)
            + b[CACHED_PAIRS_TERM] * batch.prefill_cached_pairs
            + self._context_us(batch.decode_context_tokens, batch.shared_context_tokens)
            + b[5] * (batch.num_prefill_reqs - batch.continued_prefill_reqs)
            + b[6] * batch.num_decode_reqs
            + (self._pure_decode_us(batch.num_decode_reqs) if batch.num_prefill_tokens == 0 else 0.0)
        )
        return max(step, 0)  # a negative batch-size offset never makes a step take negative time

    def decode_only_step_us(
        self, num_decode: int, decode_context_tokens: int, shared_context_tokens: int = 0
    ) -> int:
        b = self._b
        step = int(
            b[0]
            + b[2] * num_decode
            + self._context_us(decode_context_tokens, shared_context_tokens)
            + b[6] * num_decode
            + self._pure_decode_us(num_decode)
        )
        return max(step, 0)

    def _pure_decode_us(self, num_decode: int) -> float:
        """What a step without prefill adds: the floor, and the offset of its batch size."""
        b = self._b
        offset = b[BATCH_TABLE + min(num_decode, BATCH_TABLE_SIZES) - 1] if num_decode >= 1 else 0.0
        past = b[PAST_TABLE] * max(num_decode - BATCH_TABLE_SIZES, 0)
        return max(0.0, b[8] - b[7] * num_decode) + offset + past

    def _context_us(self, context: int, shared: int) -> float:
        """β4 per context token of the decoding requests, β9 instead for the shared ones past their first."""
        shared = min(shared, context)
        return self._b[4] * (context - shared) + self._b[9] * shared

    def output_delay_us(self) -> int:
        return self._out

    def describe(self) -> dict:
        return {"latency_model": self.name, "alpha": list(self.alpha), "beta": list(self.beta)}

    @classmethod
    def from_options(cls, opts: LatencyOptions) -> BlackboxModel:
        if opts.alpha is not None and opts.beta is not None:
            return cls(opts.alpha, opts.beta)
        from blis_cal.simulate.coefficients import load_coefficients

        if not opts.model:
            raise ConfigError(
                "the blackbox model needs --alpha and --beta, or --model/--gpu/--tp to look them up"
            )
        coeffs = load_coefficients(opts.coeffs_path, opts.model, opts.gpu, opts.tp, opts.vllm_version)
        model = cls(
            opts.alpha if opts.alpha is not None else coeffs.alpha,
            opts.beta if opts.beta is not None else coeffs.beta,
        )
        model.fit_coverage = coeffs.fit_coverage
        return model


def build_latency_model(name: str, opts: LatencyOptions) -> LatencyModel:
    """The registered model `name` built from `opts` (ConfigError listing allowed names if unknown)."""
    return latency_models.get(name).from_options(opts)
