"""What `blis calibrate` and `blis validate` do, as library calls (the CLI only parses and prints)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from blis_cal.calibrate.compare import (
    METRICS,
    CalibrationError,
    ComparisonReport,
    DecodeStepModel,
    compare,
    pooled,
    summary_row,
)
from blis_cal.calibrate.defaults_file import make_entry, merge_defaults_entry
from blis_cal.calibrate.fit import FitResult, NamedTrace, fit, model_pair_share, trace_simulator
from blis_cal.calibrate.timing_floor import jittered, pooled_floor, timing_floor
from blis_cal.errors import ConfigError
from blis_cal.replay import DEFAULT_SESSION_MODE, config_from_trace, unstated_settings_note
from blis_cal.simulate.coefficients import FitCoverage
from blis_cal.trace import parse_server_facts, read_trace, with_server_facts

COMPANION_SUFFIXES = (".itl.csv", ".metrics.csv")
# The accuracy targets on held-out real traces (issue 5): metric -> (MAPE at most, Pearson r at least).
TARGETS = {"e2e_mape": 0.05, "itl_mape": 0.05, "ttft_mape": 0.10, "e2e_pearson_r": 0.9}


def load_traces(
    paths: Sequence[str | Path], *, skip_bad_rows: bool = False, server_info: Sequence[str] = ()
) -> list[NamedTrace]:
    """Read each trace (header = sibling .yaml); names are the file stems, made unique. `server_info` items
    (`--server-info`: KEY=VALUE, `trace.parse_server_facts`) set that fact in every header's `server:` block
    (what it lacks or got wrong); TRACE:KEY=VALUE in that trace's only, over an unscoped value of the key.
    Raises ConfigError when TRACE names none of the traces."""
    if not paths:
        raise CalibrationError("no trace files given")
    out: list[NamedTrace] = []
    seen: dict[str, int] = {}
    # A shell glob (traces/*.csv) also matches the per-chunk and /metrics companions of each trace.
    companions = [str(p) for p in paths if str(p).endswith(COMPANION_SUFFIXES)]
    paths = [p for p in paths if not str(p).endswith(COMPANION_SUFFIXES)]
    if not paths:
        raise CalibrationError(
            f"only companion files given ({', '.join(companions)}); name the trace .csv files"
        )
    for path in paths:
        trace = read_trace(path, skip_bad_rows=skip_bad_rows)
        if companions and not out:
            trace.notes.append(f"skipped {len(companions)} companion file(s) (.itl.csv / .metrics.csv)")
        name = Path(path).stem
        seen[name] = seen.get(name, 0) + 1
        out.append(NamedTrace(name if seen[name] == 1 else f"{name}#{seen[name]}", trace))
    every, scoped = _scoped_server_info(server_info, [t.name for t in out])
    common = parse_server_facts(every)
    for t in out:
        facts = common | parse_server_facts(scoped.get(t.name, []))
        if facts:
            t.trace.header.server = with_server_facts(t.trace.header.server, facts)
        how = f"--server-info KEY=VALUE, or {t.name}:KEY=VALUE for this trace only"
        if note := unstated_settings_note(t.trace.header, config_from_trace(t.trace.header), how):
            t.trace.notes.append(f"{t.name}: {note}")
    return out


def _scoped_server_info(items: Sequence[str], names: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`--server-info` items for every trace, and per trace name those given as TRACE:KEY=VALUE."""
    every: list[str] = []
    scoped: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        trace, colon, key = key.rpartition(":")
        if not colon:
            every.append(item)
        elif trace in names:
            scoped.setdefault(trace, []).append(f"{key}{sep}{value}")
        else:
            raise ConfigError(
                f"--server-info {item!r}: no trace named {trace!r}; TRACE is a trace file's stem, one of "
                f"{', '.join(names)}"
            )
    return every, scoped


def pooled_report(reports: Sequence[ComparisonReport]) -> dict[str, Any]:
    """BLIS's layout at the top level over all traces pooled (so BLIS tooling reads it), per-trace reports
    under `per_trace`."""
    if len(reports) == 1:
        out = reports[0].to_dict()
    else:
        info: dict[str, Any] = {}
        for key in ("num_requests", "warm_up_excluded", "matched_pairs", "token_mismatches", "compared"):
            info[key] = sum(int(r.trace_info.get(key, 0)) for r in reports)
        info["traces"] = [r.trace_info.get("trace", "") for r in reports]
        if (floor := pooled_floor(reports)) is not None:
            info["timing_floor"] = floor
        merged = ComparisonReport(trace_info=info, metrics=pooled(reports), pairs=reports[0].pairs)
        out = merged.to_dict()
    out["per_trace"] = [r.to_dict() for r in reports]
    out["summary_rows"] = [summary_row(r) for r in reports]
    return out


