"""Floors: what the same work costs in-process, with no server and no transfer (a child program).

Run in a child process (`python -m benchmarks.floors ...`) so that its resident memory is a
clean baseline and llama.cpp's threads do not share a process with the benchmark's clients.
Threads are always passed explicitly: llama-cpp-python's default is half the cores.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from benchmarks.client import PROMPT


def _rss_bytes() -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


def _open(path: Path, threads: int, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)


def _first_token_s(llm, prompt: str, started: float) -> float:
    stream = llm.create_completion(prompt, max_tokens=8, temperature=0.0, stream=True)
    try:
        next(iter(stream))
        return time.perf_counter() - started
    finally:
        stream.close()


def measure(models: list[Path], threads: int, reps: int, tokens: int, n_ctx: int) -> dict:
    """Every in-process floor the workloads compare with."""
    out: dict = {"threads": threads}
    largest = max(models, key=lambda p: p.stat().st_size)
    llm = _open(largest, threads, n_ctx)  # first, in a fresh process: the memory floor
    _first_token_s(llm, PROMPT, time.perf_counter())
    out["rss_one_model_bytes"] = _rss_bytes()
    llm.close()

    # A swap in-process: close the previous model, open the next, first token.
    swap: dict[str, list[float]] = {m.name: [] for m in models}
    llm = None
    for i in range(reps):
        for path in models:
            if llm is not None:
                llm.close()
            started = time.perf_counter()
            llm = _open(path, threads, n_ctx)
            swap[path.name].append(_first_token_s(llm, f"[{i}] {PROMPT}", started))
    llm.close()
    out["swap_ttft_s"] = swap

    llm = _open(models[0], threads, n_ctx)
    _first_token_s(llm, PROMPT, time.perf_counter())  # warm-up, as the systems get one
    out["ttft_s"] = [_first_token_s(llm, f"[{i}] {PROMPT}", time.perf_counter()) for i in range(reps)]
    rates = []
    for i in range(max(1, reps // 2)):
        started, count = time.perf_counter(), 0
        for chunk in llm.create_completion(f"({i}) {PROMPT}", max_tokens=tokens, temperature=0.0, stream=True):
            count += chunk["choices"][0]["finish_reason"] is None  # as the clients count: token events only
        rates.append(count / (time.perf_counter() - started))
    out["tokens_per_s"] = rates
    llm.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=2048)
    args = parser.parse_args(argv)
    json.dump(measure(args.models, args.threads, args.reps, args.tokens, args.n_ctx), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
