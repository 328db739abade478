"""Moving a model's bytes: the raw-socket floor, and model-swap's prefetch as users feel it."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import requests

from model_swap.digest import BLOCK_SIZE

SETTLE_S = 0.2  # let the previous run's file deletion and write-back finish before timing the next


def raw_floor_s(path: Path, out_dir: Path) -> float:
    """Raw TCP (sendfile) into a file, 1 MiB reads, fsync: seconds from connect to durable file.

    No HTTP, no hashing, no checks: the least a transfer of this file can cost on this machine.
    """
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    target = out_dir / ".floor.bin"

    def receive() -> None:
        conn, _ = server.accept()
        with conn, open(target, "wb", buffering=0) as f:
            while block := conn.recv(BLOCK_SIZE):
                f.write(block)
            os.fsync(f.fileno())
            conn.sendall(b"k")

    thread = threading.Thread(target=receive)
    thread.start()
    try:
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s, open(path, "rb") as f:
            s.sendfile(f)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)
        return time.perf_counter() - started
    finally:
        thread.join()
        server.close()
        target.unlink(missing_ok=True)


def prefetch_s(store_url: str, name: str) -> float:
    """POST /admin/prefetch of a model the worker does not hold, to its answer."""
    started = time.perf_counter()
    response = requests.post(store_url + "/admin/prefetch", json={"model": name}, timeout=300)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    action = response.json()["action"]
    if action != "cached":
        raise RuntimeError(f"prefetch of {name} did not transfer it (action {action}): make the worker cold first")
    return elapsed


def measure(store_url: str, make_cold, path: Path, out_dir: Path, reps: int, tick=lambda: None) -> dict:
    """Floor and prefetch, interleaved so that drift in the machine's load hits both alike."""
    floor, prefetch = [], []
    for _ in range(reps):
        time.sleep(SETTLE_S)
        floor.append(raw_floor_s(path, out_dir))
        make_cold()
        time.sleep(SETTLE_S)
        prefetch.append(prefetch_s(store_url, path.name))
        tick()
    return {"model": path.name, "bytes": path.stat().st_size, "floor_s": floor, "prefetch_s": prefetch}