def target_check(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether pooled metrics meet the accuracy targets."""
    out = {}
    for key, bound in TARGETS.items():
        metric, stat = key.split("_", 1)
        if metric not in metrics:
            continue
        value = metrics[metric]["request_level"]["mape" if stat == "mape" else "pearson_r"]
        ok = value <= bound if stat == "mape" else value >= bound
        out[key] = {"value": value, "target": bound, "met": bool(ok)}
    return out


def run_fit(
    traces: Sequence[NamedTrace],
    *,
    model: str,
    gpu: str,
    tp: int,
    vllm_version: str = "",
    model_form: str = "blackbox",
    out: str | Path | None = None,
    bootstrap: int = 200,
    prediction_draws: int = 10,
    max_evaluations: int = 12,
    seed: int = 0,
    rtt_us: int | None = None,
    session_mode: str = DEFAULT_SESSION_MODE,
    progress: Callable[[str], None] | None = None,
) -> tuple[FitResult, dict[str, Any], str]:
    """Fit jointly over `traces`, compare each replayed with the fitted coefficients, optionally merge the
    entry into the defaults.yaml `out`. Returns (fit, JSON report, merge action or "")."""
    simulator = trace_simulator(session_mode)
    result = fit(
        traces,
        model_form=model_form,
        bootstrap=bootstrap,
        prediction_draws=prediction_draws,
        max_evaluations=max_evaluations,
        seed=seed,
        rtt_us=rtt_us,
        simulator=simulator,
        progress=progress,
        pair_share=model_pair_share(model),
    )
    blocks = {t.trace.header.server.num_gpu_blocks for t in traces if t.trace.header.server}
    entry = make_entry(
        model=model,
        gpu=gpu,
        tp=tp,
        vllm_version=vllm_version,
        alpha=tuple(round(a, 6) for a in result.alpha),
        beta=tuple(round(b, 6) for b in result.beta),
        loss=round(result.loss, 6),
        total_kv_blocks=blocks.pop() if len(blocks) == 1 else 0,
        fit=result.metadata() | {"session_mode": session_mode},
    )
    action = merge_defaults_entry(out, entry) if out is not None else ""
    report = pooled_report([result.reports[t.name] for t in traces])
    report["calibration"] = result.to_dict() | {"entry": entry}
    report["targets"] = target_check(report["metrics"])
    if model_form != "blackbox":
        # An extended form is reported side by side with BLIS's 3+3 fitted the same way on the same traces.
        plain = fit(
            traces,
            model_form="blackbox",
            bootstrap=0,
            max_evaluations=max_evaluations,
            rtt_us=rtt_us,
            simulator=simulator,
        )
        report["baseline_3plus3"] = {
            "alpha": list(plain.alpha),
            "beta": list(plain.beta),
            "loss": plain.loss,
            "summary_rows": [summary_row(plain.reports[t.name]) for t in traces],
        }
    return result, report, action


def run_compare(
    traces: Sequence[NamedTrace],
    simulate: Callable[[NamedTrace], Sequence[Any]],
    *,
    rtt_us: int | None = None,
    warmup: int | None = None,
    latency_model: DecodeStepModel | None = None,
    timing_floor_us: int = 0,
) -> tuple[list[ComparisonReport], dict[str, Any]]:
    """Compare each trace with its simulated results (`simulate(trace)`, from `latency_model` when known,
    noting batches beyond its coefficients' fit when that is known too); the pooled JSON report. With
    `timing_floor_us` > 0 (`simulate` must replay), each trace is replayed once more with its sends moved by up
    to that many µs, and how far that moved the replay per request is its `timing_floor` (`timing_floor.py`)."""
    reports = [
        _compare_replay(
            t,
            simulate,
            rtt_us=rtt_us,
            warmup=warmup,
            latency_model=latency_model,
            timing_floor_us=timing_floor_us,
        )
        for t in traces
    ]
    report = pooled_report(reports)
    report["targets"] = target_check(report["metrics"])
    return reports, report


def _compare_replay(
    t: NamedTrace,
    simulate: Callable[[NamedTrace], Sequence[Any]],
    *,
    rtt_us: int | None,
    warmup: int | None = None,
    latency_model: DecodeStepModel | None = None,
    fit_coverage: FitCoverage | None = None,
    timing_floor_us: int = 0,
) -> ComparisonReport:
    """One trace against its replay (`run_compare`), with its timing floor when `timing_floor_us` > 0."""
    results = simulate(t)
    rep = compare(
        t.trace,
        results,
        rtt_us=rtt_us,
        warmup=warmup,
        trace_name=t.name,
        latency_model=latency_model,
        diagnostics=t.diagnostics(),
        fit_coverage=fit_coverage,
    )
    if timing_floor_us > 0:
        moved = simulate(NamedTrace(t.name, jittered(t.trace, timing_floor_us)))
        _add_timing_floor(rep, t.name, timing_floor(results, moved), timing_floor_us)
    return rep


def _add_timing_floor(rep: ComparisonReport, name: str, floor: dict[str, float], jitter_us: int) -> None:
    """The floor in the report's trace info, and a note where it alone passes the TTFT target."""
    rep.trace_info["timing_floor"] = {"jitter_us": jitter_us} | {m: round(v, 6) for m, v in floor.items()}
    ttft, bound = floor.get("ttft", 0.0), TARGETS["ttft_mape"]
    if ttft > bound:
        rep.notes.append(
            f"{name}: moving every send by up to {jitter_us / 1000:g} ms moves this replay's own per-request "
            f"TTFT by {100 * ttft:.1f} % (ITL {100 * floor.get('itl', 0.0):.1f} %, E2E "
            f"{100 * floor.get('e2e', 0.0):.1f} %), past the {100 * bound:g} % target: which step a request lands "
            "in turns on timing finer than a client records, so no step model meets it per request here; judge "
            "TTFT by its means and percentiles"
        )


def validation_report(reports: Sequence[ComparisonReport], coefficients: dict[str, Any]) -> dict[str, Any]:
    """`blis validate`'s JSON: a row per trace, the pooled summary, the targets, full per-trace reports."""
    summary = pooled(reports)
    floor = pooled_floor(reports)
    return {
        "coefficients": coefficients,
        "rows": [summary_row(r) for r in reports],
        "summary": {
            "traces": len(reports),
            "requests": sum(r.trace_info["compared"] for r in reports),
            "metrics": summary,
            **{
                f"{m}_{k}": summary[m]["request_level"][k]
                for m in METRICS
                if m in summary
                for k in ("mape", "pearson_r", "quality")
            },
            **({"timing_floor": floor} if floor is not None else {}),
        },
        "targets": target_check(summary),
        "per_trace": [r.to_dict() for r in reports],
    }


def leave_one_out(
    traces: Sequence[NamedTrace],
    *,
    model_form: str = "blackbox",
    max_evaluations: int = 12,
    rtt_us: int | None = None,
    session_mode: str = DEFAULT_SESSION_MODE,
    progress: Callable[[str], None] | None = None,
    timing_floor_us: int = 0,
) -> tuple[list[ComparisonReport], list[FitResult]]:
    """Cross-validation: for each trace, fit on all the others and compare it with the replay using those
    coefficients. Every report is on a trace the fit never saw; with `timing_floor_us` > 0 each carries its
    timing floor under those coefficients (`run_compare`)."""
    from blis_cal.calibrate.fit import model_forms

    simulator = trace_simulator(session_mode)

    if len(traces) < 2:
        raise CalibrationError("leave-one-out needs at least two traces")
    form = model_forms.get(model_form)
    # The model the traces' headers name (`blis observe` records the served name), for the pairs' arithmetic.
    served = {t.trace.header.server.model for t in traces if t.trace.header.server}
    pair_share = model_pair_share(served.pop()) if len(served) == 1 else None
    reports, fits = [], []
    for i, held in enumerate(traces):
        if progress:
            progress(f"fitting without {held.name} ({i + 1}/{len(traces)})")
        others = [t for j, t in enumerate(traces) if j != i]
        result = fit(
            others,
            model_form=model_form,
            bootstrap=0,
            max_evaluations=max_evaluations,
            rtt_us=rtt_us,
            simulator=simulator,
            pair_share=pair_share,
        )
        alpha, beta = tuple(result.alpha), tuple(result.beta)
        reports.append(
            _compare_replay(
                held,
                lambda nt, a=alpha, b=beta: simulator(nt.trace, form, a, b),
                rtt_us=rtt_us,
                latency_model=form.latency(alpha, beta),
                fit_coverage=result.coverage,
                timing_floor_us=timing_floor_us,
            )
        )
        fits.append(result)
    return reports, fits
