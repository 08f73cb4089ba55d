"""`blis demo`: the whole observe -> replay -> calibrate loop against a digital twin with known coefficients.

1. Start the twin (the live simulator behind vLLM's API) in-process with known α/β, at `speed`.
2. Observe it with a short mixed workload (chat-like requests plus a shared-prefix RAG-like client).
3. Measure the client + HTTP overhead per request (client TTFT minus the twin's own, matched by request id)
   and record its median as the trace's network round trip, as BLIS corrects for a measured RTT.
4. Rescale the observed trace from wall time to simulated time (× speed): a twin at speed s is a server
   whose every latency is 1/s of the simulated one, so the rescaled trace is what the simulator predicts.
5. Replay the trace with the true coefficients (twin/offline-simulator parity: only client overhead differs).
6. Fit α/β from the trace (`calibrate`), replay with the fit, and report fitted vs true and the MAPEs.

The library never prints: progress goes to the rich console the CLI passes in (or nowhere).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from blis_cal.errors import BlisError, ConfigError
from blis_cal.stats import percentile
from blis_cal.trace import Trace, read_trace, write_trace

DEMO_MODEL = "demo-twin"
# Trace record fields holding times (µs), rescaled from wall to simulated time.
TIME_FIELDS = (
    "deadline_us",
    "slo_target_us",
    "arrival_time_us",
    "send_time_us",
    "first_chunk_time_us",
    "last_chunk_time_us",
    "think_time_us",
    "server_queue_us",
    "server_ttft_us",
    "server_generation_us",
    "server_mean_itl_us",
)


class DemoError(BlisError):
    """The demo could not complete (e.g. no request of the observation finished)."""


# Roughly the shared vLLM CPU server (tiny Llama, 2 cores): ~1.2 ms per prefill token inside the step,
# ~18 ms per step plus ~4.5 ms per decoding request, and fixed plus per-token work outside the step (API
# server, tokenizer). α2 is 0: a per-token output delay is indistinguishable from α0 in TTFT/E2E.
DEMO_ALPHA = (30000.0, 200.0, 0.0)
DEMO_BETA = (18000.0, 1200.0, 4500.0)


def _default_engine():
    from blis_cal.simulate import SimConfig

    return SimConfig(
        block_size=16,
        num_gpu_blocks=8192,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        max_model_len=4096,
        seed=42,
    )


@dataclass
class DemoConfig:
    workdir: Path
    speed: float = 2.0  # simulated seconds per wall second
    duration_s: float = 60.0  # wall seconds during which requests arrive
    rate: float = 0.35  # simulated requests/s; light, so many find the engine idle (the α fit uses those)
    seed: int = 42
    alpha: tuple[float, float, float] = DEMO_ALPHA
    beta: tuple[float, ...] = DEMO_BETA
    engine: Any = field(default_factory=_default_engine)  # SimConfig
    arrival_cv: float = 1.0  # 1 = Poisson; > 1 bursty (gamma)
    warmup_requests: int = 3  # first requests excluded from comparison (connection set-up)
    bootstrap: int = 40  # bootstrap replicates for the fit's confidence intervals
    max_evaluations: int = 8  # simulation-in-the-loop refinement budget

    def __post_init__(self) -> None:
        for name in ("speed", "duration_s", "rate"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"demo --{name.replace('_s', '')}: must be > 0, got {value}")
        if self.warmup_requests < 0 or self.bootstrap < 0:
            raise ConfigError("demo: warmup_requests and bootstrap must be >= 0")


@dataclass
class DemoResult:
    workdir: Path
    trace_csv: Path  # observed, rescaled to simulated time
    wall_trace_csv: Path  # observed, as recorded (wall time)
    report_json: Path
    report_html: Path
    defaults_yaml: Path
    requests: int
    by_status: dict[str, int]
    overhead_ms: dict[str, float]  # client + HTTP overhead per request (wall ms): p10, p50, p90
    true_alpha: tuple[float, ...]
    true_beta: tuple[float, ...]
    fitted_alpha: tuple[float, ...]
    fitted_beta: tuple[float, ...]
    parity_mape: dict[str, float]  # replay with the true coefficients vs observed (fractions)
    fitted_mape: dict[str, float]  # replay with the fitted coefficients vs observed
    seconds: dict[str, float]  # wall time per phase
    notes: list[str] = field(default_factory=list)

    def coefficient_errors(self) -> dict[str, float]:
        """Relative error of every non-zero true coefficient (fractions)."""
        out = {}
        for name, true, fitted in (
            ("alpha", self.true_alpha, self.fitted_alpha),
            ("beta", self.true_beta, self.fitted_beta),
        ):
            for i, t in enumerate(true):
                if t:
                    f = fitted[i] if i < len(fitted) else 0.0
                    out[f"{name}{i}"] = abs(f - t) / t
        return out

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["coefficient_errors"] = self.coefficient_errors()
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


def demo_workload_spec(rate_wall: float, horizon_us: int, seed: int, arrival_cv: float = 1.0):
    """A short mixed workload: chat-like requests, and a RAG-like client sharing a 512-token prefix.

    `arrival_cv` > 1 makes arrivals bursty (gamma): bursts batch many decoding requests (β2), the gaps
    leave requests that find the engine idle (their TTFT separates α, outside the step, from β1)."""
    from blis_cal.workload.spec import Arrival, ClientSpec, Distribution, WorkloadSpec

    def gaussian(mean: float, std: float, lo: int, hi: int) -> Distribution:
        return Distribution("gaussian", {"mean": mean, "std_dev": std, "min": lo, "max": hi})

    arrival = Arrival("poisson") if arrival_cv == 1.0 else Arrival("gamma", cv=arrival_cv)
    chat = ClientSpec(
        "chat",
        gaussian(192, 96, 32, 768),
        gaussian(96, 48, 16, 256),
        rate_fraction=0.7,
        arrival=arrival,
        streaming=True,
    )
    rag = ClientSpec(
        "rag",
        gaussian(96, 32, 16, 256),
        gaussian(48, 16, 8, 128),
        rate_fraction=0.3,
        arrival=arrival,
        prefix_group="docs",
        prefix_length=512,
        streaming=True,
    )
    return WorkloadSpec(clients=[chat, rag], aggregate_rate=rate_wall, horizon=horizon_us, seed=seed)


def client_overhead_us(trace: Trace, served, speed: float, warmup: int = 0) -> list[int]:
    """Per request (ok, past warm-up): the client's TTFT (wall) minus the twin's own arrival -> first token
    time (simulated / speed), matched by X-Request-Id: what sending, HTTP and SSE parsing add (wall µs)."""
    by_id = {s.request_id: s for s in served}
    out = []
    for rec in trace.records:
        s = by_id.get(rec.x_request_id)
        if s is not None and rec.status == "ok" and rec.request_id >= warmup:
            out.append(rec.ttft_us - round((s.first_token_us - s.arrival_us) / speed))
    return out


def rescale_trace(trace: Trace, factor: float) -> Trace:
    """The trace with every time multiplied by `factor` (wall -> simulated time for a twin at that speed)."""
    from blis_cal.trace import Chunk

    def scale(value):
        return None if value is None else round(value * factor)

    records = [replace(r, **{f: scale(getattr(r, f)) for f in TIME_FIELDS}) for r in trace.records]
    itl = None
    if trace.itl is not None:
        itl = {
            rid: [Chunk(scale(c.timestamp_us), c.tokens) for c in chunks] for rid, chunks in trace.itl.items()
        }
    network = dict(trace.header.network)
    if "measured_rtt_ms" in network:
        network["measured_rtt_ms"] = float(network["measured_rtt_ms"]) * factor
    header = replace(trace.header, network=network)
    return Trace(header=header, records=records, itl=itl, notes=list(trace.notes))


class _Phases:
    """Progress lines and timings of the demo's phases on an optional rich console."""

    def __init__(self, console) -> None:
        self.console = console
        self.seconds: dict[str, float] = {}

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)


