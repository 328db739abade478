"""The one JSON error envelope both services answer with."""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from gunicorn.http import errors as http_errors
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


def error_type(status: int) -> str:
    """OpenAI's error type for a status, so its SDKs (and tools built on them) classify our errors."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


class ApiError(Exception):
    """An error with its own HTTP status, stable snake_case code and headers; optionally the faulty
    parameter and details for scripts (e.g. the available model names)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.param = param
        # Extra fields of the error object, figures a client can act on (the bytes a load needs).
        self.details = details or {}

    def to_json(self) -> dict:
        """The envelope: our code and message, the type and param OpenAI clients read, then any details."""
        return {"error": {**self.details, "code": self.code, "message": self.message,
                          "type": error_type(self.status), "param": self.param}}

    def to_response(self):
        """Render as the JSON envelope."""
        response = jsonify(self.to_json())
        response.status_code = self.status
        response.headers.update(self.headers)
        return response


class ClientTimeout(TimeoutError):
    """The client sent nothing for REQUEST_TIMEOUT_S while its request body was being read."""


def register_error_handlers(app: Flask) -> None:
    """Answer every error, expected or not, with the envelope."""

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError):
        return err.to_response()

    @app.errorhandler(ClientTimeout)
    def _client_timeout(err: ClientTimeout):
        return ApiError(408, "request_timeout", str(err)).to_response()

    # A body that ends early or breaks the chunked framing surfaces while the view reads it.
    @app.errorhandler(http_errors.NoMoreData)
    def _body_cut_off(err: Exception):
        return ApiError(400, "incomplete_body", "the request body ended early").to_response()

    @app.errorhandler(http_errors.ParseException)
    def _bad_body(err: Exception):
        return ApiError(400, "invalid_chunked_body", f"the request body is malformed: {err}").to_response()

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        code = (err.name or "http_error").lower().replace(" ", "_").replace("'", "")
        return ApiError(err.code or 500, code, err.description or err.name).to_response()

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        log.exception("unhandled error")
        return ApiError(500, "internal_error", "internal error; see the server log").to_response()
