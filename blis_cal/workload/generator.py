"""Spec + seed -> requests. Open-loop clients are generated up front; closed-loop ones (concurrency
users, closed-loop sessions) start with their first request and a driver (observer or simulator) asks
`Workload.follow_up` for the next one when a response completes.

Determinism: every random stream is `numpy.random.default_rng([seed, client index, purpose, ...])`, so a
client's k-th arrival and lengths do not depend on other clients or on `num_requests`, and a closed-loop
user's or session's k-th request does not depend on how the driver interleaves users.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from blis_cal.errors import BlisError, ConfigError
from blis_cal.trace import user_session_id
from blis_cal.workload.request import WorkloadRequest
from blis_cal.workload.spec import ClientSpec, WorkloadSpec

# Stream purposes (the third element of each stream's seed).
_ARRIVAL, _INPUT, _OUTPUT, _USER, _SESSION, _TOKENS, _THINK = range(7)
_BLOCK = 4096  # arrivals drawn per batch


def _rng(*path: int) -> np.random.Generator:
    return np.random.default_rng(list(path))


@dataclass
class _Plan:
    """A client ready to generate: its samplers, shared prefix and (open loop) rate."""

    index: int
    client: ClientSpec
    prefix: tuple[tuple[str, int], ...]
    rate_per_us: float

    def __post_init__(self) -> None:
        self.inputs = self.client.input_distribution.sampler()
        self.outputs = self.client.output_distribution.sampler()
        dist = self.client.think_time_distribution
        self.thinks = None if dist is None else dist.sampler()

    @property
    def accumulate(self) -> bool:
        mt = self.client.multi_turn
        return mt is not None and mt.context_growth == "accumulate"

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """(input, output) lengths for one request from a private stream: input first, then output."""
        return _fix_lengths(self, int(self.inputs.sample(rng, 1)[0]), int(self.outputs.sample(rng, 1)[0]))

    def think_us(self, owner: _Owner) -> int:
        """A concurrency user's pause before its next request: the client's constant, or a draw from the
        user's own think stream (so lengths do not change with the distribution)."""
        if self.thinks is None:
            return self.client.think_time_us
        return int(self.thinks.sample(owner.think_rng, 1)[0])


def _fix_lengths(plan: _Plan, input_tokens: int, output_tokens: int) -> tuple[int, int]:
    # vLLM rejects an empty prompt and max_tokens < 1.
    prefix = sum(n for _, n in plan.prefix)
    return max(input_tokens, 0 if prefix else 1), max(output_tokens, 1)


@dataclass
class _Owner:
    """A closed-loop user or session: its private stream and how many sessions it has started."""

    plan: _Plan
    stream: tuple[int, ...]
    user: int | None = None
    sessions: int = 1
    _rng: np.random.Generator | None = None
    _think_rng: np.random.Generator | None = None

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = _rng(*self.stream)
        return self._rng

    @property
    def think_rng(self) -> np.random.Generator:
        if self._think_rng is None:
            self._think_rng = _rng(*self.stream, _THINK)
        return self._think_rng


@dataclass
class _Draft:
    """A request before ids are known (ids follow the arrival order)."""

    arrival_us: int
    client: int
    seq: int
    input_tokens: int
    output_tokens: int
    session_id: str = ""
    round_index: int = 0
    think_time_us: int = 0
    parent: _Draft | None = None  # previous round (pre-generated sessions)
    owner: _Owner | None = None
    request: WorkloadRequest | None = None


