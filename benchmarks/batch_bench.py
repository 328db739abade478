"""Tokens/s of batched decoding against one stream, and time to first token joining a busy batch.

    python benchmarks/batch_bench.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--streams 8]
        [--tokens 64] [--threads N] [--repeat 3] [--batch-invariant] [--llama-server PATH]

Measures in one run, medians over --repeat:
  high-level   llama-cpp-python's Llama.create_completion, one stream (today's engine path)
  batched      BatchedModel with 1 slot and one stream, then with 1, 4 and 8 slots and --streams
               concurrent streams: aggregate tokens/s = tokens generated / wall time
  llama-server (with --llama-server or $LLAMA_SERVER) `-np 8` on the same model and threads,
               one stream and --streams concurrent ones over HTTP
  ttft         first piece of a short prompt on an idle 8-slot model, and joining 7 busy streams
Prints each row and the ratios. Timings vary with the machine and its load.
"""

from __future__ import annotations

import argparse
import logging
import os
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


def median_of(repeat: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeat))


def batched_rate(bm: BatchedModel, n_streams: int, tokens: int) -> float:
    """Aggregate tokens/s of n_streams submitted at once."""
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


def ttft_joining(bm: BatchedModel, busy: int) -> float:
    """TTFT of a short prompt while `busy` streams are generating."""
    streams = [bm.submit(BatchRequest(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=400, temperature=0))
               for i in range(busy)]
    for s in streams:
        next(iter(s))  # every busy stream is past its prompt
    try:
        return first_piece_seconds(bm, "Hello")
    finally:
        for s in streams:
            s.close()


def high_level_rate(path: Path, tokens: int, threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        started = time.perf_counter()
        out = llm.create_completion(PROMPTS[0], max_tokens=tokens, temperature=0)
        return out["usage"]["completion_tokens"] / (time.perf_counter() - started)
    finally:
        llm.close()


def llama_server_rates(binary: str, path: Path, args) -> tuple[float, float]:
    """(one stream, --streams streams) tokens/s from llama-server -np 8 on the same model and threads."""
    port = free_port()
    cmd = [binary, "-m", str(path), "-np", "8", "-c", str(8 * N_CTX), "-t", str(args.threads), "-tb",
           str(args.threads), "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile() as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while not _healthy(url):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"llama-server did not start: {' '.join(cmd)}")
                time.sleep(0.2)

            def rate(n: int) -> float:
                done: list[int] = []
                started = time.perf_counter()
                threads = [threading.Thread(target=lambda i=i: done.append(_server_completion(url, i, args.tokens)))
                           for i in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return sum(done) / (time.perf_counter() - started)

            rate(1)  # warm-up
            return median_of(args.repeat, lambda: rate(1)), median_of(args.repeat, lambda: rate(args.streams))
        finally:
            server.terminate()
            server.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def _server_completion(url: str, i: int, tokens: int) -> int:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "n_predict": tokens, "temperature": 0, "cache_prompt": False}
    return requests.post(url + "/completion", json=body, timeout=300).json()["tokens_predicted"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-invariant", action="store_true", help="load without CPU weight repacking")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                        help="a llama-server binary to compare with (default: $LLAMA_SERVER)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("model %s, %d tokens per stream, %d threads, medians of %d%s", args.model.name, args.tokens,
             args.threads, args.repeat, ", batch_invariant" if args.batch_invariant else "")

    def open_model(n_parallel: int) -> BatchedModel:
        return BatchedModel(args.model, n_ctx_per_slot=N_CTX, n_parallel=n_parallel, n_threads=args.threads,
                            batch_invariant=args.batch_invariant)

    rows: dict[str, float] = {}
    high_level_rate(args.model, 8, args.threads)  # page the model in
    rows["high-level Llama, 1 stream"] = median_of(args.repeat, lambda: high_level_rate(args.model, args.tokens,
                                                                                        args.threads))
    with open_model(1) as bm:
        batched_rate(bm, 1, 8)
        rows["batched 1 slot, 1 stream"] = median_of(args.repeat, lambda: batched_rate(bm, 1, args.tokens))
    for slots in (1, 4, 8):
        with open_model(slots) as bm:
            batched_rate(bm, slots, 8)
            rows[f"batched {slots} slots, {args.streams} streams"] = median_of(
                args.repeat, lambda: batched_rate(bm, args.streams, args.tokens))
    if args.llama_server:
        one, many = llama_server_rates(args.llama_server, args.model, args)
        rows["llama-server -np 8, 1 stream"], rows[f"llama-server -np 8, {args.streams} streams"] = one, many
    for name, rate in rows.items():
        log.info("  %-34s %7.1f tok/s", name, rate)
    single = rows["batched 1 slot, 1 stream"]
    many = rows[f"batched 8 slots, {args.streams} streams"]
    log.info("ratio: %d streams on 8 slots / 1 stream: %.2fx (vs the high-level path's one stream: %.2fx)",
             args.streams, many / single, many / rows["high-level Llama, 1 stream"])
    if args.llama_server:
        log.info("ratio: batched 8 slots / llama-server -np 8, %d streams: %.2fx", args.streams,
                 many / rows[f"llama-server -np 8, {args.streams} streams"])
    with open_model(8) as bm:
        first_piece_seconds(bm, "Hello")
        idle = median_of(args.repeat, lambda: first_piece_seconds(bm, "Hello"))
        joining = median_of(args.repeat, lambda: ttft_joining(bm, 7))
    log.info("ttft: idle %.3f s, joining 7 busy streams %.3f s: %.2fx", idle, joining, joining / idle)


if __name__ == "__main__":
    main()
