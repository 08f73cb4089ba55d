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
class FitCoverage:
    """What the traces an entry was fitted on decoded (our `fit:` block): past it, step costs are extrapolated.
    `batch_max`: the most decoding requests at once (a batch size seen in enough pure-decode steps);
    `context_max`: the most context tokens per decoding request (a size's mean), None when unrecorded."""

    batch_max: int
    context_max: int | None = None


@dataclass(frozen=True)
class Coefficients:
    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    entry: dict[str, Any]  # the matching `models:` entry as written

    @property
    def fit_coverage(self) -> FitCoverage | None:
        """The batch sizes and contexts the entry's traces decoded (our `fit:` block's `decode_batch_max` and
        `decode_context_max`); None for entries without them (BLIS's, hand-written)."""
        fit = self.entry.get("fit")
        batch = self._fit_count(fit, "decode_batch_max") if isinstance(fit, dict) else None
        return None if batch is None else FitCoverage(batch, self._fit_count(fit, "decode_context_max"))

    def _fit_count(self, fit: dict[str, Any], key: str) -> int | None:
        value = fit.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(
                f"entry {self.entry.get('id')} {_describe(self.entry)}: fit.{key} must be an integer >= 0, "
                f"got {value!r}"
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
