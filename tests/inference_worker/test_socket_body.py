"""Splicing an upload from a real loopback connection into a file, hashed on the side."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import types

import pytest
import requests

from inference_worker.socket_body import RawBody, raw_body, splice_into


@pytest.fixture
def connection():
    """A connected pair of real TCP sockets on loopback: (client, server side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        yield client, server


def _body(sock, length, head=b""):
    return RawBody(sock, head, length, types.SimpleNamespace())


def _send_in_background(sock, data, close=True):
    def send():
        sock.sendall(data)
        if close:
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_splices_and_hashes_every_byte(connection, tmp_path):
    client, server = connection
    data = os.urandom(40 << 20)  # past the flusher's and the hasher's steps, not a multiple of them
    data += b"tail"
    head = data[:3000]
    sender = _send_in_background(client, data[3000:])
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    try:
        digest, received = splice_into(_body(server, len(data), head), fd)
    finally:
        os.close(fd)
    sender.join()
    assert (digest, received) == (hashlib.sha256(data).hexdigest(), len(data))
    assert (tmp_path / "out").read_bytes() == data


def test_never_reads_past_the_declared_length(connection, tmp_path):
    client, server = connection
    sender = _send_in_background(client, b"GGUF" + b"x" * 996 + b"NEXT REQUEST")
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    try:
        _, received = splice_into(_body(server, 1000), fd)
    finally:
        os.close(fd)
    sender.join()
    assert received == 1000
    assert server.recv(100) == b"NEXT REQUEST"


def test_stops_short_when_the_client_closes(connection, tmp_path):
    client, server = connection
    _send_in_background(client, b"GGUF" * 100).join()
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    try:
        digest, received = splice_into(_body(server, 10_000), fd)
    finally:
        os.close(fd)
    assert (digest, received) == (hashlib.sha256(b"GGUF" * 100).hexdigest(), 400)


def test_a_silent_client_times_out_when_the_socket_has_a_timeout(connection, tmp_path):
    client, server = connection
    client.sendall(b"GGUF")
    server.settimeout(0.3)  # what a server with a request timeout does: the fd becomes non-blocking
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(TimeoutError):
            splice_into(_body(server, 1000), fd)
    finally:
        os.close(fd)


def test_only_a_plain_gunicorn_body_qualifies():
    assert raw_body({}) is None
    assert raw_body({"gunicorn.socket": object(), "wsgi.input": object()}) is None


def _post(conn, name, body, headers=None):
    conn.request("POST", "/cache_model", body=body, headers={"X-Model-Name": name, **(headers or {})})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.slow
def test_a_worker_splices_uploads_and_keeps_the_connection(services, make_model, tmp_path):
    worker = services.worker()
    a = make_model(tmp_path / "m", "a.gguf", seed=1).read_bytes()
    b = make_model(tmp_path / "m", "b.gguf", seed=2).read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=30)
    try:
        status, first = _post(conn, "a.gguf", a)
        sock = conn.sock
        status_b, second = _post(conn, "b.gguf", b, {"X-Model-Sha256": hashlib.sha256(b).hexdigest()})
        assert (status, status_b) == (200, 200), (first, second)
        assert conn.sock is sock  # the body was consumed to its end, so the connection lives on
        assert (first["receive_method"], second["receive_method"]) == ("splice", "splice")
        assert first["sha256"] == hashlib.sha256(a).hexdigest()
        conn.request("GET", "/models")
        listed = json.loads(conn.getresponse().read())
        assert conn.sock is sock
    finally:
        conn.close()
    assert sorted(m["name"] for m in listed["cached"]) == ["a.gguf", "b.gguf"]
    assert (worker.cache_dir / "a.gguf").read_bytes() == a


@pytest.mark.slow
def test_a_chunked_upload_takes_the_stream(services, make_model, tmp_path):
    worker = services.worker()
    a = make_model(tmp_path / "m", "a.gguf", seed=1).read_bytes()
    r = requests.post(worker.url + "/cache_model", data=iter([a[:1000], a[1000:]]), headers={"X-Model-Name": "a.gguf"},
                      timeout=30)
    assert r.status_code == 200, r.text
    assert (r.json()["receive_method"], r.json()["sha256"]) == ("stream", hashlib.sha256(a).hexdigest())
