"""One vLLM V1 engine instance: the scheduler loop of v1/core/sched/scheduler.py over a block KV cache.

A step is scheduled at its start (`start_step`) and its outputs applied at its end (`finish_step`):
- running requests first, in running order: each asks for num_tokens − num_computed tokens (1 when
  decoding, the rest of the prompt when a chunked prefill continues), capped by the long-prefill threshold
  and the remaining token budget; if its KV slots cannot be allocated, the policy's victim (FCFS: the last
  running request) is preempted (blocks freed, progress reset, back to the waiting queue) until it fits or
  it preempted itself;
- then, only if nothing was preempted this step, waiting requests in policy order while budget and seats
  (max_num_seqs) last: prefix-cache hit, chunk = min(rest, budget), admitted only if the whole sequence fits
  in free blocks now (vLLM scheduler_reserve_full_isl) — a request that does not fit stops admission;
- at the end of the step every request whose computed tokens reach its known tokens samples one token (the
  step that completes a prompt emits the first token); a request finishes at its output length and frees
  its blocks.

Fast path (`jump_decode`): decoding requests are kept lazily. Their progress is implied by a round counter
`G` (one round per step), a round pops one KV block per decoder crossing a block boundary (counted by round
mod block size; the blocks wait in the KV manager's decode pool until their requests leave the lazy set)
and their finish round is known in advance, so a step costs O(prefills + finishes) instead of O(running
requests). When the budget or the free blocks cannot cover every running request, the step falls back to
the explicit loop above (everything materialised first). Runs of pure-decode steps with nothing due (no
arrival, no finish, no admission possible, blocks available) are jumped over in a tight loop. Results are
identical to stepping one by one (tests compare both): only which popped block a decoder ends up holding
differs, which relabels blocks but changes no hash, count or queue position; hash registration of
decode-filled blocks is deferred until the request leaves the lazy set (their content is the request's own
output, so nothing else can hit them before).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from blis_cal.simulate.kv_cache import KVCacheManager, cdiv
from blis_cal.simulate.latency import LatencyModel, StepBatch, attention_pairs
from blis_cal.simulate.metrics import EngineStats
from blis_cal.simulate.request import ReqState
from blis_cal.simulate.scheduler import WaitingQueue, scheduler_policies

# What start_step did.
STEP = 0  # scheduled one step: value = its duration (µs)
JUMPED = 1  # completed whole pure-decode steps: value = when the next step starts
IDLE = 2  # nothing to schedule and nothing waiting
EMPTY = 3  # nothing scheduled although work remains (a step that preempted its only request)


@dataclass(frozen=True)
class InstanceLimits:
    block_size: int
    num_gpu_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_prefix_caching: bool
    long_prefill_token_threshold: int
    scheduler: str
    long_prefill_token_threshold_adaptive: bool = False
    priority: str = "constant"  # priority policy name handed to the waiting queue (cluster schedulers)
    jump_decode: bool = True


LazyTokenCallback = Callable[[ReqState, int, int], None]  # (state, token index, step end µs)
# on_step(instance, start µs, batch, used blocks, free blocks): after each step is scheduled (tests, tracing).
StepCallback = Callable[[int, int, StepBatch, int, int], None]


class Instance:
    """Scheduler + KV cache of one engine; the engine (engine.py) owns time and events."""

    def __init__(self, index: int, limits: InstanceLimits, model: LatencyModel) -> None:
        self.index = index
        self.limits = limits
        self.model = model
        self.kv = KVCacheManager(
            limits.num_gpu_blocks, limits.block_size, limits.enable_prefix_caching, limits.max_model_len
        )
        self.waiting: WaitingQueue = scheduler_policies.get(limits.scheduler)(limits.priority)
        self.running: list[ReqState] = []
        self.busy = False  # a step is scheduled or in flight
        self.in_flight = 0  # routed here and not finished
        self.stats = EngineStats()
        self.last_batch = StepBatch(0, 0, 0, 0, 0, 0)
        self.empty_steps = 0  # consecutive steps that scheduled nothing (more than one means stuck)
        self.token_cb: LazyTokenCallback | None = None  # tokens of lazy decoders (explicit ones are returned)
        self.step_cb: StepCallback | None = None
        self._scheduled: list[tuple[ReqState, int]] = []
        self._running_seq = 0
        # Fast-path state.
        self._fast = limits.jump_decode
        self.explicit: list[ReqState] = []  # running requests not in the lazy decode set, in running order
        self.decoders: dict[int, ReqState] = {}  # lazy decoders (request_id -> state), join order
        self.round = 0  # G: decode rounds done by the lazy set
        self._ctx_sum = 0  # Σ num_computed of lazy decoders
        # Lazy decoders crossing a block boundary in rounds ≡ i (mod block size): how many need a new block.
        self._crossings = [0] * limits.block_size
        self._finish_rounds: dict[int, list[ReqState]] = {}
        self._step_decoders = 0  # lazy decoders that took part in the step in flight
        # Whether jumps may complete requests (no finish callback to honour); the engine then reads
        # (state, step end µs) of those from `jump_finished`.
        self.absorb_finishes = False
        self.jump_finished: list[tuple[ReqState, int]] = []
        # Requests whose output another request's prompt contains: their filled blocks must be registered as
        # they fill (another request may look them up), so they are never lazy. Shared with the engine.
        self.out_refs: set[int] = set()
        self._fallback = False  # the step in flight ran the explicit loop

    # ------------------------------------------------------------------------------------------ queries
    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def never_fits(self, input_len: int, output_len: int) -> str:
        """Why a request can never run here ('' if it can)."""
        lim = self.limits
        if input_len + output_len > lim.max_model_len:
            # vLLM's API rejects prompt + max_tokens > max_model_len with HTTP 400.
            return f"prompt {input_len} + output {output_len} tokens exceed max_model_len {lim.max_model_len}"
        need = cdiv(input_len + output_len - 1, lim.block_size)
        if need > self.kv.num_blocks:
            return f"needs {need} KV blocks of {lim.block_size} tokens; the cache holds {self.kv.num_blocks}"
        return ""

    def num_output(self, state: ReqState) -> int:
        """Tokens a request has sampled so far (lazy decoders' progress is implied by the round counter)."""
        if state.request_id in self.decoders and self.decoders[state.request_id] is state:
            return state.num_output + self.round - state.lazy_base
        return state.num_output

    # ------------------------------------------------------------------------------------------ queue
    def enqueue(self, state: ReqState, now_us: int) -> None:
        state.status = "waiting"
        state.queued_us = now_us
        self.waiting.add(state)

    # ------------------------------------------------------------------------------------------ step
    def start_step(self, now_us: int, horizon_us: float, limit_us: float) -> tuple[int, int]:
        """Schedule the step starting at `now_us`. Pure-decode steps starting before `horizon_us` (the next
        event) and ending by `limit_us` (the live engine's run_until) may be completed at once.
        Returns (STEP, duration) | (JUMPED, next start) | (IDLE|EMPTY, 0)."""
        if self._fast:
            result = self._fast_start(now_us, horizon_us, limit_us)
            if result is not None:
                return result
            self._materialize_all()
            self._fallback = True
        duration = self._explicit_start(now_us)
        if duration is None:
            return (EMPTY, 0) if self.has_work() else (IDLE, 0)
        return STEP, duration

    def finish_step(self, end_us: int) -> tuple[list[ReqState], list[ReqState]]:
        """Apply the step's outputs at `end_us`: returns (explicit requests that sampled a token, finished
        requests). Lazy decoders' tokens go to `token_cb`."""
        if not self._fast:
            return self._explicit_finish()
        if self._fallback:
            self._fallback = False
            sampled, finished = self._explicit_finish()
            self.explicit = list(self.running)
            self._join_decoders()
            return sampled, finished
        return self._fast_finish(end_us)

    # ------------------------------------------------------------------------------------------ explicit
    def _explicit_start(self, now_us: int) -> int | None:
        lim = self.limits
        kv = self.kv
        running = self.running
        waiting = self.waiting
        budget = lim.max_num_batched_tokens
        threshold = self._prefill_cap()
        scheduled: list[tuple[ReqState, int]] = []
        preempted = False
        max_len = lim.max_model_len

        index = 0
        while index < len(running) and budget > 0:
            state = running[index]
            num_new = state.num_tokens - state.num_computed
            if 0 < threshold < num_new:
                num_new = threshold
            num_new = min(num_new, budget, max_len - state.num_computed - 1)
            if num_new <= 0:
                index += 1
                continue
            while True:
                if kv.allocate_slots(state, num_new):
                    ok = True
                    break
                ok = False
                victim_index = waiting.victim(running)
                victim = running.pop(victim_index)
                if victim_index < index:
                    index -= 1
                for i, (other, tokens) in enumerate(scheduled):
                    if other is victim:  # vLLM: un-schedule a victim already scheduled this step
                        del scheduled[i]
                        budget += tokens
                        break
                self._preempt(victim)
                preempted = True
                if victim is state:
                    break
            if not ok:
                break
            scheduled.append((state, num_new))
            budget -= num_new
            index += 1

        if not preempted:
            self._admit(now_us, budget, threshold, scheduled)
        if not scheduled:
            self._scheduled = []
            self.empty_steps += 1
            return None
        self.empty_steps = 0
        return self._launch(now_us, scheduled, 0, 0)

    def _prefill_cap(self) -> int:
        """vLLM's long-prefill cap on a chunk this step (0: none): only when another request could be starved;
        with --long-prefill-token-threshold-adaptive, at least a fair share of the budget."""
        lim = self.limits
        eligible = len(self.running) + len(self.waiting)
        threshold = lim.long_prefill_token_threshold if eligible > 1 else 0
        if threshold and lim.long_prefill_token_threshold_adaptive:
            threshold = max(threshold, lim.max_num_batched_tokens // eligible)
        return threshold

    def _admit(self, now_us: int, budget: int, threshold: int, scheduled: list[tuple[ReqState, int]]) -> None:
        """The waiting phase: admit in policy order while budget, seats and KV blocks allow."""
        lim = self.limits
        kv = self.kv
        waiting = self.waiting
        running = self.running
        max_seqs = lim.max_num_seqs
        stats = self.stats
        while budget > 0 and len(waiting) > 0 and len(running) < max_seqs:
            state = waiting.peek()
            hit = kv.get_computed_blocks(state)
            num_hit = len(hit) * lim.block_size
            num_new = state.num_tokens - num_hit
            if 0 < threshold < num_new:
                num_new = threshold
            num_new = min(num_new, budget)
            if not kv.allocate_slots(state, num_new, hit, full_sequence_must_fit=True):
                break
            waiting.pop()
            state.num_computed = state.num_hit = num_hit
            state.status = "running"
            self._running_seq += 1
            state.running_seq = self._running_seq
            running.append(state)
            if self._fast:
                self.explicit.append(state)
            if state.scheduled_us < 0:
                state.scheduled_us = now_us
                state.cached_tokens = num_hit
                stats.prompt_tokens_admitted += state.prompt_len
                stats.prefix_hit_tokens += num_hit
            scheduled.append((state, num_new))
            budget -= num_new

    def _launch(self, now_us: int, scheduled: list[tuple[ReqState, int]], d_reqs: int, d_ctx: int) -> int:
        """Build the step's batch (lazy decoders given as counts), advance progress, return the duration."""
        p_tokens = p_reqs = p_continued = p_ctx = p_pairs = p_cached_pairs = 0
        for state, num_new in scheduled:
            if num_new == 1 and state.num_computed >= state.prompt_len:
                d_reqs += 1
                d_ctx += state.num_computed
            else:
                p_tokens += num_new
                p_reqs += 1
                p_continued += state.num_computed > state.num_hit  # a later chunk (vLLM chunked prefill)
                p_ctx += state.num_computed
                p_pairs += attention_pairs(num_new, state.num_computed)
                p_cached_pairs += num_new * state.num_hit
            state.num_computed += num_new  # vLLM _update_after_schedule
        self._scheduled = scheduled
        batch = StepBatch(
            p_tokens,
            d_reqs,
            p_reqs,
            d_reqs,
            p_ctx,
            d_ctx,
            p_pairs,
            self.kv.shared_tokens,
            p_cached_pairs,
            p_continued,
        )
        self.last_batch = batch
        self._record_step(now_us, batch)
        return max(0, self.model.step_time_us(batch))

    def _record_step(self, now_us: int, batch: StepBatch) -> None:
        stats = self.stats
        kv = self.kv
        stats.steps += 1
        stats.kv_used_block_steps += kv.num_used
        stats.kv_block_capacity_steps += kv.num_blocks
        if self.step_cb is not None:
            self.step_cb(self.index, now_us, batch, kv.num_used, kv.num_free)

    def _explicit_finish(self) -> tuple[list[ReqState], list[ReqState]]:
        sampled, finished = self._sample()
        if finished:
            self._retire(finished)
        return sampled, finished

    def _sample(self) -> tuple[list[ReqState], list[ReqState]]:
        """Explicitly scheduled requests that computed all their known tokens sample one (vLLM
        update_from_output): returns (sampled, finished at their output length), in scheduling order."""
        sampled: list[ReqState] = []
        finished: list[ReqState] = []
        for state, _ in self._scheduled:
            if state.num_computed >= state.num_tokens:
                state.num_output += 1
                sampled.append(state)
                if state.num_output >= state.output_len:
                    finished.append(state)
        self._scheduled = []
        return sampled, finished

    def _retire(self, finished: list[ReqState]) -> None:
        """Free finished requests' blocks in running order and drop them from the running queue."""
        explicit = self.explicit
        for state in finished:
            state.status = "finished"
            self.kv.free(state)
            self.kv.forget(state)
            self.running.remove(state)  # identity comparison, in C: cheaper than rebuilding the list
            if state.lazy_base < 0 and state in explicit:
                explicit.remove(state)
        self.in_flight -= len(finished)

    def _preempt(self, state: ReqState) -> None:
        """vLLM _preempt_request: free the blocks, reset progress, back to the waiting queue."""
        self.kv.remember_private(state)
        self.kv.free(state)
        state.num_computed = 0
        state.num_preemptions += 1
        state.status = "waiting"
        self.stats.preemptions += 1
        self.waiting.add_preempted(state)

    # ------------------------------------------------------------------------------------------ fast path
    def _fast_start(self, now_us: int, horizon_us: float, limit_us: float) -> tuple[int, int] | None:
        """A step with lazy decoders, or None when it needs the explicit loop (budget or blocks short)."""
        lim = self.limits
        kv = self.kv
        running = self.running
        waiting = self.waiting
        num_dec = len(self.decoders)
        budget = lim.max_num_batched_tokens
        # Jump only when no admission can happen: nothing waits, or no seat, or no budget after the decodes.
        if (
            num_dec
            and not self.explicit
            and num_dec <= budget
            and (len(waiting) == 0 or len(running) >= lim.max_num_seqs or num_dec == budget)
        ):
            jumped = self._jump(now_us, horizon_us, limit_us)
            if jumped is not None:
                return JUMPED, jumped
        threshold = self._prefill_cap()
        due = self._crossings[self.round % lim.block_size] if num_dec else 0
        need_tokens = num_dec
        need_blocks = due
        bs = lim.block_size
        max_len = lim.max_model_len
        plan: list[tuple[ReqState, int]] = []
        for state in self.explicit:
            num_new = state.num_tokens - state.num_computed
            if 0 < threshold < num_new:
                num_new = threshold
            num_new = min(num_new, max_len - state.num_computed - 1)
            if num_new <= 0:
                continue
            plan.append((state, num_new))
            need_tokens += num_new
            need_blocks += max(
                cdiv(state.num_computed + num_new, bs) - len(kv.blocks_of(state.request_id)), 0
            )
        if need_tokens > budget or need_blocks > kv.num_free:
            return None  # some running request would be cut short or need a preemption: explicit loop
        if due:
            kv.take_decode_blocks(due)
        for state, num_new in plan:
            kv.allocate_slots(state, num_new)
        self._admit(now_us, budget - need_tokens, threshold, plan)
        if not plan and not num_dec:
            self._scheduled = []
            if self.has_work():
                self.empty_steps += 1
                return EMPTY, 0
            return IDLE, 0
        self.empty_steps = 0
        self._step_decoders = num_dec
        return STEP, self._launch(now_us, plan, num_dec, self._ctx_sum)

    def _jump(self, now_us: int, horizon_us: float, limit_us: float) -> int | None:
        """Complete pure-decode rounds while nothing can differ from stepping (see the module docstring);
        returns when the next step starts, or None if not even the first round qualifies."""
        kv = self.kv
        bs = self.limits.block_size
        decode_step_us = self.model.decode_only_step_us
        crossings = self._crossings
        finish_rounds = self._finish_rounds
        num_dec = len(self.decoders)
        token_cb = self.token_cb
        step_cb = self.step_cb
        absorb = self.absorb_finishes
        capacity = kv.num_blocks
        free = kv.num_free
        t = now_us
        rounds = 0
        stats = self.stats
        pending = used_sum = 0  # rounds and Σ used blocks not yet added to the stats
        # Blocks the rounds so far popped, taken in one go before anything else touches the free queue.
        owed = 0
        g = self.round
        ctx = self._ctx_sum
        shared = kv.shared_tokens
        while True:
            if rounds and t >= horizon_us:
                break
            finishing = finish_rounds.get(g)
            if finishing is not None and not absorb:
                break  # someone must hear of the finish when it happens (follow-ups, live callbacks)
            due = crossings[g % bs]
            if due > free:
                break
            duration = decode_step_us(num_dec, ctx, shared)
            if duration < 0:
                duration = 0
            if t + duration > limit_us:
                break  # its tokens would be reported before the live clock reaches them
            if finishing is not None and t + duration >= horizon_us:
                break  # the next event (e.g. a routing snapshot) must still see these requests running
            owed += due
            free -= due
            used_sum += capacity - free
            pending += 1
            if step_cb is not None:  # the callback sees the same state as when stepping
                if owed:
                    kv.take_decode_blocks(owed)
                    owed = 0
                stats.steps += pending
                stats.kv_used_block_steps += used_sum
                stats.kv_block_capacity_steps += pending * capacity
                pending = used_sum = 0
                self.round = g
                self._ctx_sum = ctx
                batch = StepBatch(0, num_dec, 0, num_dec, 0, ctx, 0, shared)
                self.last_batch = batch
                step_cb(self.index, t, batch, capacity - free, free)
            t += duration
            g += 1
            ctx += num_dec
            rounds += 1
            if token_cb is not None:
                self.round = g
                self._decoder_tokens(t)
            if finishing is not None:
                if owed:  # before the finishing requests claim theirs and free blocks
                    kv.take_decode_blocks(owed)
                    owed = 0
                self.round = g
                self._ctx_sum = ctx
                del finish_rounds[g - 1]
                for state in finishing:
                    self._leave(state)
                finishing.sort(key=lambda s: s.running_seq)  # vLLM frees in running order
                self._retire(finishing)
                self.jump_finished += [(state, t) for state in finishing]
                ctx = self._ctx_sum
                shared = kv.shared_tokens
                num_dec = len(self.decoders)
                free = kv.num_free
                if not num_dec or len(self.waiting):
                    break  # nothing left to decode, or a freed seat / blocks may admit a waiting request
        if owed:
            kv.take_decode_blocks(owed)
        self.round = g
        self._ctx_sum = ctx
        stats.steps += pending
        stats.kv_used_block_steps += used_sum
        stats.kv_block_capacity_steps += pending * capacity
        return t if rounds else None

    def _decoder_tokens(self, end_us: int) -> None:
        token_cb = self.token_cb
        g = self.round
        for state in self.decoders.values():
            token_cb(state, state.num_output + g - state.lazy_base - 1, end_us)

    def _fast_finish(self, end_us: int) -> tuple[list[ReqState], list[ReqState]]:
        finished: list[ReqState] = []
        if self._step_decoders:
            g = self.round
            self.round = g + 1
            self._ctx_sum += self._step_decoders
            if self.token_cb is not None:
                self._decoder_tokens(end_us)
            for state in self._finish_rounds.pop(g, ()):
                self._leave(state)
                finished.append(state)
            self._step_decoders = 0
        sampled, explicit_finished = self._sample()
        if explicit_finished or finished:
            finished += explicit_finished
            finished.sort(key=lambda s: s.running_seq)  # vLLM frees in scheduling (= running) order
            self._retire(finished)
        self._join_decoders()
        return sampled, finished

    def _join_decoders(self) -> None:
        """Explicit running requests now decoding (one token to compute, past the prompt) go lazy."""
        keep: list[ReqState] = []
        bs = self.limits.block_size
        g = self.round
        for state in self.explicit:
            c = state.num_computed
            if c == state.num_tokens - 1 and c >= state.prompt_len and state.request_id not in self.out_refs:
                state.lazy_base = g
                self.decoders[state.request_id] = state
                self._ctx_sum += c
                # Round g computes position c + (g' − g): a new block when that position is a multiple of B.
                self._crossings[(g - c) % bs] += 1
                last = g + state.output_len - state.num_output - 1
                self._finish_rounds.setdefault(last, []).append(state)
            else:
                keep.append(state)
        self.explicit = keep

    def _leave(self, state: ReqState) -> None:
        """Bring a lazy decoder's progress and cache registrations up to date and drop it from the set."""
        delta = self.round - state.lazy_base
        state.num_computed += delta
        state.num_output += delta
        self._ctx_sum -= state.num_computed
        del self.decoders[state.request_id]
        self._crossings[(state.lazy_base - state.num_computed + delta) % self.limits.block_size] -= 1
        state.lazy_base = -1
        self.kv.claim_decode_blocks(state)
        if self.kv.enable_caching:
            self.kv.cache_blocks(state, state.num_computed)

    def make_explicit(self, state: ReqState) -> None:
        """Take a lazy decoder out of the lazy set (another request now refers to its output)."""
        if self.decoders.get(state.request_id) is not state:
            return
        last = state.lazy_base + state.output_len - state.num_output - 1
        self._finish_rounds[last].remove(state)
        if not self._finish_rounds[last]:
            del self._finish_rounds[last]
        self._leave(state)
        self.explicit.append(state)
        self.explicit.sort(key=lambda s: s.running_seq)

    def _materialize_all(self) -> None:
        """Leave the lazy representation entirely (before an explicit step)."""
        for state in list(self.decoders.values()):
            self._leave(state)
        self._finish_rounds.clear()
        self._ctx_sum = 0
        self.explicit = list(self.running)
