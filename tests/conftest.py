"""Shared fixtures: paths to the repo's sample traces and to ../shared."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRACES = REPO / "traces"


def shared_dir() -> Path:
    """`../shared` beside the checkout (CI layout), or $BLIS_SHARED."""
    return Path(os.environ.get("BLIS_SHARED", REPO.parent / "shared"))


@pytest.fixture
def trace_a() -> Path:
    return TRACES / "A_poisson_0.8.csv"


@pytest.fixture
def trace_c() -> Path:
    return TRACES / "C_prefix_1.0.csv"
