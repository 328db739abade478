"""Odd input gets a 400 with a code in the JSON envelope, never a 500 or an HTML page (real services)."""

from __future__ import annotations

import json
import socket

import pytest
import requests

SURROGATE = '{"model": "a.gguf", "max_tokens": 2, "prompt": "hi \\ud800 there"}'
SURROGATE_CHAT = '{"model": "a.gguf", "max_tokens": 2, "messages": [{"role": "user", "content": "\\udfff"}]}'
NESTED = '{"model": "a.gguf", "prompt": "hi", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.fixture(scope="module")
def pair(module_services, module_model, tmp_path_factory):
    """One worker and one store for the whole module: these requests change nothing."""
    tmp = tmp_path_factory.mktemp("odd-input")
    module_model(tmp / "models", "a.gguf", seed=1)
    worker = module_services.worker(cache_dir=tmp / "cache")
    worker.cache_dir = tmp / "cache"
    return module_services.store(tmp / "models", worker), worker


def raw(url: str, data: bytes, half_close: bool = False) -> tuple[int, dict, bytes]:
    """Send raw bytes; return the status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and len(answer.partition(b"\r\n\r\n")[2]) >= _length(answer):
                break
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


@pytest.mark.parametrize("body", [SURROGATE, SURROGATE_CHAT], ids=["prompt", "messages"])
def test_lone_surrogates_are_a_400_before_any_swap(pair, body):
    store, worker = pair
    path = "/v1/chat/completions" if "messages" in body else "/user_request"
    r = requests.post(store.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", r.text
    assert "X-Cache-Action" not in r.headers
    assert list(worker.cache_dir.iterdir()) == []
    r = requests.post(worker.url + "/infer", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", r.text


@pytest.mark.parametrize("service", [0, 1], ids=["store", "worker"])
def test_deeply_nested_json_is_a_400(pair, service):
    url = pair[service].url
    r = requests.post(url + ("/user_request" if service == 0 else "/infer"), data=NESTED, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text


@pytest.mark.parametrize("service", [0, 1], ids=["store", "worker"])
def test_a_chunked_body_cut_off_mid_chunk_is_a_400(pair, service):
    url = pair[service].url
    path = "/user_request" if service == 0 else "/infer"
    status, headers, body = raw(url, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                     "Transfer-Encoding: chunked\r\n\r\n40\r\n{\"prompt\": \"hi\"".encode(),
                                half_close=True)
    assert status == 400 and json.loads(body)["error"]["code"] == "incomplete_body"


@pytest.mark.parametrize("request_bytes,status,code", [
    (b"POST /user_request HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "invalid_header"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"HELLO THERE\r\n\r\n", 400, "invalid_request_line"),
    (b"GET /health HTTP/7.0\r\nHost: x\r\n\r\n", 400, "invalid_http_version"),
], ids=["bad-content-length", "big-header", "long-url", "garbage", "http-version"])
@pytest.mark.parametrize("service", [0, 1], ids=["store", "worker"])
def test_malformed_requests_get_the_json_envelope(pair, service, request_bytes, status, code):
    got_status, headers, body = raw(pair[service].url, request_bytes)
    assert got_status == status and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == code
