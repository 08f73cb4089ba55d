"""Fit a workload spec to an observed trace (`blis convert trace`): rate, burstiness, lengths, prefixes.

One client per (client_id, prefix_group) in the trace, with its share of the arrivals; the arrival process
is fitted to the open-loop clients' inter-arrival gaps (Poisson when their cv is within sampling noise of 1,
else gamma with that cv, constant when they barely vary); lengths are the observed empirical PDFs
(or gaussians). Chat sessions (session_id / round_index) become multi-turn clients. A client whose requests
were sent after earlier answers (`trace_links`: closed-loop users, also BLIS's `concurrency_<client>_user_<u>`
sessions) becomes closed-loop users again: as many as it had (rows that answer no earlier one) with its
median think time, or (`think_times`: a length fit's name) the fit of its think times as a
`think_time_distribution` when they vary.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from blis_cal.errors import ConfigError
from blis_cal.registry import Registry
from blis_cal.trace import Trace, TraceRecord, is_user_session
from blis_cal.trace_links import CLIENT_OVERHEAD_MAX_US, Link, trace_links
from blis_cal.workload.spec import Arrival, ClientSpec, Distribution, MultiTurn, WorkloadSpec, check_spec

length_fits: Registry[Callable[[Sequence[int]], Distribution]] = Registry("length fit")


@length_fits.register("empirical")
def empirical(values: Sequence[int]) -> Distribution:
    """The observed PMF: regenerated lengths follow the trace's exactly (up to sampling)."""
    counts = Counter(int(v) for v in values)
    n = sum(counts.values())
    return Distribution("empirical", {str(k): round(counts[k] / n, 9) for k in sorted(counts)})


@length_fits.register("gaussian")
def gaussian(values: Sequence[int]) -> Distribution:
    """Mean and standard deviation, clamped to the observed range."""
    arr = np.asarray(values, dtype=float)
    return Distribution(
        "gaussian",
        {
            "mean": round(float(arr.mean()), 3),
            "std_dev": round(float(arr.std()), 3),
            "min": int(arr.min()),
            "max": int(arr.max()),
        },
    )


def rate_rps(arrivals_us: Sequence[int]) -> float:
    """Requests per second over the arrival span: (n - 1) / (last - first), as `blis trace info`."""
    times = sorted(arrivals_us)
    span = times[-1] - times[0] if len(times) > 1 else 0
    return (len(times) - 1) / (span / 1e6) if span > 0 else 0.0


def fit_arrival(arrivals_us: Sequence[int]) -> Arrival:
    """Poisson if the gaps' cv is within two standard errors of 1, constant if they barely vary, else gamma."""
    gaps = np.diff(np.sort(np.asarray(arrivals_us, dtype=float)))
    if len(gaps) < 2 or gaps.mean() <= 0:
        return Arrival("poisson")
    cv = float(gaps.std() / gaps.mean())
    if cv < 0.05:
        return Arrival("constant")
    if abs(cv - 1.0) <= max(0.1, 2.0 / math.sqrt(len(gaps))):
        return Arrival("poisson")
    return Arrival("gamma", cv=round(cv, 4))


def _most_common(values: Sequence) -> object:
    return Counter(values).most_common(1)[0][0]


def _chat_round(r: TraceRecord) -> bool:
    """Whether the row is a later round of a multi-turn chat (a closed-loop user's session is not a chat)."""
    return r.round_index > 0 and not is_user_session(r.session_id)


def _multi_turn(records: list[TraceRecord], growth: str) -> MultiTurn | None:
    sessions: dict[str, list[TraceRecord]] = {}
    for r in records:
        if r.session_id and not is_user_session(r.session_id):
            sessions.setdefault(r.session_id, []).append(r)
    if not sessions:
        return None
    chat_rows = [r for rounds in sessions.values() for r in rounds]
    thinks = [r.think_time_us for r in chat_rows if r.round_index > 0 and r.think_time_us > 0]
    if not thinks:  # gap between a round's answer and the next round's arrival
        for rounds in sessions.values():
            rounds.sort(key=lambda r: r.round_index)
            thinks += [
                max(b.arrival_time_us - a.last_chunk_time_us, 0) for a, b in itertools.pairwise(rounds)
            ]
    return MultiTurn(
        max_rounds=max(r.round_index for r in chat_rows) + 1,
        think_time_us=int(np.median(thinks)) if thinks else 0,
        context_growth=growth if growth == "accumulate" else "",
    )


