"""When a replayed row is sent: at its recorded time, or only after its predecessor finishes in the simulation.

A closed-loop user (or a multi-turn chat session) sends its next request only after the previous answer
arrived, plus a think time. Replayed at the recorded times, a simulation slower than the capture has users
send before their previous answer is in: load piles up that the real users never created, and every error
grows. `trace_links.trace_links` finds those predecessor links in a trace; a `SessionMode` decides the
simulated send time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blis_cal.registry import Registry
from blis_cal.simulate.metrics import RequestResult
from blis_cal.simulate.request import SimRequest
from blis_cal.trace_links import Link


@dataclass(frozen=True)
class SessionMode:
    """How a linked row's simulated send time follows from its recorded one, its predecessor's release (the
    predecessor's simulated finish + the recorded gap) and its link; `send_us` None: every row at its
    recorded time."""

    description: str
    send_us: Callable[[int, int, Link], int] | None


session_modes: Registry[SessionMode] = Registry("session mode")
session_modes.register("fixed")(
    SessionMode("every row at its recorded send time (BLIS --session-mode fixed)", None)
)
session_modes.register("closed-loop")(
    SessionMode(
        "a follow-up at its predecessor's simulated finish + the recorded gap (BLIS --session-mode closed-loop)",
        lambda recorded, released, link: released,
    )
)
session_modes.register("causal")(
    SessionMode(
        "recorded send time, but never before the predecessor's simulated finish + the recorded gap",
        lambda recorded, released, link: max(recorded, released),
    )
)
# A user sending the moment its answer came never left the server: holding it to its recorded time (causal)
# when the simulation answers sooner leaves it idle as it never was and lowers the load; after a think time
# that idling is a small share of the pause, and the recorded time keeps which requests met.
session_modes.register("adaptive")(
    SessionMode(
        "a row sent as soon as its predecessor answered as closed-loop, one sent after a pause as causal (default)",
        lambda recorded, released, link: max(recorded, released) if link.waited else released,
    )
)
DEFAULT_SESSION_MODE = "adaptive"


class TraceFollowUp:
    """`follow_up` for `simulate()`: a finished (or rejected) request releases the rows linked to it."""

    def __init__(self, held: dict[int, list[tuple[SimRequest, Link]]], mode: SessionMode) -> None:
        self._held = held  # parent id -> [(child request at its recorded time, its link)]
        self._send_us = mode.send_us
        self.released_by: dict[int, int] = {}  # child id -> the parent whose simulated answer released it

    def __call__(self, result: RequestResult) -> list[SimRequest]:
        done = result.finish_us if result.status == "ok" and result.finish_us >= 0 else result.arrival_us
        children = self._held.pop(result.request_id, ())
        if result.status == "ok":
            self.released_by.update((child.request_id, result.request_id) for child, _ in children)
        return [
            dataclasses.replace(child, arrival_us=self._send_us(child.arrival_us, done + link.gap_us, link))
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
    if mode.send_us is None or not linked:
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
