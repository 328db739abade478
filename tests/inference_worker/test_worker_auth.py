"""The worker's bearer token over real HTTP (the check itself: tests/model_swap/test_auth.py)."""

from __future__ import annotations

import requests


def test_worker_accepts_a_lowercase_bearer_scheme(services):
    worker = services.worker(token="t0ken")
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = requests.get(worker.url + "/models", headers={"Authorization": f"{scheme} t0ken"}, timeout=10)
        assert r.status_code == 200, scheme
