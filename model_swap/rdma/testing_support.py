"""Test support for the RDMA tests, shared by tests/model_swap, tests/inference_worker and tests/model_store_server.

Not used by the services. Under pytest's importlib import mode test files cannot import each other, so
what several RDMA test files need lives here:

- HAS_PYVERBS, DEVICES and the skip markers built on them, which pick the tests this machine can run:
  without_pyverbs, pyverbs_without_device, without_device, with_device.
- stored(), a catalog entry for a file, and the `model` fixture, a tiny GGUF model in tmp_path/store.
  A test module uses the fixture by binding it to a module-level name (`model = testing_support.model`).

Importing this module looks for RDMA devices, so it imports pyverbs when pyverbs is installed (the
services' own modules never do at import time). Nothing here fakes pyverbs: the fake of the pyverbs calls
lives in tests/model_swap/test_rdma_verbs.py, the only file that uses it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from model_swap.digest import sha256_file
from model_swap.errors import ApiError

if TYPE_CHECKING:
    from model_store_server.catalog import StoredModel

HAS_PYVERBS = importlib.util.find_spec("pyverbs") is not None


def _devices() -> list[str]:
    if not HAS_PYVERBS:
        return []
    from model_swap.rdma.verbs import rdma_devices

    try:
        return rdma_devices()
    except ApiError:
        return []


DEVICES = _devices()
without_pyverbs = pytest.mark.skipif(HAS_PYVERBS, reason="pyverbs is installed; this checks the error without it")
pyverbs_without_device = pytest.mark.skipif(not HAS_PYVERBS or bool(DEVICES),
                                            reason="needs pyverbs installed and no RDMA device")
without_device = pytest.mark.skipif(bool(DEVICES), reason="an RDMA device is present")
with_device = pytest.mark.skipif(not DEVICES, reason="needs pyverbs and an RDMA device: "
                                 + ("pyverbs is not installed" if not HAS_PYVERBS else "get_device_list() finds none"))


def stored(path: Path, sha256: str | None = None) -> StoredModel:
    """The store's catalog entry for the file at path (its digest computed unless given)."""
    from model_store_server.catalog import StoredModel

    return StoredModel(path.name, path, path.stat().st_size, sha256 or sha256_file(path))


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A tiny GGUF model at tmp_path/store/tiny.gguf."""
    from inference_worker.testing.tiny_gguf import write_tiny_gguf

    (tmp_path / "store").mkdir()
    return write_tiny_gguf(tmp_path / "store" / "tiny.gguf", seed=11)
