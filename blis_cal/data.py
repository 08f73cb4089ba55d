"""Locate the data files shipped with the package (defaults.yaml, hardware_config.json, model_configs/)."""

from pathlib import Path

_PACKAGE_DATA = Path(__file__).resolve().parent / "_data"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_path(name: str) -> Path:
    """Path of a shipped data file: inside the wheel (blis_cal/_data) or, in a source checkout, the repo top."""
    for base in (_PACKAGE_DATA, _REPO_ROOT):
        candidate = base / name
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"shipped data file {name!r} not found under {_PACKAGE_DATA} or {_REPO_ROOT}")
