"""The worker over real HTTP: a real gunicorn process, real llama.cpp, tiny generated models."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

import pytest
import requests

AUTH = {}


def _files(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def _upload(url, name, data, endpoint="/cache_model", sha=None, headers=None):
    h = {"X-Model-Name": name, **(headers or {})}
    if sha:
        h["X-Model-Sha256"] = sha
    return requests.post(url + endpoint, data=data, headers=h, timeout=30)


@pytest.fixture
def worker(services):
    return services.worker()


@pytest.fixture
def model_a(make_model, tmp_path):
    return make_model(tmp_path / "src", "a.gguf", seed=1)


@pytest.fixture
def model_b(make_model, tmp_path):
    return make_model(tmp_path / "src", "b.gguf", seed=2)


def test_upload_load_and_stream(worker, model_a):
    data = model_a.read_bytes()
    r = _upload(worker.url, "a.gguf", data, "/load_model_from_store", sha=hashlib.sha256(data).hexdigest())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "a.gguf" and body["loaded"] == "a.gguf"
    assert body["size"] == len(data) and body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["receive_ms"] >= 0 and body["load_ms"] > 0

    with requests.post(worker.url + "/infer", json={"prompt": "hello", "max_tokens": 8}, stream=True) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        pieces = [c for c in r.iter_content(chunk_size=None) if c]
    assert len(pieces) >= 1 and b"".join(pieces)

    listing = requests.get(worker.url + "/models").json()
    assert [m["name"] for m in listing["loaded"]] == ["a.gguf"]
    entry = listing["loaded"][0]
    assert (entry["active"], entry["waiting"], entry["unloading"]) == (0, 0, False)
    assert entry["memory_bytes"] > 0 and entry["estimated_bytes"] > 0
    assert entry["loaded_at"] <= entry["last_used"]
    assert listing["memory"]["used_bytes"] >= entry["estimated_bytes"] and listing["memory"]["max_loaded_models"] == 3
    assert listing["boot_id"] == requests.get(worker.url + "/health").json()["boot_id"]
    assert [(m["name"], m["size"], m["sha256"]) for m in listing["cached"]] == [
        ("a.gguf", len(data), hashlib.sha256(data).hexdigest())]
    assert _files(worker.cache_dir) == ["a.gguf"]


def test_chunked_upload_is_accepted(worker, model_a):
    data = model_a.read_bytes()
    blocks = (data[i:i + 7000] for i in range(0, len(data), 7000))  # a generator makes requests send chunked
    r = _upload(worker.url, "a.gguf", blocks)
    assert r.status_code == 200, r.text
    assert r.json()["size"] == len(data)


def test_cache_only_then_load_from_local_store(worker, model_a):
    r = _upload(worker.url, "a.gguf", model_a.read_bytes())
    assert r.status_code == 200
    assert requests.get(worker.url + "/models").json()["loaded"] == []
    r = requests.post(worker.url + "/load_model_from_local_store", headers={"X-Model-Name": "a.gguf"})
    assert r.status_code == 200 and r.json()["loaded"] == "a.gguf" and r.json()["already_loaded"] is False
    again = requests.post(worker.url + "/load_model_from_local_store", headers={"X-Model-Name": "a.gguf"})
    assert again.status_code == 200 and again.json()["already_loaded"] is True


def test_load_from_local_store_applies_the_settings_in_its_body(worker, model_a):
    _upload(worker.url, "a.gguf", model_a.read_bytes())
    load = requests.post(worker.url + "/load_model_from_local_store", headers={"X-Model-Name": "a.gguf"},
                         json={"settings": {"n_ctx": 64, "chat_template": "chatml"}})
    assert load.status_code == 200 and load.json()["already_loaded"] is False
    entry = requests.get(worker.url + "/models").json()["loaded"][0]
    assert (entry["n_ctx"], entry["chat_template"]) == (64, "config:chatml")
    assert entry["settings"] == {"n_ctx": 64, "chat_template": "chatml"}
    r = requests.post(worker.url + "/infer", json={"messages": [{"role": "user", "content": "x" * 500}],
                                                   "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"  # 64, not the worker's N_CTX
    bad = requests.post(worker.url + "/load_model_from_local_store", headers={"X-Model-Name": "a.gguf"},
                        json={"settings": {"n_ctx": "big"}})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    assert bad.json()["error"]["param"] == "settings"
    assert requests.get(worker.url + "/models").json()["loaded"][0]["n_ctx"] == 64  # a refused load changes nothing


def test_load_from_local_store_unknown_is_404(worker):
    r = requests.post(worker.url + "/load_model_from_local_store", headers={"X-Model-Name": "nope.gguf"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_cached"


@pytest.mark.parametrize("name", ["../evil.gguf", "a/b.gguf", ".hidden.gguf", "noext", "x" * 300 + ".gguf",
                                  "a..b.gguf", "", "sp ace.gguf"])
def test_bad_names_are_refused_and_nothing_written(worker, model_a, name):
    r = _upload(worker.url, name, model_a.read_bytes())
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_model_name"
    assert _files(worker.cache_dir) == []
    assert not (worker.cache_dir.parent / "evil.gguf").exists()


@pytest.mark.parametrize("case,status,code", [
    ("digest", 422, "digest_mismatch"),
    ("not_gguf", 422, "not_gguf"),
    ("bad_digest_header", 400, "invalid_request"),
])
def test_bad_bodies_leave_no_file(worker, model_a, case, status, code):
    data = model_a.read_bytes()
    sha = None
    if case == "digest":
        sha = "0" * 64
    elif case == "not_gguf":
        data = b"NOPE" + data[4:]
    elif case == "bad_digest_header":
        sha = "xyz"
    r = _upload(worker.url, "a.gguf", data, sha=sha)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert _files(worker.cache_dir) == []


def test_too_large_is_413_and_leaves_no_file(services, model_a, tmp_path):
    worker = services.worker(extra=["--max-model-bytes", "1000"])
    r = _upload(worker.url, "a.gguf", model_a.read_bytes())
    assert r.status_code == 413 and r.json()["error"]["code"] == "model_too_large"
    chunked = _upload(worker.url, "a.gguf", iter([model_a.read_bytes()]))
    assert chunked.status_code == 413
    assert _files(worker.cache_dir) == []


def test_disk_full_is_507(services, model_a):
    worker = services.worker(extra=["--reserve-disk-bytes", str(1 << 62)])
    r = _upload(worker.url, "a.gguf", model_a.read_bytes())
    assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage"
    assert _files(worker.cache_dir) == []


def _send_partial(url, name, declared, body):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall((f"POST /cache_model HTTP/1.1\r\nHost: x\r\nX-Model-Name: {name}\r\n"
                   f"Content-Length: {declared}\r\n\r\n").encode() + body)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        try:
            return s.recv(4096)
        except OSError:
            return b""


def test_disconnect_mid_upload_leaves_no_file(worker, model_a):
    data = model_a.read_bytes()
    _send_partial(worker.url, "a.gguf", len(data), data[: len(data) // 2])
    # The worker answers (or drops) only after cleaning up; ask it to be sure it is done.
    assert requests.get(worker.url + "/models").json()["cached"] == []
    assert _files(worker.cache_dir) == []


def test_leftover_partial_files_removed_at_startup(services, tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / ".incoming-abc123").write_bytes(b"GGUF half")
    services.worker(cache_dir=cache)
    assert _files(cache) == []


def test_corrupt_model_fails_and_previous_keeps_serving(worker, model_a):
    assert _upload(worker.url, "a.gguf", model_a.read_bytes(), "/load_model_from_store").status_code == 200
    data = model_a.read_bytes()
    corrupt = data[: len(data) // 3]  # valid magic, truncated tensors
    r = _upload(worker.url, "broken.gguf", corrupt, "/load_model_from_store")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "load_failed"
    assert [m["name"] for m in requests.get(worker.url + "/models").json()["loaded"]] == ["a.gguf"]
    with requests.post(worker.url + "/infer", json={"prompt": "hi", "max_tokens": 4, "model": "a.gguf"}) as r:
        assert r.status_code == 200 and r.content


def test_infer_for_another_model_is_409(worker, model_a, model_b):
    _upload(worker.url, "a.gguf", model_a.read_bytes(), "/load_model_from_store")
    r = requests.post(worker.url + "/infer", json={"prompt": "hi", "model": "b.gguf"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_not_loaded"


def test_infer_without_model_is_409(worker):
    r = requests.post(worker.url + "/infer", json={"prompt": "hi"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_not_loaded"


@pytest.mark.parametrize("body", [None, [], {"prompt": ""}, {"prompt": "x", "max_tokens": 0},
                                  {"prompt": "x", "max_tokens": "9"}, {"prompt": "x", "temperature": "hot"},
                                  {"prompt": "x", "model": "../a.gguf"}])
def test_infer_bad_json(worker, body):
    r = requests.post(worker.url + "/infer", json=body) if body is not None else \
        requests.post(worker.url + "/infer", data="not json")
    assert r.status_code == 400
    assert r.json()["error"]["code"] in ("invalid_json", "invalid_request", "invalid_model_name")


def test_concurrent_infer_all_complete(worker, model_a):
    _upload(worker.url, "a.gguf", model_a.read_bytes(), "/load_model_from_store")
    results: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def one(i):
        r = requests.post(worker.url + "/infer", json={"prompt": f"hello {i}", "max_tokens": 6}, timeout=60)
        with lock:
            results.append((r.status_code, r.content))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert all(status == 200 and body for status, body in results)
    metrics = requests.get(worker.url + "/metrics").text
    assert 'worker_infer_requests_total{result="ok"} 8.0' in metrics


def test_load_during_generation_lets_it_finish(worker, model_a, model_b):
    _upload(worker.url, "a.gguf", model_a.read_bytes(), "/load_model_from_store")
    _upload(worker.url, "b.gguf", model_b.read_bytes())
    stream = requests.post(worker.url + "/infer", json={"prompt": "hi", "max_tokens": 1000, "temperature": 0,
                                                        "model": "a.gguf"}, stream=True)
    chunks = stream.iter_content(chunk_size=None)
    assert next(chunks)
    load = requests.post(worker.url + "/load_model_from_local_store", headers={"X-Model-Name": "b.gguf"})
    rest = b"".join(chunks)
    assert load.status_code == 200 and load.json()["loaded"] == "b.gguf"
    assert rest, "the generation went on after the load was asked for"
    # b was loaded alongside a: nothing was closed under the running generation.
    assert [m["name"] for m in requests.get(worker.url + "/models").json()["loaded"]] == ["a.gguf", "b.gguf"]
    metrics = requests.get(worker.url + "/metrics").text
    # The stream ran to its end: a load drains, it never cuts a generation short.
    assert 'worker_infer_requests_total{result="ok"} 1.0' in metrics
    assert "disconnected" not in metrics


def unread_stream(url: str, body: dict) -> socket.socket:
    """POST /infer on a socket with a small receive buffer that reads only the first bytes: the worker
    then blocks writing a response larger than the socket buffers, and holds its model until the
    socket is read or closed."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body)
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.connect((host, int(port)))
    conn.settimeout(30)
    conn.sendall(f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n{data}".encode())
    assert conn.recv(64).startswith(b"HTTP/1.1 200")
    return conn


def test_client_disconnect_stops_generation(services, model_a):
    """The unread stream holds the worker mid-response until the client closes, however fast the
    machine decodes. That a closed stream's slot stops decoding is held in-process behind a Gate:
    test_parallel_generation.py::test_drain_timeout_is_model_busy_and_a_disconnect_frees_the_slot."""
    worker = services.worker(extra=["--n-ctx", "16384"])
    _upload(worker.url, "a.gguf", model_a.read_bytes(), "/load_model_from_store")
    conn = unread_stream(worker.url, {"prompt": "hi", "max_tokens": 16000, "temperature": 0,
                                      "stream_format": "ndjson"})
    # ~300 KB of ndjson: twice what the worker's send buffer (SEND_BUFFER_BYTES, doubled by Linux)
    # and our 4 KiB receive buffer can hold, so the response cannot end before the close below.
    conn.close()
    # The worker notices on its next write; a later request gets its turn.
    with requests.post(worker.url + "/infer", json={"prompt": "hi", "max_tokens": 2}, timeout=30) as r:
        assert r.status_code == 200
    deadline = time.monotonic() + 10
    while 'result="disconnected"} 1.0' not in (metrics := requests.get(worker.url + "/metrics").text):
        assert time.monotonic() < deadline, "no disconnect counted (or the whole response fit the socket buffers)"
        time.sleep(0.02)
    written = float(next(line.split()[1] for line in metrics.splitlines()
                         if line.startswith("worker_tokens_generated_total")))
    assert written < 16000, "the response stopped where the client left"


def test_delete_unloads_and_removes(worker, model_a):
    _upload(worker.url, "a.gguf", model_a.read_bytes(), "/load_model_from_store")
    r = requests.delete(worker.url + "/models/a.gguf")
    assert r.status_code == 200 and r.json()["unloaded"] is True
    assert _files(worker.cache_dir) == []
    assert requests.get(worker.url + "/models").json()["loaded"] == []
    assert requests.delete(worker.url + "/models/a.gguf").status_code == 404


def test_unload(worker, model_a):
    _upload(worker.url, "a.gguf", model_a.read_bytes(), "/load_model_from_store")
    assert requests.post(worker.url + "/unload").json()["unloaded"] == ["a.gguf"]
    assert requests.get(worker.url + "/health").json()["loaded"] == []


def test_metrics_count_loads_and_bytes(worker, model_a):
    size = model_a.stat().st_size
    _upload(worker.url, "a.gguf", model_a.read_bytes(), "/load_model_from_store")
    text = requests.get(worker.url + "/metrics").text
    assert f"worker_model_bytes_received_total {float(size)}" in text
    assert 'worker_model_loads_total{result="ok"} 1.0' in text


def test_token_required_when_configured(services, model_a):
    worker = services.worker(token="s3cret")
    assert requests.get(worker.url + "/health").status_code == 200
    for method, path in [("get", "/models"), ("post", "/infer"), ("post", "/unload"), ("get", "/metrics"),
                         ("delete", "/models/a.gguf"), ("post", "/load_model_from_local_store")]:
        r = getattr(requests, method)(worker.url + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
    r = _upload(worker.url, "a.gguf", model_a.read_bytes())
    assert r.status_code == 401
    assert _files(worker.cache_dir) == []
    r = _upload(worker.url, "a.gguf", model_a.read_bytes(), headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200


def test_refuses_public_bind_without_token(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "inference_worker", "--host", "0.0.0.0", "--cache-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "WORKER_TOKEN" in proc.stderr


def test_resending_a_loaded_model_loads_the_new_bytes(worker, model_a, model_b):
    _upload(worker.url, "m.gguf", model_a.read_bytes(), "/load_model_from_store")
    first = requests.post(worker.url + "/infer", json={"prompt": "hello", "max_tokens": 8, "temperature": 0}).content
    r = _upload(worker.url, "m.gguf", model_b.read_bytes(), "/load_model_from_store")
    assert r.status_code == 200 and r.json()["load_ms"] > 0
    second = requests.post(worker.url + "/infer", json={"prompt": "hello", "max_tokens": 8, "temperature": 0}).content
    assert first != second, "greedy output of different weights differs; the same output means stale weights"


def test_chat_messages_and_ndjson_events(worker, model_a):
    import json

    _upload(worker.url, "a.gguf", model_a.read_bytes(), "/load_model_from_store")
    r = requests.post(worker.url + "/infer", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 4, "stream_format": "ndjson"})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
    events = [json.loads(line) for line in r.text.splitlines()]
    assert all("text" in e for e in events[:-1]) and len(events) >= 2
    assert events[-1]["finish_reason"] in ("length", "stop")
    assert events[-1]["completion_tokens"] == len(events) - 1
    bad = requests.post(worker.url + "/infer", json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"


def test_upload_that_cannot_load_is_not_kept(worker, model_a):
    data = model_a.read_bytes()
    r = _upload(worker.url, "broken.gguf", data[: len(data) // 3], "/load_model_from_store")
    assert r.status_code == 422 and r.json()["error"]["code"] == "load_failed"
    assert _files(worker.cache_dir) == []


def test_json_without_content_type_and_oversized_bodies(worker, model_a):
    _upload(worker.url, "a.gguf", model_a.read_bytes(), "/load_model_from_store")
    r = requests.post(worker.url + "/infer", data='{"prompt": "hi", "max_tokens": 2}')  # form content type
    assert r.status_code == 200
    r = requests.post(worker.url + "/infer", data=b'{"prompt": "' + b"x" * (5 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = requests.post(worker.url + "/infer", json={"prompt": "word " * 100_000})  # refused before tokenizing
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"


@pytest.mark.parametrize("kwargs,status,code", [
    ({"json": {"model": "../a.gguf"}}, 400, "invalid_model_name"),
    ({"data": "not json"}, 400, "invalid_json"),
])
def test_unload_checks_its_body(worker, model_a, kwargs, status, code):
    _upload(worker.url, "a.gguf", model_a.read_bytes(), "/load_model_from_store")
    r = requests.post(worker.url + "/unload", **kwargs)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    assert [m["name"] for m in requests.get(worker.url + "/models").json()["loaded"]] == ["a.gguf"]
    assert requests.post(worker.url + "/unload", json={"model": "other.gguf"}).json() == {"unloaded": []}


def test_no_log_line_is_lost_while_models_load(worker, model_a):
    # llama-cpp-python points fds 1 and 2 at /dev/null while it loads; the worker logs elsewhere.
    _upload(worker.url, "a.gguf", model_a.read_bytes())
    before = worker.log().count("GET /health 200")
    made = 0
    done = threading.Event()

    def hammer():
        nonlocal made
        with requests.Session() as s:
            while not done.is_set():
                assert s.get(worker.url + "/health").status_code == 200
                made += 1

    t = threading.Thread(target=hammer)
    t.start()
    try:
        for _ in range(30):
            assert requests.post(worker.url + "/load_model_from_local_store", headers={"X-Model-Name": "a.gguf"}).ok
            assert requests.post(worker.url + "/unload", json={"model": "a.gguf"}).ok
    finally:
        done.set()
        t.join()
    assert worker.log().count("GET /health 200") - before == made
