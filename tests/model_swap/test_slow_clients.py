"""Slow senders and slow readers against the real services, over real sockets (model_swap.serving)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

STORE_THREADS, WORKER_THREADS = 32, 16  # the services' defaults
TIMEOUT_S = 2  # REQUEST_TIMEOUT_S for these tests


def stalled_connections(url: str, count: int, path: str) -> list[socket.socket]:
    """Connections that send their headers and one byte of a declared 1000-byte body, then go silent."""
    host, port = url.removeprefix("http://").split(":")
    conns = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 1000\r\n\r\n{{".encode())
        conns.append(s)
    time.sleep(0.5)  # let the server take them all in
    return conns


def wait_closed(conn: socket.socket, within_s: float) -> bytes:
    """What the server sent before closing the connection; fails if it stays open longer than within_s."""
    conn.settimeout(within_s)
    received = b""
    try:
        while chunk := conn.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the server kept a stalled connection open for more than {within_s}s")
    except ConnectionResetError:
        pass
    return received


@pytest.fixture
def models(make_model, tmp_path):
    d = tmp_path / "models"
    make_model(d, "a.gguf", seed=1)
    make_model(d, "b.gguf", seed=2)
    return d


def test_slow_senders_do_not_freeze_either_service(services, models):
    env = {"REQUEST_TIMEOUT_S": "30"}
    worker = services.worker(env=env)
    store = services.store(models, worker, env=env)
    held = stalled_connections(store.url, 4 * STORE_THREADS, "/user_request")
    held += stalled_connections(worker.url, 4 * WORKER_THREADS, "/infer")
    try:
        # 10 s, well below REQUEST_TIMEOUT_S: a frozen service answers only when the stalled ones time out.
        assert requests.get(store.url + "/health", timeout=10).json()["worker"] == "ok"
        assert requests.get(worker.url + "/health", timeout=10).ok
        r = requests.post(store.url + "/user_request", json={"prompt": "hi", "max_tokens": 2, "model": "a.gguf"},
                          timeout=10)
        assert r.status_code == 200 and r.content
    finally:
        for s in held:
            s.close()


def test_a_stalled_request_is_dropped_after_the_request_timeout(services, models):
    env = {"REQUEST_TIMEOUT_S": str(TIMEOUT_S)}
    worker = services.worker(env=env)
    store = services.store(models, worker, env=env)
    started = time.monotonic()
    conns = stalled_connections(store.url, 1, "/user_request") + stalled_connections(worker.url, 1, "/infer")
    for conn in conns:
        answer = wait_closed(conn, within_s=TIMEOUT_S + 4)
        assert time.monotonic() - started >= TIMEOUT_S - 1
        head, _, body = answer.partition(b"\r\n\r\n")  # it sent a byte, so it is told why it was dropped
        assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout"
        conn.close()


def test_a_stream_nobody_reads_is_cut_off_and_its_turn_released(services, models):
    env = {"REQUEST_TIMEOUT_S": str(TIMEOUT_S)}
    worker = services.worker(extra=["--n-ctx", "8192"], env=env)
    store = services.store(models, worker, env=env)
    body = json.dumps({"model": "a.gguf", "prompt": "hi", "max_tokens": 8000, "temperature": 0, "stream": True})
    host, port = store.url.removeprefix("http://").split(":")
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and then never read
    reader.connect((host, int(port)))
    reader.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    time.sleep(1)
    # b needs a swap, which waits until the stream on a ends: it must not wait for ever.
    answered = threading.Event()
    result = {}

    def ask_b():
        try:
            r = requests.post(store.url + "/user_request", json={"prompt": "hi", "max_tokens": 2, "model": "b.gguf"},
                              timeout=120)
            result["status"] = r.status_code
        finally:
            answered.set()

    threading.Thread(target=ask_b, daemon=True).start()
    try:
        assert answered.wait(TIMEOUT_S + 20), "the unread stream held the model beyond the request timeout"
        assert result["status"] == 200
    finally:
        reader.close()


def test_an_upload_that_stops_arriving_is_a_408_and_leaves_no_file(services):
    worker = services.worker(env={"REQUEST_TIMEOUT_S": str(TIMEOUT_S)})
    host, port = worker.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        # More than the event loop reads ahead, so a thread reads the rest of this body.
        s.sendall(b"POST /cache_model HTTP/1.1\r\nHost: x\r\nX-Model-Name: big.gguf\r\n"
                  b"Content-Length: 3000000\r\n\r\nGGUF" + b"\0" * 1_500_000)
        answer = wait_closed(s, within_s=TIMEOUT_S + 4)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout"
    assert [p.name for p in worker.cache_dir.iterdir()] == []
