"""The "roofline" step-time model: analytical, from a HF `config.json` and `hardware_config.json`.

One step is one forward pass over all its tokens (vLLM V1 mixes prefill chunks and decodes in a batch):
  compute time = prefill FLOPs / (peak · mfuPrefill) + decode FLOPs / (peak · mfuDecode)
  memory time  = (weights read once + KV written + KV read + activations) / bandwidth
  step         = max(compute, memory) + overheads (optional hardware keys, µs: TOverheadMicros per step,
                 perLayerOverhead per layer, allReduceLatency ×2 per layer when TP > 1)
Everything but the overheads is divided by TP (weights and heads are sharded). FLOPs per token: the
QKV/output projections, a gated (SwiGLU) or plain MLP (top-k routed + shared experts for MoE), the LM head
once per request; attention 4·H·d_head per (query, key) pair, with a prefill chunk of n tokens after c
cached ones attending to c + (n−1)/2 keys on average. Queue and output delays are α0 + α1·input and α2
(from --alpha, or the blackbox entry for the model when one exists, else 0).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blis_cal.data import data_path
from blis_cal.errors import ConfigError
from blis_cal.simulate.latency import (
    LatencyModel,
    LatencyOptions,
    StepBatch,
    check_coefficients,
    latency_models,
)

_DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "fp8": 1,
    "int8": 1,
    "uint8": 1,
}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # dense MLP width, or per-expert width for MoE
    vocab: int
    bytes_per_param: float
    gated_mlp: bool
    experts: int = 0  # 0 = dense
    top_k: int = 0
    shared_ffn: int = 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: str) -> ModelShape:
        cfg = {**cfg, **(cfg.get("text_config") or {})}  # multimodal configs nest the language model

        def need(key: str) -> int:
            value = cfg.get(key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{where}: field {key} must be a positive integer, got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").lower()
        if dtype not in _DTYPE_BYTES:
            raise ConfigError(f"{where}: unknown dtype {dtype!r}; known: {', '.join(sorted(_DTYPE_BYTES))}")
        quant = cfg.get("quantization_config") or {}
        bytes_per_param = (
            1
            if str(quant.get("quant_method", "")).lower() in ("fp8", "compressed-tensors")
            else _DTYPE_BYTES[dtype]
        )
        experts = int(
            cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0
        )
        ffn = int(cfg.get("intermediate_size") or 4 * hidden)
        if experts > 1:
            ffn = int(cfg.get("moe_intermediate_size") or ffn)
        shared = int(cfg.get("shared_expert_intermediate_size") or 0)
        if not shared and cfg.get("n_shared_experts"):
            shared = int(cfg["n_shared_experts"]) * ffn
        return cls(
            layers=need("num_hidden_layers"),
            hidden=hidden,
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            ffn=ffn,
            vocab=int(cfg.get("vocab_size") or 0),
            bytes_per_param=bytes_per_param,
            gated_mlp=str(cfg.get("hidden_act", "silu")).lower()
            in ("silu", "swiglu", "gelu_pytorch_tanh", "geglu"),
            experts=experts if experts > 1 else 0,
            top_k=int(cfg.get("num_experts_per_tok") or 0) if experts > 1 else 0,
            shared_ffn=shared,
        )

    @classmethod
    def load(cls, path: Path) -> ModelShape:
        """The shape in the HF config.json at `path`."""
        return cls.from_config(_load_json(path, "model config"), str(path))

    @property
    def weights_per_layer(self) -> int:
        """Weights one token goes through in a layer: attention projections and the (active) MLP."""
        d, dkv = self.hidden, self.kv_heads * self.head_dim
        attn = d * (self.heads * self.head_dim + 2 * dkv) + self.heads * self.head_dim * d
        mats = 3 if self.gated_mlp else 2
        if self.experts:
            return attn + (self.top_k * self.ffn + self.shared_ffn) * mats * d + d * self.experts  # + router
        return attn + mats * d * self.ffn

    @property
    def flops_per_token(self) -> float:
        """2 FLOPs per active weight, all layers (the LM head runs once per request: not counted)."""
        return 2.0 * self.weights_per_layer * self.layers

    @property
    def attn_flops_per_pair(self) -> float:
        """One (query, key) pair of causal attention: QK and PV over every head, plus the softmax."""
        return (4.0 * self.heads * self.head_dim + 5.0 * self.heads) * self.layers


def shipped_model_shape(model: str) -> ModelShape | None:
    """The shape of `model` from the shipped model_configs/ (as the roofline finds it), None without one."""
    try:
        path = model_config_path(model, None)
    except ConfigError:
        return None
    return ModelShape.load(path)


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def model_config_path(model: str, given: str | None) -> Path:
    """`given` (a config.json or its folder), else the shipped model_configs/<name after '/'>/config.json."""
    if given:
        path = Path(given)
        return path / "config.json" if path.is_dir() else path
    if not model:
        raise ConfigError("the roofline model needs --model (shipped model_configs/) or --model-config")
    name = model.strip().lower().split("/")[-1]
    root = data_path("model_configs")
    path = root / name / "config.json"
    if not path.exists():
        known = sorted(p.name for p in root.iterdir() if (p / "config.json").exists())
        raise ConfigError(
            f"no shipped model config for {model!r} (looked for {path}); give --model-config; shipped: {', '.join(known)}"
        )
    return path


@latency_models.register("roofline")
class RooflineModel(LatencyModel):
    name = "roofline"

    def __init__(
        self,
        shape: ModelShape,
        hardware: dict[str, Any],
        tp: int,
        alpha: tuple[float, ...] = (0.0, 0.0, 0.0),
        gpu: str = "",
    ) -> None:
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"tensor parallelism must be a positive integer, got {tp!r}")
        self.shape, self.tp, self.gpu = shape, tp, gpu
        self.alpha = check_coefficients("alpha", alpha, 3, 3)
        hw = {k: v for k, v in hardware.items() if not k.startswith("_")}
        for key in ("TFlopsPeak", "BwPeakTBs", "mfuPrefill", "mfuDecode"):
            value = hw.get(key)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"hardware {gpu or ''}: {key} must be a positive number, got {value!r}")
        self.peak_flops = float(hw["TFlopsPeak"]) * 1e12
        self.bandwidth = float(hw["BwPeakTBs"]) * 1e12
        self.mfu_prefill, self.mfu_decode = float(hw["mfuPrefill"]), float(hw["mfuDecode"])
        s = shape
        self.overhead_us = float(hw.get("TOverheadMicros", 0)) + s.layers * float(
            hw.get("perLayerOverhead", 0)
        )
        if tp > 1:
            self.overhead_us += s.layers * 2 * float(hw.get("allReduceLatency", 0))
        d, dkv = s.hidden, s.kv_heads * s.head_dim
        # Per new token: 2 FLOPs per active weight (all layers); per request: the LM head on its last token.
        self.flops_per_token = s.flops_per_token
        self.flops_per_request = 2.0 * d * s.vocab
        self.attn_flops_per_pair = s.attn_flops_per_pair
        self.weight_bytes = (
            s.weights_per_layer * s.layers * s.bytes_per_param + d * s.vocab * s.bytes_per_param
        )
        self.kv_bytes_per_token = 2.0 * s.layers * dkv * s.bytes_per_param
        self.act_bytes_per_token = s.layers * d * s.bytes_per_param

    def queue_delay_us(self, input_len: int) -> int:
        return int(self.alpha[0] + self.alpha[1] * input_len)

    def output_delay_us(self) -> int:
        return int(self.alpha[2])

    def step_time_us(self, batch: StepBatch) -> int:
        if batch.num_prefill_tokens + batch.num_decode_tokens == 0:
            return 0
        tp = self.tp
        p_pairs = batch.prefill_attention_pairs
        prefill_flops = (
            self.flops_per_token * batch.num_prefill_tokens
            + self.flops_per_request * batch.num_prefill_reqs
            + self.attn_flops_per_pair * p_pairs
        )
        decode_flops = (
            self.flops_per_token + self.flops_per_request
        ) * batch.num_decode_tokens + self.attn_flops_per_pair * (
            batch.decode_context_tokens + batch.num_decode_tokens
        )
        compute_s = (prefill_flops / self.mfu_prefill + decode_flops / self.mfu_decode) / (
            self.peak_flops * tp
        )
        new_tokens = batch.num_prefill_tokens + batch.num_decode_tokens
        kv_read = batch.prefill_context_tokens + batch.decode_context_tokens
        memory_bytes = (
            self.weight_bytes
            + self.kv_bytes_per_token * (new_tokens + kv_read)
            + self.act_bytes_per_token * new_tokens
        )
        memory_s = memory_bytes / (self.bandwidth * tp)
        return round(max(compute_s, memory_s) * 1e6 + self.overhead_us)

    def describe(self) -> dict:
        return {"latency_model": self.name, "gpu": self.gpu, "tp": self.tp, "alpha": list(self.alpha)}

    @classmethod
    def from_options(cls, opts: LatencyOptions) -> RooflineModel:
        shape = ModelShape.load(model_config_path(opts.model, opts.model_config))
        hw_path = Path(opts.hardware_config) if opts.hardware_config else data_path("hardware_config.json")
        table = _load_json(hw_path, "hardware config")
        if not opts.gpu or opts.gpu not in table:
            known = ", ".join(k for k in table if not k.startswith("_"))
            raise ConfigError(f"{hw_path}: no hardware {opts.gpu!r} (--gpu); known: {known}")
        alpha = opts.alpha
        if alpha is None:
            alpha = (0.0, 0.0, 0.0)
            if opts.model:
                from blis_cal.simulate.coefficients import load_coefficients

                # No blackbox entry for this triple: no queue/output delays unless --alpha is given.
                with contextlib.suppress(ConfigError):
                    alpha = load_coefficients(
                        opts.coeffs_path, opts.model, opts.gpu, opts.tp, opts.vllm_version
                    ).alpha
        return cls(shape, table[opts.gpu], opts.tp or 1, alpha, opts.gpu)
