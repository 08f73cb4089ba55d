"""The calibration's view of the simulator: replay a trace with given coefficients."""

from __future__ import annotations

from collections.abc import Sequence

from blis_cal.replay import DEFAULT_SESSION_MODE, config_from_trace, replay_trace
from blis_cal.simulate import LatencyModel, RequestResult, latency_models
from blis_cal.trace import Trace


def replay_with(
    trace: Trace,
    latency_model: str,
    alpha: Sequence[float],
    beta: Sequence[float],
    session_mode: str = DEFAULT_SESSION_MODE,
) -> list[RequestResult]:
    """Replay `trace` on the engine settings in its header with the `latency_model` built from α/β."""
    return replay_model(trace, latency_models.get(latency_model)(tuple(alpha), tuple(beta)), session_mode)


def replay_model(
    trace: Trace, model: LatencyModel, session_mode: str = DEFAULT_SESSION_MODE
) -> list[RequestResult]:
    """Replay `trace` on the engine settings in its header with an already built latency model."""
    return replay_trace(trace, config_from_trace(trace.header), model, session_mode=session_mode).results
