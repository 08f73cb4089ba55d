"""Traces and workloads turned into simulator requests, and simulation results written back out."""

from blis_cal.replay.from_trace import (
    config_from_trace,
    replay_trace,
    requests_from_trace,
    trace_requests,
    unstated_settings_note,
)
from blis_cal.replay.results import read_results_json, results_to_json, results_to_trace, write_results_json
from blis_cal.replay.sessions import DEFAULT_SESSION_MODE, session_modes, with_think_time

__all__ = [
    "DEFAULT_SESSION_MODE",
    "config_from_trace",
    "read_results_json",
    "replay_trace",
    "requests_from_trace",
    "results_to_json",
    "results_to_trace",
    "session_modes",
    "trace_requests",
    "unstated_settings_note",
    "with_think_time",
    "write_results_json",
]
