"""ServeGen import (blis-formats.md §4, BLIS's first conversion): one client per chunk.

A directory holds `chunk-<ID>-trace.csv` (no header: start_time_s, rate_rps, cv, pattern[, shape, scale_s])
and `chunk-<ID>-dataset.json` (window start seconds -> {"input_tokens": "{100: 0.5, ...}", "output_tokens": ...}).
Each chunk becomes a client whose rate is its busiest row inside the span, whose arrival process is that
row's pattern (Gamma / Weibull with its cv, otherwise Poisson), and whose lengths are the empirical PDFs of
its first dataset window (lexicographic key order, as BLIS) inside the span.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
from pathlib import Path

from blis_cal.errors import ConfigError
from blis_cal.workload.spec import Arrival, ClientSpec, Distribution, ServeGenData, WorkloadSpec, check_spec

_TRACE = re.compile(r"^chunk-(.+)-trace\.csv$")


def _chunk_ids(directory: Path) -> list[str]:
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory of ServeGen chunk-<ID>-trace.csv files")
    ids = sorted(m.group(1) for p in directory.iterdir() if (m := _TRACE.match(p.name)))
    if not ids:
        raise ConfigError(f"{directory}: no chunk-<ID>-trace.csv files")
    return ids


def _in_span(start: float, span: ServeGenData) -> bool:
    return start >= span.span_start and (not span.span_end or start < span.span_end)


def _busiest_row(path: Path, span: ServeGenData) -> tuple[float, float, str] | None:
    """(rate, cv, pattern) of the max-rate row in the span; malformed rows are skipped (as BLIS)."""
    best: tuple[float, float, str] | None = None
    with path.open(newline="") as fh:
        for row in csv.reader(fh):
            if len(row) < 4:
                continue
            try:
                start, rate, cv = float(row[0]), float(row[1]), float(row[2])
            except ValueError:
                continue
            if not all(math.isfinite(v) for v in (start, rate, cv)) or not _in_span(start, span):
                continue
            if best is None or rate > best[0]:
                best = (rate, cv, row[3].strip().lower())
    return best


def parse_pdf(text: str, where: str) -> dict[str, float]:
    """A Python-dict text `{100: 0.5, 2e2: 0.5}` as empirical params {"100": p, ...} (rounded counts, normalised)."""
    try:
        raw = ast.literal_eval(text) if text.strip() else {}
    except (ValueError, SyntaxError):
        raise ConfigError(f"{where}: not a {{token count: probability}} dict: {text[:60]!r}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: not a {{token count: probability}} dict: {text[:60]!r}")
    pmf: dict[int, float] = {}
    for key, prob in raw.items():
        if not isinstance(key, int | float) or not isinstance(prob, int | float) or prob < 0:
            raise ConfigError(f"{where}: bad entry {key!r}: {prob!r}")
        if math.isfinite(key) and prob > 0:
            count = max(1, round(key))
            pmf[count] = pmf.get(count, 0.0) + float(prob)
    total = sum(pmf.values())
    return {str(k): pmf[k] / total for k in sorted(pmf)} if total > 0 else {}


def _lengths(path: Path, span: ServeGenData) -> tuple[dict[str, float], dict[str, float]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (each chunk needs its dataset JSON)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object keyed by window start seconds")
    for key in sorted(data):  # lexicographic, as BLIS
        window = data[key]
        try:
            start = float(key)
        except ValueError:
            raise ConfigError(f"{path}: window key {key!r} is not a start time in seconds") from None
        if not isinstance(window, dict) or not _in_span(start, span):
            continue
        inputs, outputs = window.get("input_tokens", ""), window.get("output_tokens", "")
        if not isinstance(inputs, str) or not isinstance(outputs, str):
            raise ConfigError(f"{path}: window {key}: input_tokens / output_tokens must be dict strings")
        pdf_in = parse_pdf(inputs, f"{path}: window {key}.input_tokens")
        pdf_out = parse_pdf(outputs, f"{path}: window {key}.output_tokens")
        if pdf_in and pdf_out:
            return pdf_in, pdf_out
    raise ConfigError(f"{path}: no window in the span with both input_tokens and output_tokens")


def _arrival(rate: float, cv: float, pattern: str, where: str) -> Arrival:
    if pattern in ("gamma", "weibull") and cv > 0:
        arrival = Arrival(pattern, cv=cv)
        arrival.sampler(rate / 1e6, where)  # e.g. weibull cv outside [0.01, 10.4]
        return arrival
    return Arrival("poisson")


def servegen_clients(directory: str | Path, span: ServeGenData | None = None) -> list[ClientSpec]:
    """One client per chunk with a positive busiest rate (rate_fraction = that rate in requests/s)."""
    directory = Path(directory)
    span = span or ServeGenData(str(directory))
    clients = []
    for cid in _chunk_ids(directory):
        trace = directory / f"chunk-{cid}-trace.csv"
        busiest = _busiest_row(trace, span)
        if busiest is None or busiest[0] <= 0:
            continue  # BLIS skips chunks idle in the span
        rate, cv, pattern = busiest
        pdf_in, pdf_out = _lengths(directory / f"chunk-{cid}-dataset.json", span)
        clients.append(
            ClientSpec(
                id=f"servegen-chunk-{cid}",
                tenant_id=f"chunk-{cid}",
                rate_fraction=rate,
                arrival=_arrival(rate, cv, pattern, str(trace)),
                input_distribution=Distribution("empirical", pdf_in),
                output_distribution=Distribution("empirical", pdf_out),
                streaming=True,
            )
        )
    if not clients:
        raise ConfigError(f"{directory}: every chunk is idle in the span (no row with rate > 0)")
    return clients


def servegen_spec(
    directory: str | Path,
    *,
    rate: float | None = None,
    num_requests: int = 0,
    horizon_us: int = 0,
    span_start: float = 0.0,
    span_end: float = 0.0,
    seed: int = 0,
) -> WorkloadSpec:
    """A self-contained spec (explicit clients) from a ServeGen directory. Without `rate` the aggregate is
    the sum of the chunks' busiest rates, so each chunk keeps its own rate."""
    if span_end and span_end <= span_start:
        raise ConfigError(f"--span-end must be > --span-start ({span_start:g}), got {span_end:g}")
    clients = servegen_clients(directory, ServeGenData(str(directory), span_start, span_end))
    total = sum(c.rate_fraction or 0.0 for c in clients)
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"--rate: must be > 0 requests/s, got {rate}")
    spec = WorkloadSpec(
        clients=clients,
        seed=seed,
        aggregate_rate=rate if rate is not None else total,
        num_requests=num_requests,
        horizon=horizon_us,
    )
    check_spec(spec, str(directory))
    return spec
