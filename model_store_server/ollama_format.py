"""Ollama's request shapes translated into the store's own (pure functions)."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

from model_store_server import openai_format
from model_swap.errors import ApiError

# Ollama options the store applies, and the request field (GenerationRequest's) each becomes.
APPLIED_OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
                   "stop": "stop", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
# Sampling options llama.cpp has but the worker does not apply yet: refused, not ignored.
SAMPLING_OPTIONS = ("top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n", "tfs_z", "mirostat",
                    "mirostat_tau", "mirostat_eta", "penalize_newline", "num_keep")
# Options that say how to load a model: per-model settings in the models config instead.
LOAD_OPTIONS = ("num_ctx", "num_gpu", "num_batch", "num_thread", "main_gpu", "low_vram", "use_mmap", "use_mlock",
                "numa", "logits_all", "vocab_only", "embedding_only", "f16_kv")
UNLIMITED_TOKENS = 1 << 20  # num_predict -1 (or -2): until the model stops or the context is full
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def keep_alive_seconds(value: object) -> float | None:
    """Ollama's keep_alive (seconds as a number, or a duration such as "5m"; negative: forever) in seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"-?\d+(\.\d+)?", value.strip()):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ApiError(400, "invalid_request", f"keep_alive {value!r} is not a duration such as 5m or 1h30m",
                           param="keep_alive")
        seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise ApiError(400, "invalid_request", "keep_alive must be a number of seconds or a duration",
                       param="keep_alive")
    return math.inf if seconds < 0 else seconds


def _options(options: object) -> dict:
    """Ollama's options as request fields; what the store cannot honour is refused with its reason."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ApiError(400, "invalid_request", "options must be an object", param="options")
    fields: dict = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in APPLIED_OPTIONS:
            if key == "num_predict" and isinstance(value, int) and not isinstance(value, bool) and value < 0:
                value = UNLIMITED_TOKENS
            fields[APPLIED_OPTIONS[key]] = value
        elif key in LOAD_OPTIONS:
            raise ApiError(400, "unsupported_parameter", f"options.{key} is how a model is loaded: set it per model "
                                                         "in the models config (MODELS_CONFIG)", param=f"options.{key}")
        elif key in SAMPLING_OPTIONS:
            raise ApiError(400, "unsupported_parameter", f"options.{key} is not applied by model-swap yet",
                           param=f"options.{key}")
        else:
            raise ApiError(400, "unsupported_parameter", f"options.{key} is not an option model-swap knows",
                           param=f"options.{key}")
    return fields


def _format(value: object) -> dict | None:
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "schema": value}
    raise ApiError(400, "invalid_request", 'format must be "json" or a JSON schema object', param="format")


def _refuse_set(body: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if body.get(key) not in (None, "", [], False):
            raise ApiError(400, "unsupported_parameter", f"{key} is not supported by model-swap", param=key)


def _images(holder: dict, where: str) -> None:
    if holder.get("images"):
        raise ApiError(400, "unsupported_content", f"{where} has images; model-swap serves text models", param=where)


def _message(message: object, index: int) -> object:
    if not isinstance(message, dict):
        return message  # parse_generation says what is wrong
    where = f"messages[{index}]"
    _images(message, where)
    if message.get("tool_calls"):
        raise ApiError(400, "unsupported_parameter", f"{where} has tool_calls; tools are not supported", param=where)
    return {"role": message.get("role"), "content": openai_format.text_content(message.get("content", ""), where)}


def generate_body(body: dict) -> dict:
    """/api/generate as a request: a one-turn chat through the model's template, or the raw prompt (raw: true)."""
    _refuse_set(body, ("suffix", "template", "context", "think", "logprobs", "top_logprobs"))
    _images(body, "images")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "invalid_request", "prompt must be a string", param="prompt")
    fields = {"response_format": _format(body.get("format")), **_options(body.get("options"))}
    if body.get("raw"):
        return dict(fields, prompt=prompt)
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise ApiError(400, "invalid_request", "system must be a string", param="system")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return dict(fields, messages=messages)


def chat_body(body: dict) -> dict:
    """/api/chat as a request."""
    _refuse_set(body, ("tools", "think", "logprobs", "top_logprobs"))
    messages = body.get("messages")
    if isinstance(messages, list):
        messages = [_message(m, i) for i, m in enumerate(messages)]
    return {"messages": messages, "response_format": _format(body.get("format")), **_options(body.get("options"))}
