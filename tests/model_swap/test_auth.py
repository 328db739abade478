"""The bearer-token check both services install (fast seam: a bare Flask app, no server)."""

from __future__ import annotations

import pytest
from flask import Flask

from model_swap.auth import install_token_check
from model_swap.errors import register_error_handlers


@pytest.fixture
def client():
    app = Flask(__name__)
    register_error_handlers(app)
    install_token_check(app, "s3cret", open_endpoints={"open"})
    app.add_url_rule("/closed", "closed", lambda: "in")
    app.add_url_rule("/open", "open", lambda: "open")
    return app.test_client()


@pytest.mark.parametrize("header", ["Bearer s3cret", "bearer s3cret", "BEARER s3cret", "Bearer  s3cret"])
def test_scheme_is_case_insensitive(client, header):
    # RFC 7235: the scheme name is case-insensitive; the token itself is not.
    assert client.get("/closed", headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer S3CRET", "Basic s3cret", "Bearer", "s3cret", "Bearer s3cret x"])
def test_wrong_or_missing_token_is_401(client, header):
    r = client.get("/closed", headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.json["error"]["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_open_endpoint_needs_no_token(client):
    assert client.get("/open").status_code == 200


def test_no_token_configured_means_no_check():
    app = Flask(__name__)
    install_token_check(app, None, open_endpoints=set())
    app.add_url_rule("/closed", "closed", lambda: "in")
    assert app.test_client().get("/closed").status_code == 200
