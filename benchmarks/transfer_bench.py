"""How fast model bytes reach the worker's cache, against floors measured in the same run.

    python benchmarks/transfer_bench.py [--model models/gemma-3-270m-q4_k_m.gguf] [--repeat 5]

Compares, for one file, medians over --repeat runs:
  floor      raw TCP (socket.sendfile) into a file, 1 MiB reads, fsync: no HTTP, no hashing
  push       model-swap's HTTP push (WorkerClient.push, sendfile) into a real worker's
             /cache_model, which also hashes, checks the GGUF magic, fsyncs and renames
  naive      the same endpoint fed by `requests` with a file object (http.client's 8 KiB
             blocks): what the push would cost without sendfile
The whole store path (POST /admin/prefetch) is measured by `python -m benchmarks`.
Prints GB/s for each and its ratio to the floor. Timings vary with the machine and its load.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.transfer import raw_floor_s  # noqa: E402
from model_store_server.worker_client import WorkerClient  # noqa: E402
from model_swap.digest import sha256_file  # noqa: E402
from model_swap.testing import ServiceProcess  # noqa: E402

log = logging.getLogger("transfer_bench")


def floor_once(path: Path, out_dir: Path) -> float:
    return raw_floor_s(path, out_dir)


def push_once(client: WorkerClient, path: Path, size: int, sha: str) -> float:
    elapsed = client.push(path.name, path, size, sha)
    requests.delete(f"{client.base_url}/models/{path.name}", timeout=30).raise_for_status()
    return elapsed


def naive_once(url: str, path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb") as f:
        requests.post(url + "/cache_model", data=f, headers={"X-Model-Name": path.name},
                      timeout=300).raise_for_status()
    elapsed = time.perf_counter() - started
    requests.delete(f"{url}/models/{path.name}", timeout=30).raise_for_status()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.model.is_file():
        log.error("no such model file: %s (run ./scripts/serve.sh or fetch_models first)", args.model)
        return 2
    size, sha = args.model.stat().st_size, sha256_file(args.model)
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        tmp_dir = Path(tmp)
        worker = ServiceProcess("inference_worker", ["--cache-dir", str(tmp_dir / "cache"), "--log-level",
                                                     "WARNING"], tmp_dir / "worker.log").start()
        url = worker.url
        try:
            client = WorkerClient(url, None, 300)
            runs = {"floor": [], "push": [], "naive": []}
            for i in range(args.repeat):  # interleaved, so drift in the machine's load hits all alike
                runs["floor"].append(floor_once(args.model, tmp_dir))
                runs["push"].append(push_once(client, args.model, size, sha))
                runs["naive"].append(naive_once(url, args.model))
        finally:
            worker.stop()
    floor = statistics.median(runs["floor"])
    log.info("file: %s (%d bytes), %d runs each, medians", args.model.name, size, args.repeat)
    for name, times in runs.items():
        median = statistics.median(times)
        log.info("  %-6s %6.3f s  %5.2f GB/s  %.2fx the floor's time", name, median, size / median / 1e9,
                 median / floor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
