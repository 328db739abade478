"""Small Flask helpers both services share: request log lines and JSON bodies."""

from __future__ import annotations

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
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    return body


def int_field(body: dict, key: str, default: int, low: int, high: int) -> int:
    """Read an optional bounded integer field or raise 400 invalid_request."""
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, "invalid_request", f"{key} must be an integer from {low} to {high}")
    return value


DEFAULT_MAX_TOKENS = 512
CHAT_ROLES = frozenset({"system", "user", "assistant"})
MAX_MESSAGES = 256
MAX_TOP_LOGPROBS = 20
STRUCTURED_FORMATS = ("json_object", "json_schema")


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: a prompt or chat messages, with max_tokens, temperature and output options."""

    prompt: str | None
    messages: tuple[dict, ...] | None
    max_tokens: int
    temperature: float | None
    logprobs: int | None = None  # alternatives to report per token (0: only the chosen one); None: no logprobs
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", "schema": {...}}
    keep_alive_s: float | None = None  # the store's business (Ollama's keep_alive); never sent to the worker

    def to_json(self) -> dict:
        body: dict = {"max_tokens": self.max_tokens}
        if self.prompt is not None:
            body["prompt"] = self.prompt
        if self.messages is not None:
            body["messages"] = list(self.messages)
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.logprobs is not None:
            body["logprobs"] = self.logprobs
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return body


def _messages(value: object) -> tuple[dict, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MESSAGES:
        raise ApiError(400, "invalid_request", f"messages must be a list of 1 to {MAX_MESSAGES} messages")
    for message in value:
        if (not isinstance(message, dict) or message.get("role") not in CHAT_ROLES
                or not isinstance(message.get("content"), str)):
            raise ApiError(400, "invalid_request",
                           "each message needs a role (system, user or assistant) and a string content")
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
    max_tokens = int_field(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, 1 << 20)
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 10):
        raise ApiError(400, "invalid_request", "temperature must be a number from 0 to 10")
    return GenerationRequest(prompt, messages, max_tokens, temperature, **parse_output_options(body))


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
