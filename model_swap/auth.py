"""The bearer-token check both services put in front of every endpoint but their open ones."""

from __future__ import annotations

import hmac
from typing import Collection

from flask import Flask, request

from model_swap.errors import ApiError


def bearer_credentials(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None; the scheme is case-insensitive (RFC 7235)."""
    scheme, _, credentials = (header or "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials or " " in credentials:
        return None
    return credentials


def install_token_check(app: Flask, token: str | None, open_endpoints: Collection[str]) -> None:
    """Require `Authorization: Bearer <token>` on every endpoint not in `open_endpoints`, when a token is set."""
    if not token:
        return
    expected = token.encode()

    @app.before_request
    def _check_token():
        if request.endpoint in open_endpoints:
            return None
        given = bearer_credentials(request.headers.get("Authorization"))
        # compare_digest on equal-type bytes: the time taken says nothing about the token.
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token",
                           headers={"WWW-Authenticate": "Bearer"})
        return None
