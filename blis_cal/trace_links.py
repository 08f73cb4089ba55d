"""Which rows of a trace were sent in answer to an earlier row's completion (closed-loop users, chat sessions).

A closed-loop user (or a multi-turn chat session) sends its next request only after the previous answer
arrived, plus a think time. `trace_links` finds those predecessor links in a trace; the replay uses them to
keep users waiting for their simulated answers (`replay.sessions`), and `blis convert trace` to turn such a
client back into closed-loop users.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from blis_cal.trace import Trace, TraceRecord, injection_time_us

CLIENT_OVERHEAD_MAX_US = 50_000  # a client sends within a few ms of the answer (ours: 0.5-7 ms under load)


@dataclass(frozen=True)
class Link:
    """A row sent in answer to an earlier row's completion."""

    parent_id: int
    gap_us: int  # recorded: the row's send time − the parent's last chunk (think time + client overhead)
    think_us: int  # the recorded think time within that gap (0: none recorded; a foreign loop's: inferred)

    @property
    def waited(self) -> bool:
        """The user paused before sending: a recorded think time, or a gap no client overhead explains."""
        return self.think_us > 0 or self.gap_us > CLIENT_OVERHEAD_MAX_US


LINKED_MIN_SHARE = 0.8  # of a client's rows sent after its first answer; an open loop matches far fewer


def trace_links(trace: Trace) -> dict[int, Link]:
    """request_id -> its predecessor, for rows recorded as sent after an earlier row's answer:
    - a session's round r > 0 follows round r − 1 of the same `session_id` (BLIS sessions, multi-turn chat);
    - any other row whose `arrival_time_us − think_time_us` is the `last_chunk_time_us` of an earlier row of
      the same client follows that row (closed-loop users, whose next request, or next session, arrives at the
      answer + think time); among rows that ended at the same µs, each answer releases one row, oldest first.
    A row sent less than its think time after its candidate's answer is not linked: it did not wait for it
    (an open-loop session). Predecessors are sent before their rows, so links never form a cycle. The second
    rule's links of a client stand only when they make it a closed loop (`LINKED_MIN_SHARE`): a few exact
    matches are chance (ms-rounded times). A client neither rule links (another tool's closed loop: no
    sessions, no think times) may be linked by time (`_links_by_time`), by the one pause its users took
    (`_links_by_pause`), or else by its users (`_links_by_capacity`)."""
    rows = sorted(trace.records, key=lambda r: (injection_time_us(r), r.request_id))
    order = {r.request_id: i for i, r in enumerate(rows)}

    def link(rec: TraceRecord, parent: TraceRecord | None) -> Link | None:
        if (
            parent is None
            or parent.last_chunk_time_us <= 0
            or order[parent.request_id] >= order[rec.request_id]
        ):
            return None
        gap = injection_time_us(rec) - parent.last_chunk_time_us
        return None if gap < rec.think_time_us else Link(parent.request_id, gap, rec.think_time_us)

    links: dict[int, Link] = {}
    by_round = {(r.session_id, r.round_index): r for r in rows if r.session_id}
    for rec in rows:
        if rec.session_id and rec.round_index > 0:
            found = link(rec, by_round.get((rec.session_id, rec.round_index - 1)))
            if found:
                links[rec.request_id] = found
    parents = {ln.parent_id for ln in links.values()}
    by_end: dict[tuple[str, int], list[TraceRecord]] = {}
    for r in rows:
        if r.last_chunk_time_us > 0 and r.request_id not in parents:
            by_end.setdefault((r.client_id, r.last_chunk_time_us), []).append(r)
    released_links: dict[int, Link] = {}
    for rec in rows:
        released = rec.arrival_time_us - rec.think_time_us
        if rec.request_id in links or released <= 0:
            continue
        candidates = by_end.get((rec.client_id, released), [])
        parent = next((p for p in candidates if order[p.request_id] < order[rec.request_id]), None)
        found = link(rec, parent)
        if found:
            released_links[rec.request_id] = found
            candidates.remove(parent)
    for client_rows in _by_client(rows).values():
        client_links = {
            r.request_id: found
            for r in client_rows
            if (found := links.get(r.request_id) or released_links.get(r.request_id))
        }
        if not _closed_loop_share(client_rows, client_links):
            client_links = {c: ln for c, ln in client_links.items() if c in links}
        links.update(
            client_links
            or _links_by_time(client_rows, order)
            or _links_by_pause(client_rows, order)
            or _links_by_capacity(client_rows, order)
        )
    return links


def links_summary(trace: Trace) -> dict[str, int | float]:
    """What `trace_links` finds, for `blis trace info`: the rows the replay sends after an earlier row's answer,
    the chains they form (closed-loop users or chat sessions: each starts at a row no answer released) and the
    median think time of those links (recorded, or the pause a foreign loop's users took)."""
    links = trace_links(trace)
    if not links:
        return {"rows_after_an_answer": 0}
    parents = {ln.parent_id for ln in links.values()}
    return {
        "rows_after_an_answer": len(links),
        "users_or_sessions": len(parents - links.keys()),
        "think_time_p50_ms": round(float(np.median([ln.think_us for ln in links.values()])) / 1000, 3),
    }


