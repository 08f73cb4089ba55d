"""The twin's side of the vLLM OpenAI API: request parsing and validation, response bodies, error bodies.

Shapes follow vLLM 0.32 (`entrypoints/openai/{completion,chat_completion}/protocol.py` and `serving.py`):
streamed chunks are dumped with `exclude_unset` (so every choice field appears, `usage` only with
continuous usage), the usage chunk with `exclude_none`, errors as `{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from blis_cal.errors import BlisError

# vLLM 0.32 `CompletionRequest.max_tokens` defaults to 16; chat leaves it unset (-> max_model_len - prompt).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# Generated text: one word per token, cycling through BLIS's 100-word prompt vocabulary (blis-formats §2),
# so a client that counts words counts tokens.
# fmt: off
FILLER_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "apple", "banana", "cherry", "date",
    "elder", "fig", "grape", "hazel", "iris", "jasmine", "kiwi", "lemon", "mango", "nutmeg", "olive",
    "peach", "quince", "rose", "sage", "thyme", "umber", "violet", "willow", "yarrow", "acorn", "birch",
    "cedar", "daisy", "elm", "fern", "ginger", "holly", "ivy", "juniper", "kelp", "laurel", "maple",
    "nettle", "oak", "pine", "quinoa", "reed", "spruce", "tulip", "umbra", "vine", "walnut", "xylem",
    "yew", "zinnia", "alder", "basil", "clover", "dill", "fennel", "garlic", "hemp", "indigo", "jade",
    "kumquat", "lily", "moss", "neem", "orchid", "poppy", "rye", "saffron", "tea", "urchin", "verbena",
    "wheat", "xeris", "yucca", "zest",
)
# fmt: on

_WORD_RE = re.compile(r"\w+|[^\w\s]")
# Chat template cost: each message is wrapped in a role marker and an end marker; the generation prompt
# adds one assistant marker (a fixed, documented stand-in for a real chat template).
CHAT_TOKENS_PER_MESSAGE = 2
CHAT_GENERATION_PROMPT_TOKENS = 1


class ApiError(BlisError):
    """A request the twin refuses, carried as vLLM's error body and HTTP status."""

    def __init__(self, message: str, *, status: int = 400, err_type: str = "BadRequestError", param=None):
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(str(self), status=self.status, err_type=self.err_type, param=self.param)


def error_body(message: str, *, status: int = 400, err_type: str = "BadRequestError", param=None) -> dict:
    """vLLM >= 0.10.1 nested error body (vLLM PR #22099)."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def validation_error(message: str, parameter: str, value: Any = None) -> ApiError:
    """vLLM's `VLLMValidationError`: the message ends with `(parameter=…, value=…)`."""
    extras = f"parameter={parameter}" + ("" if value is None else f", value={value}")
    return ApiError(f"{message} ({extras})", param=parameter)


def word_tokens(text: str, vocab_size: int) -> list[int]:
    """The twin's tokenizer: one token per word or punctuation mark, id = crc32(word) mod vocab."""
    return [zlib.crc32(w.encode()) % vocab_size for w in _WORD_RE.findall(text)]


def filler_word(index: int) -> str:
    return FILLER_WORDS[index % len(FILLER_WORDS)]


def filler_token_id(index: int, vocab_size: int) -> int:
    return zlib.crc32(filler_word(index).encode()) % vocab_size


def filler_text(start: int, stop: int) -> str:
    """Text of output tokens [start, stop): one leading-space word per token."""
    return "".join(" " + filler_word(i) for i in range(start, stop))


def prompt_segments(token_ids: list[int], block_size: int) -> tuple[tuple[str, int], ...]:
    """Content segments for the simulator's block hashing: one per block, keyed by the block's token ids.

    Identical key at the same position means identical tokens, so equal token prefixes share full KV
    blocks exactly as vLLM's per-block token hashing does (`v1/core/kv_cache_utils.hash_block_tokens`).
    """
    data = np.asarray(token_ids, dtype="<i8").tobytes()
    step = block_size * 8
    return tuple(
        (
            f"tok:{hashlib.blake2b(data[i : i + step], digest_size=10).hexdigest()}",
            len(data[i : i + step]) // 8,
        )
        for i in range(0, len(data), step)
    )


