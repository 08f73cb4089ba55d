"""The simulation engine: one clock, the event heap, the instances, and the live `Simulation` API.

`simulate()` (batch) and `Simulation` (live: twin server, closed-loop drivers) are the same core.
Timing (blackbox semantics, t_a = arrival): a request joins the waiting queue at t_a + queue delay (plus
admission and routing latencies with a router); each token is delivered `output_delay_us()` after the end
of the step that produced it; TTFT = first delivery − t_a; E2E = last delivery − t_a.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

from blis_cal.errors import BlisError, ConfigError
from blis_cal.simulate import events as ev
from blis_cal.simulate.instance import EMPTY, JUMPED, STEP, Instance, InstanceLimits, StepCallback
from blis_cal.simulate.latency import LatencyModel
from blis_cal.simulate.metrics import EngineStats, RequestResult, SimRun, result_from_state, summarize
from blis_cal.simulate.request import ReqState, SimRequest, output_key
from blis_cal.simulate.router import InstanceSnapshot, Router
from blis_cal.simulate.scheduler import scheduler_policies


class SimulationError(BlisError):
    """A request or call the simulator cannot accept (bad request fields, time going backwards)."""


DEFAULT_MAX_NUM_SEQS = 256


@dataclass
class SimConfig:
    """One instance's engine settings (vLLM flags), and how many instances share the clock."""

    block_size: int = 16
    num_gpu_blocks: int = 65536
    max_num_seqs: int | None = None  # None: DEFAULT_MAX_NUM_SEQS, at most the token budget (as vLLM)
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = 0
    long_prefill_token_threshold_adaptive: bool = False  # vLLM 0.32: cap at least budget // requests
    seed: int = 42
    instances: int = 1
    scheduler: str = "fcfs"
    priority: str = "constant"  # priority policy of priority-aware schedulers (cluster/scheduling.py)
    # Fast path (instance.py): lazy decode accounting + jumps over pure-decode steps. Same results;
    # False steps every request one by one (the reference the tests compare against).
    jump_decode: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs is None:  # vLLM's EngineArgs caps a default max_num_seqs at the token budget
            budget = self.max_num_batched_tokens
            valid = isinstance(budget, int) and not isinstance(budget, bool) and budget > 0
            self.max_num_seqs = min(DEFAULT_MAX_NUM_SEQS, budget) if valid else DEFAULT_MAX_NUM_SEQS
        for name in (
            "block_size",
            "num_gpu_blocks",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "instances",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_gpu_blocks < 2:
            raise ConfigError(
                f"num_gpu_blocks must be at least 2 (vLLM keeps one null block), got {self.num_gpu_blocks}"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:  # vLLM's SchedulerConfig refuses to start
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}), as vLLM requires: lower max_num_seqs (or leave it unset: it "
                "then defaults to at most the budget) or raise the token budget"
            )
        value = self.long_prefill_token_threshold
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"long_prefill_token_threshold must be an integer >= 0, got {value!r}")
        if not isinstance(self.long_prefill_token_threshold_adaptive, bool):
            raise ConfigError(
                "long_prefill_token_threshold_adaptive must be true or false, got "
                f"{self.long_prefill_token_threshold_adaptive!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        scheduler_policies.get(self.scheduler)  # ConfigError listing the allowed policies

    def limits(self) -> InstanceLimits:
        return InstanceLimits(
            block_size=self.block_size,
            num_gpu_blocks=self.num_gpu_blocks,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
            long_prefill_token_threshold_adaptive=self.long_prefill_token_threshold_adaptive,
            scheduler=self.scheduler,
            priority=self.priority,
            jump_decode=self.jump_decode,
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_request(req: SimRequest) -> None:
    """Reject requests the engine cannot model (SimulationError naming the request and field)."""
    where = f"request {req.request_id}"
    for name in ("arrival_us", "input_len", "output_len"):
        value = getattr(req, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SimulationError(f"{where}: {name} must be an integer, got {value!r}")
    if req.arrival_us < 0:
        raise SimulationError(f"{where}: arrival_us must be >= 0, got {req.arrival_us}")
    if req.input_len < 1:
        raise SimulationError(f"{where}: input_len must be >= 1, got {req.input_len}")
    if req.output_len < 1:
        raise SimulationError(
            f"{where}: output_len must be >= 1 (vLLM needs max_tokens >= 1), got {req.output_len}"
        )
    total = 0
    for key, length in req.segments:
        if not isinstance(length, int) or length < 0:
            raise SimulationError(f"{where}: segment {key!r} has bad length {length!r}")
        total += length
    if total != req.input_len:
        raise SimulationError(f"{where}: segment lengths sum to {total}, input_len is {req.input_len}")
    if not 0 <= req.warm_tokens <= req.input_len:
        raise SimulationError(
            f"{where}: warm_tokens must be in 0..input_len ({req.input_len}), got {req.warm_tokens}"
        )


TokenCallback = Callable[[int, int, int], None]
ResultCallback = Callable[[RequestResult], None]


class Simulation:
    """A live simulation: add requests as time goes, advance the clock, get callbacks.

    on_token(request_id, token_index, delivery_us) is called when the step producing the token ends
    (delivery is then + output delay, so in the future); on_finish / on_reject get the RequestResult;
    on_step(instance, start_us, batch, used_blocks, free_blocks) follows every step's scheduling.
    """

    def __init__(
        self,
        config: SimConfig,
        model: LatencyModel,
        *,
        router: Router | None = None,
        on_token: TokenCallback | None = None,
        on_finish: ResultCallback | None = None,
        on_reject: ResultCallback | None = None,
        on_step: StepCallback | None = None,
    ) -> None:
        if router is None and config.instances != 1:
            raise ConfigError(f"{config.instances} instances need a router (routing policy); got none")
        self.config = config
        self.model = model
        self.router = router
        self.on_token = on_token
        self.on_finish = on_finish
        self.on_reject = on_reject
        self.on_step = on_step
        limits = config.limits()
        self.instances = [Instance(i, limits, model) for i in range(config.instances)]
        self._out_refs: set[int] = set()  # requests whose output some request's prompt contains
        for inst in self.instances:
            inst.token_cb = self._lazy_token if on_token is not None else None
            inst.step_cb = on_step
            inst.out_refs = self._out_refs
            inst.absorb_finishes = on_finish is None
        self._events = ev.EventQueue()
        self._states: dict[int, ReqState] = {}
        self._results: dict[int, RequestResult] = {}
        self._output_delay = model.output_delay_us()
        self._snapshots: list[InstanceSnapshot | None] = [None] * config.instances
        self._limit_us = math.inf  # run_until bound (jumps must not cross it)

    # ------------------------------------------------------------------------------------------ API
    @property
    def now_us(self) -> int:
        return self._events.now_us

    def add_request(self, req: SimRequest) -> None:
        check_request(req)
        if req.arrival_us < self.now_us:
            raise SimulationError(
                f"request {req.request_id}: arrival {req.arrival_us} µs is before the clock ({self.now_us} µs)"
            )
        if req.request_id in self._states:
            raise SimulationError(f"request id {req.request_id} was added twice")
        state = ReqState(req)
        self._states[req.request_id] = state
        if req.warm_tokens:
            for inst in self.instances:
                inst.kv.warm(req.segments, req.warm_tokens)
        for key, length in req.segments:
            if length > 0 and key.startswith("out:") and key[4:].isdigit():
                self._refer_to_output(int(key[4:]))
        if self.router is None:
            # One instance and nothing to decide on arrival: the queue join can be scheduled right away
            # (so arrivals do not interrupt jumps over decode steps; same results).
            self._to_instance(req.arrival_us, state, 0)
        else:
            self._events.push(req.arrival_us, ev.ARRIVAL, state)

    def _refer_to_output(self, request_id: int) -> None:
        """Some prompt contains this request's output: its filled blocks must be findable while it runs."""
        self._out_refs.add(request_id)
        producer = self._states.get(request_id)
        if producer is not None and producer.instance >= 0:
            self.instances[producer.instance].make_explicit(producer)

    def add_requests(self, reqs: Iterable[SimRequest]) -> None:
        for req in reqs:
            self.add_request(req)

    def mark_private_content(self) -> None:
        """Declare that no request will be added: content keys used by a single request (its own prompt
        segments, its output) cannot be hit by any other, so their blocks are tracked without hashing.
        Results are unchanged (tests compare); only the work of hashing and indexing them is saved."""
        users: Counter[str] = Counter()
        for state in self._states.values():
            keys = {key for key, length in state.req.segments if length > 0}
            keys.add(output_key(state.request_id))
            users.update(keys)
        for state in self._states.values():
            position = 0
            for key, length in state.req.segments:
                if length > 0 and users[key] == 1:
                    state.private_from = max(position, state.req.warm_tokens)  # warm blocks are looked up
                    break
                position += length
            else:
                if users[output_key(state.request_id)] == 1:
                    state.private_from = state.prompt_len

    def run_until(self, t_us: int) -> None:
        """Process every event with time <= t_us; the clock then reads t_us."""
        if t_us < self.now_us:
            raise SimulationError(f"run_until({t_us}) is before the clock ({self.now_us} µs)")
        self._limit_us = t_us
        events = self._events
        while len(events) and events.peek_time() <= t_us:
            self._dispatch(*events.pop())
        events.now_us = t_us
        self._limit_us = math.inf

    def run(self) -> SimRun:
        """Run to completion and return the results."""
        pop = self._events.pop
        dispatch = self._dispatch
        while True:
            try:
                event = pop()
            except IndexError:  # no event left (heapq on an empty heap)
                break
            dispatch(*event)
        return self.results()

    def results(self) -> SimRun:
        """Results so far: finished and rejected requests, the rest marked "incomplete"."""
        out: list[RequestResult] = []
        for rid in sorted(self._states):
            result = self._results.get(rid)
            if result is None:
                state = self._states[rid]
                inst = self.instances[state.instance] if state.instance >= 0 else None
                result = result_from_state(state, "incomplete", inst.num_output(state) if inst else 0)
            out.append(result)
        stats = EngineStats()
        for inst in self.instances:
            stats.add(inst.stats)
        extra = {"instances": self.config.instances} | self.model.describe()
        return SimRun(results=out, summary=summarize(out, stats, extra))

    # ------------------------------------------------------------------------------------------ events
    def _dispatch(self, now: int, kind: int, payload: Any) -> None:
        if kind == ev.STEP_START:
            self._step_start(now, payload)
        elif kind == ev.STEP_END:
            self._step_end(now, payload)
        elif kind == ev.QUEUED:
            self._queued(now, payload)
        elif kind == ev.ARRIVAL:
            self._events.push(now + self.router.admission_latency_us, ev.ADMIT, payload)
        elif kind == ev.ADMIT:
            if self.router.admit(payload.req, now):
                self._events.push(now + self.router.routing_latency_us, ev.ROUTE, payload)
            else:
                self._reject(payload)
        elif kind == ev.ROUTE:
            index = self.router.route(payload.req, self._snapshots_at(now), now)
            if not isinstance(index, int) or not 0 <= index < len(self.instances):
                raise SimulationError(
                    f"router chose instance {index!r} for request {payload.request_id}; there are {len(self.instances)}"
                )
            self.router.on_routed(payload.req, index, now)
            self._to_instance(now, payload, index)

    def _to_instance(self, now: int, state: ReqState, index: int) -> None:
        inst = self.instances[index]
        state.instance = index
        if inst.never_fits(state.prompt_len, state.output_len):
            self._reject(state)
            return
        inst.in_flight += 1
        self._events.push(now + max(0, self.model.queue_delay_us(state.prompt_len)), ev.QUEUED, state)

    def _queued(self, now: int, state: ReqState) -> None:
        inst = self.instances[state.instance]
        inst.enqueue(state, now)
        if not inst.busy:
            inst.busy = True
            self._start_now(now, inst.index)

    def _start_now(self, now: int, index: int) -> None:
        """A step start at the current time: run it at once when no other event is due by then (it would
        be popped next anyway), else queue it behind them."""
        next_time = self._events.peek_time()
        if next_time is None or next_time > now:
            self._step_start(now, index)
        else:
            self._events.push(now, ev.STEP_START, index)

    def _step_start(self, now: int, index: int) -> None:
        inst = self.instances[index]
        horizon = self._events.peek_time()
        if horizon is None:
            horizon = math.inf
        kind, value = inst.start_step(now, horizon, self._limit_us)
        if kind == STEP:
            self._events.push(now + value, ev.STEP_END, index)
        elif kind == JUMPED:
            for state, end in inst.jump_finished:
                self._finished(state, end + self._output_delay)
            inst.jump_finished.clear()
            self._events.push(value, ev.STEP_START, index)
        elif kind == EMPTY:
            # Only a step that preempted its sole request schedules nothing; the next one re-admits it.
            if inst.empty_steps > 1:
                raise SimulationError(f"instance {index} cannot schedule its waiting requests at {now} µs")
            self._events.push(now, ev.STEP_START, index)
        else:
            inst.busy = False

    def _step_end(self, now: int, index: int) -> None:
        inst = self.instances[index]
        sampled, finished = inst.finish_step(now)
        delivery = now + self._output_delay
        on_token = self.on_token
        for state in sampled:
            if state.first_token_us < 0:
                state.first_token_us = delivery
            if on_token is not None:
                on_token(state.request_id, state.num_output - 1, delivery)
        for state in finished:
            self._finished(state, delivery)
        if inst.has_work():
            self._start_now(now, index)
        else:
            inst.busy = False

    def _finished(self, state: ReqState, delivery_us: int) -> None:
        state.finish_us = delivery_us
        result = result_from_state(state, "ok")
        self._results[state.request_id] = result
        if self.on_finish is not None:
            self.on_finish(result)

    def _lazy_token(self, state: ReqState, token_index: int, end_us: int) -> None:
        self.on_token(state.request_id, token_index, end_us + self._output_delay)

    def _reject(self, state: ReqState) -> None:
        state.status = "rejected"
        result = result_from_state(state, "rejected")
        self._results[state.request_id] = result
        if self.on_reject is not None:
            self.on_reject(result)

    def _snapshots_at(self, now: int) -> list[InstanceSnapshot]:
        refresh = self.router.snapshot_refresh_us
        snaps = self._snapshots
        for i, inst in enumerate(self.instances):
            snap = snaps[i]
            if snap is not None and refresh > 0 and now - snap.taken_at_us < refresh:
                # In-flight counts are the router's own bookkeeping (llm-d, BLIS): never stale.
                if snap.in_flight != inst.in_flight:
                    snaps[i] = dataclasses.replace(snap, in_flight=inst.in_flight)
            else:
                kv = inst.kv
                snaps[i] = InstanceSnapshot(
                    index=i,
                    waiting=len(inst.waiting),
                    running=len(inst.running),
                    in_flight=inst.in_flight,
                    kv_utilization=kv.usage(),
                    free_blocks=kv.num_free,
                    num_gpu_blocks=kv.num_blocks + 1,
                    taken_at_us=now,
                )
        return list(snaps)  # type: ignore[arg-type]


def simulate(
    requests: Iterable[SimRequest],
    config: SimConfig,
    model: LatencyModel,
    follow_up: Callable[[RequestResult], list[SimRequest]] | None = None,
    *,
    router: Router | None = None,
    record_tokens: bool = False,
) -> SimRun:
    """Run `requests` to completion. `follow_up(result)` (closed loop) returns requests released by a finish
    or a rejection; `record_tokens` keeps every token's delivery time in `SimRun.token_times` (costs time per token)."""
    sim: Simulation
    token_times: dict[int, list[int]] = {}
    # Results waiting to release their follow-ups. One instance rejects a request that can never fit inside
    # add_request, which calls on_finish again: releasing from a queue keeps long rejected chains off the stack.
    released: deque[RequestResult] = deque()

    def on_finish(result: RequestResult) -> None:
        released.append(result)
        if len(released) > 1:  # an outer call is draining the queue
            return
        while released:
            sim.add_requests(follow_up(released[0]))
            released.popleft()

    def on_token(request_id: int, index: int, delivery_us: int) -> None:
        token_times.setdefault(request_id, []).append(delivery_us)

    sim = Simulation(
        config,
        model,
        router=router,
        on_finish=on_finish if follow_up is not None else None,
        on_reject=on_finish if follow_up is not None else None,  # a rejected user still sends its next one
        on_token=on_token if record_tokens else None,
    )
    # Same-time arrivals are taken in request-id order, whatever order the caller listed them in.
    requests = sorted(requests, key=lambda r: (r.arrival_us, r.request_id))
    sim.add_requests(requests)
    if follow_up is None:  # every request is known: content no other request shares skips the hash chain
        sim.mark_private_content()
    run = sim.run()
    if record_tokens:
        run.token_times = token_times
    return run