def _by_client(rows: list[TraceRecord]) -> dict[str, list[TraceRecord]]:
    clients: dict[str, list[TraceRecord]] = {}
    for r in rows:
        clients.setdefault(r.client_id, []).append(r)
    return clients


def _closed_loop_share(rows: list[TraceRecord], links: dict[int, Link]) -> bool:
    """Whether `links` cover nearly every one of `rows` sent once the first answer was in."""
    after_first_answer = _sent_after_first_answer(rows)
    return (
        bool(links) and after_first_answer is not None and len(links) >= LINKED_MIN_SHARE * after_first_answer
    )


def _sent_after_first_answer(rows: list[TraceRecord]) -> int | None:
    """How many of `rows` were sent once the first answer was in (None: no answer)."""
    first_answer = min((r.last_chunk_time_us for r in rows if r.last_chunk_time_us > 0), default=None)
    return None if first_answer is None else sum(injection_time_us(r) >= first_answer for r in rows)


TIMED_LINK_WINDOW_SHARE = 0.1  # of the mean time between answers: keeps chance matches near 10 %
TIMED_LINK_WINDOW_MIN_US = 10_000  # but wide enough for a loaded client's overhead with many users ...
TIMED_LINK_WINDOW_MAX_SHARE = 0.5  # ... while chance matches stay far below LINKED_MIN_SHARE (~40 %)


def _link_window_us(answers: list[TraceRecord]) -> float | None:
    """How long after an answer (+ its pause) a row may be sent and still follow it: a short share of the mean
    time between `answers` (in time order), so that chance matches stay rare; None with fewer than two."""
    if len(answers) < 2 or answers[-1].last_chunk_time_us == answers[0].last_chunk_time_us:
        return None
    spacing = (answers[-1].last_chunk_time_us - answers[0].last_chunk_time_us) / (len(answers) - 1)
    return min(
        CLIENT_OVERHEAD_MAX_US,
        max(TIMED_LINK_WINDOW_MIN_US, TIMED_LINK_WINDOW_SHARE * spacing),
        TIMED_LINK_WINDOW_MAX_SHARE * spacing,
    )


def _answers(rows: list[TraceRecord]) -> list[TraceRecord]:
    return sorted((r for r in rows if r.last_chunk_time_us > 0), key=lambda r: r.last_chunk_time_us)


def _links_by_time(rows: list[TraceRecord], order: dict[int, int], pause_us: int = 0) -> dict[int, Link]:
    """One client's closed loop recorded without session ids or think times (users sending as soon as their
    answer is in, or a think time after it, or `pause_us` after it): each row sent within a short window after
    an unclaimed answer (+ its think time and pause) follows the oldest such answer. Kept only when nearly
    every row sent after the first answer is matched so (`_closed_loop_share`); a client where fewer are is an
    open loop and gets no links."""
    answers = _answers(rows)
    window = _link_window_us(answers)
    if window is None:
        return {}
    coming = deque(answers)  # answers not yet in by the current row's release
    pending: deque[TraceRecord] = deque()  # unclaimed answers in by then, oldest first
    links: dict[int, Link] = {}
    released_at = {r.request_id: injection_time_us(r) - r.think_time_us - pause_us for r in rows}
    for rec in sorted(rows, key=lambda r: (released_at[r.request_id], order[r.request_id])):
        released = released_at[rec.request_id]
        while coming and coming[0].last_chunk_time_us <= released:
            pending.append(coming.popleft())
        while pending and pending[0].last_chunk_time_us < released - window:
            pending.popleft()
        at = next((i for i, p in enumerate(pending) if order[p.request_id] < order[rec.request_id]), None)
        if at is not None:
            parent = pending[at]
            del pending[at]
            links[rec.request_id] = Link(
                parent.request_id,
                injection_time_us(rec) - parent.last_chunk_time_us,
                rec.think_time_us + pause_us,
            )
    return links if _closed_loop_share(rows, links) else {}


# Answers before a row among which its user's may be: every other user's that came in during its pause.
PAUSE_LOOKBACK = 64
# At most this chance that an open loop's rows would, for some pause among those tried, be sent one pause
# after an answer as often as the client's were.
PAUSE_CHANCE = 1e-3