@dataclass
class ParsedRequest:
    """One validated generation request, in the units the engine needs."""

    chat: bool
    model: str
    prompt_token_ids: list[int]
    max_tokens: int  # after vLLM's clamp to max_model_len - prompt_len
    min_tokens: int
    ignore_eos: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool
    return_token_ids: bool
    priority: int
    request_id: str | None  # body `request_id`; the X-Request-Id header wins
    session_id: str

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _int_field(body: dict, name: str, default: int | None, *, minimum: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise validation_error(f"{name} must be an integer, got {type(value).__name__}", name, value)
    if minimum is not None and value < minimum:
        raise validation_error(f"{name} must be at least {minimum}, got {value}.", name, value)
    return value


def _bool_field(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise validation_error(f"{name} must be a boolean, got {type(value).__name__}", name, value)
    return value


def _completion_prompt(prompt: Any, vocab_size: int) -> list[int]:
    """`prompt` as text, a token-id array, or a one-element list of either (vLLM accepts batches; we do not)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return word_tokens(prompt, vocab_size)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):  # bool is no token id
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise validation_error(f"Token id {bad} is out of vocabulary (size {vocab_size})", "prompt", bad)
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(
            "the twin serves one prompt per request; send prompts as separate requests", param="prompt"
        )
    raise ApiError("prompt must be a string or a list of token ids", param="prompt")


def _chat_prompt(messages: Any, vocab_size: int, add_generation_prompt: bool) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list", param="messages")
    ids: list[int] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ApiError(f"messages[{i}] must be an object with a role", param="messages")
        content = message.get("content") or ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ApiError(
                        f"messages[{i}]: the twin accepts only text content parts", param="messages"
                    )
                parts.append(str(part.get("text", "")))
            content = " ".join(parts)
        if not isinstance(content, str):
            raise ApiError(
                f"messages[{i}].content must be a string or a list of text parts", param="messages"
            )
        role_marker = zlib.crc32(f"<|{message['role']}|>".encode()) % vocab_size
        ids += [role_marker, *word_tokens(content, vocab_size), 0]
    if add_generation_prompt:
        ids.append(zlib.crc32(b"<|assistant|>") % vocab_size)
    return ids


def parse_request(
    body: Any, *, chat: bool, served_model: str, max_model_len: int, vocab_size: int
) -> ParsedRequest:
    """Validate a /v1/completions or /v1/chat/completions body as vLLM 0.32 does; raise ApiError."""
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    model = body.get("model") or served_model
    if model != served_model:
        raise ApiError(
            f"The model `{model}` does not exist.", status=404, err_type="NotFoundError", param="model"
        )
    n = _int_field(body, "n", 1, minimum=1)
    if n != 1:
        raise validation_error("the twin generates one choice per request (n must be 1)", "n", n)
    stream = _bool_field(body, "stream", False)
    stream_options = body.get("stream_options")
    if stream_options and not stream:
        raise validation_error("Stream options can only be defined when `stream=True`.", "stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise validation_error("stream_options must be an object", "stream_options")
    stream_options = stream_options or {}
    include_usage = bool(stream_options.get("include_usage"))
    continuous_usage = include_usage and bool(stream_options.get("continuous_usage_stats"))

    if chat:
        prompt_ids = _chat_prompt(
            body.get("messages"), vocab_size, _bool_field(body, "add_generation_prompt", True)
        )
        max_tokens = _int_field(body, "max_completion_tokens", None, minimum=1)
        if max_tokens is None:
            max_tokens = _int_field(body, "max_tokens", None, minimum=1)
        max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        if "prompt" not in body:
            raise ApiError("prompt is required", param="prompt")
        prompt_ids = _completion_prompt(body["prompt"], vocab_size)
        max_tokens = _int_field(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS, minimum=1)
        max_param = "max_tokens"
    min_tokens = _int_field(body, "min_tokens", 0, minimum=0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise validation_error(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
            "min_tokens",
            min_tokens,
        )
    if not prompt_ids:
        raise ApiError("The prompt cannot be empty.", param="prompt")
    # renderers/params.py: output budget above the context window, then prompt over the window.
    if max_tokens is not None and max_tokens > max_model_len:
        raise validation_error(
            f"{max_param}={max_tokens} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            max_param,
            max_tokens,
        )
    if len(prompt_ids) > max_model_len:
        # vLLM says "at least" when the count is limit + 1 (its tokenizer truncates there).
        qualifier = "at least " if len(prompt_ids) == max_model_len + 1 else ""
        raise validation_error(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
            f"{qualifier}{len(prompt_ids)} input tokens, which exceeds this limit even without any output "
            "tokens. Please reduce the length of the input prompt.",
            "input_tokens",
            len(prompt_ids),
        )
    if len(prompt_ids) == max_model_len:
        # get_max_tokens leaves 0 output tokens, which SamplingParams refuses.
        raise validation_error("max_tokens must be at least 1, got 0.", "max_tokens", 0)
    # api_utils.get_max_tokens: prompt + max_tokens over the window silently clamps (0.20+).
    room = max_model_len - len(prompt_ids)
    max_tokens = room if max_tokens is None else min(max_tokens, room)
    min_tokens = min(min_tokens, max_tokens)
    priority = _int_field(body, "priority", 0)
    request_id = body.get("request_id")
    session_id = body.get("session_id") or ""
    return ParsedRequest(
        chat=chat,
        model=model,
        prompt_token_ids=prompt_ids,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=_bool_field(body, "ignore_eos", False),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        return_token_ids=_bool_field(body, "return_token_ids", False),
        priority=priority or 0,
        request_id=str(request_id) if request_id is not None else None,
        session_id=str(session_id),
    )


# ------------------------------------------------------------------------------------------ responses


def usage_block(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> dict:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


def per_request_metrics(
    *, queued_s: float, scheduled_s: float, first_token_s: float, last_token_s: float, num_tokens: int
) -> dict:
    """vLLM's `build_per_request_timing_metrics` (entrypoints/generate/base/serving.py), times in seconds."""
    metrics: dict[str, float] = {
        "time_to_first_token_ms": (first_token_s - scheduled_s) * 1000,
        "generation_time_ms": (last_token_s - first_token_s) * 1000,
        "queue_time_ms": (scheduled_s - queued_s) * 1000,
    }
    if num_tokens > 1:
        metrics["mean_itl_ms"] = (last_token_s - first_token_s) / (num_tokens - 1) * 1000
    inference_s = last_token_s - scheduled_s
    if inference_s > 0:
        metrics["tokens_per_second"] = num_tokens / inference_s
    return metrics


def stream_chunk(
    req: ParsedRequest,
    *,
    response_id: str,
    created: int,
    start: int,
    stop: int,
    finish_reason: str | None,
    first: bool,
    vocab_size: int,
    prompt_tokens: int,
) -> dict:
    """One SSE event carrying output tokens [start, stop)."""
    text = filler_text(start, stop)
    token_ids = [filler_token_id(i, vocab_size) for i in range(start, stop)] if req.return_token_ids else None
    if req.chat:
        choice: dict[str, Any] = {
            "index": 0,
            "delta": {"content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "token_ids": token_ids,
        }
        chunk: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "choices": [choice],
        }
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "prompt_token_ids": list(req.prompt_token_ids) if first and req.return_token_ids else None,
            "token_ids": token_ids,
        }
        chunk = {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": [choice],
        }
    if req.continuous_usage:
        chunk["usage"] = usage_block(prompt_tokens, stop, None)
    return chunk


def chat_role_chunk(req: ParsedRequest, *, response_id: str, created: int) -> dict:
    """The first chat event: `delta: {role: assistant, content: ""}` (chat_completion/serving.py)."""
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": req.model,
        "prompt_token_ids": None,
        "prompt_text": None,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    if req.continuous_usage:
        chunk["usage"] = usage_block(req.prompt_len, 0, None)
    return chunk


def usage_chunk(
    req: ParsedRequest, *, response_id: str, created: int, usage: dict, metrics: dict | None
) -> dict:
    """The final usage event (`choices: []`), dumped with `exclude_none`; metrics ride on it."""
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": created,
        "model": req.model,
        "choices": [],
        "usage": usage,
    }
    if metrics:
        chunk["metrics"] = metrics
    return chunk


def full_response(
    req: ParsedRequest,
    *,
    response_id: str,
    created: int,
    num_tokens: int,
    finish_reason: str,
    usage: dict,
    metrics: dict | None,
    vocab_size: int,
) -> dict:
    """The non-streaming body (`model_dump()`: every field, None included)."""
    text = filler_text(0, num_tokens).lstrip(" ")
    token_ids = [filler_token_id(i, vocab_size) for i in range(num_tokens)] if req.return_token_ids else None
    if req.chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "token_ids": token_ids,
        }
        extra: dict[str, Any] = {
            "prompt_logprobs": None,
            "prompt_token_ids": list(req.prompt_token_ids) if req.return_token_ids else None,
            "prompt_text": None,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "token_ids": token_ids,
            "prompt_logprobs": None,
            "prompt_token_ids": list(req.prompt_token_ids) if req.return_token_ids else None,
        }
        extra = {}
        obj = "text_completion"
    return {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": req.model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage,
        **extra,
        "kv_transfer_params": None,
        "metrics": metrics,
    }
