"""α/β coefficient lookup in a `defaults.yaml` (BLIS layout, blis-formats.md §7) by (model, GPU, TP)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from blis_cal.data import data_path
from blis_cal.errors import ConfigError


@dataclass(frozen=True)
class Coefficients:
    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    entry: dict[str, Any]  # the matching `models:` entry as written

    @property
    def fitted_batch_max(self) -> int | None:
        """The most decoding requests at once in the traces the entry was fitted on (our `fit:` block's
        `decode_batch_max`); None for entries without one (BLIS's, hand-written)."""
        fit = self.entry.get("fit")
        value = fit.get("decode_batch_max") if isinstance(fit, dict) else None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(
                f"entry {self.entry.get('id')} {_describe(self.entry)}: fit.decode_batch_max must be an "
                f"integer >= 0, got {value!r}"
            )
        return value


def _load(path: str | Path | None) -> tuple[Path, dict[str, Any]]:
    file = Path(path) if path is not None else data_path("defaults.yaml")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"coefficients file {file} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ConfigError(f"{file}: expected a mapping with a `models:` list (BLIS defaults.yaml layout)")
    return file, data


def _describe(entry: dict[str, Any]) -> str:
    return f"GPU={entry.get('GPU')} TP={entry.get('tensor_parallelism')} vllm_version={entry.get('vllm_version')}"


def load_coefficients(
    path: str | Path | None, model: str, gpu: str, tp: int | None, vllm_version: str | None = None
) -> Coefficients:
    """The entry for (model, GPU, TP[, vLLM version]) in `path` (default: the shipped defaults.yaml).

    Model ids compare case-insensitively (BLIS lowercases them). An empty GPU or TP 0/None is filled from the
    file's `defaults:` block for that model; an empty or None version matches any. When several entries match
    (different vLLM versions), the one named in `defaults:` wins, else the first. Errors list what exists for
    the model.
    """
    file, data = _load(path)
    model_id = model.strip().lower()
    defaults = {str(k).lower(): v for k, v in (data.get("defaults") or {}).items()}.get(model_id) or {}
    gpu = gpu or str(defaults.get("GPU") or "")
    tp = tp or int(defaults.get("tensor_parallelism") or 0)
    entries = [e for e in data["models"] if isinstance(e, dict) and str(e.get("id", "")).lower() == model_id]
    if not entries:
        known = sorted({str(e.get("id", "")).lower() for e in data["models"] if isinstance(e, dict)})
        close = difflib.get_close_matches(model_id, known, n=5, cutoff=0.4)
        hint = f"; did you mean: {', '.join(close)}" if close else f"; {len(known)} models are listed"
        raise ConfigError(f"{file}: no coefficients for model {model!r}{hint}")
    matches = [
        e
        for e in entries
        if str(e.get("GPU", "")).lower() == gpu.lower()
        and int(e.get("tensor_parallelism", 0)) == tp
        and (not vllm_version or str(e.get("vllm_version", "")) == vllm_version)  # "": a header without one
    ]
    if not matches:
        available = "; ".join(sorted({_describe(e) for e in entries}))
        wanted = f"GPU={gpu or '?'} TP={tp or '?'}" + (
            f" vllm_version={vllm_version}" if vllm_version else ""
        )
        raise ConfigError(
            f"{file}: no coefficients for {model_id} with {wanted}; available for this model: {available}"
        )
    preferred = [
        e for e in matches if str(e.get("vllm_version", "")) == str(defaults.get("vllm_version", ""))
    ]
    entry = (preferred or matches)[0]
    try:
        alpha = tuple(float(x) for x in entry["alpha_coeffs"])
        beta = tuple(float(x) for x in entry["beta_coeffs"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{file}: entry {model_id} {_describe(entry)} has bad alpha_coeffs/beta_coeffs: {exc}"
        ) from None
    return Coefficients(alpha=alpha, beta=beta, entry=dict(entry))
