"""A closed-loop capture as BLIS's `--concurrency` mode records it: one client `distribution`, each user one session
`concurrency_distribution_user_<u>` of rounds 0, 1, ..., no think-time or cached-token columns."""

import dataclasses

from blis_cal.trace import Trace, user_session_id
from blis_cal.trace_links import trace_links


def as_blis_users(trace: Trace) -> Trace:
    parent = {c: ln.parent_id for c, ln in trace_links(trace).items()}
    user: dict[int, int] = {}
    rounds: dict[int, int] = {}
    for r in sorted(trace.records, key=lambda r: r.send_time_us):
        first = r.request_id not in parent
        user[r.request_id] = len(set(user.values())) if first else user[parent[r.request_id]]
        rounds[r.request_id] = 0 if first else rounds[parent[r.request_id]] + 1
    rows = [
        dataclasses.replace(
            r,
            client_id="distribution",
            session_id=user_session_id("distribution", user[r.request_id]),
            round_index=rounds[r.request_id],
            think_time_us=0,
            cached_tokens=None,
        )
        for r in trace.records
    ]
    return dataclasses.replace(trace, records=rows)
