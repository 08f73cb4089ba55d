"""Self-contained HTML calibration / validation report (matplotlib images embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from blis_cal.calibrate.compare import METRICS, ComparisonReport, summary_row
from blis_cal.calibrate.fit import FitResult
from blis_cal.simulate.latency import BETA_TERMS

_LABELS = {"ttft": "TTFT", "itl": "ITL (mean per request)", "e2e": "E2E"}
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f2f2f2} td.l,th.l{text-align:left}
.excellent{background:#d8f5d0}.good{background:#eef7c8}.fair{background:#fbeec2}.poor{background:#f8d0d0}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.note{color:#666;font-size:0.9em}
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    # No metadata: the same inputs give byte-identical images.
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figures(report: ComparisonReport) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if m in report.metrics]
    out = []
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        real, sim = (a / 1000 for a in report.pairs.arrays(metric))
        ax.scatter(real, sim, s=8, alpha=0.6)
        hi = max(real.max(), sim.max()) * 1.05
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set(xlabel="observed (ms)", ylabel="predicted (ms)", title=f"{_LABELS[metric]}")
    out.append(("Predicted vs observed, per request", _png(fig)))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        real, sim = (np.sort(a / 1000) for a in report.pairs.arrays(metric))
        ax.step(real, np.linspace(0, 1, real.size), label="observed", where="post")
        ax.step(sim, np.linspace(0, 1, sim.size), label="predicted", where="post")
        ax.set(xlabel="ms", ylabel="CDF", title=_LABELS[metric])
        ax.legend(loc="lower right")
    out.append(("Distributions (CDF)", _png(fig)))
    speed = np.asarray(report.decode_speed, dtype=float).reshape(-1, 2)
    rows = 2 if speed.size else 1
    fig, axes = plt.subplots(rows, 1, figsize=(10, 3.4 * rows), sharex=True, squeeze=False)
    ax = axes[0][0]
    start = min(report.pairs.send_us)
    send = (np.asarray(report.pairs.send_us) - start) / 1e6
    for metric in ("ttft", "e2e"):
        real, sim = report.pairs.arrays(metric)
        ax.scatter(
            send, 100 * (sim - real) / np.where(real != 0, real, 1), s=8, alpha=0.6, label=metric.upper()
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set(ylabel="error (%)", title="Residuals over time (predicted − observed), by send time")
    ax.legend()
    axes[-1][0].set_xlabel("time (s)")
    caption = "Residuals over time"
    if speed.size:
        ax = axes[1][0]
        when = (speed[:, 0] - start) / 1e6
        ax.scatter(when, speed[:, 1], s=3, alpha=0.25, color="grey")
        window = min(101, speed.shape[0])  # rolling median over about a hundred steps
        pad = np.pad(speed[:, 1], window // 2, mode="edge")
        rolling = np.median(np.lib.stride_tricks.sliding_window_view(pad, window), axis=1)[: speed.shape[0]]
        ax.plot(when, rolling, color="C3", lw=1.5, label="rolling median")
        ax.axhline(1, color="k", lw=0.8)
        ax.set(
            ylim=(0.5, 2.0),
            ylabel="step ÷ typical step",
            title="Server speed: each pure-decode step over the run's typical step at its batch size and context",
        )
        ax.legend()
        caption += ", and the server's speed during the capture"
    out.append((caption, _png(fig)))
    split = report.trace_info.get("ttft_split_ms")
    if split:
        out.append(("Where TTFT goes: mean ms, observed and predicted", _ttft_split_figure(split)))
    return out


def _ttft_split_figure(split: dict[str, dict[str, float]]) -> str:
    """Mean TTFT as stacked parts: observed (before vLLM saw it, vLLM's queue, prefill) over predicted."""
    import matplotlib.pyplot as plt

    real, sim = split["real"], split["sim"]
    bars = {
        "observed": [("before the engine", real["waiting"] - real["vllm_queue"], "C7"),
                     ("vLLM queue", real["vllm_queue"], "C1"), ("prefill", real["prefill"], "C0")],
        "predicted": [("waiting to be scheduled", sim["waiting"], "C2"), ("prefill", sim["prefill"], "C0")],
    }  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 2.2))
    labelled = set()
    for y, parts in enumerate(bars.values()):
        left = 0.0
        for label, width, color in parts:
            ax.barh(y, width, left=left, color=color, label=None if label in labelled else label)
            labelled.add(label)
            left += width
    ax.set_yticks(range(len(bars)), list(bars))
    ax.invert_yaxis()
    ax.set(xlabel="ms")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    return _png(fig)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _summary_table(reports: Sequence[ComparisonReport]) -> str:
    cols = ["trace", "requests", "rate_rps"]
    for m in METRICS:
        cols += [f"{m}_mape", f"{m}_pearson_r", f"{m}_bias", f"{m}_quality"]
    cols += ["speed_drift", "step_ratio", "prefill_step_ratio"]
    rows = [summary_row(r) for r in reports]
    if any("ttft_timing_floor" in row for row in rows):
        cols.append("ttft_timing_floor")
    head = "".join(f"<th class=l>{c}</th>" if c == "trace" else f"<th>{c}</th>" for c in cols)
    body = []
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c, "")
            cls = f" class={v}" if c.endswith("_quality") and v else (" class=l" if c == "trace" else "")
            if (c.endswith("_mape") or c in ("speed_drift", "ttft_timing_floor")) and isinstance(v, float):
                v = f"{100 * v:.1f} %"
            cells.append(f"<td{cls}>{_cell(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _percentile_table(report: ComparisonReport) -> str:
    head = "<tr><th class=l>metric</th>" + "".join(
        f"<th>{k}</th>"
        for k in ("real p50", "sim p50", "real p90", "sim p90", "real p99", "sim p99", "mean err %")
    )
    rows = []
    for m in METRICS:
        if m not in report.metrics:
            continue
        wl = report.metrics[m]["workload_level"]
        vals = [wl["real_p50"], wl["sim_p50"], wl["real_p90"], wl["sim_p90"], wl["real_p99"], wl["sim_p99"]]
        cells = "".join(f"<td>{v / 1000:.1f} ms</td>" for v in vals)
        rows.append(f"<tr><td class=l>{m}</td>{cells}<td>{100 * wl['mean_percent_error']:.1f}</td></tr>")
    return f"<table>{head}</tr>{''.join(rows)}</table>"


def _coefficient_table(fit: FitResult) -> str:
    alpha_terms = ("queue delay", "queue delay per input token", "output delay")
    names = [f"α{i} {t}" for i, t in enumerate(alpha_terms)]
    names += [f"β{i} {BETA_TERMS[i].replace('_', ' ')}" for i in range(len(fit.beta))]
    values = list(fit.alpha) + list(fit.beta)
    direct = list(fit.direct_alpha) + list(fit.direct_beta)
    cis = list(fit.alpha_ci) + list(fit.beta_ci)
    rows = []
    for i, name in enumerate(names):
        ci = f"[{cis[i][0]:.4g}, {cis[i][1]:.4g}]" if i < len(cis) else "n/a"
        rows.append(
            f"<tr><td class=l>{html.escape(name)}</td><td>{values[i]:.6g}</td><td>{direct[i]:.6g}</td><td>{ci}</td></tr>"
        )
    head = "<tr><th class=l>coefficient</th><th>fitted</th><th>direct estimate</th><th>95 % CI</th></tr>"
    meta = (
        f"<p class=note>form {html.escape(fit.model_form)}; method: {html.escape(fit.method)}; loss "
        f"{fit.loss:.4f} (direct {fit.direct_loss:.4f}); {fit.num_requests} requests from "
        f"{html.escape(', '.join(fit.traces))}; {fit.evaluations} replays; {fit.fit_seconds:.1f} s.</p>"
    )
    return f"<table>{head}{''.join(rows)}</table>{meta}"


def _decode_step_figure(fit: FitResult) -> str | None:
    """Median pure-decode step per batch size in the fit's traces against the fitted step model (its context
    at the traces' mean per request); the shaded part is beyond the batches the fit saw."""
    if not any(fit.decode_medians.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blis_cal.simulate.latency import BlackboxModel

    model = BlackboxModel(fit.alpha, fit.beta)
    rows = [row for medians in fit.decode_medians.values() for row in medians]
    context = float(np.mean([ctx for _, _, ctx in rows]))
    top = max(n for n, _, _ in rows)
    sizes = np.arange(1, max(2 * top, 16) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, medians in fit.decode_medians.items():
        if medians:
            ax.plot([n for n, _, _ in medians], [us / 1000 for _, us, _ in medians], "o", ms=4, label=name)
    model_ms = [model.decode_only_step_us(int(n), int(n * context)) / 1000 for n in sizes]
    ax.plot(sizes, model_ms, "k-", lw=1.2, label=f"fitted ({fit.model_form})")
    ax.axvspan(top, sizes[-1], color="#eee", zorder=0, label="extrapolated")
    ax.set(xlabel="decoding requests in the step", ylabel="step time (ms)", ylim=(0, None))
    ax.legend(fontsize=8)
    return _png(fig)


def _intervals_table(intervals: dict[str, Any]) -> str:
    rows = []
    for trace, block in intervals.items():
        for key, v in block.items():
            inside = v["lo"] <= v["observed"] <= v["hi"]
            rows.append(
                f"<tr><td class=l>{html.escape(trace)}</td><td class=l>{key}</td><td>{v['lo']}</td>"
                f"<td>{v['hi']}</td><td>{v['observed']}</td><td>{'yes' if inside else 'no'}</td></tr>"
            )
    head = "<tr><th class=l>trace</th><th class=l>statistic</th><th>lo</th><th>hi</th><th>observed</th><th>inside</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def render_html(
    reports: Sequence[ComparisonReport],
    *,
    title: str = "blis-cal calibration report",
    fit: FitResult | None = None,
    held_out: Sequence[str] = (),
) -> str:
    """The whole report as one HTML string (no external files)."""
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>")
    parts.append("<h2>Summary</h2>" + _summary_table(reports))
    if held_out:
        parts.append(f"<p class=note>held out of the fit: {html.escape(', '.join(held_out))}</p>")
    parts.append(
        "<p class=note>MAPE = mean |predicted − observed| / observed per request; quality grades are BLIS's "
        "(excellent: MAPE &lt; 10 % and r &gt; 0.95; good: &lt; 20 % and &gt; 0.85; fair: &lt; 35 % and &gt; 0.70).</p>"
    )
    if fit is not None:
        parts.append("<h2>Coefficients</h2>" + _coefficient_table(fit))
        steps_uri = _decode_step_figure(fit)
        if steps_uri:
            caption = "Pure-decode step time by batch size: medians observed vs the fitted model"
            parts.append(f"<h3>{caption}</h3><img alt='{caption}' src='{steps_uri}'>")
        if fit.prediction_intervals:
            parts.append("<h2>Prediction intervals (95 %)</h2>" + _intervals_table(fit.prediction_intervals))
    for rep in reports:
        name = rep.trace_info.get("trace") or "trace"
        parts.append(f"<h2>{html.escape(str(name))}</h2>" + _percentile_table(rep))
        for note in rep.notes:
            parts.append(f"<p class=note>{html.escape(note)}</p>")
        for caption, uri in _figures(rep):
            parts.append(f"<h3>{html.escape(caption)}</h3><img alt='{html.escape(caption)}' src='{uri}'>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html(path: str | Path, reports: Sequence[ComparisonReport], **kwargs: Any) -> None:
    Path(path).write_text(render_html(reports, **kwargs), encoding="utf-8")
