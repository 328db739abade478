"""Bearer-token check for every endpoint but /health."""

from __future__ import annotations

import hmac

from flask import Flask, request

from model_swap.errors import ApiError

OPEN_ENDPOINTS = {"ops.health"}


def install_token_check(app: Flask, token: str | None) -> None:
    """Require `Authorization: Bearer <token>` when a token is configured."""
    if not token:
        return
    expected = f"Bearer {token}".encode()

    @app.before_request
    def _check_token():
        if request.endpoint in OPEN_ENDPOINTS:
            return None
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token",
                           headers={"WWW-Authenticate": "Bearer"})
        return None
