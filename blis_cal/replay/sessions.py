"""When a replayed row is sent: at its recorded time, or only after its predecessor finishes in the simulation.

A closed-loop user (or a multi-turn chat session) sends its next request only after the previous answer
arrived, plus a think time. Replayed at the recorded times, a simulation slower than the capture has users
send before their previous answer is in: load piles up that the real users never created, and every error
grows. `trace_links` finds those predecessor links in a trace; a `SessionMode` decides the simulated send time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blis_cal.registry import Registry
from blis_cal.simulate.metrics import RequestResult
from blis_cal.simulate.request import SimRequest
from blis_cal.trace import Trace, TraceRecord


def injection_time_us(rec: TraceRecord) -> int:
    """When the server could first see the request: its send time if recorded, else its arrival."""
    return rec.send_time_us if rec.send_time_us > 0 or rec.arrival_time_us == 0 else rec.arrival_time_us


@dataclass(frozen=True)
class Link:
    """A row sent in answer to an earlier row's completion."""

    parent_id: int
    gap_us: int  # recorded: the row's send time − the parent's last chunk (think time + client overhead)


def trace_links(trace: Trace) -> dict[int, Link]:
    """request_id -> its predecessor, for rows recorded as sent after an earlier row's answer:
    - a session's round r > 0 follows round r − 1 of the same `session_id` (BLIS sessions, multi-turn chat);
    - any other row whose `arrival_time_us − think_time_us` is the `last_chunk_time_us` of a row of the same
      client follows that row (closed-loop users, whose next request, or next session, arrives at the
      answer + think time).
    A row sent before its candidate predecessor's answer was in is not linked (an open-loop session)."""
    by_round = {(r.session_id, r.round_index): r for r in trace.records if r.session_id}
    by_end = {(r.client_id, r.last_chunk_time_us): r for r in trace.records if r.last_chunk_time_us > 0}
    links: dict[int, Link] = {}
    for rec in trace.records:
        parent = by_round.get((rec.session_id, rec.round_index - 1)) if rec.session_id else None
        if parent is None:
            released = rec.arrival_time_us - rec.think_time_us
            parent = by_end.get((rec.client_id, released)) if released > 0 else None
        if parent is None or parent.request_id == rec.request_id or parent.last_chunk_time_us <= 0:
            continue
        gap = injection_time_us(rec) - parent.last_chunk_time_us
        if gap >= 0:
            links[rec.request_id] = Link(parent.request_id, gap)
    return links


@dataclass(frozen=True)
class SessionMode:
    """How a linked row's simulated send time follows from its recorded one and its predecessor's release
    (the predecessor's simulated finish + the recorded gap); `send_us` None: every row at its recorded time."""

    description: str
    send_us: Callable[[int, int], int] | None


session_modes: Registry[SessionMode] = Registry("session mode")
session_modes.register("fixed")(
    SessionMode("every row at its recorded send time (BLIS --session-mode fixed)", None)
)
session_modes.register("closed-loop")(
    SessionMode(
        "a follow-up at its predecessor's simulated finish + the recorded gap (BLIS --session-mode closed-loop)",
        lambda recorded, released: released,
    )
)
session_modes.register("causal")(
    SessionMode(
        "recorded send time, but never before the predecessor's simulated finish + the recorded gap (default)",
        max,
    )
)
DEFAULT_SESSION_MODE = "causal"


class TraceFollowUp:
    """`follow_up` for `simulate()`: a finished (or rejected) request releases the rows linked to it."""

    def __init__(self, held: dict[int, list[tuple[SimRequest, int]]], mode: SessionMode) -> None:
        self._held = held  # parent id -> [(child request at its recorded time, gap µs)]
        self._send_us = mode.send_us

    def __call__(self, result: RequestResult) -> list[SimRequest]:
        done = result.finish_us if result.status == "ok" and result.finish_us >= 0 else result.arrival_us
        return [
            dataclasses.replace(child, arrival_us=self._send_us(child.arrival_us, done + gap))
            for child, gap in self._held.pop(result.request_id, ())
        ]


def chain_requests(
    requests: Sequence[SimRequest], links: dict[int, Link], session_mode: str, notes: list[str] | None = None
) -> tuple[list[SimRequest], TraceFollowUp | None]:
    """The requests injected up front and the bridge releasing the linked ones (None: nothing to chain)."""
    mode = session_modes.get(session_mode)
    ids = {r.request_id for r in requests}
    linked = {c: ln for c, ln in links.items() if c in ids and ln.parent_id in ids}
    if mode.send_us is None or not linked:
        return list(requests), None
    held: dict[int, list[tuple[SimRequest, int]]] = {}
    first = []
    for req in requests:
        link = linked.get(req.request_id)
        if link is None:
            first.append(req)
        else:
            held.setdefault(link.parent_id, []).append((req, link.gap_us))
    if notes is not None:
        notes.append(
            f"{len(linked)} row(s) were sent after an earlier row's answer (closed-loop users or sessions): "
            f"session mode {session_mode!r} sends them {mode.description.split(' (')[0]}"
        )
    return first, TraceFollowUp(held, mode)