def _links_by_pause(rows: list[TraceRecord], order: dict[int, int]) -> dict[int, Link]:
    """One client's closed loop whose users all paused the same unrecorded think time (BLIS's --concurrency
    with --think-time-ms, whose users start think/N apart: answers may come in before the last user's first
    row, which `_links_by_capacity` needs): the pause is the shortest delay of the densest window-wide cluster of
    delays from each row's send back to the answers before it; where nearly every row was sent within a window
    after it (`_links_by_time`), more than chance explains (`PAUSE_CHANCE`), each row follows the oldest
    unclaimed answer one pause before it, and each link's think time is the shortest linked gap (the rest of a
    gap is client overhead)."""
    answers = _answers(rows)
    window = _link_window_us(answers)
    if window is None:
        return {}
    answered = np.fromiter((r.last_chunk_time_us for r in answers), np.int64, len(answers))
    sends = np.fromiter((injection_time_us(r) for r in rows), np.int64, len(rows))
    before = np.searchsorted(answered, sends, side="right")  # answers in by each send
    delays = np.sort(
        np.concatenate(
            [sends[before >= k] - answered[before[before >= k] - k] for k in range(1, PAUSE_LOOKBACK + 1)]
        )
    )
    delays = delays[delays > CLIENT_OVERHEAD_MAX_US]  # a row sent sooner: `_links_by_time` without a pause
    if not len(delays):
        return {}
    within = np.searchsorted(delays, delays + window, side="right") - np.arange(len(delays))
    pause = int(delays[int(np.argmax(within))])
    timed = _links_by_time(rows, order, pause_us=pause)
    # An open loop's row is sent within the window after some answer (+ the pause) with this probability.
    by_chance = min(window * (len(answers) - 1) / (answered[-1] - answered[0]), 1.0)
    if (
        not timed
        or len(delays) * binom.sf(len(timed) - 1, _sent_after_first_answer(rows), by_chance) > PAUSE_CHANCE
    ):
        return {}  # too few rows sent one pause after an answer, or too few to tell from chance
    # Users that pause alike send in the order of their answers (a starved client late by more than the window
    # too): each row follows the oldest answer in by its release that no row has claimed; a row released
    # before the first answer is a user's first.
    coming = deque(answers)
    pending: deque[TraceRecord] = deque()
    chained: dict[int, tuple[int, int]] = {}  # row -> (its parent, the recorded gap)
    for rec in sorted(rows, key=lambda r: (injection_time_us(r), order[r.request_id])):
        while coming and coming[0].last_chunk_time_us <= injection_time_us(rec) - pause:
            pending.append(coming.popleft())
        if pending and order[pending[0].request_id] < order[rec.request_id]:
            parent = pending.popleft()
            chained[rec.request_id] = (parent.request_id, injection_time_us(rec) - parent.last_chunk_time_us)
    shortest = min(gap for _, gap in chained.values())  # the quickest user's gap: no client overhead in it
    return {child: Link(parent, gap, shortest) for child, (parent, gap) in chained.items()}


# Sends an open loop at the client's rate would have made while all of its first N rows were in flight: a
# closed loop of N users makes none, and an open loop that made none where it would have made this many on
# average is that unlikely (e^-3, 5 %). On our captures made foreign: the 119 closed loops 3.5-190; the three
# open loops (of 166) whose in-flight never passed their first N 0.2-2.2 (docs/accuracy.md).
CAPACITY_EVIDENCE = 3.0


def _links_by_capacity(rows: list[TraceRecord], order: dict[int, int]) -> dict[int, Link]:
    """One client's closed loop recorded without session ids or think times whose users paused before sending
    (too long for `_links_by_time`'s window; one user per client as well): N rows were sent before the first
    answer, and never after were more than N in flight (sent, not answered), while N were in flight long
    enough that an open loop at the client's rate would have sent CAPACITY_EVIDENCE more meanwhile. Each later row follows the oldest answer
    no row has claimed: the user who has waited longest sends first (exact for equal think times); which
    user it was does not change the population, N users each waiting for an answer."""
    answers = _answers(rows)
    sends = sorted(rows, key=lambda r: (injection_time_us(r), order[r.request_id]))
    if not answers:
        return {}
    users = sum(injection_time_us(r) < answers[0].last_chunk_time_us for r in sends)
    if not users or len(sends) < 2 * users:
        return {}
    coming = deque(answers)
    pending: deque[TraceRecord] = deque()  # answers in and not yet claimed, oldest first
    links: dict[int, Link] = {}
    full_us, since = 0, injection_time_us(sends[users - 1])  # time with all N in flight
    for rec in sends[users:]:
        sent = injection_time_us(rec)
        while coming and coming[0].last_chunk_time_us <= sent:
            answer = coming.popleft()
            if not pending:
                full_us += answer.last_chunk_time_us - since
            pending.append(answer)
        if not pending:
            return {}  # an (N + 1)th in flight: not N users
        parent = pending.popleft()
        links[rec.request_id] = Link(parent.request_id, sent - parent.last_chunk_time_us, rec.think_time_us)
        since = sent
    duration = injection_time_us(sends[-1]) - injection_time_us(sends[0])
    expected = (len(sends) - 1) * full_us / duration if duration > 0 else 0.0
    return links if expected >= CAPACITY_EVIDENCE else {}
