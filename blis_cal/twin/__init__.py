"""The digital twin: the live simulator behind a vLLM-compatible OpenAI API (`blis serve`)."""

from blis_cal.twin.api import ApiError, ParsedRequest, parse_request
from blis_cal.twin.server import (
    TwinApp,
    TwinClock,
    TwinConfig,
    TwinEngine,
    TwinServerThread,
    build_app,
    serve_forever,
)

__all__ = [
    "ApiError",
    "ParsedRequest",
    "TwinApp",
    "TwinClock",
    "TwinConfig",
    "TwinEngine",
    "TwinServerThread",
    "build_app",
    "parse_request",
    "serve_forever",
]
