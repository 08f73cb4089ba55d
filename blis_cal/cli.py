"""The `blis` command line: thin wrappers that parse flags, call the library and print results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
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
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


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
    """Summarise a trace: counts by status, rate, token stats, TTFT / ITL / E2E.

    Examples:

        blis trace info traces/A_poisson_0.8.csv

        blis trace info run.csv --header run-header.yaml --json
    """
    from blis_cal.trace import read_trace, trace_summary

    trace = read_trace(trace_csv, header, skip_bad_rows=skip_bad_rows)
    print_notes(trace.notes)
    summary = trace_summary(trace)
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


def main() -> None:
    """Entry point: library errors become one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except BlisError as exc:
        stderr.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except FileNotFoundError as exc:
        stderr.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        stderr.print("[red]interrupted[/red]")
        raise SystemExit(130) from None
