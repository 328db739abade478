"""Small Flask helpers both services share: request log lines and JSON bodies."""

from __future__ import annotations

import logging
import time

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


def json_body() -> dict:
    """Return the request's JSON object or raise 400 invalid_json."""
    body = request.get_json(silent=True)
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


def generation_fields(body: dict) -> tuple[str, int, float | None]:
    """Validate prompt, max_tokens (default 512) and temperature (0-10, optional)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "invalid_request", "prompt must be a non-empty string")
    max_tokens = int_field(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, 1 << 20)
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 10):
        raise ApiError(400, "invalid_request", "temperature must be a number from 0 to 10")
    return prompt, max_tokens, temperature
