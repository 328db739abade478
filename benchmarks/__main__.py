"""python -m benchmarks [--quick]: model-swap against its peers and floors, in one run.

Starts each system on free loopback ports, runs the same workloads against each, stops it,
and writes RESULTS/bench.md (machine, date, versions, the exact command, the tables),
RESULTS/bench.png and RESULTS/bench.json (every sample). See README, "Benchmarks".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
except ImportError:  # the suite's own dependencies are an extra: say which
    sys.exit("python -m benchmarks needs the bench extra: pip install -e '.[bench]'")

from benchmarks import mixed, report, slots, transfer, workloads
from benchmarks.systems import System, all_systems

log = logging.getLogger("benchmarks")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf", REPO / "models" / "gemma-3-270m-q4_k_m.gguf"]


WORKLOADS = ("warm_swap", "no_swap", "throughput", "cold_swap", "transfer", "memory", "mixed", "slots")
NEEDS_FLOORS = {"warm_swap", "no_swap", "throughput", "cold_swap", "memory"}


@dataclass(frozen=True)
class Plan:
    """How much of each workload to run."""

    reps: int
    streams: tuple[int, ...]
    stream_tokens: int
    throughput_reps: int
    mixed_clients: int
    mixed_seconds: float
    mixed_tokens: int
    memory_swaps: int
    transfer_reps: int
    workloads: tuple[str, ...]

    @classmethod
    def of(cls, args: argparse.Namespace) -> "Plan":
        quick = args.quick
        return cls(
            reps=args.reps or (3 if quick else 5),
            streams=(1, 8),
            stream_tokens=64,
            throughput_reps=args.throughput_reps or (1 if quick else 2),
            mixed_clients=args.mixed_clients or 32,
            mixed_seconds=args.mixed_seconds or (10.0 if quick else 60.0),
            mixed_tokens=8,
            memory_swaps=args.memory_swaps or (10 if quick else 100),
            transfer_reps=args.transfer_reps or (3 if quick else 9),
            workloads=tuple(args.workloads),
        )

    def steps(self, system: System) -> int:
        """Progress-bar units one system takes."""
        per = {"warm_swap": 2 * self.reps, "no_swap": self.reps, "throughput": self.throughput_reps * len(self.streams),
               "memory": self.memory_swaps, "mixed": 1}
        if system.can_cold_swap:
            per.update(cold_swap=2 * self.reps, transfer=self.transfer_reps)
        if system.key == report.SELF:
            per["slots"] = slots.steps(self.throughput_reps)
        return sum(per.get(w, 0) for w in self.workloads)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and a 10 s mixed load (minutes)")
    p.add_argument("--models", nargs="+", type=Path, default=DEFAULT_MODELS,
                   help="two models to alternate (and an optional third for the mixed load; default: a copy "
                        "of the first under another name); default: the two real models in models/")
    p.add_argument("--systems", nargs="+", choices=[s.key for s in all_systems()],
                   help="run only these (default: all)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where bench.md/png/json go")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                   help="run only these (default: all)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="llama.cpp threads for every system and floor (default: all cores)")
    p.add_argument("--reps", type=int, help="repetitions of each timed request (quick 3, full 5)")
    p.add_argument("--throughput-reps", type=int)
    p.add_argument("--mixed-clients", type=int)
    p.add_argument("--mixed-seconds", type=float)
    p.add_argument("--memory-swaps", type=int)
    p.add_argument("--transfer-reps", type=int)
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def _stage_models(models: list[Path], into: Path) -> list[Path]:
    """Hard links (copies across filesystems) of the models under one directory; a third if missing."""
    into.mkdir(parents=True)
    staged = []
    for source in models:
        target = into / source.name
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        staged.append(target)
    if len(staged) == 2:
        third = into / f"{models[0].stem}-copy.gguf"
        os.link(staged[0], third)
        staged.append(third)
    return staged


def run_system(system: System, models: list[Path], workdir: Path, plan: Plan, threads: int, bar: tqdm) -> dict:
    """Every workload against one system; its results, or why it did not run."""
    result: dict = {"label": system.label}
    reason = system.unavailable()
    result["version"] = system.version
    if reason:
        result["status"] = f"not run: {reason}"
        log.warning("%s: %s", system.label, result["status"])
        bar.update(plan.steps(system))
        return result
    tick = lambda: bar.update(1)  # noqa: E731
    ids = [system.model_id(m) for m in models]
    largest = max(models[:2], key=lambda p: p.stat().st_size)
    steps = [
        ("warm_swap", lambda: workloads.warm_swap(system, models[:2], plan.reps, tick)),
        ("no_swap", lambda: workloads.no_swap(system, ids[0], plan.reps, tick)),
        *((f"throughput_{n}", lambda n=n: workloads.throughput(system, ids[0], n, plan.stream_tokens,
                                                               plan.throughput_reps, tick)) for n in plan.streams),
        *((("cold_swap", lambda: workloads.cold_swap(system, models[:2], plan.reps, tick)),
           ("transfer", lambda: transfer.measure(system.url, system.make_cold, largest, workdir, plan.transfer_reps,
                                                 tick))) if system.can_cold_swap else ()),
        ("memory", lambda: workloads.memory(system, ids[:2], plan.memory_swaps, tick)),
        ("mixed", lambda: _mixed(system, ids, plan, tick)),
        *((("slots", lambda: slots.measure(models, workdir, threads, plan.stream_tokens, plan.throughput_reps, tick)),)
          if system.key == report.SELF else ()),
    ]
    steps = [(name, step) for name, step in steps
             if name in plan.workloads or (name.startswith("throughput_") and "throughput" in plan.workloads)]
    started = time.perf_counter()
    failures = []
    try:
        bar.set_postfix_str(f"{system.key}: starting")
        (workdir / system.key).mkdir()
        system.start(models, workdir / system.key, threads)
        for name, step in steps:
            bar.set_postfix_str(f"{system.key}: {name}")
            try:
                result[name] = step()
            except Exception as err:  # one workload failing must not lose the others' results
                log.exception("%s: %s failed", system.label, name)
                failures.append(f"{name}: {type(err).__name__}: {err}"[:200])
        result["status"] = "ok" if not failures else "partly failed: " + "; ".join(failures)
    except Exception as err:
        log.exception("%s failed", system.label)
        result["status"] = f"failed: {type(err).__name__}: {err}"[:300]
    finally:
        system.stop()
    result["notes"] = system.notes
    result["seconds"] = time.perf_counter() - started
    return result


def _floors_in_child(models: list[Path], threads: int, reps: int, tokens: int) -> dict:
    """benchmarks.floors in a fresh interpreter: a clean memory baseline, no threads shared with clients."""
    argv = [sys.executable, "-m", "benchmarks.floors", "--threads", str(threads), "--reps", str(reps),
            "--tokens", str(tokens), *map(str, models)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"floors failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _mixed(system: System, ids: list[str], plan: Plan, tick) -> dict:
    if system.can_cold_swap:
        system.make_cold()  # the mixed load starts from an empty cache, as its LRU and Belady figures do
    result = mixed.run(system.url, ids, plan.mixed_clients, plan.mixed_seconds, plan.mixed_tokens,
                       capacity=getattr(system, "max_cache_size", 2))
    tick()
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = Plan.of(args)
    missing = [m for m in args.models if not m.is_file()]
    if missing or not 2 <= len(args.models) <= 3:
        log.error("need two or three model files; missing: %s (fetch the real ones with "
                  "python -m model_store_server.fetch_models --dest models)", ", ".join(map(str, missing)) or "-")
        return 2
    systems = [s for s in all_systems() if not args.systems or s.key in args.systems]
    command = shlex.join(["python", "-m", "benchmarks", *(argv if argv is not None else sys.argv[1:])])
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix=".bench-", dir=REPO))  # beside the models: hard links, same disk
    results: dict = {"meta": report.machine(args, command, started), "plan": plan.__dict__, "systems": {}}
    try:
        models = _stage_models(args.models, workdir / "models")
        results["models"] = [{"name": m.name, "bytes": m.stat().st_size} for m in models]
        with logging_redirect_tqdm(), tqdm(total=1 + sum(plan.steps(s) for s in systems), unit="step",
                                           desc="benchmarks", file=sys.stderr) as bar:
            bar.set_postfix_str("floors (in-process)")
            results["floors"] = {"threads": args.threads}
            if NEEDS_FLOORS & set(plan.workloads):
                results["floors"] = _floors_in_child(models[:2], args.threads, plan.reps, plan.stream_tokens)
                results["floors"]["raw_transfer_s"] = {
                    m.name: [transfer.raw_floor_s(m, workdir) for _ in range(plan.reps)] for m in models[:2]}
            bar.update(1)
            for system in systems:
                results["systems"][system.key] = run_system(system, models, workdir, plan, args.threads, bar)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["meta"]["seconds"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "bench.md").write_text(report.markdown(results))
    report.chart(results, args.out / "bench.png")
    log.info("wrote %s, bench.png and bench.json in %.0f s", args.out / "bench.md", results["meta"]["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
