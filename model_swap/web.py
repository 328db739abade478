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


def int_field(body: dict, key: str, default: int, low: int, high: int) -> int:
    """Read an optional bounded integer field or raise 400 invalid_request."""
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, "invalid_request", f"{key} must be an integer from {low} to {high}")
    return value


DEFAULT_MAX_TOKENS = 512
CHAT_ROLES = frozenset({"system", "user", "assistant"})
MAX_MESSAGES = 256


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: a prompt or chat messages, with max_tokens and temperature."""

    prompt: str | None
    messages: tuple[dict, ...] | None
    max_tokens: int
    temperature: float | None

    def to_json(self) -> dict:
        body: dict = {"max_tokens": self.max_tokens}
        if self.prompt is not None:
            body["prompt"] = self.prompt
        if self.messages is not None:
            body["messages"] = list(self.messages)
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body


def _text(value: str, field: str) -> str:
    """Refuse text that cannot be UTF-8: JSON's \\ud800-\\udfff escapes decode to lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(400, "invalid_request", f"{field} holds a lone surrogate ({value[err.start]!a} at "
                                               f"character {err.start}), which is not text") from None
    return value


def _messages(value: object) -> tuple[dict, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MESSAGES:
        raise ApiError(400, "invalid_request", f"messages must be a list of 1 to {MAX_MESSAGES} messages")
    for i, message in enumerate(value):
        if (not isinstance(message, dict) or message.get("role") not in CHAT_ROLES
                or not isinstance(message.get("content"), str)):
            raise ApiError(400, "invalid_request",
                           "each message needs a role (system, user or assistant) and a string content")
        _text(message["content"], f"messages[{i}].content")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def parse_generation(body: dict, chat: bool | None = None) -> GenerationRequest:
    """Validate a prompt (or, where allowed, messages), max_tokens (default 512) and temperature (0-10).

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
            raise ApiError(400, "invalid_request", "prompt must be a non-empty string")
        _text(prompt, "prompt")
    max_tokens = int_field(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, 1 << 20)
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 10):
        raise ApiError(400, "invalid_request", "temperature must be a number from 0 to 10")
    return GenerationRequest(prompt, messages, max_tokens, temperature)
