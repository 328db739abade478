"""What resident models cost: the worker's estimate against what each load measured, and RSS
over load/unload cycles of the real models.

    python benchmarks/memory_bench.py [--repeat 3] [--cycles 100] [--n-ctx 2048]

Starts a real worker, caches the two real models (models/) and generated tiny ones (0.5, 8 and
32 MB), loads and unloads each --repeat times, and prints per model the estimate's parts, the
measured RSS change (median, range) and their difference. Then alternates loading and
unloading the two real models --cycles times (0 to skip) and prints the worker's RSS before,
after the first two cycles and at the end, and the time taken.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference_worker.testing.tiny_gguf import write_tiny_gguf  # noqa: E402
from model_swap.testing import ServiceProcess  # noqa: E402

log = logging.getLogger("memory_bench")
REAL = Path(__file__).resolve().parents[1] / "models"
REAL_MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]


def _call(method: str, url: str, **kwargs) -> dict:
    r = requests.request(method, url, timeout=120, **kwargs)
    r.raise_for_status()
    return r.json()


def _rss(worker: ServiceProcess) -> float:
    text = requests.get(worker.url + "/metrics", timeout=10).text
    return float(re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M).group(1))


def _estimates(worker: ServiceProcess, paths: list[Path], repeat: int) -> None:
    samples: dict[str, list[int]] = {p.name: [] for p in paths}
    entries: dict[str, dict] = {}
    for _ in range(repeat):
        for path in paths:
            _call("POST", worker.url + "/load_model_from_local_store", headers={"X-Model-Name": path.name})
            entry = next(e for e in _call("GET", worker.url + "/models")["loaded"] if e["name"] == path.name)
            samples[path.name].append(entry["memory_bytes"])
            entries[path.name] = entry
            _call("POST", worker.url + "/unload", json={"model": path.name})
    log.info("| model | weights | KV cache | context | estimate | measured (median, range) | estimate vs measured |")
    log.info("| --- | --- | --- | --- | --- | --- | --- |")
    for name, values in samples.items():
        e, need = entries[name], statistics.median(values)
        log.info("| %s | %.1f MB | %.1f MB | %.1f MB | %.1f MB | %.1f MB (%.1f-%.1f) | %+.1f%% |", name,
                 e["estimate"]["weights_bytes"] / 1e6, e["estimate"]["kv_cache_bytes"] / 1e6,
                 e["estimate"]["context_bytes"] / 1e6, e["estimated_bytes"] / 1e6, need / 1e6, min(values) / 1e6,
                 max(values) / 1e6, (e["estimated_bytes"] - need) / need * 100)


def _cycles(worker: ServiceProcess, names: list[str], cycles: int) -> None:
    start = _rss(worker)
    warm = start
    started = time.perf_counter()
    for i in range(cycles):
        name = names[i % len(names)]
        _call("POST", worker.url + "/load_model_from_local_store", headers={"X-Model-Name": name})
        _call("POST", worker.url + "/unload", json={"model": name})
        if i == 1:
            warm = _rss(worker)
    end = _rss(worker)
    log.info("%d load/unload cycles (alternating %s) in %.1f s: RSS %.1f MB at start, %.1f MB after two, "
             "%.1f MB at the end (%+.1f MB)", cycles, " and ".join(names), time.perf_counter() - started,
             start / 1e6, warm / 1e6, end / 1e6, (end - start) / 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="loads per model for the estimate table")
    parser.add_argument("--cycles", type=int, default=100, help="load/unload cycles of the real models (0: skip)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="the worker's N_CTX")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    missing = [n for n in REAL_MODELS if not (REAL / n).is_file()]
    if missing:
        log.error("missing %s in %s (run ./scripts/serve.sh or fetch_models first)", ", ".join(missing), REAL)
        return 2
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = [REAL / n for n in REAL_MODELS] + [
            write_tiny_gguf(tmp / f"tiny-{mb or 0.5}mb.gguf", seed=i, size_mb=mb) for i, mb in enumerate([None, 8, 32])]
        worker = ServiceProcess("inference_worker", ["--cache-dir", str(tmp / "cache"), "--n-ctx", str(args.n_ctx)],
                                tmp / "worker.log").start()
        try:
            for path in paths:
                with open(path, "rb") as f:
                    _call("POST", worker.url + "/cache_model", data=f, headers={"X-Model-Name": path.name})
            _estimates(worker, paths, args.repeat)
            if args.cycles:
                _cycles(worker, REAL_MODELS, args.cycles)
        finally:
            worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