def run_demo(config: DemoConfig, console=None) -> DemoResult:
    """Run the loop; files go to `config.workdir` (created). `console` (rich) shows progress."""
    from blis_cal.calibrate import compare
    from blis_cal.calibrate.fit import NamedTrace
    from blis_cal.calibrate.pipeline import run_fit
    from blis_cal.calibrate.report_html import write_html
    from blis_cal.observe import ClientConfig, ObserveConfig
    from blis_cal.replay import config_from_trace, replay_trace, write_results_json
    from blis_cal.simulate import BlackboxModel
    from blis_cal.twin.live import simulated_twin, twin_config_for
    from blis_cal.twin.server import TwinServerThread
    from blis_cal.workload import generate

    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    phases = _Phases(console)
    true_model = BlackboxModel(config.alpha, config.beta)
    engine_cfg = config.engine
    twin_cfg = twin_config_for(engine_cfg, model_name=DEMO_MODEL, speed=config.speed, keep_served_log=True)
    spec = demo_workload_spec(
        config.rate * config.speed, int(config.duration_s * 1e6), config.seed, config.arrival_cv
    )
    workload = generate(spec, config.seed)
    wall_csv = workdir / "observed-wall.csv"
    phases.say(
        f"[bold]1. twin[/bold] {DEMO_MODEL}: alpha={list(config.alpha)} beta={list(config.beta)}, "
        f"speed x{config.speed:g}; {len(workload.requests)} requests over {config.duration_s:g} s"
    )

    server = TwinServerThread(lambda: simulated_twin(engine_cfg, true_model, twin_cfg))
    with server as url:
        phases.say(f"[bold]2. observe[/bold] {url}")
        observe_cfg = ObserveConfig(
            client=ClientConfig(endpoint=url, model=DEMO_MODEL),
            warmup_requests=config.warmup_requests,
            metrics_interval_s=1.0,
            workload_spec="blis demo (mixed chat + shared-prefix rag)",
            # vLLM does not publish its scheduler limits; the observer records them from here.
            server_overrides={
                "max_num_seqs": engine_cfg.max_num_seqs,
                "max_num_batched_tokens": engine_cfg.max_num_batched_tokens,
            },
        )
        with phases.timed("observe"):
            observed = _observe(workload, observe_cfg, wall_csv, console)
        served = list(server.engine.served)
    served_json = workdir / "twin-served.json"
    served_json.write_text(json.dumps([asdict(s) for s in served], indent=1) + "\n", encoding="utf-8")

    wall = read_trace(wall_csv)
    overheads = client_overhead_us(wall, served, config.speed, config.warmup_requests)
    if not overheads:
        raise DemoError(
            f"demo: no request of {wall_csv} finished ok; nothing to calibrate ({observed.notes})"
        )
    overhead_ms = {f"p{p}": percentile(overheads, p) / 1000 for p in (10, 50, 90)}
    wall.header.network = {"measured_rtt_ms": round(overhead_ms["p50"], 3)}
    write_trace(wall, wall_csv)
    trace = rescale_trace(wall, config.speed)
    trace_csv = workdir / "observed.csv"
    write_trace(trace, trace_csv)
    phases.say(
        f"[bold]3. replay[/bold] {len(trace.records)} requests ({observed.by_status}) rescaled x{config.speed:g} "
        f"to simulated time -> {trace_csv.name}; client + HTTP overhead per request p50 "
        f"{overhead_ms['p50']:.2f} ms (p10 {overhead_ms['p10']:.2f}, p90 {overhead_ms['p90']:.2f}), as the RTT"
    )
    with phases.timed("replay"):
        sim_config = config_from_trace(trace.header, engine_cfg)
        parity_run = replay_trace(trace, sim_config, true_model)
        write_results_json(parity_run, workdir / "replay-true.json")
        parity = compare(trace, parity_run.results, trace_name="observed")
    parity_mape = {m: parity.mape(m) for m in ("ttft", "itl", "e2e")}
    phases.say(
        "   replay with the true coefficients: "
        + ", ".join(f"{m.upper()} MAPE {v * 100:.2f} %" for m, v in parity_mape.items())
    )

    phases.say("[bold]4. calibrate[/bold] fitting alpha/beta from the observed trace")
    defaults_yaml = workdir / "defaults.yaml"
    with phases.timed("fit"):
        fit, report, _ = run_fit(
            [NamedTrace("observed", trace)],
            model=DEMO_MODEL,
            gpu="twin",
            tp=1,
            vllm_version=wall.header.server.vllm_version if wall.header.server else "",
            out=defaults_yaml,
            bootstrap=config.bootstrap,
            prediction_draws=0,
            max_evaluations=config.max_evaluations,
            seed=config.seed,
            progress=lambda msg: phases.say(f"   {msg}"),
        )
    fitted_report = fit.reports["observed"]
    fitted_mape = {m: fitted_report.mape(m) for m in ("ttft", "itl", "e2e")}
    report["demo"] = {
        "true_alpha": list(config.alpha),
        "true_beta": list(config.beta),
        "speed": config.speed,
        "overhead_ms": overhead_ms,
        "parity_mape": parity_mape,
    }
    report_json = workdir / "report.json"
    report_json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    report_html = workdir / "report.html"
    write_html(report_html, [fitted_report], title="blis demo: calibration against a digital twin", fit=fit)
    return DemoResult(
        workdir=workdir,
        trace_csv=trace_csv,
        wall_trace_csv=wall_csv,
        report_json=report_json,
        report_html=report_html,
        defaults_yaml=defaults_yaml,
        requests=len(trace.records),
        by_status=dict(observed.by_status),
        overhead_ms=overhead_ms,
        true_alpha=tuple(config.alpha),
        true_beta=tuple(config.beta),
        fitted_alpha=tuple(fit.alpha),
        fitted_beta=tuple(fit.beta),
        parity_mape=parity_mape,
        fitted_mape=fitted_mape,
        seconds=phases.seconds,
        notes=list(observed.notes) + list(fit.notes),
    )


def _observe(workload, config, csv_path: Path, console):
    """`observe` with a rich progress bar when a console is given."""
    from blis_cal.observe import observe

    if console is None:
        return observe(workload, config, csv_path, handle_signals=False)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("   observe"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = bar.add_task("observe", total=len(workload.requests), info="")

    def update(p) -> None:
        bar.update(task, completed=p.done, info=f"in flight {p.in_flight}, errors {p.errors}")

    with bar:
        return observe(workload, config, csv_path, on_progress=update, handle_signals=False)
