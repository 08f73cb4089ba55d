"""Observe: drive a live OpenAI-compatible server (vLLM first) with a workload and record a TraceV2 trace."""

from blis_cal.observe.client import APIS, PROMPT_MODES, ClientConfig
from blis_cal.observe.clock import new_event_loop
from blis_cal.observe.dispatcher import ObserveConfig, Observer, ObserveResult, Progress, observe

__all__ = [
    "APIS",
    "PROMPT_MODES",
    "ClientConfig",
    "ObserveConfig",
    "ObserveResult",
    "Observer",
    "Progress",
    "new_event_loop",
    "observe",
]