def _closed_loop_users(members: list[TraceRecord], links: dict[int, Link]) -> tuple[int, list[int]] | None:
    """(users, think times µs) when the group's requests (or sessions) were sent after earlier answers; None
    for an open loop. Each user's first request answers none; the think times are the recorded ones, or the
    median gap after the answers when none was recorded and that gap is longer than a client's overhead."""
    starts = [r for r in members if not _chat_round(r)]
    released = [links[r.request_id] for r in starts if r.request_id in links]
    if not released:
        return None
    thinks = [ln.think_us for ln in released if ln.think_us > 0]
    if not thinks:
        gap = int(np.median([ln.gap_us for ln in released]))
        thinks = [gap if gap > CLIENT_OVERHEAD_MAX_US else 0]
    # At least one user: a foreign trace may move a user's chain between prefix groups (spec clients).
    return max(len(starts) - len(released), 1), thinks


THINK_MEDIAN = "median"  # --think-times: one think time, the median (BLIS's spec has no think distribution)


def _think_time(thinks: list[int], think_times: str) -> tuple[int, Distribution | None]:
    """(think_time_us, think_time_distribution) of closed-loop users: the median, or the fit of varied ones."""
    if think_times == THINK_MEDIAN or len(set(thinks)) == 1:
        return int(np.median(thinks)), None
    return 0, length_fits.get(think_times)(thinks)


def spec_from_trace(
    trace: Trace,
    *,
    lengths: str = "empirical",
    think_times: str = THINK_MEDIAN,
    num_requests: int | None = None,
    seed: int = 0,
) -> WorkloadSpec:
    """A spec whose regenerated workload has the trace's rate, burstiness, length PDFs and prefixes."""
    fit = length_fits.get(lengths)
    if think_times != THINK_MEDIAN and think_times not in length_fits:
        allowed = ", ".join([THINK_MEDIAN, *length_fits.names()])
        raise ConfigError(f"unknown think-time fit {think_times!r}; allowed: {allowed}")
    records = sorted(trace.records, key=lambda r: (r.arrival_time_us, r.request_id))
    starts = [r for r in records if not _chat_round(r)]
    if len(starts) < 2:
        raise ConfigError("trace: need at least 2 requests (round 0) to fit an arrival rate")
    groups: dict[tuple[str, str], list[TraceRecord]] = {}
    for r in records:
        groups.setdefault((r.client_id, r.prefix_group), []).append(r)
    growth = trace.header.session_context_growth
    links = trace_links(trace)
    users = {key: _closed_loop_users(members, links) for key, members in groups.items()}
    open_starts = [r for r in starts if users[(r.client_id, r.prefix_group)] is None]
    arrival = fit_arrival([r.arrival_time_us for r in open_starts])
    clients = []
    for (client_id, group), members in groups.items():
        ok = [r for r in members if r.status == "ok"] or members
        multi_turn = _multi_turn(members, growth)
        closed = users[(client_id, group)]
        think_us, think_dist = _think_time(closed[1], think_times) if closed else (0, None)
        # With accumulated context, later rounds' inputs include history: fit own tokens on round 0.
        fresh = [r for r in ok if r.round_index == 0] if multi_turn and multi_turn.context_growth else ok
        base = client_id or "client"
        sole = sum(1 for cid, _ in groups if cid == client_id) == 1
        clients.append(
            ClientSpec(
                id=base if sole else f"{base}/{group or 'no-prefix'}",
                tenant_id=str(_most_common([r.tenant_id for r in members])),
                slo_class=str(_most_common([r.slo_class for r in members])),
                rate_fraction=None if closed else float(sum(1 for r in members if not _chat_round(r))) or 1.0,
                concurrency=closed[0] if closed else None,
                think_time_us=think_us,
                think_time_distribution=think_dist,
                arrival=Arrival() if closed else arrival,
                input_distribution=fit([r.input_tokens for r in fresh]),
                output_distribution=fit([r.output_tokens for r in ok]),
                prefix_group=group,
                prefix_length=int(_most_common([r.prefix_length for r in members])) if group else None,
                streaming=bool(_most_common([r.streaming for r in members])),
                multi_turn=multi_turn,
            )
        )
    if len({bool(c.slo_class) for c in clients}) > 1:  # the spec needs SLO classes on all or none
        clients = [c if c.slo_class else replace(c, slo_class="standard") for c in clients]
    spec = WorkloadSpec(
        clients=clients,
        seed=seed,
        aggregate_rate=round(rate_rps([r.arrival_time_us for r in open_starts]), 6) if open_starts else 0.0,
        num_requests=len(records) if num_requests is None else num_requests,
    )
    check_spec(spec, "trace fit")
    return spec
