"""Reserving a model file's blocks before its bytes arrive (storage.preallocate), on the real
filesystem under tmp_path: the size stays as written, and a body that ends short is still refused."""

from __future__ import annotations

import hashlib
import os

import pytest

from inference_worker import storage
from inference_worker.storage import ModelCache, preallocate
from model_swap.digest import GGUF_MAGIC
from model_swap.errors import ApiError

MB = 1 << 20


def test_blocks_are_reserved_and_the_size_stays_as_written(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        if not preallocate(fd, 8 * MB):
            pytest.skip("this filesystem has no fallocate")
        st = os.fstat(fd)
        assert st.st_size == 0 and st.st_blocks * 512 >= 8 * MB
        os.write(fd, b"x" * 1000)
        assert os.fstat(fd).st_size == 1000
    finally:
        os.close(fd)


def test_a_received_model_is_whole_and_its_size_exact(tmp_path):
    cache = ModelCache(tmp_path / "cache", 1 << 30, 0)
    data = GGUF_MAGIC + os.urandom(3 * MB + 5)
    receipt = cache.receive("a.gguf", iter([data[:MB], data[MB:]]), len(data), hashlib.sha256(data).hexdigest())
    path = tmp_path / "cache" / "a.gguf"
    assert receipt.size == len(data) and path.stat().st_size == len(data) and path.read_bytes() == data


def test_a_body_shorter_than_declared_is_still_incomplete_and_leaves_nothing(tmp_path):
    cache = ModelCache(tmp_path / "cache", 1 << 30, 0)
    data = GGUF_MAGIC + os.urandom(MB)
    with pytest.raises(ApiError) as refused:
        cache.receive("a.gguf", iter([data]), 4 * MB)  # 4 MiB reserved, 1 MiB came
    assert (refused.value.status, refused.value.code) == (400, "incomplete_body")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_filesystem_without_fallocate_is_written_as_before(tmp_path, monkeypatch):
    """A stand-in fallocate that fails as some filesystems do (EOPNOTSUPP): the receipt goes on."""
    calls = []

    def unsupported(fd, mode, offset, length):
        calls.append((mode, length))
        storage.ctypes.set_errno(storage.errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(storage, "_FALLOCATE", unsupported)
    cache = ModelCache(tmp_path / "cache", 1 << 30, 0)
    data = GGUF_MAGIC + os.urandom(MB)
    assert cache.receive("a.gguf", iter([data]), len(data)).size == len(data)
    assert calls == [(storage._FALLOC_FL_KEEP_SIZE, len(data))]


def test_a_full_disk_at_reservation_is_507_and_leaves_nothing(tmp_path, monkeypatch):
    """A stand-in fallocate that says ENOSPC, as a real one does on a disk too full for the model."""
    def full(fd, mode, offset, length):
        storage.ctypes.set_errno(storage.errno.ENOSPC)
        return -1

    monkeypatch.setattr(storage, "_FALLOCATE", full)
    cache = ModelCache(tmp_path / "cache", 1 << 30, 0)
    data = GGUF_MAGIC + os.urandom(MB)
    with pytest.raises(ApiError) as refused:
        cache.receive("a.gguf", iter([data]), len(data))
    assert (refused.value.status, refused.value.code) == (507, "insufficient_storage")
    assert list((tmp_path / "cache").iterdir()) == []
