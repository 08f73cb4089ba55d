"""Cluster summaries: per-instance metrics, request spread, Jain fairness over tenants, per-SLO-class latency.

Jain's index is BLIS's: over tenants, of the output tokens served to each (completed requests), J =
(Σx)² / (n·Σx²), 1 = perfectly even; a tenant that sent requests but was served nothing counts as 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from blis_cal.stats import latency_summary

if TYPE_CHECKING:
    from blis_cal.simulate.metrics import RequestResult


def jain_index(values: Sequence[float]) -> float:
    """(Σx)² / (n·Σx²); 1.0 for one value or all equal, 0.0 for no values or all zero."""
    total = float(sum(values))
    squares = float(sum(v * v for v in values))
    if not values or squares == 0.0:
        return 0.0
    return round(total * total / (len(values) * squares), 6)


def tenant_fairness(results: Sequence[RequestResult]) -> float:
    served: dict[str, float] = {}
    for r in results:
        served.setdefault(r.tenant_id, 0.0)
        if r.status == "ok":
            served[r.tenant_id] += r.output_tokens
    return jain_index([served[t] for t in sorted(served)])


def per_slo_class(results: Sequence[RequestResult]) -> dict[str, dict]:
    """TTFT and E2E per SLO class (completed requests), plus counts; the empty class is reported as ""."""
    out: dict[str, dict] = {}
    for cls in sorted({r.slo_class for r in results}):
        group = [r for r in results if r.slo_class == cls]
        ok = [r for r in group if r.status == "ok"]
        out[cls] = {
            "requests": len(group),
            "completed": len(ok),
            "rejected": sum(r.status == "rejected" for r in group),
            **latency_summary([r.ttft_us for r in ok], "ttft"),
            **latency_summary([r.e2e_us for r in ok], "e2e"),
        }
    return out


def cluster_summary(
    results: Sequence[RequestResult],
    instances: int,
    instance_summary: Callable[[int, list[RequestResult]], dict],
) -> dict:
    """The cluster section of a run summary. `instance_summary(i, results)` is the simulator's single-instance
    summary of instance i's routed requests, so every instance reports the same metrics one instance does."""
    routed: list[list[RequestResult]] = [[] for _ in range(instances)]
    for r in results:
        if r.status != "rejected":
            routed[r.instance].append(r)
    admitted = sum(len(group) for group in routed)
    return {
        "instances": instances,
        "arrived": len(results),
        "admitted": admitted,
        "rejected": len(results) - admitted,
        # rejected by the admission policy (never routed); the rest were routed but can never fit there
        "rejected_by_admission": sum(r.status == "rejected" and r.instance < 0 for r in results),
        "requests_per_instance": [len(group) for group in routed],
        "tenant_fairness_jain": tenant_fairness(results),
        "per_slo_class": per_slo_class(results),
        "per_instance": [{"instance": i, **instance_summary(i, group)} for i, group in enumerate(routed)],
    }
