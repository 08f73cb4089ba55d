"""Simulator requests: the immutable input (`SimRequest`) and the per-request engine state (`ReqState`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SimRequest:
    """One request as the simulator sees it.

    `segments` describes the prompt as content segments (key, length): an identical key at the same position
    means identical tokens (as `WorkloadRequest.context`), so full KV blocks are hashed by this content chain
    and requests sharing a prefix share cache blocks. Lengths must sum to `input_len`.
    """

    request_id: int
    arrival_us: int
    input_len: int  # whole prompt, prefix included
    output_len: int
    segments: tuple[tuple[str, int], ...]
    slo_class: str = ""
    tenant_id: str = ""
    priority: int = 0
    session_id: str = ""
    round_index: int = 0
    # Leading prompt tokens the server held in its prefix cache before the run began (e.g. a trace's recorded
    # cached_tokens that no earlier request explains): they are cached, evictable, when the request is added.
    warm_tokens: int = 0


NEVER_PRIVATE = 1 << 62


def output_key(request_id: int) -> str:
    """Content key of the tokens a request generates (follow-ups carry them as ("out:<id>", k))."""
    return f"out:{request_id}"


class ReqState:
    """Mutable engine state of one request (vLLM's `Request`): progress, KV hashes and timestamps."""

    __slots__ = (
        "block_hashes",
        "cached_tokens",
        "finish_us",
        "first_token_us",
        "instance",
        "lazy_base",
        "num_computed",
        "num_hit",
        "num_output",
        "num_preemptions",
        "output_len",
        "private_from",
        "prompt_len",
        "queued_us",
        "req",
        "request_id",
        "running_seq",
        "scheduled_us",
        "status",
    )

    def __init__(self, req: SimRequest) -> None:
        self.req = req
        self.request_id = req.request_id
        self.prompt_len = req.input_len
        self.output_len = req.output_len
        self.num_computed = 0  # vLLM num_computed_tokens: tokens whose KV is (being) written
        self.num_output = 0  # tokens sampled so far
        self.block_hashes: list[int] = []  # hashes of full blocks of prompt + output, computed lazily
        # First token position whose content no other request has (simulate() knows all requests up front):
        # blocks past it can only ever be hit by this request itself, so they skip the hash chain.
        self.private_from = NEVER_PRIVATE
        self.num_preemptions = 0
        self.cached_tokens = -1  # prefix-cache hit at first admission; -1 = not admitted yet
        self.num_hit = 0  # prefix-cache hit at its latest admission (after a preemption: its own blocks too)
        self.instance = -1
        self.queued_us = -1
        self.scheduled_us = -1
        self.first_token_us = -1
        self.finish_us = -1
        self.lazy_base = -1  # fast path: decode round at which this request joined the lazy set (-1 = not)
        self.running_seq = 0  # order of entry into the running queue (vLLM keeps running as a list)
        self.status = "pending"  # pending | waiting | running | finished | rejected

    @property
    def num_tokens(self) -> int:
        """vLLM `request.num_tokens`: prompt plus sampled output tokens."""
        return self.prompt_len + self.num_output
