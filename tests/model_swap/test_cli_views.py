"""`ps` and `list` over canned store listings (a fast seam beside test_cli.py's real services): the
shapes a store may answer with, one worker at the top level or several in a `workers` list."""

from __future__ import annotations

import io
import threading

import pytest
import requests
from rich.console import Console
from werkzeug.serving import make_server

from model_swap.commands import main
from model_swap.commands.views import duration, keep_alive_left, show_list, show_ps, workers_of
from model_swap.testing import free_port
from tests.support.fake_worker import FakeWorker
from tests.support.store_harness import fake_store


class CannedStore:
    """Answers GET paths from a dict, as StoreClient.get does (a stand-in: no HTTP)."""

    def __init__(self, answers: dict[str, dict]):
        self.answers = answers

    def get(self, path: str) -> dict:
        return self.answers[path]


def _worker(name, loaded, cached, uses=None):
    return {"name": name, "cached": cached, "in_flight": [],
            "loaded": [{"name": m, "memory_bytes": 150_000_000, "keep_alive_s": 300.0, "expires_in_s": 42.0,
                        "pinned": False} for m in loaded],
            "memory": {"budget_bytes": 1_000_000_000, "used_bytes": 150_000_000 * len(loaded), "max_loaded_models": 2},
            "gates": {"uses": uses or {}, "waiting": {}}}


TWO_WORKERS = {
    "models": [{"name": n, "size": 98_000_000} for n in ("a.gguf", "b.gguf", "c.gguf")],
    "workers": [_worker("http://w1", ["a.gguf"], ["a.gguf"], {"a.gguf": 2}), _worker("http://w2", ["b.gguf"],
                                                                                   ["b.gguf", "c.gguf"])],
    "worker": [{"name": "http://w1", "reachable": True}, {"name": "http://w2", "reachable": False}],
    "unusable": [],
}


def _render(fn, answers) -> str:
    out = Console(file=io.StringIO(), width=160)
    fn(CannedStore(answers), out)
    return out.file.getvalue()


def test_ps_shows_every_worker_of_a_workers_list():
    text = _render(show_ps, {"/models": TWO_WORKERS})
    assert "worker http://w1: 150.0 MB of 1.0 GB, 1 of 2 models" in text
    assert "worker http://w2: 150.0 MB of 1.0 GB, 1 of 2 models (not answering now)" in text
    assert "disk cache: b.gguf (98.0 MB), c.gguf (98.0 MB)" in text
    a_row = next(line for line in text.splitlines() if "a.gguf" in line and "│" in line)
    assert [c.strip() for c in a_row.split("│") if c.strip()] == ["a.gguf", "150.0 MB", "2", "0", "in use"]


def test_a_store_without_a_workers_list_is_one_worker():
    old = {"models": [], "policy": {"cached": ["a.gguf"]}, "worker": {"name": "http://w", "reachable": True},
           "memory": {"loaded": [], "budget_bytes": None, "used_bytes": 0, "max_loaded_models": 1},
           "gates": {"uses": {}}, "in_flight": []}
    assert [w["name"] for w in workers_of(old)] == ["http://w"]
    assert "no model in memory" in _render(show_ps, {"/models": old})


def test_list_names_the_worker_where_each_model_is_when_there_are_several():
    answers = {"/models": TWO_WORKERS, "/api/tags": {"models": [{"file": "a.gguf", "aliases": ["alpha"]}]}}
    rows = {r["name"]: r for r in show_list(CannedStore(answers), Console(file=io.StringIO(), width=160))}
    assert rows["a.gguf"]["where"] == "http://w1: memory" and rows["a.gguf"]["aliases"] == ["alpha"]
    assert rows["b.gguf"]["where"] == "http://w2: memory" and rows["c.gguf"]["where"] == "http://w2: disk"


@pytest.mark.parametrize("model,uses,shown", [
    ({"pinned": True, "expires_in_s": None}, 0, "pinned"),
    ({"keep_alive_s": -1, "expires_in_s": None}, 0, "forever"),
    ({"keep_alive_s": 300, "expires_in_s": None}, 1, "in use"),
    ({"keep_alive_s": 300, "expires_in_s": 299.6}, 0, "5m 0s"),
    ({"keep_alive_s": 7200, "expires_in_s": 3725}, 0, "1h 2m"),
])
def test_keep_alive_left(model, uses, shown):
    assert keep_alive_left(model, uses) == shown


def test_duration():
    assert [duration(s) for s in (0, 12.4, 60, 3599, 3600)] == ["0s", "12s", "1m 0s", "59m 59s", "1h 0m"]


@pytest.mark.parametrize("argv,url,as_json", [
    (["ps"], "http://env:1", False),
    (["--url", "http://before:1", "ps"], "http://before:1", False),
    (["ps", "--url", "http://after:1", "--json"], "http://after:1", True),
    (["--url", "http://before:1", "--json", "ps"], "http://before:1", True),  # left out after: kept
])
def test_connection_flags_go_before_or_after_the_command(argv, url, as_json):
    from model_swap.commands import build_parser

    args = build_parser({"MODEL_SWAP_URL": "http://env:1", "STORE_API_KEY": "k"}).parse_args(argv)
    assert (args.url, args.api_key, args.json) == (url, "k", as_json)


def test_ps_over_http_counts_a_stream_still_running_as_in_use(tmp_path, capsys, monkeypatch):
    """A real store app on a loopback port in front of a fake worker that holds the generation open,
    so ps surely asks while it runs (test_cli.py checks the figures against the real worker)."""
    monkeypatch.setenv("COLUMNS", "160")
    fake = FakeWorker()
    app, _ = fake_store(tmp_path, fake)
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    fake.hold("a.gguf")
    started, ended = threading.Event(), threading.Event()

    def generate():
        with requests.post(url + "/user_request", json={"model": "a.gguf", "prompt": "hi", "max_tokens": 4},
                           stream=True, timeout=30) as r:
            for _ in r.iter_content(None):
                started.set()
        ended.set()

    t = threading.Thread(target=generate)
    t.start()
    try:
        assert started.wait(10)
        assert main(["ps"], env={"MODEL_SWAP_URL": url}) == 0
        held = capsys.readouterr().out
        assert not ended.is_set()
    finally:
        fake.release("a.gguf")
        t.join(10)
    assert main(["ps"], env={"MODEL_SWAP_URL": url}) == 0
    after = capsys.readouterr().out
    server.shutdown()
    cells = lambda text: next([c.strip() for c in line.split("│") if c.strip()]  # noqa: E731
                              for line in text.splitlines() if line.startswith("│ a.gguf"))
    assert cells(held)[2:] == ["1", "0", "in use"]
    assert cells(after)[2] == "0" and cells(after)[4] != "in use"
