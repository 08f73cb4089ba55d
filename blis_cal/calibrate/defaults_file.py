"""Add or replace one coefficient entry in a defaults.yaml, keeping every other byte of the file.

The `models:` list holds entries keyed by (id, GPU, tensor_parallelism, vllm_version) (blis-formats.md §7).
The file is edited as text: the YAML node positions of the matching entry give the span to replace, so
comments, key order, number formatting and the other sections stay exactly as they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from blis_cal.errors import ConfigError

KEY_FIELDS = ("id", "GPU", "tensor_parallelism", "vllm_version")
ENTRY_ORDER = (
    "id",
    "GPU",
    "tensor_parallelism",
    "vllm_version",
    "alpha_coeffs",
    "beta_coeffs",
    "total_kv_blocks",
    "best_loss",
)


def entry_key(entry: dict[str, Any]) -> tuple[str, str, int, str]:
    """The identity of an entry: model id (case-insensitive, as BLIS's lookup lowercases it), GPU, TP, version."""
    return (
        str(entry.get("id", "")).lower(),
        str(entry.get("GPU", "")),
        int(entry.get("tensor_parallelism", 0) or 0),
        str(entry.get("vllm_version", "") or ""),
    )


def make_entry(
    *,
    model: str,
    gpu: str,
    tp: int,
    vllm_version: str,
    alpha: tuple[float, ...],
    beta: tuple[float, ...],
    loss: float,
    total_kv_blocks: int = 0,
    fit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `models:` entry in BLIS's layout, plus our `fit:` metadata block when given."""
    if not model or not gpu or tp <= 0:
        raise ConfigError(
            f"a defaults.yaml entry needs a model id, a GPU and a TP >= 1 (got {model!r}, {gpu!r}, {tp})"
        )
    entry: dict[str, Any] = {
        "id": model,
        "GPU": gpu,
        "tensor_parallelism": int(tp),
        "vllm_version": vllm_version,
        "alpha_coeffs": [float(a) for a in alpha],
        "beta_coeffs": [float(b) for b in beta],
    }
    if total_kv_blocks > 0:
        entry["total_kv_blocks"] = int(total_kv_blocks)
    entry["best_loss"] = float(loss)
    if fit:
        entry["fit"] = fit
    return entry


def _dump_item(entry: dict[str, Any], indent: int) -> str:
    ordered = {k: entry[k] for k in ENTRY_ORDER if k in entry}
    ordered.update({k: v for k, v in entry.items() if k not in ordered})
    text = yaml.safe_dump(
        [ordered], default_flow_style=False, sort_keys=False, allow_unicode=True, width=1000
    )
    pad = " " * indent
    return "".join(pad + line if line.strip() else line for line in text.splitlines(keepends=True))


def _max_end(node: yaml.Node) -> int:
    """End offset of the last character belonging to `node` (its deepest last scalar)."""
    if isinstance(node, yaml.ScalarNode):
        return node.end_mark.index
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            children.extend((k, v))
    return max([_max_end(c) for c in children], default=node.end_mark.index)


def _line_start(text: str, index: int) -> int:
    return text.rfind("\n", 0, index) + 1


def _line_end(text: str, index: int) -> int:
    nl = text.find("\n", index)
    return len(text) if nl < 0 else nl + 1


def merge_defaults_entry(path: str | Path, entry: dict[str, Any]) -> str:
    """Write `entry` into the `models:` list of the defaults.yaml at `path`; returns "created", "added" or
    "replaced". Every byte outside the replaced (or appended) entry is kept."""
    path = Path(path)
    for key in KEY_FIELDS:
        if key not in entry:
            raise ConfigError(f"defaults.yaml entry lacks {key!r} (needs {', '.join(KEY_FIELDS)})")
    if not path.exists():
        path.write_text("models:\n" + _dump_item(entry, 0), encoding="utf-8")
        return "created"
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if root is None:
        sep = "" if not text or text.endswith("\n") else "\n"
        path.write_text(text + sep + "models:\n" + _dump_item(entry, 0), encoding="utf-8")
        return "added"
    if not isinstance(root, yaml.MappingNode) or not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping with a 'models:' list")
    models_node = next((v for k, v in root.value if getattr(k, "value", None) == "models"), None)
    if models_node is None:
        sep = "" if text.endswith("\n") else "\n"
        path.write_text(text + sep + "models:\n" + _dump_item(entry, 0), encoding="utf-8")
        return "added"
    models = data.get("models")
    if models is None:  # `models:` with no value
        key_node = next(k for k, v in root.value if v is models_node)
        start, end = _line_start(text, key_node.start_mark.index), _line_end(text, key_node.end_mark.index)
        path.write_text(text[:start] + "models:\n" + _dump_item(entry, 0) + text[end:], encoding="utf-8")
        return "added"
    if not isinstance(models_node, yaml.SequenceNode) or not isinstance(models, list):
        raise ConfigError(f"{path}: 'models' must be a list of entries")
    if models_node.flow_style and models_node.value:
        raise ConfigError(
            f"{path}: 'models' is a flow-style list; rewrite it in block style to merge into it"
        )
    want = entry_key(entry)
    for node, existing in zip(models_node.value, models, strict=True):
        if isinstance(existing, dict) and entry_key(existing) == want:
            start = _line_start(text, node.start_mark.index)
            end = _line_end(text, _max_end(node))
            dash_col = node.start_mark.column - 2 if node.start_mark.column >= 2 else 0
            path.write_text(text[:start] + _dump_item(entry, dash_col) + text[end:], encoding="utf-8")
            return "replaced"
    if models_node.value:
        last = models_node.value[-1]
        end = _line_end(text, _max_end(last))
        dash_col = last.start_mark.column - 2 if last.start_mark.column >= 2 else 0
        prefix = text[:end] if text[:end].endswith("\n") else text[:end] + "\n"
        path.write_text(prefix + _dump_item(entry, dash_col) + text[end:], encoding="utf-8")
        return "added"
    # `models: []` or `models:` with nothing: replace the empty value with a block list.
    key_node = next(k for k, v in root.value if v is models_node)
    start = _line_start(text, key_node.start_mark.index)
    end = _line_end(text, max(models_node.end_mark.index - 1, key_node.end_mark.index))
    path.write_text(text[:start] + "models:\n" + _dump_item(entry, 0) + text[end:], encoding="utf-8")
    return "added"