@dataclass
class Workload:
    requests: list[WorkloadRequest]  # pre-generated, sorted by arrival_us; ids 0..n-1 in that order
    num_requests: int | None  # budget over all requests, follow-ups included; None = unlimited
    horizon_us: int | None  # no request arrives at or after this; None = unbounded
    seed: int
    token_seed: int = 0
    spec: WorkloadSpec | None = None
    _owners: dict[int, _Owner] = field(default_factory=dict, repr=False)
    _next_id: int = field(default=0, repr=False)
    _issued: int = field(default=0, repr=False)

    @property
    def closed_loop(self) -> bool:
        """Whether a driver must call `follow_up` as requests finish."""
        return bool(self._owners)

    def follow_up(
        self, finished: WorkloadRequest, completion_tokens: int, finished_at_us: int, *, ok: bool = True
    ) -> WorkloadRequest | None:
        """The request a closed-loop user or session sends after `finished` completes, or None.

        Arrival = finished_at_us + think time. None when `finished` is open loop, its session is over
        (single-session user), the budget is spent or the arrival falls past the horizon. A failed
        request (`ok=False`) ends a multi-turn session (BLIS), but a concurrency user goes on: a multi-turn
        user with a new session, any other with its next round.
        """
        owner = self._owners.get(finished.request_id)
        if owner is None:
            return None
        plan = owner.plan
        client = plan.client
        mt = client.multi_turn
        if ok and mt is not None and finished.round_index + 1 < mt.max_rounds:
            round_index, think, session_id = finished.round_index + 1, mt.think_time_us, finished.session_id
            history = plan.prefix
            if plan.accumulate:
                answer = ((f"out:{finished.request_id}", completion_tokens),) if completion_tokens > 0 else ()
                history = finished.context + answer
        elif client.concurrency is not None and mt is None:
            # A user without multi-turn is one unending BLIS session: each request is its next round.
            round_index, think, history = finished.round_index + 1, plan.think_us(owner), plan.prefix
            session_id = finished.session_id
        elif client.concurrency is not None and not mt.single_session:
            round_index, think, history = 0, plan.think_us(owner), plan.prefix
            session_id = _user_session(client, owner.user, owner.sessions)
            owner.sessions += 1
        else:
            return None
        arrival = finished_at_us + think
        if self.horizon_us is not None and arrival >= self.horizon_us:
            return None
        if self.num_requests is not None and self._issued >= self.num_requests:
            return None
        input_tokens, output_tokens = plan.draw(owner.rng)
        request = self._make(
            self._next_id, plan, arrival, input_tokens, output_tokens, session_id, round_index, think, history
        )
        self._next_id += 1
        self._issued += 1
        self._owners[request.request_id] = owner
        return request

    def _make(
        self,
        request_id: int,
        plan: _Plan,
        arrival_us: int,
        input_tokens: int,
        output_tokens: int,
        session_id: str,
        round_index: int,
        think_time_us: int,
        history: tuple[tuple[str, int], ...],
    ) -> WorkloadRequest:
        client = plan.client
        own = ((f"req:{request_id}", input_tokens),) if input_tokens > 0 else ()
        context = history + own
        prefix_length = sum(n for _, n in plan.prefix)
        return WorkloadRequest(
            request_id=request_id,
            client_id=client.id,
            tenant_id=client.tenant_id,
            slo_class=client.slo_class,
            arrival_us=arrival_us,
            prefix_group=client.prefix_group if prefix_length else "",
            prefix_length=prefix_length,
            input_tokens=sum(n for _, n in context) - prefix_length,
            output_tokens=output_tokens,
            session_id=session_id,
            round_index=round_index,
            streaming=client.streaming,
            think_time_us=think_time_us,
            token_seed=self.token_seed,
            context=context,
            model=client.model,
        )


def _user_session(client: ClientSpec, user: int | None, k: int) -> str:
    return f"{client.id}/u{user}/s{k}"


