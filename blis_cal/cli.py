"""The `blis` command line: thin wrappers that parse flags, call the library and print results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from blis_cal.errors import BlisError

app = typer.Typer(
    name="blis",
    help="Observe a live vLLM server, simulate it, and calibrate the simulator against what was observed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
trace_app = typer.Typer(help="Inspect TraceV2 traces.", no_args_is_help=True)
app.add_typer(trace_app, name="trace")

stderr = Console(stderr=True)
stdout = Console()


def print_json(data: object) -> None:
    """Machine output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def print_notes(notes: list[str]) -> None:
    for note in notes:
        stderr.print(f"[yellow]note:[/yellow] {note}", highlight=False)


# ---------------------------------------------------------------------------------------------- trace


@trace_app.command("info")
def trace_info(
    trace_csv: Path = typer.Argument(..., help="Trace data CSV; the header is the sibling .yaml."),
    header: Path | None = typer.Option(None, "--header", help="Header YAML, if not the sibling .yaml."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Load the good rows, report the bad."),
) -> None:
    """Summarise a trace: counts by status, rate, token stats, TTFT / ITL / E2E, server speed, and the
    closed-loop users or sessions a replay will chain.

    Examples:

        blis trace info traces/A_poisson_0.8.csv

        blis trace info run.csv --header run-header.yaml --json
    """
    from blis_cal.trace import read_trace
    from blis_cal.trace_analysis import trace_summary
    from blis_cal.trace_links import links_summary

    trace = read_trace(trace_csv, header, skip_bad_rows=skip_bad_rows)
    print_notes(trace.notes)
    summary = trace_summary(trace) | links_summary(trace)
    if as_json:
        print_json(summary)
        return
    stdout.print(summary_table(f"Trace {trace_csv}", summary))


def summary_table(title: str, summary: dict) -> Table:
    """A two-column table of a flat summary dict (nested dicts shown inline)."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("metric", style="cyan")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        table.add_row(key, str(value))
    return table


# ---------------------------------------------------------------------------------------------- convert

convert_app = typer.Typer(
    help="Write workload spec YAML from a preset, ServeGen data or a trace.", no_args_is_help=True
)
app.add_typer(convert_app, name="convert")


def emit_spec(spec, output: Path | None) -> None:
    """A workload spec as YAML: to --output, else stdout."""
    from blis_cal.workload import spec_to_yaml

    text = spec_to_yaml(spec)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        stderr.print(f"wrote {output}", highlight=False)


def _preset_names() -> str:
    from blis_cal.workload import workload_presets

    return ", ".join(workload_presets.names())


@convert_app.command("preset")
def convert_preset(
    name: str = typer.Argument(
        ...,
        help=f"Preset or scenario: {_preset_names()}.",
    ),
    rate: float = typer.Option(..., "--rate", help="Aggregate rate, requests/s."),
    num_requests: int = typer.Option(
        0, "--num-requests", help="Requests to generate (0: bounded by --duration)."
    ),
    duration: float = typer.Option(0.0, "--duration", help="Horizon in seconds (0: none)."),
    seed: int = typer.Option(0, "--seed", help="Workload seed written into the spec."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
) -> None:
    """Write a preset's or scenario's workload spec.

    Presets (BLIS defaults.yaml) use constant arrivals at the rate and gaussian lengths; scenarios
    (bursty, unfair, prefix-heavy, mixed-slo) have their own clients and arrival processes.

    Examples:

        blis convert preset chatbot --rate 4 --num-requests 500 > chatbot.yaml

        blis convert preset mixed-slo --rate 10 --duration 120 -o mixed.yaml
    """
    from blis_cal.errors import ConfigError
    from blis_cal.workload import preset_spec, workload_presets

    if name not in workload_presets:
        raise ConfigError(f"unknown workload preset {name!r}; allowed: {_preset_names()}")
    spec = preset_spec(name, rate, num_requests)
    spec.horizon = round(duration * 1e6) if duration > 0 else 0
    spec.seed = seed
    emit_spec(spec, output)


@convert_app.command("servegen")
def convert_servegen(
    directory: Path = typer.Argument(
        ..., help="Directory of chunk-<ID>-trace.csv + chunk-<ID>-dataset.json."
    ),
    rate: float | None = typer.Option(
        None,
        "--rate",
        help="Aggregate rate, requests/s (default: the sum of "
        "each chunk's busiest rate, so chunks keep their own rates).",
    ),
    num_requests: int = typer.Option(
        0, "--num-requests", help="Requests to generate (0: bounded by --duration)."
    ),
    duration: float = typer.Option(0.0, "--duration", help="Horizon in seconds (0: none)."),
    span_start: float = typer.Option(
        0.0, "--span-start", help="Only rows / windows starting at or after this (s)."
    ),
    span_end: float = typer.Option(
        0.0, "--span-end", help="Only rows / windows starting before this (s; 0: no end)."
    ),
    seed: int = typer.Option(0, "--seed", help="Workload seed written into the spec."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
) -> None:
    """Import ServeGen data as a workload spec (one client per chunk).

    Each chunk's busiest row in the span gives its rate and arrival process (Gamma / Weibull with the
    row's cv, else Poisson); its first dataset window in the span gives empirical length PDFs.

    Examples:

        blis convert servegen servegen/language/ --num-requests 2000 > servegen.yaml

        blis convert servegen data/ --rate 20 --span-start 3600 --span-end 7200 --duration 300
    """
    from blis_cal.workload.servegen import servegen_spec

    spec = servegen_spec(
        directory,
        rate=rate,
        num_requests=num_requests,
        horizon_us=round(duration * 1e6) if duration > 0 else 0,
        span_start=span_start,
        span_end=span_end,
        seed=seed,
    )
    emit_spec(spec, output)


@convert_app.command("trace")
def convert_trace(
    trace_csv: Path = typer.Argument(..., help="Trace data CSV; the header is the sibling .yaml."),
    header: Path | None = typer.Option(None, "--header", help="Header YAML, if not the sibling .yaml."),
    lengths: str = typer.Option(
        "empirical", "--lengths", help="Length fit: empirical (observed PDF) or gaussian."
    ),
    think_times: str = typer.Option(
        "median",
        "--think-times",
        help="Closed-loop users' think time: median (one value, as BLIS specs have), or empirical / gaussian "
        "(a think_time_distribution fitted to the recorded pauses when they vary).",
    ),
    num_requests: int | None = typer.Option(
        None, "--num-requests", help="Requests to generate (default: as many as the trace has)."
    ),
    seed: int = typer.Option(0, "--seed", help="Workload seed written into the spec."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
) -> None:
    """Fit a workload spec to an observed trace: rate, burstiness (cv), lengths, prefix groups, sessions;
    a client whose requests followed earlier answers becomes closed-loop users (concurrency, think time).

    Examples:

        blis convert trace traces/A_poisson_0.8.csv > a.yaml

        blis convert trace run.csv --lengths gaussian --num-requests 1000 -o fitted.yaml
    """
    from blis_cal.trace import read_trace
    from blis_cal.workload.fit_trace import spec_from_trace

    trace = read_trace(trace_csv, header)
    print_notes(trace.notes)
    spec = spec_from_trace(
        trace, lengths=lengths, think_times=think_times, num_requests=num_requests, seed=seed
    )
    parts = []
    open_loop = [c for c in spec.clients if c.concurrency is None]
    if open_loop:
        arrival = open_loop[0].arrival
        cv = f" cv {arrival.cv:g}" if arrival.cv is not None else ""
        parts.append(f"{spec.aggregate_rate:g} req/s, {arrival.process}{cv} arrivals")
    if users := sum(c.concurrency or 0 for c in spec.clients):
        parts.append(f"{users} closed-loop user(s)")
    stderr.print(f"fitted {len(spec.clients)} client(s): {'; '.join(parts)}", highlight=False)
    emit_spec(spec, output)


# ---------------------------------------------------------------------------------------------- replay / run
# Cluster options of `replay` and `run`, and `blis policies` (cluster engineer's section;
# library: blis_cal.simulate.cluster). Allowed values are checked against the registries.

# Options shared by replay, run and serve (one definition each; replay's engine flags default to the header).
_OPT_LATENCY_MODEL = typer.Option(
    "blackbox",
    "--latency-model",
    help="Step-time model: blackbox (α/β) or another one `blis policies` lists.",
)
_OPT_ALPHA = typer.Option(None, "--alpha", help="α0,α1,α2 (µs): queue delay α0+α1·input, output delay α2.")
_OPT_BETA = typer.Option(
    None, "--beta", help="β0,β1,β2[,...] (µs): step = β0 + β1·prefill + β2·decode tokens."
)
_OPT_GPU = typer.Option(None, "--gpu", help="GPU for the coefficient lookup (default: defaults.yaml's).")
_OPT_TP = typer.Option(None, "--tp", help="Tensor parallelism for the lookup.")
_OPT_VLLM_VERSION = typer.Option(None, "--vllm-version", help="Pick the entry of this vLLM version.")
_OPT_COEFFS = typer.Option(
    None, "--coeffs", help="Coefficients YAML (defaults.yaml layout) instead of the shipped one."
)
_OPT_MODEL_CONFIG = typer.Option(None, "--model-config", help="roofline: HF config.json or its folder.")
_OPT_HARDWARE_CONFIG = typer.Option(None, "--hardware-config", help="roofline: hardware_config.json.")
_OPT_BLOCK_SIZE = typer.Option(16, "--block-size", help="KV block size in tokens.")
_OPT_NUM_GPU_BLOCKS = typer.Option(65536, "--num-gpu-blocks", help="KV blocks.")
_OPT_MAX_NUM_SEQS = typer.Option(
    None, "--max-num-seqs", help="Max running requests (default 256, at most the token budget, as vLLM)."
)
_OPT_MAX_BATCHED = typer.Option(2048, "--max-num-batched-tokens", help="Token budget per step.")
_OPT_MAX_MODEL_LEN = typer.Option(8192, "--max-model-len", help="Context window (prompt + output).")
_OPT_LONG_PREFILL = typer.Option(
    0, "--long-prefill-token-threshold", help="Cap on a prefill chunk (0 = off)."
)
_OPT_PREFIX_CACHING = typer.Option(True, "--prefix-caching/--no-prefix-caching", help="Prefix caching.")
_ADAPTIVE_HELP = "Floor that cap at the token budget over the requests running and waiting (vLLM's flag)"
_OPT_LONG_PREFILL_ADAPTIVE = typer.Option(
    False, "--long-prefill-token-threshold-adaptive", help=_ADAPTIVE_HELP + "."
)
_OPT_TRACE_SERVER_INFO = typer.Option(
    [],
    "--server-info",
    help="Server fact for every trace's header, KEY=VALUE, where it lacks or got one wrong "
    "(e.g. long_prefill_token_threshold=256, max_num_seqs=16); TRACE:KEY=VALUE for one trace (its file's "
    "stem, e.g. kv24_run:num_gpu_blocks=24), over a value for every trace.",
)

_OPT_POLICY_CONFIG = typer.Option(
    None,
    "--policy-config",
    help="Cluster policy YAML (instances, admission, routing, scheduler); flags override it.",
)
_OPT_INSTANCES = typer.Option(None, "--instances", help="Number of instances behind the router (default 1).")
_OPT_ADMISSION = typer.Option(
    None, "--admission-policy", help="Admission policy (default always-admit); `blis policies` lists them."
)
_OPT_ROUTING = typer.Option(
    None, "--routing-policy", help="Routing policy (default round-robin); `blis policies` lists them."
)
_OPT_SCORERS = typer.Option(
    None,
    "--routing-scorers",
    help="Scorers of the weighted policy as NAME:WEIGHT,... "
    "(default prefix-affinity:3,queue-depth:2,kv-utilization:2).",
)
_OPT_SCHEDULER = typer.Option(
    None, "--scheduler", help="Instance scheduler (default fcfs); `blis policies` lists them."
)
_OPT_PRIORITY = typer.Option(
    None,
    "--priority-policy",
    help="Priority policy of priority-fcfs (default constant); `blis policies` lists them.",
)
_OPT_TRACE_DECISIONS = typer.Option(
    None, "--trace-decisions", help="Write one JSON line per routing decision (candidates and scores) here."
)

_OPT_THINK_TIME = typer.Option(
    None,
    "--think-time-ms",
    help="With --concurrency: a user's pause between an answer and its next request, ms (default 0); "
    "user u starts at u·think/N, as in BLIS.",
)
_OPT_THINK_DIST = typer.Option(
    None,
    "--think-time-dist",
    help="With --concurrency, instead of --think-time-ms: each pause drawn from a distribution, BLIS syntax: "
    "lognormal:mu=2.0,sigma=0.6,min=3s,max=30s (mu, sigma of ln seconds) or constant:value=500ms; "
    "times take s, ms or us (bare: ms). Users all start at 0, as in BLIS.",
)
_OPT_REPLAY_THINK_TIME = typer.Option(
    None,
    "--think-time-ms",
    help="What if users paused this long: every row sent after an earlier row's answer (closed-loop user, "
    "session round) arrives at that answer + this think time, ms (BLIS replay's flag; default: as recorded).",
)
_OPT_REPLAY_THINK_DIST = typer.Option(
    None,
    "--think-time-dist",
    help="As --think-time-ms, with each pause drawn (--seed) from a distribution, BLIS syntax: "
    "lognormal:mu=2.0,sigma=0.6,min=3s,max=30s or constant:value=500ms.",
)
_OPT_TIMING_FLOOR = typer.Option(
    None,
    "--timing-floor-ms",
    help="Replay each trace once more with every send moved later by up to this many ms (seeded) and report how "
    "far that alone moves its per-request TTFT/ITL/E2E: the floor under per-request MAPE (default 2, under a "
    "client's own send lag; 0: off; wherever traces are replayed with coefficients, with --leave-one-out each "
    "under its fold's fit; not with --fit or --sim-results).",
)

_OPT_SESSION_MODE = typer.Option(
    None,
    "--session-mode",
    help="When rows sent after an earlier row's answer (closed-loop users, chat sessions) are sent in the "
    "simulation (default aligned: a row sent the moment its answer came at the predecessor's simulated answer "
    "+ the recorded gap; one sent after a pause at its recorded time shifted by how late a line through the "
    "recent simulated answers puts the simulation, or how early once the replay has preempted a request, but "
    "never before its own answer); "
    "`blis policies` lists and describes the modes.",
)


def _session_mode(value: str | None) -> str:
    """The --session-mode value, checked against the registry (default: the library's)."""
    from blis_cal.replay import DEFAULT_SESSION_MODE, session_modes

    session_modes.get(value or DEFAULT_SESSION_MODE)
    return value or DEFAULT_SESSION_MODE


def _timing_floor_us(value: float | None) -> int:
    """The --timing-floor-ms value in µs (default: the library's DEFAULT_JITTER_MS), checked."""
    from blis_cal.calibrate.timing_floor import DEFAULT_JITTER_MS, jitter_us_of

    return jitter_us_of(DEFAULT_JITTER_MS if value is None else value)


def _model_form(value: str | None) -> str:
    """The --model-form value, checked against the registry (default: the library's DEFAULT_MODEL_FORM)."""
    from blis_cal.calibrate.fit import DEFAULT_MODEL_FORM, model_forms

    return model_forms.get(value or DEFAULT_MODEL_FORM).name


def _cluster_policy(policy_config, instances, admission, routing, scorers, scheduler, priority, decisions):
    """The cluster policy from --policy-config and the flags, or None when no cluster option was given."""
    given = (policy_config, instances, admission, routing, scorers, scheduler, priority, decisions)
    if all(value is None for value in given):
        return None
    from blis_cal.errors import ConfigError
    from blis_cal.simulate.cluster import PolicyConfig, load_policy_config, parse_scorers

    base = load_policy_config(policy_config) if policy_config is not None else PolicyConfig()
    policy = base.with_overrides(
        instances=instances,
        admission=admission,
        routing=routing,
        scorers=parse_scorers(scorers) if scorers is not None else None,
        scheduler=scheduler,
        priority=priority,
    )
    if scorers is not None and policy.routing != "weighted":
        raise ConfigError(
            f"--routing-scorers needs --routing-policy weighted (the policy is {policy.routing!r})"
        )
    return policy


def _simulate(requests, config, sim_model, follow_up, policy, decisions, record_tokens=False):
    """One instance (`simulate`) unless cluster options were given, then the cluster (`run_cluster`).
    `record_tokens` (single instance) keeps per-token times for the replayed trace's ITL file."""
    if policy is None:
        from blis_cal.simulate import simulate

        return simulate(requests, config, sim_model, follow_up, record_tokens=record_tokens)
    from blis_cal.simulate.cluster import run_cluster

    return run_cluster(requests, config, sim_model, policy, follow_up=follow_up, trace_decisions=decisions)


@app.command("policies")
def policies_cmd() -> None:
    """List every registered extension: policies, schedulers, latency models, fit forms, workload samplers,
    presets and replay session modes.

    Examples:

        blis policies
    """
    from blis_cal.calibrate.fit import model_forms
    from blis_cal.replay import session_modes
    from blis_cal.simulate.cluster import admission_policies, routing_policies, routing_scorers
    from blis_cal.simulate.cluster.scheduling import priority_policies
    from blis_cal.simulate.latency import latency_models
    from blis_cal.simulate.scheduler import scheduler_policies
    from blis_cal.workload.presets import workload_presets
    from blis_cal.workload.samplers import arrival_samplers, length_samplers
    from blis_cal.workload.think_time import think_time_types

    print_json(
        {
            "admission_policies": admission_policies.names(),
            "routing_policies": routing_policies.names(),
            "routing_scorers": routing_scorers.names(),
            "scheduler_policies": scheduler_policies.names(),
            "priority_policies": priority_policies.names(),
            "latency_models": latency_models.names(),
            "model_forms": {name: model_forms.get(name).description for name in model_forms.names()},
            "arrival_processes": arrival_samplers.names(),
            "length_distributions": length_samplers.names(),
            "think_time_distributions": think_time_types.names(),
            "workload_presets": workload_presets.names(),
            "session_modes": {name: session_modes.get(name).description for name in session_modes.names()},
        }
    )


def _floats(flag: str, text: str | None) -> tuple[float, ...] | None:
    from blis_cal.errors import ConfigError

    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated numbers like 1000,2.5,100; got {text!r}") from None


def _sim_model(
    latency_model: str, alpha, beta, model, gpu, tp, coeffs, vllm_version, model_config, hardware_config
):
    from blis_cal.simulate import LatencyOptions, build_latency_model

    opts = LatencyOptions(
        alpha=_floats("--alpha", alpha),
        beta=_floats("--beta", beta),
        model=model or "",
        gpu=gpu or "",
        tp=tp or 0,
        vllm_version=vllm_version,
        coeffs_path=coeffs,
        model_config=model_config,
        hardware_config=hardware_config,
    )
    return build_latency_model(latency_model, opts)


def _sim_outputs(
    run, sim_model, results: Path | None, trace_output: str | None, source=None, released_by=None
) -> None:
    from blis_cal.replay import results_to_trace, write_results_json
    from blis_cal.trace import write_trace

    if results is not None:
        write_results_json(run, results)
    if trace_output is not None:
        csv_path = trace_output if trace_output.endswith(".csv") else trace_output + ".csv"
        trace = results_to_trace(
            run, source, released_by=released_by, output_delay_us=sim_model.output_delay_us()
        )
        write_trace(trace, csv_path)
    print_json(run.summary)


@app.command("replay")
def replay_cmd(
    trace_csv: Path = typer.Argument(..., help="Trace data CSV; the header is the sibling .yaml."),
    header: Path | None = typer.Option(None, "--header", help="Header YAML, if not the sibling .yaml."),
    results: Path | None = typer.Option(
        None, "--results", help="Write per-request results (JSON array) here."
    ),
    trace_output: str | None = typer.Option(
        None, "--trace-output", help="Write a replayed TraceV2 as PREFIX.csv/.yaml."
    ),
    latency_model: str = _OPT_LATENCY_MODEL,
    alpha: str | None = _OPT_ALPHA,
    beta: str | None = _OPT_BETA,
    model: str | None = typer.Option(
        None, "--model", help="Model id for the coefficient lookup (default: header server.model)."
    ),
    gpu: str | None = typer.Option(
        None, "--gpu", help="GPU for the lookup (default: header server.gpu or defaults.yaml)."
    ),
    tp: int | None = _OPT_TP,
    vllm_version: str | None = _OPT_VLLM_VERSION,
    coeffs: str | None = _OPT_COEFFS,
    model_config: str | None = _OPT_MODEL_CONFIG,
    hardware_config: str | None = _OPT_HARDWARE_CONFIG,
    block_size: int | None = typer.Option(
        None, "--block-size", help="KV block size in tokens (default: header)."
    ),
    num_gpu_blocks: int | None = typer.Option(None, "--num-gpu-blocks", help="KV blocks (default: header)."),
    max_num_seqs: int | None = typer.Option(
        None,
        "--max-num-seqs",
        help="Max running requests (default: header, else 256 but at most the token budget, as vLLM).",
    ),
    max_num_batched_tokens: int | None = typer.Option(
        None, "--max-num-batched-tokens", help="Token budget per step (default: header)."
    ),
    max_model_len: int | None = typer.Option(
        None, "--max-model-len", help="Max prompt + output length (default: header)."
    ),
    long_prefill_token_threshold: int | None = typer.Option(
        None, "--long-prefill-token-threshold", help="Cap on a prefill chunk (default: header, else 0 = off)."
    ),
    long_prefill_token_threshold_adaptive: bool | None = typer.Option(
        None,
        "--long-prefill-token-threshold-adaptive/--no-long-prefill-token-threshold-adaptive",
        help=_ADAPTIVE_HELP + " (default: header, else off).",
    ),
    prefix_caching: bool | None = typer.Option(
        None, "--prefix-caching/--no-prefix-caching", help="Prefix caching (default: header, else on)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    skip_bad_rows: bool = typer.Option(
        False, "--skip-bad-rows", help="Replay the good rows, report the bad."
    ),
    policy_config: Path | None = _OPT_POLICY_CONFIG,
    instances: int | None = _OPT_INSTANCES,
    admission_policy: str | None = _OPT_ADMISSION,
    routing_policy: str | None = _OPT_ROUTING,
    routing_scorers: str | None = _OPT_SCORERS,
    scheduler: str | None = _OPT_SCHEDULER,
    priority_policy: str | None = _OPT_PRIORITY,
    trace_decisions: Path | None = _OPT_TRACE_DECISIONS,
    session_mode: str | None = _OPT_SESSION_MODE,
    think_time_ms: float | None = _OPT_REPLAY_THINK_TIME,
    think_time_dist: str | None = _OPT_REPLAY_THINK_DIST,
) -> None:
    """Replay a trace through the simulated vLLM instance; print the summary as JSON.

    Every row becomes a request with its observed prompt and output lengths, injected at its send time, or,
    for a row sent after an earlier row's answer (closed-loop user, session round), as --session-mode says
    (by default never before that answer in the simulation); rows of a prefix group share their prefix, so
    the simulated prefix cache hits as vLLM's did. Engine settings come from the header's `server:` block,
    overridden by the flags.

    Examples:

        blis replay traces/A_poisson_0.8.csv --alpha 20000,0,0 --beta 10000,30,500 --results r.json

        blis replay run.csv --model meta-llama/llama-3.1-8b-instruct --gpu H100 --tp 2 --trace-output sim

        blis replay run.csv --alpha 20000,0,0 --beta 10000,30,500 --instances 4 --routing-policy weighted
    """
    from blis_cal.replay import config_from_trace, trace_requests, unstated_settings_note, with_think_time
    from blis_cal.trace import read_trace
    from blis_cal.workload.think_time import think_time_option

    think = think_time_option(think_time_ms, think_time_dist)
    trace = read_trace(trace_csv, header, skip_bad_rows=skip_bad_rows)
    server = trace.header.server
    engine = {"num_gpu_blocks": num_gpu_blocks, "block_size": block_size, "max_num_seqs": max_num_seqs}
    engine |= {"max_num_batched_tokens": max_num_batched_tokens, "max_model_len": max_model_len}
    config = config_from_trace(
        trace.header,
        **engine,
        long_prefill_token_threshold=long_prefill_token_threshold,
        long_prefill_token_threshold_adaptive=long_prefill_token_threshold_adaptive,
        enable_prefix_caching=prefix_caching,
        seed=seed,
    )
    sim_model = _sim_model(
        latency_model,
        alpha,
        beta,
        model or (server.model if server else None),
        gpu or (server.gpu if server else None),
        tp or (server.tensor_parallel if server else None),
        coeffs,
        vllm_version,
        model_config,
        hardware_config,
    )
    if think is not None:
        trace = with_think_time(trace, think, config.seed)
    notes = list(trace.notes)
    # the flags are named after the settings
    how = ", ".join(f"--{name.replace('_', '-')}" for name in engine)
    given = [name for name, value in engine.items() if value is not None]
    if note := unstated_settings_note(trace.header, config, how, given):
        notes.append(note)
    policy = _cluster_policy(
        policy_config,
        instances,
        admission_policy,
        routing_policy,
        routing_scorers,
        scheduler,
        priority_policy,
        trace_decisions,
    )
    requests, follow_up = trace_requests(trace, config, notes, _session_mode(session_mode))
    run = _simulate(
        requests,
        config,
        sim_model,
        follow_up,
        policy,
        trace_decisions,
        record_tokens=trace_output is not None,
    )
    print_notes(notes)
    _sim_outputs(run, sim_model, results, trace_output, trace, follow_up.released_by if follow_up else None)


def run_requests(
    spec_path: Path | None,
    preset: str | None,
    rate: float | None,
    concurrency: int | None,
    think_time_ms: float | None,
    think_time_dist: str | None,
    num_requests: int | None,
    duration: float | None,
    input_tokens: int | None,
    output_tokens: int | None,
    seed: int | None,
) -> tuple[object, list, object]:
    """The request source of `blis run` (workload owner): the workload, its first requests and, for closed
    loops, the follow-up bridge that releases the next request when one finishes."""
    from blis_cal.replay.from_workload import follow_up_for, requests_from_workload
    from blis_cal.workload import workload_from_options

    if spec_path is None and num_requests is None and duration is None:
        num_requests = 1000
    workload = workload_from_options(
        spec_path=spec_path,
        preset=preset,
        rate=rate,
        concurrency=concurrency,
        think_time_ms=think_time_ms,
        think_time_dist=think_time_dist,
        num_requests=num_requests,
        duration_s=duration,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        seed=seed,
    )
    return workload, requests_from_workload(workload), follow_up_for(workload)


@app.command("run")
def run_cmd(
    workload_spec: Path | None = typer.Option(None, "--workload-spec", help="Workload spec YAML (BLIS v2)."),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help=f"Preset or scenario ({_preset_names()}); needs --rate. Presets arrive at a constant --rate.",
    ),
    rate: float | None = typer.Option(
        None, "--rate", help="Requests/s. Alone: Poisson arrivals with the chatbot preset's lengths."
    ),
    concurrency: int | None = typer.Option(
        None,
        "--concurrency",
        help="N closed-loop users (next request when the answer completes; chatbot lengths).",
    ),
    think_time_ms: float | None = _OPT_THINK_TIME,
    think_time_dist: str | None = _OPT_THINK_DIST,
    num_requests: int | None = typer.Option(
        None,
        "--num-requests",
        help="Number of requests (default 1000 unless a spec or --duration bounds the run).",
    ),
    duration: float | None = typer.Option(None, "--duration", help="Stop arrivals after this many seconds."),
    input_tokens: int | None = typer.Option(
        None,
        "--input-tokens",
        help="Constant prompt length (default: the workload's; chatbot N(256,100) in [2,800]).",
    ),
    output_tokens: int | None = typer.Option(
        None,
        "--output-tokens",
        help="Constant output length (default: the workload's; chatbot N(256,100) in [1,1024]).",
    ),
    results: Path | None = typer.Option(
        None, "--results", help="Write per-request results (JSON array) here."
    ),
    trace_output: str | None = typer.Option(
        None, "--trace-output", help="Write the simulated trace as PREFIX.csv/.yaml."
    ),
    latency_model: str = _OPT_LATENCY_MODEL,
    alpha: str | None = _OPT_ALPHA,
    beta: str | None = _OPT_BETA,
    model: str | None = typer.Option(None, "--model", help="Model id for the coefficient lookup."),
    gpu: str | None = _OPT_GPU,
    tp: int | None = _OPT_TP,
    vllm_version: str | None = _OPT_VLLM_VERSION,
    coeffs: str | None = _OPT_COEFFS,
    model_config: str | None = _OPT_MODEL_CONFIG,
    hardware_config: str | None = _OPT_HARDWARE_CONFIG,
    block_size: int = _OPT_BLOCK_SIZE,
    num_gpu_blocks: int = _OPT_NUM_GPU_BLOCKS,
    max_num_seqs: int | None = _OPT_MAX_NUM_SEQS,
    max_num_batched_tokens: int = _OPT_MAX_BATCHED,
    max_model_len: int = _OPT_MAX_MODEL_LEN,
    long_prefill_token_threshold: int = _OPT_LONG_PREFILL,
    long_prefill_token_threshold_adaptive: bool = _OPT_LONG_PREFILL_ADAPTIVE,
    prefix_caching: bool = _OPT_PREFIX_CACHING,
    seed: int | None = typer.Option(
        None, "--seed", help="Workload seed (default: the spec's, else 0); the simulator's (default 42)."
    ),
    policy_config: Path | None = _OPT_POLICY_CONFIG,
    instances: int | None = _OPT_INSTANCES,
    admission_policy: str | None = _OPT_ADMISSION,
    routing_policy: str | None = _OPT_ROUTING,
    routing_scorers: str | None = _OPT_SCORERS,
    scheduler: str | None = _OPT_SCHEDULER,
    priority_policy: str | None = _OPT_PRIORITY,
    trace_decisions: Path | None = _OPT_TRACE_DECISIONS,
) -> None:
    """Simulate a workload (spec, preset, rate or closed-loop users) on vLLM; print the summary as JSON.

    One workload source: --workload-spec FILE, --preset NAME --rate R, --rate R, or --concurrency N.

    Examples:

        blis run --rate 20 --num-requests 1000 --model meta-llama/llama-3.1-8b-instruct --gpu H100 --tp 2

        blis run --rate 5 --input-tokens 1024 --output-tokens 128 --alpha 1000,1,100 --beta 6000,18,3 --results r.json

        blis run --workload-spec spec.yaml --alpha 1000,1,100 --beta 6000,18,3

        blis run --preset mixed-slo --rate 8 --duration 300 --alpha 1000,1,100 --beta 6000,18,3

        blis run --concurrency 16 --num-requests 500 --alpha 1000,1,100 --beta 6000,18,3

        blis run --preset prefix-heavy --rate 40 --alpha 1000,1,100 --beta 6000,18,3 --instances 4 --routing-policy weighted --routing-scorers prefix-affinity:3,queue-depth:2

        blis run --rate 50 --alpha 1000,1,100 --beta 6000,18,3 --policy-config policy.yaml --instances 8 --trace-decisions decisions.jsonl
    """
    from blis_cal.simulate import SimConfig

    config = SimConfig(
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_prefix_caching=prefix_caching,
        long_prefill_token_threshold=long_prefill_token_threshold,
        long_prefill_token_threshold_adaptive=long_prefill_token_threshold_adaptive,
        seed=42 if seed is None else seed,
    )
    sim_model = _sim_model(
        latency_model, alpha, beta, model, gpu, tp, coeffs, vllm_version, model_config, hardware_config
    )
    from blis_cal.replay.from_workload import workload_trace

    workload, requests, follow_up = run_requests(
        workload_spec,
        preset,
        rate,
        concurrency,
        think_time_ms,
        think_time_dist,
        num_requests,
        duration,
        input_tokens,
        output_tokens,
        seed,
    )
    policy = _cluster_policy(
        policy_config,
        instances,
        admission_policy,
        routing_policy,
        routing_scorers,
        scheduler,
        priority_policy,
        trace_decisions,
    )
    run = _simulate(
        requests,
        config,
        sim_model,
        follow_up,
        policy,
        trace_decisions,
        record_tokens=trace_output is not None,
    )
    label = str(workload_spec) if workload_spec else (f"preset:{preset}" if preset else "")
    source = workload_trace(workload, getattr(follow_up, "released", ()), label)
    _sim_outputs(run, sim_model, results, trace_output, source)


# ---------------------------------------------------------------------------------------------- calibrate
# Calibration engineer's section: `calibrate` and `validate` (library: blis_cal.calibrate).


_MODEL_FORMS_SEE = "`blis policies` lists every form (registry `model_forms`)."


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _calibration_table(title: str, rows: list[dict]) -> Table:
    # Numbers keep their width and a narrow terminal (a pipe: 80 columns) folds the trace name instead of cutting it.
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    table.add_column("trace", overflow="fold", min_width=10)
    columns = (
        "n",
        "req/s",
        "TTFT MAPE",
        "ITL MAPE",
        "E2E MAPE",
        "E2E r",
        "speed drift",
        "decode/ prefill ratio",
        "TTFT floor",
    )
    for col in columns:
        table.add_column(col.replace(" ", "\n"), justify="right", no_wrap=True)
    for row in rows:
        pct = [
            f"{100 * row[k]:.1f} %" if k in row else "-"
            for k in ("ttft_mape", "itl_mape", "e2e_mape", "speed_drift", "ttft_timing_floor")
        ]
        ratios = "/".join(f"{row[k]:.2f}" if k in row else "-" for k in ("step_ratio", "prefill_step_ratio"))
        table.add_row(
            str(row["trace"]),
            str(row["requests"]),
            f"{row['rate_rps']:.2f}",
            *pct[:3],
            f"{row.get('e2e_pearson_r', 0):.3f}",
            pct[3],
            ratios,
            pct[4],
        )
    return table


def _replay_fn(latency_model, alpha, beta, model, gpu, tp, coeffs, vllm_version, session_mode):
    """Build the latency model once; return a function replaying a NamedTrace with it."""
    from blis_cal.calibrate.sim_bridge import replay_model

    sim_model = _sim_model(latency_model, alpha, beta, model, gpu, tp, coeffs, vllm_version, None, None)
    return sim_model, lambda named: replay_model(named.trace, sim_model, session_mode)


@app.command("calibrate")
def calibrate_cmd(
    traces: list[Path] = typer.Argument(..., help="Trace data CSVs (headers are the sibling .yaml files)."),
    do_fit: bool = typer.Option(False, "--fit", help="Fit α/β jointly over the traces, then compare."),
    model: str | None = typer.Option(
        None, "--model", help="Model id of the entry (default: header server.model)."
    ),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU of the entry (default: header server.gpu)."),
    tp: int | None = typer.Option(
        None, "--tp", help="Tensor parallelism of the entry (default: header, else 1)."
    ),
    vllm_version: str | None = typer.Option(
        None, "--vllm-version", help="vLLM version of the entry (default: header server.vllm_version)."
    ),
    model_form: str | None = typer.Option(
        None,
        "--model-form",
        help="Fit: step-time form. blackbox-table (default; the 3+3 fit is reported beside it) adds to "
        "blackbox-floor an offset per batch size of pure-decode steps; blackbox-floor adds to "
        "blackbox-ctx a floor under pure-decode steps at a batch size it finds (none when steps grow from one "
        "request); blackbox-ctx predicted held-out real traces 4x better than blackbox, which gives BLIS's plain "
        "3+3 entry. " + _MODEL_FORMS_SEE,
    ),
    out: Path | None = typer.Option(None, "--out", help="Fit: add/replace the entry in this defaults.yaml."),
    report: Path | None = typer.Option(
        None, "--report", help="Write the JSON report (BLIS layout + ours) here."
    ),
    html_path: Path | None = typer.Option(None, "--html", help="Write a self-contained HTML report here."),
    sim_results: Path | None = typer.Option(
        None,
        "--sim-results",
        help="No fit: compare with this results JSON from `blis replay --results`, or with another capture "
        "(.csv) of the same workload (same spec and seed): the host's run-to-run error, a floor under any "
        "prediction.",
    ),
    coeffs: str | None = typer.Option(None, "--coeffs", help="No fit: coefficients YAML for the lookup."),
    alpha: str | None = typer.Option(None, "--alpha", help="No fit: α0,α1,α2 (µs)."),
    beta: str | None = typer.Option(None, "--beta", help="No fit: β0,β1,β2[,...] (µs)."),
    rtt_us: int | None = typer.Option(
        None, "--network-rtt-us", help="RTT added to simulated TTFT/E2E (default: header measured_rtt_ms)."
    ),
    warmup: int | None = typer.Option(
        None, "--warmup-requests", help="Exclude ids below this (default: header)."
    ),
    bootstrap: int = typer.Option(
        200, "--bootstrap", help="Fit: bootstrap replicates for the intervals (0: none)."
    ),
    prediction_draws: int = typer.Option(
        10, "--prediction-draws", help="Fit: replays for p50/p99 prediction intervals (0: none)."
    ),
    max_evaluations: int = typer.Option(
        12, "--max-evaluations", help="Fit: replays allowed for the simulation-in-the-loop refinement."
    ),
    seed: int = typer.Option(0, "--seed", help="Fit: bootstrap seed."),
    session_mode: str | None = _OPT_SESSION_MODE,
    server_info: list[str] = _OPT_TRACE_SERVER_INFO,
    timing_floor_ms: float | None = _OPT_TIMING_FLOOR,
) -> None:
    """Compare simulated with observed latencies, or fit α/β from traces (`--fit`) and write them.

    With `--fit`: a direct estimate from per-chunk timestamps, refined by replaying every trace in the
    simulator, jointly over all traces; bootstrap intervals for every coefficient and for p50/p99 TTFT/E2E.
    Without: compare one trace with `--sim-results` (a replay's results, or a second capture of the same
    workload: how far the real server is from itself), or replay the traces with looked-up
    (`--coeffs/--model/--gpu/--tp`) or given (`--alpha/--beta`) coefficients and compare. Prints a JSON
    summary.

    Examples:

        blis calibrate traces/A_poisson_0.8.csv traces/C_prefix_1.0.csv --fit --model tiny --gpu cpu --tp 1 --out defaults.yaml --html cal.html

        blis calibrate run.csv --sim-results results.json --report cal.json

        blis calibrate run2.csv --sim-results run1.csv

        blis calibrate run.csv --coeffs defaults.yaml --model tiny --gpu cpu --tp 1
    """
    from blis_cal.calibrate.pipeline import load_traces, run_compare, run_fit
    from blis_cal.calibrate.report_html import write_html
    from blis_cal.errors import ConfigError

    if sim_results is not None and session_mode is not None:
        raise ConfigError("--session-mode sets how calibrate replays; --sim-results are replayed already")
    if timing_floor_ms is not None and (do_fit or sim_results is not None):
        raise ConfigError(
            "--timing-floor-ms replays the traces with given coefficients; not with --fit or --sim-results"
        )
    jitter_us = _timing_floor_us(timing_floor_ms)  # a bad value fails before any trace is read
    session_mode = _session_mode(session_mode)
    named = load_traces(traces, server_info=server_info)
    for t in named:
        print_notes(t.trace.notes)
    server = named[0].trace.header.server
    model = model or (server.model if server else "")
    gpu = gpu or (server.gpu if server else "")
    tp = tp or (server.tensor_parallel if server and server.tensor_parallel else 1)
    vllm_version = vllm_version if vllm_version is not None else (server.vllm_version if server else "")
    fit_result = None
    if do_fit:
        model_form = _model_form(model_form)
        if sim_results or alpha or beta or coeffs:
            raise ConfigError(
                "--fit fits coefficients; it cannot be combined with --sim-results/--alpha/--beta/--coeffs"
            )
        if out is not None and (not model or not gpu):
            raise ConfigError(
                "--out needs the entry's --model and --gpu (the trace header does not name them)"
            )
        with stderr.status("fitting") as status:
            fit_result, data, action = run_fit(
                named,
                model=model,
                gpu=gpu,
                tp=tp,
                vllm_version=vllm_version,
                model_form=model_form,
                out=out,
                bootstrap=bootstrap,
                prediction_draws=prediction_draws,
                max_evaluations=max_evaluations,
                seed=seed,
                rtt_us=rtt_us,
                session_mode=session_mode,
                progress=lambda msg: status.update(f"fitting: {msg}"),
            )
        reports = [fit_result.reports[t.name] for t in named]
        print_notes(fit_result.notes)
        if action:
            stderr.print(f"{action} entry ({model}, {gpu}, TP {tp}, {vllm_version or 'no version'}) in {out}")
    else:
        if out is not None:
            raise ConfigError("--out writes fitted coefficients; add --fit")
        if sim_results is not None:
            from blis_cal.replay import read_results_json

            if len(named) != 1:
                raise ConfigError("--sim-results compares one trace; give exactly one TRACE.csv")
            if sim_results.suffix == ".csv":
                from blis_cal.calibrate.compare import capture_as_results

                capture = load_traces([sim_results])[0]
                results = capture_as_results(capture.trace, named[0].trace, where=str(sim_results))
            else:
                results = read_results_json(sim_results)
            reports, data = run_compare(named, lambda _t: results, rtt_us=rtt_us, warmup=warmup)
        else:
            if not (alpha and beta) and not model:
                raise ConfigError(
                    "give --sim-results, --alpha and --beta, or --model/--gpu/--tp for a lookup (or --fit)"
                )
            sim_model, replay = _replay_fn(
                "blackbox", alpha, beta, model, gpu, tp, coeffs, vllm_version, session_mode
            )
            reports, data = run_compare(
                named,
                replay,
                rtt_us=rtt_us,
                warmup=warmup,
                latency_model=sim_model,
                timing_floor_us=jitter_us,
            )
    print_notes([note for rep in reports for note in rep.notes])
    if report is not None:
        _write_json(report, data)
    if html_path is not None:
        write_html(html_path, reports, title="blis-cal calibration report", fit=fit_result)
    stderr.print(_calibration_table("Calibration", data["summary_rows"]))
    summary = {"summary_rows": data["summary_rows"], "targets": data["targets"]}
    if "baseline_3plus3" in data:
        stderr.print(
            _calibration_table("BLIS 3+3 on the same traces", data["baseline_3plus3"]["summary_rows"])
        )
        summary["baseline_3plus3"] = data["baseline_3plus3"]
    if fit_result is not None:
        summary["calibration"] = {
            k: data["calibration"][k]
            for k in ("model_form", "alpha", "beta", "alpha_ci95", "beta_ci95", "loss", "fit_seconds")
        }
    print_json(summary)


@app.command("validate")
def validate_cmd(
    traces: list[Path] = typer.Argument(
        ..., help="Held-out trace data CSVs (headers are the sibling .yaml)."
    ),
    coeffs: str | None = typer.Option(None, "--coeffs", help="Coefficients YAML (defaults.yaml layout)."),
    model: str | None = typer.Option(None, "--model", help="Model id for the lookup (default: header)."),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU for the lookup."),
    tp: int | None = typer.Option(
        None, "--tp", help="Tensor parallelism for the lookup (default: header, else 1)."
    ),
    vllm_version: str | None = typer.Option(
        None, "--vllm-version", help="Pick the entry of this vLLM version."
    ),
    alpha: str | None = typer.Option(None, "--alpha", help="α0,α1,α2 (µs) instead of a lookup."),
    beta: str | None = typer.Option(None, "--beta", help="β0,β1,β2[,...] (µs) instead of a lookup."),
    rtt_us: int | None = typer.Option(
        None, "--network-rtt-us", help="RTT added to simulated TTFT/E2E (default: header measured_rtt_ms)."
    ),
    report: Path | None = typer.Option(None, "--report", help="Write the JSON validation report here."),
    html_path: Path | None = typer.Option(None, "--html", help="Write a self-contained HTML report here."),
    leave_one_out: bool = typer.Option(
        False,
        "--leave-one-out",
        help="Cross-validate: fit on all traces but one, validate on that one, for each.",
    ),
    model_form: str | None = typer.Option(
        None,
        "--model-form",
        help="--leave-one-out: the step-time form to fit (default: calibrate's). " + _MODEL_FORMS_SEE,
    ),
    session_mode: str | None = _OPT_SESSION_MODE,
    server_info: list[str] = _OPT_TRACE_SERVER_INFO,
    timing_floor_ms: float | None = _OPT_TIMING_FLOOR,
) -> None:
    """Validation report for a model/GPU pair over held-out traces: a row per trace and a pooled summary.

    Each trace is replayed with the coefficients and compared (TTFT/ITL/E2E MAPE, Pearson r, bias, BLIS
    quality, p50/p90/p99 errors); the summary pools all requests and checks the accuracy targets (E2E and
    ITL MAPE ≤ 5 %, TTFT MAPE ≤ 10 %, E2E r ≥ 0.9).

    Examples:

        blis validate traces/real/*.csv --coeffs defaults.yaml --model tiny --gpu cpu --tp 1 --report v.json --html v.html

        blis validate traces/*.csv traces/real/*.csv --leave-one-out --html loo.html
    """
    from blis_cal.calibrate.pipeline import load_traces, run_compare

    session_mode = _session_mode(session_mode)
    jitter_us = _timing_floor_us(timing_floor_ms)
    named = load_traces(traces, server_info=server_info)
    for t in named:
        print_notes(t.trace.notes)
    if leave_one_out:
        from blis_cal.calibrate.pipeline import leave_one_out as cross_validate

        model_form = _model_form(model_form)
        with stderr.status("cross-validating") as status:
            reports, fits = cross_validate(
                named,
                model_form=model_form,
                rtt_us=rtt_us,
                session_mode=session_mode,
                progress=lambda m: status.update(m),
                timing_floor_us=jitter_us,
            )
        coefficients = {
            "leave_one_out": model_form,
            "session_mode": session_mode,
            "fits": {
                t.name: {"alpha": list(f.alpha), "beta": list(f.beta)}
                for t, f in zip(named, fits, strict=True)
            },
        }
        _validation_output(reports, coefficients, report, html_path, f"blis-cal leave-one-out ({model_form})")
        return
    server = named[0].trace.header.server
    model = model or (server.model if server else None)
    gpu = gpu or (server.gpu if server else None)
    # As `calibrate --fit` writes entries: TP from the header, else 1.
    tp = tp or (server.tensor_parallel if server and server.tensor_parallel else 1)
    sim_model, replay = _replay_fn(
        "blackbox", alpha, beta, model, gpu, tp, coeffs, vllm_version, session_mode
    )
    reports, _ = run_compare(named, replay, rtt_us=rtt_us, latency_model=sim_model, timing_floor_us=jitter_us)
    coefficients = sim_model.describe() | {"model": model, "gpu": gpu, "tp": tp, "session_mode": session_mode}
    _validation_output(
        reports, coefficients, report, html_path, f"blis-cal validation: {model} on {gpu or '?'} TP {tp}"
    )


def _validation_output(
    reports, coefficients: dict, report: Path | None, html_path: Path | None, title: str
) -> None:
    from blis_cal.calibrate.pipeline import validation_report
    from blis_cal.calibrate.report_html import write_html

    data = validation_report(reports, coefficients)
    print_notes([note for rep in reports for note in rep.notes])
    if report is not None:
        _write_json(report, data)
    if html_path is not None:
        write_html(html_path, reports, title=title)
    stderr.print(_calibration_table("Validation", data["rows"]))
    print_json(
        {k: data[k] for k in ("coefficients", "rows", "targets")}
        | {"summary": {k: v for k, v in data["summary"].items() if k != "metrics"}}
    )


# ---------------------------------------------------------------------------------------------- observe


def _observe_headers(values: list[str]) -> dict[str, str]:
    from blis_cal.errors import ConfigError

    out = {}
    for item in values:
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise ConfigError(f"--header: expected KEY:VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


@app.command("observe")
def observe_cmd(
    endpoint: str = typer.Option(..., "--endpoint", help="Server base URL, e.g. http://127.0.0.1:8000."),
    model: str = typer.Option(
        ...,
        "--model",
        help="Model name the server serves (sent in every request; checked against its /v1/models list first).",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Trace data CSV; writes the sibling .yaml, .itl.csv, .metrics.csv."
    ),
    workload_spec: Path | None = typer.Option(None, "--workload-spec", help="Workload spec YAML (BLIS v2)."),
    preset: str | None = typer.Option(
        None, "--preset", help=f"Preset or scenario ({_preset_names()}); needs --rate."
    ),
    rate: float | None = typer.Option(
        None, "--rate", help="Requests/s. Alone: Poisson arrivals, chatbot lengths."
    ),
    concurrency: int | None = typer.Option(None, "--concurrency", help="N closed-loop users."),
    think_time_ms: float | None = _OPT_THINK_TIME,
    think_time_dist: str | None = _OPT_THINK_DIST,
    num_requests: int | None = typer.Option(None, "--num-requests", help="Number of requests."),
    duration: float | None = typer.Option(None, "--duration", help="Stop arrivals after this many seconds."),
    input_tokens: int | None = typer.Option(None, "--input-tokens", help="Constant prompt length."),
    output_tokens: int | None = typer.Option(None, "--output-tokens", help="Constant output length."),
    seed: int | None = typer.Option(None, "--seed", help="Workload seed (overrides the spec's)."),
    api: str = typer.Option("completions", "--api", help="completions or chat."),
    prompt_mode: str | None = typer.Option(
        None, "--prompt-mode", help="tokens (token-id arrays, exact; default for completions) or text (chat)."
    ),
    streaming: bool = typer.Option(True, "--streaming/--no-streaming", help="Stream responses (SSE)."),
    max_concurrency: int | None = typer.Option(
        None, "--max-concurrency", help="Cap on requests in flight (default 256; N with --concurrency N)."
    ),
    timeout: float = typer.Option(300.0, "--timeout", help="Whole-request timeout, seconds."),
    drain_timeout: float = typer.Option(
        30.0, "--drain-timeout", help="On Ctrl+C, wait this long for in-flight requests."
    ),
    warmup_requests: int = typer.Option(
        0, "--warmup-requests", help="First N requests: recorded, left out of statistics."
    ),
    prewarm_duration: float = typer.Option(
        0.0,
        "--prewarm-duration",
        help="Seconds of unrecorded load before the run, the first request a prompt as long as the token budget.",
    ),
    api_key: str = typer.Option(
        "", "--api-key", envvar="BLIS_API_KEY", help="Bearer token (never written anywhere)."
    ),
    ignore_eos: bool = typer.Option(
        True, "--ignore-eos/--no-ignore-eos", help="vLLM: exact output lengths (ignore_eos + min_tokens)."
    ),
    record_itl: bool | None = typer.Option(
        None,
        "--record-itl/--no-record-itl",
        help="Write per-event times (.itl.csv); default on when streaming.",
    ),
    header: list[str] = typer.Option([], "--header", help="Extra HTTP header KEY:VALUE (repeatable)."),
    rtt_ms: float = typer.Option(0.0, "--rtt-ms", help="Network round trip to record in the header, ms."),
    max_errors: int = typer.Option(
        0, "--max-errors", help="Stop after this many failed requests (0 = never)."
    ),
    metrics_interval: float = typer.Option(
        0.0,
        "--metrics-interval",
        help="Seconds between /metrics samples into <stem>.metrics.csv (0 = off). Off by default: scraping "
        "during the run can slow a CPU-bound server (vLLM renders /metrics on its API server's event loop). "
        "The header's before/after counters need no sidecar.",
    ),
    vocab_size: int = typer.Option(
        8192, "--vocab-size", help="Token ids are drawn below this (model vocabulary size)."
    ),
    server_info: list[str] = typer.Option(
        [], "--server-info", help="Server fact for the header, KEY=VALUE (e.g. max_num_seqs=64)."
    ),
    http_client: str = typer.Option(
        "httptools",
        "--http-client",
        help="HTTP client for the workload's requests: httptools (keep-alive HTTP/1.1 on the httptools "
        "parser; the least CPU per streamed event, so the most honest timestamps under load), aiohttp or httpx "
        "(benchmarks/observer_overhead.py compares them).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Live progress bar on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Drive a live OpenAI-compatible server with a workload and record a TraceV2 trace.

    Requests go out at their scheduled arrivals (closed-loop users when the previous answer ends), streamed,
    with exact lengths (token-id prompts, ignore_eos); every event's time and token count, the server's
    usage, cached tokens and per-request metrics, and a /metrics time series are recorded. Ctrl+C stops
    sending, drains in-flight requests for --drain-timeout, and leaves a valid trace.

    Examples:

        blis observe --endpoint http://127.0.0.1:8000 --model tiny --rate 2 --num-requests 100 --out run.csv

        blis observe --endpoint http://127.0.0.1:8000 --model tiny --workload-spec spec.yaml --out run.csv

        blis observe --endpoint http://127.0.0.1:8000 --model tiny --concurrency 8 --duration 60 --api chat --out chat.csv
    """
    from blis_cal.observe import ClientConfig, ObserveConfig, observe
    from blis_cal.trace import parse_server_facts, read_trace
    from blis_cal.trace_analysis import trace_summary
    from blis_cal.workload import workload_from_options

    workload = workload_from_options(
        spec_path=workload_spec,
        preset=preset,
        rate=rate,
        concurrency=concurrency,
        think_time_ms=think_time_ms,
        think_time_dist=think_time_dist,
        num_requests=num_requests,
        duration_s=duration,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        seed=seed,
    )
    client = ClientConfig(
        endpoint=endpoint,
        model=model,
        api=api,
        prompt_mode=prompt_mode or "",
        streaming=streaming,
        ignore_eos=ignore_eos,
        timeout_s=timeout,
        api_key=api_key,
        headers=_observe_headers(header),
        vocab_size=vocab_size,
        http_client=http_client,
    )
    config = ObserveConfig(
        client=client,
        max_concurrency=max_concurrency or concurrency or 256,
        drain_timeout_s=drain_timeout,
        warmup_requests=warmup_requests,
        prewarm_duration_s=prewarm_duration,
        record_itl=streaming if record_itl is None else record_itl,
        rtt_ms=rtt_ms,
        max_errors=max_errors,
        metrics_interval_s=metrics_interval,
        workload_spec=str(workload_spec) if workload_spec else (f"preset:{preset}" if preset else ""),
        server_overrides=parse_server_facts(server_info),
    )
    total = num_requests or getattr(workload, "num_requests", None) or None
    if progress:
        result = _observe_with_progress(workload, config, out, total)
    else:
        result = observe(workload, config, out)
    print_notes(result.notes)
    summary = trace_summary(read_trace(out))
    if as_json:
        print_json(summary)
    else:
        stderr.print(summary_table(f"Observed {out}", summary))
    stderr.print(
        f"wrote {out} (+ .yaml"
        + (", .itl.csv" if config.record_itl else "")
        + (", .metrics.csv" if result.metrics_path else "")
        + ")",
        highlight=False,
    )
    if result.stopped:
        stderr.print(f"[yellow]{result.stopped}[/yellow]; the trace holds what was recorded", highlight=False)
        raise SystemExit(130 if result.stopped == "interrupted" else 1)


def _observe_with_progress(workload, config, out: Path, total: int | None):
    """Run `observe` under a rich progress bar: sent / done / errors, live TTFT and E2E p50."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from blis_cal.observe import observe
    from blis_cal.stats import percentile

    bar = Progress(
        TextColumn("observe"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=stderr,
        transient=False,
    )
    task = bar.add_task("observe", total=total, info="")
    last = [0.0]

    def update(p) -> None:
        import time

        now = time.monotonic()
        if now - last[0] < 0.2 and p.done != total:  # percentiles over all requests: not on every event
            return
        last[0] = now
        ttft = percentile(p.ttft_us, 50) / 1000 if p.ttft_us else 0.0
        e2e = percentile(p.e2e_us, 50) / 1000 if p.e2e_us else 0.0
        info = f"sent {p.sent} in-flight {p.in_flight} errors {p.errors} TTFT p50 {ttft:.0f} ms E2E p50 {e2e:.0f} ms"
        if p.stopping:
            info += f" [yellow]{p.stopping}: draining[/yellow]"
        bar.update(task, completed=p.done, info=info)

    with bar:
        return observe(workload, config, out, on_progress=update)


# ---------------------------------------------------------------------------------------------- serve (twin)


@app.command("serve")
def serve_cmd(
    port: int = typer.Option(8000, "--port", help="TCP port (0 = any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    model: str | None = typer.Option(
        None, "--model", help="Served model name; also the coefficient lookup key (default blis-twin)."
    ),
    speed: float = typer.Option(1.0, "--speed", help="Simulated seconds per wall second (>1: faster)."),
    latency_model: str = _OPT_LATENCY_MODEL,
    alpha: str | None = _OPT_ALPHA,
    beta: str | None = _OPT_BETA,
    gpu: str | None = _OPT_GPU,
    tp: int | None = _OPT_TP,
    vllm_version: str | None = _OPT_VLLM_VERSION,
    coeffs: str | None = _OPT_COEFFS,
    model_config: str | None = _OPT_MODEL_CONFIG,
    hardware_config: str | None = _OPT_HARDWARE_CONFIG,
    block_size: int = _OPT_BLOCK_SIZE,
    num_gpu_blocks: int = _OPT_NUM_GPU_BLOCKS,
    max_num_seqs: int | None = _OPT_MAX_NUM_SEQS,
    max_num_batched_tokens: int = _OPT_MAX_BATCHED,
    max_model_len: int = _OPT_MAX_MODEL_LEN,
    long_prefill_token_threshold: int = _OPT_LONG_PREFILL,
    long_prefill_token_threshold_adaptive: bool = _OPT_LONG_PREFILL_ADAPTIVE,
    prefix_caching: bool = _OPT_PREFIX_CACHING,
    eos_mean_tokens: int = typer.Option(
        128, "--eos-mean-tokens", help="Mean answer length when a request does not set ignore_eos."
    ),
    seed: int = typer.Option(42, "--seed", help="Seed of the simulator and of the answer lengths."),
    policy_config: Path | None = _OPT_POLICY_CONFIG,
    instances: int | None = _OPT_INSTANCES,
    admission_policy: str | None = _OPT_ADMISSION,
    routing_policy: str | None = _OPT_ROUTING,
    routing_scorers: str | None = _OPT_SCORERS,
    scheduler: str | None = _OPT_SCHEDULER,
    priority_policy: str | None = _OPT_PRIORITY,
) -> None:
    """Serve the simulator behind vLLM's OpenAI API (a digital twin, no GPU): tokens stream in real time.

    /v1/completions, /v1/chat/completions (SSE with usage chunk and [DONE], or JSON), /v1/models,
    /metrics (vLLM names), /health, /version. `--speed 10` runs simulated time 10x faster than the wall.

    Examples:

        blis serve --port 8000 --alpha 20000,0,0 --beta 18000,1200,4500 --model tiny-twin

        blis serve --model meta-llama/llama-3.1-8b-instruct --gpu H100 --tp 1 --speed 5

        blis serve --alpha 5000,1,0 --beta 6000,12,150 --instances 4 --routing-policy least-loaded
    """
    import asyncio

    from blis_cal.simulate import SimConfig
    from blis_cal.twin.live import simulated_twin, twin_config_for
    from blis_cal.twin.server import serve_forever

    sim_model = _sim_model(
        latency_model, alpha, beta, model, gpu, tp, coeffs, vllm_version, model_config, hardware_config
    )
    config = SimConfig(
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_prefix_caching=prefix_caching,
        long_prefill_token_threshold=long_prefill_token_threshold,
        long_prefill_token_threshold_adaptive=long_prefill_token_threshold_adaptive,
        seed=seed,
    )
    policy = _cluster_policy(
        policy_config,
        instances,
        admission_policy,
        routing_policy,
        routing_scorers,
        scheduler,
        priority_policy,
        None,
    )
    twin = twin_config_for(
        config, model_name=model or "blis-twin", speed=speed, eos_mean_tokens=eos_mean_tokens
    )
    engine = simulated_twin(config, sim_model, twin, policy)

    def ready(url: str) -> None:
        described = ", ".join(f"{k}={v}" for k, v in sim_model.describe().items())
        stderr.print(
            f"twin of [bold]{twin.model_name}[/bold] ({described}; speed x{speed:g}) at {url}  (Ctrl+C stops)",
            highlight=False,
        )

    try:
        asyncio.run(serve_forever(engine, host, port, ready))
    except KeyboardInterrupt:
        stderr.print("stopped")
    except OSError as exc:
        raise BlisError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------- demo


@app.command("demo")
def demo_cmd(
    workdir: Path | None = typer.Option(
        None, "--workdir", help="Where to write files (default: a new temp dir)."
    ),
    speed: float = typer.Option(2.0, "--speed", help="Twin speed: simulated seconds per wall second."),
    duration: float = typer.Option(60.0, "--duration", help="Wall seconds of traffic."),
    rate: float = typer.Option(0.35, "--rate", help="Requests per simulated second."),
    seed: int = typer.Option(42, "--seed", help="Workload and fit seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of tables."),
) -> None:
    """Run the whole loop on a digital twin: serve known α/β, observe, replay, fit, compare (no GPU).

    Starts the twin in-process, observes it with a mixed workload (about a minute), rescales the trace to
    simulated time, replays it with the true coefficients (parity), fits α/β and shows fitted vs true.

    Examples:

        blis demo

        blis demo --workdir demo-out --speed 4 --duration 30
    """
    import tempfile

    from blis_cal.demo import DemoConfig, run_demo

    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="blis-demo-"))
    stderr.print(f"blis demo: files in {workdir}", highlight=False)
    result = run_demo(
        DemoConfig(workdir=workdir, speed=speed, duration_s=duration, rate=rate, seed=seed), stderr
    )
    if as_json:
        print_json(result.to_dict())
        return
    _demo_tables(result)


def _demo_tables(result) -> None:
    """The demo's report: coefficients true vs fitted, then MAPE of the two replays."""
    coeffs = Table(title="Coefficients (µs): true vs fitted", title_justify="left")
    for col in ("coefficient", "true", "fitted", "error"):
        coeffs.add_column(col, justify="left" if col == "coefficient" else "right")
    errors = result.coefficient_errors()
    for name, true, fitted in (
        ("alpha", result.true_alpha, result.fitted_alpha),
        ("beta", result.true_beta, result.fitted_beta),
    ):
        for i, t in enumerate(true):
            f = fitted[i] if i < len(fitted) else 0.0
            err = errors.get(f"{name}{i}")
            coeffs.add_row(f"{name}{i}", f"{t:g}", f"{f:.6g}", "-" if err is None else f"{err * 100:.1f} %")
    stdout.print(coeffs)
    mape = Table(title="MAPE vs observed", title_justify="left")
    for col in ("replay", "TTFT", "ITL", "E2E"):
        mape.add_column(col, justify="left" if col == "replay" else "right")
    for label, values in (
        ("true coefficients", result.parity_mape),
        ("fitted coefficients", result.fitted_mape),
    ):
        mape.add_row(label, *(f"{values[m] * 100:.2f} %" for m in ("ttft", "itl", "e2e")))
    stdout.print(mape)
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    stdout.print(
        f"{result.requests} requests {result.by_status}; client + HTTP overhead p50 "
        f"{result.overhead_ms['p50']:.2f} ms; {timing}",
        highlight=False,
    )
    stdout.print(f"report: {result.report_html}  defaults entry: {result.defaults_yaml}", highlight=False)


def main() -> None:
    """Entry point: library errors become one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except typer.TyperException as exc:  # usage errors (unknown command or option, missing argument)
        if not hasattr(exc, "show"):
            raise
        exc.show()
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except BlisError as exc:
        stderr.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except FileNotFoundError as exc:
        stderr.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        stderr.print("[red]interrupted[/red]")
        raise SystemExit(130) from None
