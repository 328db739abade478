"""The worker's answer to a push reaches the user even when it refuses before reading the body."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
import requests


@pytest.fixture
def small_disk(tmp_path):
    """A real 32 MiB filesystem (tmpfs), unmounted afterwards; needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def _worker_refusal(url: str, name: str, size: int) -> dict:
    """What the worker answers when told a body of `size` bytes is coming, sent no body at all."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /cache_model HTTP/1.1\r\nHost: x\r\nX-Model-Name: {name}\r\n"
                  f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"507", head
    return json.loads(body)["error"]


@pytest.mark.slow
def test_model_too_big_for_the_workers_disk_is_507_with_the_workers_message(small_disk, services, make_model,
                                                                            tmp_path):
    # small_disk comes first so that it is unmounted after the services using it have stopped.
    models = tmp_path / "store-models"
    # Larger than the socket buffers on both ends, so the worker's refusal breaks the upload.
    big = make_model(models, "big.gguf", seed=5, size_mb=48)
    make_model(models, "small.gguf", seed=6)
    worker = services.worker(cache_dir=small_disk / "cache", extra=["--reserve-disk-bytes", "0"])
    store = services.store(models, worker)
    expected = _worker_refusal(worker.url, "big.gguf", big.stat().st_size)

    for path, body in (("/user_request", {"model": "big.gguf", "prompt": "hi", "max_tokens": 2}),
                       ("/admin/prefetch", {"model": "big.gguf"})):
        r = requests.post(store.url + path, json=body, timeout=60)
        assert r.status_code == 507, (path, r.text)
        error = r.json()["error"]
        assert error["code"] == "insufficient_storage", path
        assert expected["message"] in error["message"], path

    assert sorted(p.name for p in (small_disk / "cache").iterdir()) == []
    # The refusal leaves the store and the worker agreeing and usable.
    r = requests.post(store.url + "/user_request", json={"model": "small.gguf", "prompt": "hi", "max_tokens": 2},
                      timeout=60)
    assert r.status_code == 200, r.text
    assert requests.get(store.url + "/models", timeout=10).json()["policy"]["cached"] == ["small.gguf"]