def _arrival_times(plan: _Plan, seed: int, cap: int | None, horizon: int | None) -> np.ndarray:
    """Open-loop arrival times: the first at the first gap (BLIS), none at or after the horizon."""
    sampler = plan.client.arrival.sampler(plan.rate_per_us, f"clients[{plan.index}].arrival")
    rng = _rng(seed, plan.index, _ARRIVAL)
    parts: list[np.ndarray] = []
    count, last = 0, 0
    while cap is None or count < cap:
        size = _BLOCK if cap is None else min(_BLOCK, cap - count)
        times = last + np.cumsum(sampler.sample(rng, size))
        if horizon is not None and times[-1] >= horizon:
            parts.append(times[times < horizon])
            break
        parts.append(times)
        count += size
        last = int(times[-1])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _first_arrivals(
    plans: list[_Plan], seed: int, cap: int | None, horizon: int | None
) -> dict[int, np.ndarray]:
    """Each open-loop client's arrivals, without those that cannot be among the first `cap` overall."""
    times = {}
    for plan in plans:
        if plan.client.concurrency is not None:
            continue
        client_cap, mt = cap, plan.client.multi_turn
        if cap is not None and mt is not None and plan.client.is_closed_loop:
            client_cap = -(-cap // mt.max_rounds)  # leave the budget room for the sessions' later rounds
        times[plan.index] = _arrival_times(plan, seed, client_cap, horizon)
    every = np.concatenate(list(times.values())) if times else np.zeros(0, dtype=np.int64)
    if cap is not None and len(every) > cap:
        # Anything after the cap-th earliest arrival has >= cap requests before it (saves drafting them).
        cutoff = np.partition(every, cap - 1)[cap - 1]
        times = {i: t[t <= cutoff] for i, t in times.items()}
    return times


def _open_loop(plan: _Plan, seed: int, times: np.ndarray, horizon: int | None) -> list[_Draft]:
    client, mt = plan.client, plan.client.multi_turn
    n = len(times)
    inputs = plan.inputs.sample(_rng(seed, plan.index, _INPUT), n)
    outputs = plan.outputs.sample(_rng(seed, plan.index, _OUTPUT), n)
    drafts: list[_Draft] = []
    for s in range(n):
        first = _Draft(
            int(times[s]), plan.index, len(drafts), *_fix_lengths(plan, int(inputs[s]), int(outputs[s]))
        )
        drafts.append(first)
        if mt is None:
            continue
        first.session_id = f"{client.id}/s{s}"
        owner = _Owner(plan, (seed, plan.index, _SESSION, s))
        if client.is_closed_loop:
            first.owner = owner
            continue
        # Open-loop sessions: round r+1 arrives at round r's arrival + think time + output length (BLIS).
        prev = first
        for r in range(1, mt.max_rounds):
            arrival = prev.arrival_us + mt.think_time_us + prev.output_tokens
            if horizon is not None and arrival >= horizon:
                break
            nxt = _Draft(arrival, plan.index, len(drafts), *plan.draw(owner.rng), first.session_id, r)
            nxt.think_time_us, nxt.parent = mt.think_time_us, prev
            drafts.append(nxt)
            prev = nxt
    return drafts


def _closed_loop_users(plan: _Plan, seed: int) -> list[_Draft]:
    """Each concurrency user's first request: user u's at u·think/N (BLIS), so users with a think time do not
    all start at once; with a think-time distribution all start at 0 (BLIS `--think-time-dist`)."""
    client = plan.client
    users = client.concurrency or 0
    drafts = []
    for u in range(users):
        owner = _Owner(plan, (seed, plan.index, _USER, u), user=u)
        arrival = u * client.think_time_us // users
        draft = _Draft(arrival, plan.index, u, *plan.draw(owner.rng), owner=owner)
        if client.multi_turn is not None:
            draft.session_id = _user_session(client, u, 0)
        else:
            draft.session_id = user_session_id(client.id, u)
        drafts.append(draft)
    return drafts


def _plans(spec: WorkloadSpec) -> list[_Plan]:
    groups = spec.prefix_lengths()
    total_fraction = sum(c.rate_fraction or 0.0 for c in spec.clients)
    plans = []
    for i, client in enumerate(spec.clients):
        length = groups.get(client.prefix_group, 0)
        prefix = (("prefix:" + client.prefix_group, length),) if length else ()
        rate = 0.0
        if client.rate_fraction is not None:
            rate = spec.aggregate_rate * client.rate_fraction / total_fraction / 1e6
        plans.append(_Plan(i, client, prefix, rate))
    return plans


def generate(spec: WorkloadSpec, seed: int | None = None) -> Workload:
    """The workload a spec describes; `seed` overrides the spec's. Same spec + seed -> same requests."""
    seed = spec.seed if seed is None else seed
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    cap = spec.num_requests or None
    horizon = spec.horizon or None
    if cap is None and horizon is None:
        raise ConfigError("workload spec: set num_requests or horizon (otherwise the workload never ends)")
    plans = _plans(spec)
    first = _first_arrivals(plans, seed, cap, horizon)
    drafts: list[_Draft] = []
    for plan in plans:
        if plan.client.concurrency is not None:
            drafts.extend(_closed_loop_users(plan, seed))
        else:
            drafts.extend(_open_loop(plan, seed, first[plan.index], horizon))
    drafts.sort(key=lambda d: (d.arrival_us, d.client, d.seq))
    if cap is not None:
        drafts = drafts[:cap]
    token_seed = int(np.random.SeedSequence([seed, _TOKENS]).generate_state(1)[0])
    workload = Workload([], cap, horizon, seed, token_seed, spec)
    for request_id, d in enumerate(drafts):
        plan = plans[d.client]
        history = plan.prefix
        if d.parent is not None and plan.accumulate:
            parent = d.parent.request
            if parent is None:  # parents arrive earlier, so they were built first
                raise BlisError(f"internal: round {d.round_index} of {d.session_id} built before its parent")
            history = (*parent.context, (f"out:{parent.request_id}", parent.output_tokens))
        d.request = workload._make(
            request_id,
            plan,
            d.arrival_us,
            d.input_tokens,
            d.output_tokens,
            d.session_id,
            d.round_index,
            d.think_time_us,
            history,
        )
        workload.requests.append(d.request)
        if d.owner is not None:
            workload._owners[request_id] = d.owner
    workload._next_id = workload._issued = len(workload.requests)
    return workload
