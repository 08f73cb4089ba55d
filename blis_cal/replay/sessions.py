"""When a replayed row is sent: at its recorded time, or only after its predecessor finishes in the simulation.

A closed-loop user (or a multi-turn chat session) sends its next request only after the previous answer
arrived, plus a think time. Replayed at the recorded times, a simulation slower than the capture has users
send before their previous answer is in: load piles up that the real users never created, and every error
grows. `trace_links.trace_links` finds those predecessor links in a trace; a `SessionMode` decides the
simulated send time; `with_think_time` re-times a trace as if its users had paused differently.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from blis_cal.errors import ConfigError
from blis_cal.registry import Registry
from blis_cal.simulate.metrics import RequestResult
from blis_cal.simulate.request import SimRequest
from blis_cal.trace import Trace, injection_time_us
from blis_cal.trace_links import Link, trace_links
from blis_cal.workload.spec import Distribution

# (recorded send, predecessor's release, link, whether the replay has preempted a request yet) -> simulated send
Sender = Callable[[int, int, Link, bool], int]


@dataclass(frozen=True)
class SessionMode:
    """How a linked row's simulated send time follows from its recorded one, its predecessor's release (the
    predecessor's simulated finish + the recorded gap), its link and whether the replay has preempted yet;
    `new_sender` gives a fresh sender for each replay (None: every row at its recorded time)."""

    description: str
    new_sender: Callable[[], Sender] | None


def _stateless(send: Sender) -> Callable[[], Sender]:
    return lambda: send


# Answers through whose lateness `aligned` draws its line: a window follows a simulation that changes pace
# within a long replay; fewer answers let one answer's noise move the users (docs/accuracy.md, forty-first
# session).
ALIGN_ANSWERS = 128
ALIGN_LINE_MIN = 8  # answers before the line is drawn; until then their mean lateness


class _Aligned:
    """`aligned`'s sender: a row sent after a pause goes at its recorded time shifted by the lateness
    (simulated − recorded answer) that a least-squares line through the last ALIGN_ANSWERS answers' lateness
    against their release times gives at this release (never earlier until the replay has preempted a request,
    earlier too from then on), but never before its own answer (+ the recorded client overhead); a row sent as
    soon as its answer came, at that answer (closed-loop)."""

    def __init__(self) -> None:
        self._points: deque[tuple[int, int]] = deque()  # (release, lateness) µs, latest last
        # Exact integer sums of release, lateness, release² and release·lateness over the window.
        self._sums = [0, 0, 0, 0]

    def _add(self, x: int, y: int, sign: int) -> None:
        for i, v in enumerate((x, y, x * x, x * y)):
            self._sums[i] += sign * v

    def _lateness_now(self, released: int) -> int:
        """The line's lateness at `released` (the answers' mean until ALIGN_LINE_MIN have come)."""
        n = len(self._points)
        sx, sy, sxx, sxy = self._sums
        spread = n * sxx - sx * sx
        if n < ALIGN_LINE_MIN or spread <= 0:
            return round(sy / n)
        slope = (n * sxy - sx * sy) / spread
        return round((sy - slope * sx) / n + slope * released)

    def __call__(self, recorded: int, released: int, link: Link, preempted: bool) -> int:
        if len(self._points) == ALIGN_ANSWERS:
            self._add(*self._points.popleft(), -1)
        self._points.append((released, released - recorded))
        self._add(released, released - recorded, 1)
        if not link.waited:
            return released
        shift = self._lateness_now(released)
        if not preempted:
            shift = max(0, shift)
        overhead = link.gap_us - link.think_us if link.think_us else 0
        return max(recorded + shift, released - link.gap_us + overhead)


session_modes: Registry[SessionMode] = Registry("session mode")
session_modes.register("fixed")(
    SessionMode("every row at its recorded send time (BLIS --session-mode fixed)", None)
)
session_modes.register("closed-loop")(
    SessionMode(
        "a follow-up at its predecessor's simulated finish + the recorded gap (BLIS --session-mode closed-loop)",
        _stateless(lambda recorded, released, link, preempted: released),
    )
)
session_modes.register("causal")(
    SessionMode(
        "recorded send time, but never before the predecessor's simulated finish + the recorded gap",
        _stateless(lambda recorded, released, link, preempted: max(recorded, released)),
    )
)
# A user sending the moment its answer came never left the server: holding it to its recorded time (causal)
# when the simulation answers sooner leaves it idle as it never was and lowers the load; after a think time
# that idling is a small share of the pause, and the recorded time keeps which requests met.
session_modes.register("adaptive")(
    SessionMode(
        "a row sent as soon as its predecessor answered as closed-loop, one sent after a pause as causal",
        _stateless(
            lambda recorded, released, link, preempted: max(recorded, released) if link.waited else released
        ),
    )
)
# `causal` moves a user by every ms its answer is late and never back, so per-request noise ratchets its
# timeline later and loses which requests met. `aligned` moves every paused user alike, by a line through the
# recent answers' lateness: it keeps the users' recorded order and follows a simulation falling behind (a
# steady drift, without the lag of a mean nor one answer's noise). Once KV blocks ran short (a preemption), how
# many requests hold blocks sets how many more are preempted, so users a faster simulation answered early send
# early too rather than leave blocks free the server's users held (docs/accuracy.md, fortieth and forty-first
# sessions).
session_modes.register("aligned")(
    SessionMode(
        "a row sent as soon as its predecessor answered as closed-loop; one sent after a pause at its recorded "
        f"time shifted by how late a line through the last {ALIGN_ANSWERS} simulated answers puts the simulation "
        "now (once the replay has preempted a request, how early too), never before its predecessor's simulated "
        "answer (default)",
        _Aligned,
    )
)
DEFAULT_SESSION_MODE = "aligned"


class TraceFollowUp:
    """`follow_up` for `simulate()`: a finished (or rejected) request releases the rows linked to it."""

    def __init__(self, held: dict[int, list[tuple[SimRequest, Link]]], mode: SessionMode) -> None:
        self._held = held  # parent id -> [(child request at its recorded time, its link)]
        assert mode.new_sender is not None  # chain_requests: `fixed` needs no bridge
        self._send_us = mode.new_sender()
        self._preempted = False  # a finished request was preempted in this replay
        self.released_by: dict[int, int] = {}  # child id -> the parent whose simulated answer released it

    def __call__(self, result: RequestResult) -> list[SimRequest]:
        done = result.finish_us if result.status == "ok" and result.finish_us >= 0 else result.arrival_us
        children = self._held.pop(result.request_id, ())
        if result.status == "ok":
            self.released_by.update((child.request_id, result.request_id) for child, _ in children)
        self._preempted = self._preempted or result.num_preemptions > 0
        return [
            dataclasses.replace(
                child, arrival_us=self._send_us(child.arrival_us, done + link.gap_us, link, self._preempted)
            )
            for child, link in children
        ]


def chain_requests(
    requests: Sequence[SimRequest], links: dict[int, Link], session_mode: str, notes: list[str] | None = None
) -> tuple[list[SimRequest], TraceFollowUp | None]:
    """The requests injected up front and the bridge releasing the linked ones (None: nothing to chain). A
    row whose predecessor is not replayed (0 output tokens) keeps its recorded send time."""
    mode = session_modes.get(session_mode)
    ids = {r.request_id for r in requests}
    linked = {c: ln for c, ln in links.items() if c in ids and ln.parent_id in ids}
    if mode.new_sender is None or not linked:
        return list(requests), None
    held: dict[int, list[tuple[SimRequest, Link]]] = {}
    first = []
    for req in requests:
        link = linked.get(req.request_id)
        if link is None:
            first.append(req)
        else:
            held.setdefault(link.parent_id, []).append((req, link))
    if notes is not None:
        notes.append(
            f"{len(linked)} row(s) were sent after an earlier row's answer (closed-loop users or sessions); "
            f"session mode {session_mode!r}: {mode.description}"
        )
    return first, TraceFollowUp(held, mode)


_THINK_STREAM = 7919  # the think-time draws' stream, beside the simulator's own use of the seed


def with_think_time(trace: Trace, think: Distribution, seed: int) -> Trace:
    """The trace as if every row sent after an earlier row's answer had paused a think time drawn from `think`
    (BLIS replay's --think-time-ms / --think-time-dist): the row arrives at its predecessor's answer + the
    pause, is sent its recorded client overhead later (a recorded gap with no think time and no pause is all
    overhead), and its answer and later rounds move with it, so the trace stays causal. Draws follow the rows'
    ids, so a seed repeats them. Raises ConfigError when no row follows an answer."""
    links = trace_links(trace)
    if not links:
        raise ConfigError(
            "the think time applies to rows sent after an earlier row's answer (closed-loop users, session "
            "rounds), and this trace has none"
        )
    pauses = think.sampler().sample(np.random.default_rng([seed, _THINK_STREAM]), len(links))
    pause_of = dict(zip(sorted(links), pauses.tolist(), strict=True))
    by_id = {r.request_id: r for r in trace.records}
    shift: dict[int, int] = {}
    moved = {}
    for rec in sorted(trace.records, key=lambda r: (injection_time_us(r), r.request_id)):  # parents first
        link = links.get(rec.request_id)
        if link is None:
            continue
        pause = pause_of[rec.request_id]
        answer = by_id[link.parent_id].last_chunk_time_us + shift.get(link.parent_id, 0)
        overhead = link.gap_us - link.think_us if link.think_us or not link.waited else 0
        delta = shift[rec.request_id] = answer + overhead + pause - injection_time_us(rec)
        moved[rec.request_id] = dataclasses.replace(
            rec,
            think_time_us=pause,
            arrival_time_us=answer + pause,
            **{
                name: getattr(rec, name) + delta
                for name in ("send_time_us", "first_chunk_time_us", "last_chunk_time_us")
                if getattr(rec, name) > 0
            },
        )
    itl = trace.itl and {
        rid: [dataclasses.replace(c, timestamp_us=c.timestamp_us + shift.get(rid, 0)) for c in chunks]
        for rid, chunks in trace.itl.items()
    }
    note = f"{len(moved)} row(s) sent after an earlier answer now pause a think time drawn from {think.type}"
    return dataclasses.replace(
        trace,
        records=[moved.get(r.request_id, r) for r in trace.records],
        itl=itl,
        notes=[*trace.notes, note],
    )
