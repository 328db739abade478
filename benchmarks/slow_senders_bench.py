"""/health latency of both services with stalled senders open, against the same services idle (same run).

    python benchmarks/slow_senders_bench.py [--factor 4] [--samples 20]

Starts a worker and a store on free ports, measures the median /health latency of each, then
opens factor x their thread count of connections that send headers and one byte of a
1000-byte body and go silent, and measures again. A service that cannot answer within 3 s
counts as inf. Prints both medians and their ratio.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model_swap.testing import ServiceProcess  # noqa: E402

THREADS = {"store": 32, "worker": 16}  # the services' defaults


def median_ms(url: str, samples: int) -> float:
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        try:
            requests.get(url + "/health", timeout=3)
            times.append(time.perf_counter() - started)
        except requests.RequestException:
            times.append(float("inf"))
    return statistics.median(times) * 1000


def stall(port: int, count: int, path: str) -> list[socket.socket]:
    conns = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode())
        conns.append(conn)
    return conns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "models").mkdir()
        worker = ServiceProcess("inference_worker", ["--cache-dir", str(tmp_path / "cache")], tmp_path / "w.log")
        store = ServiceProcess("model_store_server", ["--models-dir", str(tmp_path / "models"), "--worker-url",
                                                      f"http://127.0.0.1:{worker.port}"], tmp_path / "s.log")
        worker.start()
        store.start()
        held: list[socket.socket] = []
        try:
            idle = {"store": median_ms(store.url, args.samples), "worker": median_ms(worker.url, args.samples)}
            held += stall(store.port, args.factor * THREADS["store"], "/user_request")
            held += stall(worker.port, args.factor * THREADS["worker"], "/infer")
            time.sleep(0.5)
            loaded = {"store": median_ms(store.url, args.samples), "worker": median_ms(worker.url, args.samples)}
        finally:
            for conn in held:
                conn.close()
            store.stop()
            worker.stop()
    for name in ("store", "worker"):
        stalled = args.factor * THREADS[name]
        print(f"{name:6} /health median: idle {idle[name]:.1f} ms, with {stalled} stalled senders "
              f"{loaded[name]:.1f} ms ({loaded[name] / idle[name]:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
