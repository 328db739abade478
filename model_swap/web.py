"""Small Flask helpers both services share: request log lines and JSON bodies."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from flask import Flask, g, request

from model_swap.errors import ApiError


def install_request_logging(app: Flask, logger: logging.Logger) -> None:
    """Log one line per request with its status and latency."""

    @app.before_request
    def _start_clock():
        g.request_started = time.perf_counter()

    @app.after_request
    def _log_request(response):
        elapsed_ms = (time.perf_counter() - g.get("request_started", time.perf_counter())) * 1000
        logger.info("[http] %s %s %s %.1fms", request.method, request.path, response.status_code, elapsed_ms)
        return response


MAX_JSON_BYTES = 4 << 20


def json_body() -> dict:
    """Return the request's JSON object (whatever its Content-Type says) or raise 400 invalid_json."""
    if (request.content_length or 0) > MAX_JSON_BYTES:
        raise ApiError(413, "request_too_large", f"JSON bodies are limited to {MAX_JSON_BYTES} bytes")
    if "json_body" not in g:
        data = request.stream.read(MAX_JSON_BYTES + 1)  # a chunked body has no length to check first
        if len(data) > MAX_JSON_BYTES:
            raise ApiError(413, "request_too_large", f"JSON bodies are limited to {MAX_JSON_BYTES} bytes")
        try:
            g.json_body = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(g.json_body, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    return g.json_body


def int_field(body: dict, key: str, default: int | None, low: int, high: int) -> int | None:
    """Read an optional bounded integer field (null means absent) or raise 400 invalid_request."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, "invalid_request", f"{key} must be an integer from {low} to {high}",
                       param=key)
    return value


def number_field(body: dict, key: str, low: float, high: float) -> float | None:
    """Read an optional bounded number (null means absent) or raise 400 invalid_request."""
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high):
        raise ApiError(400, "invalid_request", f"{key} must be a number from {low:g} to {high:g}",
                       param=key)
    return value


def refuse_unknown(body: dict, accepted: frozenset[str]) -> None:
    """400 unsupported_parameter for any field (not null) that nothing here would apply."""
    for key, value in body.items():
        if key not in accepted and value is not None:
            raise ApiError(400, "unsupported_parameter", f"{key} is not supported by model-swap", param=key)


DEFAULT_MAX_TOKENS = 512
CHAT_ROLES = frozenset({"system", "user", "assistant"})
MAX_MESSAGES = 256
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
STRUCTURED_FORMATS = ("json_object", "json_schema")
# The request fields a GenerationRequest takes (besides prompt or messages), in the store's own spelling.
GENERATION_FIELDS = frozenset({"prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                               "seed", "stop", "presence_penalty", "frequency_penalty"})


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: a prompt or chat messages, how to sample (None: llama.cpp's default), output options."""

    prompt: str | None
    messages: tuple[dict, ...] | None
    max_tokens: int
    temperature: float | None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int | None = None  # alternatives to report per token (0: only the chosen one); None: no logprobs
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", "schema": {...}}

    def sampling_kwargs(self) -> dict:
        """The keyword arguments llama-cpp-python's create_completion / create_chat_completion take for this."""
        kwargs: dict = {"max_tokens": self.max_tokens}
        for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        if self.stop:
            kwargs["stop"] = list(self.stop)
        return kwargs

    def to_json(self) -> dict:
        """The request as the worker's /infer reads it."""
        body = self.sampling_kwargs()
        if self.prompt is not None:
            body["prompt"] = self.prompt
        if self.messages is not None:
            body["messages"] = list(self.messages)
        if self.logprobs is not None:
            body["logprobs"] = self.logprobs
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return body


def _text(value: str, field: str) -> str:
    """Refuse text that cannot be UTF-8: JSON's \\ud800-\\udfff escapes decode to lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(400, "invalid_request", f"{field} holds a lone surrogate ({value[err.start]!a} at "
                                               f"character {err.start}), which is not text", param=field) from None
    return value


def _messages(value: object) -> tuple[dict, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MESSAGES:
        raise ApiError(400, "invalid_request", f"messages must be a list of 1 to {MAX_MESSAGES} messages",
                       param="messages")
    for i, message in enumerate(value):
        if (not isinstance(message, dict) or message.get("role") not in CHAT_ROLES
                or not isinstance(message.get("content"), str)):
            raise ApiError(400, "invalid_request",
                           "each message needs a role (system, user or assistant) and a string content")
        _text(message["content"], f"messages[{i}].content")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def parse_generation(body: dict, chat: bool | None = None) -> GenerationRequest:
    """Validate a prompt (or, where allowed, messages), max_tokens (default 512), sampling and output options.

    chat=False needs a prompt, chat=True needs messages, None takes exactly one of the two.
    """
    has_messages = body.get("messages") is not None
    if has_messages and body.get("prompt") is not None:
        raise ApiError(400, "invalid_request", "give either prompt or messages, not both")
    if chat is None:
        chat = has_messages
    if chat:
        prompt, messages = None, _messages(body.get("messages"))
    else:
        prompt, messages = body.get("prompt"), None
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "invalid_request", "prompt must be a non-empty string", param="prompt")
        _text(prompt, "prompt")
    return GenerationRequest(prompt, messages, _max_tokens(body), number_field(body, "temperature", 0, 10),
                             top_p=number_field(body, "top_p", 0, 1), seed=int_field(body, "seed", None, 0, (1 << 32) - 1),
                             stop=_stops(body.get("stop")),
                             presence_penalty=number_field(body, "presence_penalty", -2, 2),
                             frequency_penalty=number_field(body, "frequency_penalty", -2, 2),
                             **parse_output_options(body))


def _max_tokens(body: dict) -> int:
    """max_tokens, or max_completion_tokens (the OpenAI SDK's newer name); both must agree if both are given."""
    old = int_field(body, "max_tokens", None, 1, 1 << 20)
    new = int_field(body, "max_completion_tokens", None, 1, 1 << 20)
    if old is not None and new is not None and old != new:
        raise ApiError(400, "invalid_request", "max_tokens and max_completion_tokens differ; give one",
                       param="max_completion_tokens")
    return new or old or DEFAULT_MAX_TOKENS


def _stops(value: object) -> tuple[str, ...]:
    """stop: one string or a list of up to MAX_STOPS non-empty strings."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "invalid_request", f"stop must be a string or a list of 1 to {MAX_STOPS} non-empty strings",
                       param="stop")
    return tuple(_text(s, "stop") for s in stops)


def parse_output_options(body: dict) -> dict:
    """The internal spelling of logprobs (a count) and response_format; each API's route translates into it."""
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise ApiError(400, "invalid_request", f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}",
                       param="logprobs")
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in STRUCTURED_FORMATS:
            raise ApiError(400, "invalid_request", "response_format.type must be json_object or json_schema",
                           param="response_format")
        if fmt["type"] == "json_schema" and not isinstance(fmt.get("schema"), dict):
            raise ApiError(400, "invalid_request", "a json_schema response_format needs a schema object",
                           param="response_format")
        fmt = {"type": fmt["type"], **({"schema": fmt["schema"]} if fmt["type"] == "json_schema" else {})}
    return {"logprobs": logprobs, "response_format": fmt}
