"""Fixtures shared by the store's real-service tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def models_dir(make_model, tmp_path):
    """A store folder with three tiny models, a.gguf, b.gguf and c.gguf (each its own bytes)."""
    d = tmp_path / "store-models"
    for seed, name in enumerate(["a.gguf", "b.gguf", "c.gguf"], start=1):
        make_model(d, name, seed=seed)
    return d
