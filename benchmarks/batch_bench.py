"""Tokens/s of batched decoding against one stream, and time to first token joining a busy batch.

    python benchmarks/batch_bench.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--streams 8]
        [--tokens 64] [--threads N] [--repeat 5] [--batch-invariant] [--llama-server PATH]

Measures in one run, in rounds (every row once per round, so load from other processes falls
on all rows alike), and prints each row's median and samples:
  high-level   llama-cpp-python's Llama.create_completion, one stream (today's engine path)
  batched      BatchedModel: one stream on 1 and on 8 slots, and --streams concurrent streams on
               1, 4 and 8 slots: aggregate tokens/s = tokens generated / wall time
  llama-server (with --llama-server or $LLAMA_SERVER) `-np 8` on the same model and threads,
               one stream and --streams concurrent ones over HTTP
  ttft         first piece of a short prompt on the idle 8-slot model, and joining 7 busy streams
then the ratios. Each in-process measurement runs in a fresh process (after one warm-up), as
a worker with one model would: in an OpenMP build of llama.cpp, a process in which several
threads have driven contexts decodes markedly slower (here about 160 -> 100 tok/s; likely
libgomp giving up its spin-waiting once it manages more threads than there are cores). Timings vary with
the machine and its load."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference_worker.batch_prompt import BatchRequest, usable_cores  # noqa: E402
from inference_worker.batching import BatchedModel  # noqa: E402
from model_swap.testing import free_port  # noqa: E402

log = logging.getLogger("batch_bench")
PROMPTS = ["Once upon a time", "The history of Rome", "A recipe for bread:", "The best way to learn",
           "In the year 2050,", "Dear diary, today", "The ocean is", "My favourite book is"]
N_CTX = 512
JOIN_DELAY = random.Random(0)


def wait_idle(bm: BatchedModel) -> None:
    """Closed streams leave their slots at the loop's next step: start each measurement from idle."""
    while bm.stats().active or bm.stats().queued:
        time.sleep(0.001)


def batched_rate(bm: BatchedModel, n_streams: int, tokens: int) -> float:
    """Aggregate tokens/s of n_streams submitted at once."""
    wait_idle(bm)
    started = time.perf_counter()
    streams = [bm.submit(BatchRequest(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=tokens, temperature=0))
               for i in range(n_streams)]
    readers = [threading.Thread(target=s.text) for s in streams]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    return sum(s.completion_tokens for s in streams) / (time.perf_counter() - started)


def first_piece_seconds(bm: BatchedModel, prompt: str) -> float:
    started = time.perf_counter()
    stream = bm.submit(BatchRequest(prompt=prompt, max_tokens=8, temperature=0))
    next(iter(stream))
    seconds = time.perf_counter() - started
    stream.close()
    return seconds


def ttft_idle(bm: BatchedModel) -> float:
    wait_idle(bm)
    return first_piece_seconds(bm, "Hello")


def ttft_joining(bm: BatchedModel, busy: int) -> float:
    """TTFT of a short prompt while `busy` streams are generating."""
    wait_idle(bm)
    streams = [bm.submit(BatchRequest(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=400, temperature=0))
               for i in range(busy)]
    for s in streams:
        next(iter(s))  # every busy stream is past its prompt
    # Arrive at a random point of a step, as a real request does, not just after one.
    time.sleep(JOIN_DELAY.uniform(0.05, 0.15))
    try:
        return first_piece_seconds(bm, "Hello")
    finally:
        for s in streams:
            s.close()


class HighLevel:
    """llama-cpp-python's Llama.create_completion: today's engine path."""

    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False)

    def rate(self, tokens: int) -> float:
        started = time.perf_counter()
        out = self.llm.create_completion(PROMPTS[0], max_tokens=tokens, temperature=0)
        return out["usage"]["completion_tokens"] / (time.perf_counter() - started)


