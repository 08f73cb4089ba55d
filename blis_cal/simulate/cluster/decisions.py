"""The decision trace: one JSON line per routing decision, with what the router saw and each candidate's scores.

Line layout: {"request_id", "time_us", "policy", "chosen", "candidates": [{"instance", "waiting", "running",
"in_flight", "kv_utilization", "snapshot_at_us", "scores": {name: value}, "total"}]}. Floats are rounded to
6 decimals so the file is byte-stable across runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from blis_cal.errors import ConfigError

if TYPE_CHECKING:
    from blis_cal.simulate.cluster.routing import Decision
    from blis_cal.simulate.request import SimRequest
    from blis_cal.simulate.router import InstanceSnapshot


def decision_record(
    policy: str, req: SimRequest, snapshots: Sequence[InstanceSnapshot], decision: Decision, now_us: int
) -> dict:
    candidates = []
    for i, snap in enumerate(snapshots):
        cand = {
            "instance": snap.index,
            "waiting": snap.waiting,
            "running": snap.running,
            "in_flight": snap.in_flight,
            "kv_utilization": round(snap.kv_utilization, 6),
            "snapshot_at_us": snap.taken_at_us,
            "scores": {name: round(values[i], 6) for name, values in decision.scores.items()},
        }
        if decision.totals is not None:
            cand["total"] = round(decision.totals[i], 6)
        candidates.append(cand)
    return {
        "request_id": req.request_id,
        "time_us": now_us,
        "policy": policy,
        "chosen": decision.instance,
        "candidates": candidates,
    }


class DecisionTrace:
    """Appends decision records to a JSONL file; `close()` when the run ends."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self._fh: IO[str] = self.path.open("w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--trace-decisions {self.path}: cannot write ({exc.strerror})") from None
        self.lines = 0

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.lines += 1

    def close(self) -> None:
        self._fh.close()


def read_decisions(path: Path | str) -> list[dict]:
    """Load a decision trace (for tests and analysis)."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
