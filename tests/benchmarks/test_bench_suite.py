"""python -m benchmarks: end to end in quick mode with tiny models, and its cache arithmetic."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks.client import complete
from benchmarks.mixed import belady_misses, fewest_loads, lru_misses
from model_store_server.outcome import Outcome

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _table(markdown: str, first_header: str) -> list[list[str]]:
    """The rows (cells) of the markdown table whose header starts with `first_header`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_quick_run_with_tiny_models_writes_a_well_formed_report(make_model, tmp_path):
    models = [make_model(tmp_path / "models", f"tiny-{c}.gguf", seed=i) for i, c in enumerate("abc", start=1)]
    out = tmp_path / "results"
    # An empty cache folder: llama-server is missing, and the report must say so rather than skip it.
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "empty-cache"))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--models", *map(str, models), "--systems", "model-swap",
         "llama-server-1", "--out", str(out), "--threads", "1", "--reps", "2", "--throughput-reps", "1",
         "--mixed-clients", "4", "--mixed-seconds", "2", "--memory-swaps", "4", "--transfer-reps", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]

    report = (out / "bench.md").read_text()
    assert "python -m benchmarks --quick --models" in report  # the exact command
    summary = _table(report, "workload")
    assert summary[0] == ["workload", "metric", "model-swap", "best peer", "÷ best peer", "floor", "÷ floor"]
    assert all(cell == "---" for cell in summary[1])
    rows = summary[2:]
    assert [r[0][0] for r in rows] == list("111122344555" "67")  # workloads 1-7, in order
    for row in rows:
        assert len(row) == 7, row
        assert re.fullmatch(r"\d+\.\d+( s| MiB)?|\d+ MiB", row[2]), row  # model-swap measured every metric
        assert row[3] == row[4] == "n/a", row  # no peer ran
    with_floor = [r for r in rows if not r[0].startswith("5")]
    assert all(re.fullmatch(r"\d+\.\d\d×", r[6]) for r in with_floor), with_floor

    systems = _table(report, "system")
    assert len({len(r) for r in systems}) == 1
    names = [r[0] for r in systems[2:]]
    assert names[0].startswith("model-swap") and names[-1].startswith("floor")
    missing = next(r for r in systems if r[0].startswith("llama-server router"))
    assert missing[1].startswith("not run:") and "build_llama_server.sh" in missing[1]

    # Workload 8: the worker with 1, 4 and 8 slots, each measured; llama-server -np 8 says why it did not run.
    slot_rows = _table(report, "configuration")[2:]
    assert [r[0] for r in slot_rows] == [f"model-swap, N_PARALLEL={n}" for n in (1, 4, 8)] + [
        "model-swap, N_PARALLEL=8, FLASH_ATTN=1", "llama-server router, models-max 1"]
    for row in slot_rows[:4]:
        assert re.fullmatch(r"\d+\.\d", row[1]) and re.fullmatch(r"\d+\.\d", row[2]) and row[8] == "ok", row
        assert re.fullmatch(r"\d+\.\d+ s", row[5]) and re.fullmatch(r"\d+\.\d+ s", row[6]), row  # TTFT idle, joining
    assert slot_rows[4][8].startswith("not run:") and slot_rows[4][4] == "n/a"

    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    results = json.loads((out / "bench.json").read_text())
    own = results["systems"]["model-swap"]
    assert own["status"] == "ok"
    assert "load_from_store" not in own["warm_swap"]["actions"]["tiny-a.gguf"]  # warm: no transfer
    assert set(own["cold_swap"]["actions"]["tiny-b.gguf"]) == {"load_from_store"}  # really a transfer
    assert own["mixed"]["errors"] == {} and own["mixed"]["transfers"] >= own["mixed"]["belady_transfers"]
    assert own["mixed"]["told"] == own["mixed"]["ok"]  # every served request's outcome was counted


def test_cache_arithmetic_on_a_known_order():
    order = list("abcabc")
    assert lru_misses(order, 2) == 6  # LRU always evicts the one needed next
    assert belady_misses(order, 2) == 4  # a b c(evict b) a b(evict a) c
    assert belady_misses(order, 3) == lru_misses(order, 3) == 3
    assert fewest_loads(list("aabbba")) == 3
    assert belady_misses([], 2) == lru_misses([], 2) == fewest_loads([]) == 0


TOKEN = f"data: {json.dumps({'choices': [{'text': 'a', 'finish_reason': None}]})}".encode()
LAST = f"data: {json.dumps({'choices': [{'text': '', 'finish_reason': 'length'}]})}".encode()


def _sse_server(events: list[bytes]) -> ThreadingHTTPServer:
    """A loopback server that answers every POST with these server-sent events, CRLF line ends."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for event in events:
                self.wfile.write(event + b"\r\n\r\n")
                self.wfile.flush()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _complete_against(events: list[bytes]):
    server = _sse_server(events)
    try:
        return complete(f"http://127.0.0.1:{server.server_address[1]}", "m", 2)
    finally:
        server.shutdown()
        server.server_close()


def test_the_client_counts_token_events_only():
    # What llama_cpp.server sends while a request waits: a comment, then tokens.
    result = _complete_against([b": ping - 2026-01-01", TOKEN, TOKEN, LAST, b"data: [DONE]"])
    assert (result.ok, result.tokens, result.error, result.cache_action) == (True, 2, None, None)
    assert 0 < result.ttft_s <= result.total_s


def test_the_client_reads_the_outcome_a_waiting_stream_tells_in_a_comment():
    # A model-swap request that waited for a swap has no X-Cache-Action header: the store's comment tells it.
    outcome = Outcome(action="load_from_store", evicted=["x.gguf"])
    comment = outcome.sse_comment().strip().encode()
    result = _complete_against([b": transferring m... 45%", comment, TOKEN, LAST, b"data: [DONE]"])
    assert (result.ok, result.cache_action) == (True, "load_from_store")
    assert result.action_at is not None


def test_an_error_after_the_status_line_counts_by_its_code():
    error = json.dumps({"error": {"code": "load_failed", "message": "no"}}).encode()
    result = _complete_against([b": loading m...", b"data: " + error])
    assert (result.ok, result.error) == (False, "load_failed")