class LlamaServer:
    """llama-server -np 8 on the same model and threads, asked over HTTP."""

    def __init__(self, binary: str, path: Path, threads: int, out):
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        cmd = [binary, "-m", str(path), "-np", "8", "-c", str(8 * N_CTX), "-t", str(threads), "-tb", str(threads),
               "--host", "127.0.0.1", "--port", port]
        self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not _healthy(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError(f"llama-server did not start: {' '.join(cmd)}")
            time.sleep(0.2)

    def rate(self, n_streams: int, tokens: int) -> float:
        done: list[int] = []
        started = time.perf_counter()
        threads = [threading.Thread(target=lambda i=i: done.append(_server_completion(self.url, i, tokens)))
                   for i in range(n_streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(done) / (time.perf_counter() - started)

    def ttft(self, busy: int) -> float:
        """First streamed piece of a short prompt while `busy` long requests are generating."""
        stop = threading.Event()
        started_busy = [threading.Event() for _ in range(busy)]
        threads = [threading.Thread(target=self._stream, args=(PROMPTS[i % len(PROMPTS)], 400, started_busy[i], stop))
                   for i in range(busy)]
        for t in threads:
            t.start()
        for e in started_busy:
            e.wait()
        time.sleep(JOIN_DELAY.uniform(0.05, 0.15))
        at_once = threading.Event()
        at_once.set()  # return at the first piece
        started = time.perf_counter()
        self._stream("Hello", 8, threading.Event(), at_once)
        seconds = time.perf_counter() - started
        stop.set()
        for t in threads:
            t.join()
        return seconds

    def _stream(self, prompt: str, tokens: int, first: threading.Event, stop: threading.Event) -> None:
        body = {"prompt": prompt, "n_predict": tokens, "temperature": 0, "cache_prompt": False, "stream": True}
        with requests.post(self.url + "/completion", json=body, stream=True, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: ") and b'"content"' in line:
                    first.set()
                    if stop.is_set():
                        return  # closing the connection cancels the request

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def _server_completion(url: str, i: int, tokens: int) -> int:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "n_predict": tokens, "temperature": 0, "cache_prompt": False}
    return requests.post(url + "/completion", json=body, timeout=300).json()["tokens_predicted"]


ROWS = {  # id: label
    "high": "high-level Llama, 1 stream",
    "b1x1": "batched 1 slot, 1 stream",
    "b8x1": "batched 8 slots, 1 stream",
    "b1xN": "batched 1 slot, {n} streams",
    "b4xN": "batched 4 slots, {n} streams",
    "b8xN": "batched 8 slots, {n} streams",
    "server1": "llama-server -np 8, 1 stream",
    "serverN": "llama-server -np 8, {n} streams",
    "ttft-idle": "ttft idle (s)",
    "ttft-join": "ttft joining 7 busy streams (s)",
    "server-ttft-idle": "llama-server ttft idle (s)",
    "server-ttft-join": "llama-server ttft joining 7 busy (s)",
}


def measure_row(row: str, args) -> float:
    """One in-process row in this (fresh) process: a warm-up, then one measurement."""
    if row == "high":
        high = HighLevel(args.model, args.threads)
        try:
            high.rate(8)
            return high.rate(args.tokens)
        finally:
            high.llm.close()
    n_parallel = {"b1x1": 1, "b8x1": 8, "b1xN": 1, "b4xN": 4, "b8xN": 8, "ttft-idle": 8, "ttft-join": 8}[row]
    with BatchedModel(args.model, n_ctx_per_slot=N_CTX, n_parallel=n_parallel, n_threads=args.threads,
                      batch_invariant=args.batch_invariant) as bm:
        streams = 1 if row.endswith("x1") else args.streams

        def measure() -> float:
            if row == "ttft-idle":
                return ttft_idle(bm)
            if row == "ttft-join":
                return ttft_joining(bm, 7)
            return batched_rate(bm, streams, args.tokens)

        measure()  # warm-up
        return measure()


def run_in_fresh_process(row: str, argv: list[str]) -> float:
    out = subprocess.run([sys.executable, __file__, *argv, "--row", row], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch-invariant", action="store_true", help="load without CPU weight repacking")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                        help="a llama-server binary to compare with (default: $LLAMA_SERVER)")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args()
    if args.row:
        print(measure_row(args.row, args))  # the parent reads this value
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("model %s, %d tokens per stream, %d threads, medians of %d rounds%s", args.model.name, args.tokens,
             args.threads, args.repeat, ", batch_invariant" if args.batch_invariant else "")
    child_argv = ["--model", str(args.model), "--streams", str(args.streams), "--tokens", str(args.tokens),
                  "--threads", str(args.threads), *(["--batch-invariant"] if args.batch_invariant else [])]
    rows: dict[str, Callable[[], float]] = {
        row: (lambda row=row: run_in_fresh_process(row, child_argv)) for row in ROWS if not row.startswith("server")}
    with contextlib.ExitStack() as stack:
        if args.llama_server:
            server = LlamaServer(args.llama_server, args.model, args.threads,
                                 stack.enter_context(tempfile.TemporaryFile()))
            stack.callback(server.close)
            server.rate(1, 8)  # warm-up
            rows.update({"server1": lambda: server.rate(1, args.tokens),
                         "serverN": lambda: server.rate(args.streams, args.tokens),
                         "server-ttft-idle": lambda: server.ttft(0),
                         "server-ttft-join": lambda: server.ttft(7)})
        samples: dict[str, list[float]] = {row: [] for row in rows}
        for _ in range(args.repeat):
            for row, measure in rows.items():
                samples[row].append(measure())
    result = {row: statistics.median(values) for row, values in samples.items()}
    for row in ROWS:
        if row in result:
            unit = "s" if "ttft" in row else "tok/s"
            log.info("  %-34s %8.3f %s  (%s)", ROWS[row].format(n=args.streams), result[row], unit,
                     ", ".join(f"{v:.3g}" for v in samples[row]))
    log.info("ratio: %d streams on 8 slots / 1 stream on 1 slot: %.2fx; / the high-level path's 1 stream: %.2fx",
             args.streams, result["b8xN"] / result["b1x1"], result["b8xN"] / result["high"])
    if args.llama_server:
        log.info("ratio: batched 8 slots / llama-server -np 8, %d streams: %.2fx; 1 stream: %.2fx", args.streams,
                 result["b8xN"] / result["serverN"], result["b1x1"] / result["server1"])
        log.info("ratio: llama-server ttft joining / idle: %.2fx", result["server-ttft-join"] / result["server-ttft-idle"])
    log.info("ratio: ttft joining / idle: %.2fx", result["ttft-join"] / result["ttft-idle"])


if __name__ == "__main__":
    main()
