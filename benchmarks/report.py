"""bench.md: the machine, the command, and every workload as ratios to the best peer and the floor."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import slots
from benchmarks.client import median, percentile

SELF = "model-swap"
MIB = 1 << 20


@dataclass(frozen=True)
class Metric:
    """One number per system, how to read it, and its floor."""

    key: str
    workload: str
    label: str
    unit: str  # "s", "tok/s" or "MiB"
    floor: str  # what the floor is
    lower_is_better: bool = True


def metrics(models: list[str]) -> list[Metric]:
    """The summary's rows, in the issue's order (workloads 1-7)."""
    a, b = models[0], models[1]
    swap = "in-process: close, Llama() load, first token"
    cold = "raw socket transfer + in-process swap"
    tps = "in-process, one stream"
    return [
        Metric("warm_a", "1 warm swap", f"TTFT {a}, median", "s", swap),
        Metric("warm_a_p90", "1 warm swap", f"TTFT {a}, p90", "s", swap),
        Metric("warm_b", "1 warm swap", f"TTFT {b}, median", "s", swap),
        Metric("warm_b_p90", "1 warm swap", f"TTFT {b}, p90", "s", swap),
        Metric("cold_a", "2 cold swap", f"TTFT {a}, median", "s", cold),
        Metric("cold_b", "2 cold swap", f"TTFT {b}, median", "s", cold),
        Metric("no_swap", "3 no swap", f"TTFT {a}, median", "s", "in-process first token, model loaded"),
        Metric("tps_1", "4 throughput", "1 stream × 64 tokens, tok/s", "tok/s", tps, lower_is_better=False),
        Metric("tps_8", "4 throughput", "8 streams × 64 tokens, tok/s", "tok/s", tps, lower_is_better=False),
        Metric("mixed_p50", "5 mixed load", "latency p50", "s", ""),
        Metric("mixed_p95", "5 mixed load", "latency p95", "s", ""),
        Metric("mixed_max", "5 mixed load", "latency max", "s", ""),
        Metric("rss_after", "6 memory", "RSS after the swaps", "MiB", "a process holding the larger model"),
        Metric("transfer", "7 transfer", "prefetch of the larger model, median", "s",
               "raw socket: sendfile → recv → file, fsync"),
    ]


def _values(result: dict, models: list[str]) -> dict[str, float]:
    """A system's summary numbers (NaN where it has none)."""
    v: dict[str, float] = {}
    a, b = models[0], models[1]
    if warm := result.get("warm_swap"):
        ttft = warm["ttft_s"]
        v.update(warm_a=median(ttft[a]), warm_a_p90=percentile(ttft[a], 90), warm_b=median(ttft[b]),
                 warm_b_p90=percentile(ttft[b], 90))
    if cold := result.get("cold_swap"):
        v.update(cold_a=median(cold["ttft_s"][a]), cold_b=median(cold["ttft_s"][b]))
    if no_swap := result.get("no_swap"):
        v["no_swap"] = median(no_swap["ttft_s"])
    for key, run in result.items():
        if key.startswith("throughput_"):
            v[f"tps_{run['streams']}"] = median(run["tokens_per_s"])
    if mixed := result.get("mixed"):
        v.update(mixed_p50=mixed["p50_s"], mixed_p95=mixed["p95_s"], mixed_max=mixed["max_s"])
    if memory := result.get("memory"):
        v["rss_after"] = memory["after_bytes"] / MIB
    if moved := result.get("transfer"):
        v["transfer"] = median(moved["prefetch_s"])
    return v


def _floor_values(results: dict, models: list[str]) -> dict[str, float]:
    f = results["floors"]
    a, b = models[0], models[1]
    swap, raw = f.get("swap_ttft_s", {}), f.get("raw_transfer_s", {})
    v = {"warm_a": median(swap.get(a, [])), "warm_a_p90": percentile(swap.get(a, []), 90),
         "warm_b": median(swap.get(b, [])), "warm_b_p90": percentile(swap.get(b, []), 90),
         "cold_a": median(raw.get(a, [])) + median(swap.get(a, [])),
         "cold_b": median(raw.get(b, [])) + median(swap.get(b, [])), "no_swap": median(f.get("ttft_s", [])),
         "tps_1": median(f.get("tokens_per_s", [])), "tps_8": median(f.get("tokens_per_s", [])),
         "rss_after": f.get("rss_one_model_bytes", math.nan) / MIB}
    moved = (results["systems"].get(SELF) or {}).get("transfer")
    if moved:  # the floor measured interleaved with the prefetches, not the one at the start
        v["transfer"] = median(moved["floor_s"])
    return v


def ran(result: dict) -> bool:
    """Whether a system started and has results (all of them, or some: status says which failed)."""
    return result.get("status", "").startswith(("ok", "partly failed"))


def _fmt(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "tok/s":
        return f"{value:.1f}"
    return f"{value:.0f} MiB"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or math.isnan(value) or math.isnan(base) or base == 0:
        return "n/a"
    return f"{value / base:.2f}×"


def summary_rows(results: dict) -> list[list[str]]:
    """One row per metric: model-swap, the best peer, the ratio, the floor, the ratio."""
    models = [m["name"] for m in results["models"]]
    systems = results["systems"]
    own = _values(systems.get(SELF, {}), models)
    peers = {k: _values(r, models) for k, r in systems.items() if k != SELF and ran(r)}
    floor = _floor_values(results, models)
    rows = []
    for m in metrics(models):
        has_floor = not math.isnan(floor.get(m.key, math.nan))
        candidates = [(v[m.key], systems[k]["label"]) for k, v in peers.items()
                      if not math.isnan(v.get(m.key, math.nan))]
        best = (min if m.lower_is_better else max)(candidates, default=None)
        rows.append([m.workload, f"{m.label} ({'lower' if m.lower_is_better else 'higher'} is better)",
                     _fmt(own.get(m.key), m.unit),
                     f"{_fmt(best[0], m.unit)} ({best[1]})" if best else "n/a",
                     _ratio(own.get(m.key), best[0] if best else None),
                     f"{_fmt(floor[m.key], m.unit)} ({m.floor})" if has_floor else "n/a",
                     _ratio(own.get(m.key), floor.get(m.key))])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def systems_rows(results: dict) -> list[list[str]]:
    """Every system (and the floor) side by side, or why it did not run."""
    models = [m["name"] for m in results["models"]]
    rows = []
    nan = math.nan
    for key, r in results["systems"].items():
        if not ran(r):
            rows.append([r["label"], r.get("status", "?")] + [""] * 7)
            continue
        v = _values(r, models)
        mix = r.get("mixed")
        memory = r.get("memory")
        notes = "; ".join(x for x in (r.get("notes"), "" if r["status"] == "ok" else r["status"]) if x)
        rows.append([r["label"] + (f" ({notes})" if notes else ""),
                     f"{_fmt(v.get('warm_a', nan), 's')} / {_fmt(v.get('warm_a_p90', nan), 's')}",
                     f"{_fmt(v.get('warm_b', nan), 's')} / {_fmt(v.get('warm_b_p90', nan), 's')}",
                     f"{_fmt(v.get('cold_a', nan), 's')} / {_fmt(v.get('cold_b', nan), 's')}",
                     _fmt(v.get("no_swap", nan), "s"),
                     f"{_fmt(v.get('tps_1', nan), 'tok/s')} / {_fmt(v.get('tps_8', nan), 'tok/s')}",
                     f"{mix['ok']} ok, {sum(mix['errors'].values())} errors "
                     f"{mix['errors'] or ''}; {_fmt(mix['p50_s'], 's')} / {_fmt(mix['p95_s'], 's')} / "
                     f"{_fmt(mix['max_s'], 's')}" if mix else "n/a",
                     f"{memory['before_bytes'] / MIB:.0f} → {memory['after_bytes'] / MIB:.0f} MiB"
                     if memory else "n/a",
                     r.get("version", "")])
    f = _floor_values(results, models)
    rows.append(["floor (in-process, same run)", f"{_fmt(f['warm_a'], 's')} / {_fmt(f['warm_a_p90'], 's')}",
                 f"{_fmt(f['warm_b'], 's')} / {_fmt(f['warm_b_p90'], 's')}",
                 f"{_fmt(f['cold_a'], 's')} / {_fmt(f['cold_b'], 's')}", _fmt(f["no_swap"], "s"),
                 f"{_fmt(f['tps_1'], 'tok/s')} (1 stream)", "", f"{f['rss_after']:.0f} MiB (one model)",
                 _threads(results)])
    return rows


def _threads(results: dict) -> str:
    n = results["floors"]["threads"]
    return f"{n} llama.cpp thread{'' if n == 1 else 's'}"


def _mixed_section(results: dict) -> str:
    r = (results["systems"].get(SELF) or {}).get("mixed")
    if not r or "transfers" not in r:
        return ""
    return (f"model-swap served {r['requests']} requests from {r['clients']} clients in {r['wall_s']:.0f} s "
            f"(weights {r['weights']} over three models, cache of 2). Errors by code: {r['errors'] or 'none'}. "
            f"On the order in which it served them it made **{r['transfers']} transfers**; LRU on that order needs "
            f"{r['lru_transfers']}, Belady's minimum is {r['belady_transfers']} "
            f"({_ratio(r['transfers'], r['belady_transfers'])} the minimum). It made **{r['loads']} loads**; "
            f"one model in memory needs at least {r['fewest_loads']} for that order "
            f"({_ratio(r['loads'], r['fewest_loads'])}). Actions: {r['actions']}, told for "
            f"{r.get('told', '?')} of the {r['ok']} requests served.\n")


def _transfer_section(results: dict) -> str:
    t = (results["systems"].get(SELF) or {}).get("transfer")
    if not t:
        return ""
    floor, pre = median(t["floor_s"]), median(t["prefetch_s"])
    samples = ", ".join(f"{x:.3f}" for x in t["prefetch_s"])
    floors = ", ".join(f"{x:.3f}" for x in t["floor_s"])
    return (f"`POST /admin/prefetch` of {t['model']} ({t['bytes'] / 1e6:.0f} MB) not on the worker, to its "
            f"answer: median **{pre:.3f} s** ({t['bytes'] / pre / 1e9:.2f} GB/s) against the raw-socket floor's "
            f"**{floor:.3f} s** ({t['bytes'] / floor / 1e9:.2f} GB/s): **{pre / floor:.2f}×** the floor. "
            f"Interleaved, {len(t['floor_s'])} of each. Prefetch samples: {samples} s; floor samples: "
            f"{floors} s.\n")


def markdown(results: dict) -> str:
    meta = results["meta"]
    models = ", ".join(f"{m['name']} ({m['bytes'] / 1e6:.0f} MB)" for m in results["models"])
    plan = results["plan"]
    parts = [
        "# model-swap benchmark\n",
        f"- Date: {meta['date']}; took {meta.get('seconds', 0):.0f} s\n- Machine: {meta['machine']}\n"
        f"- Versions: " + "; ".join(dict.fromkeys(
            [meta["versions"]] + [r["version"] for r in results["systems"].values()
                                  if r.get("version") and r["version"] not in meta["versions"]])) + "\n"
        f"- Command: `{meta['command']}`\n- Models: {models}\n"
        f"- Plan: {plan['reps']} repetitions per timed request, {plan['mixed_clients']} clients for "
        f"{plan['mixed_seconds']:.0f} s of mixed load, {plan['memory_swaps']} swaps for memory, "
        f"{plan['transfer_reps']} transfers; every system and floor with {_threads(results)}. TTFT: from "
        "sending `/v1/completions` (stream, temperature 0) to the first token event.\n",
        "\n## model-swap against the best peer and the floor\n\n",
        "Ratios are model-swap ÷ the other: above 1× means model-swap took longer (times, memory) or, for "
        "tokens/s, that it was faster. Everything was measured in this run on this machine.\n\n",
        _table(["workload", "metric", "model-swap", "best peer", "÷ best peer", "floor", "÷ floor"],
               summary_rows(results)),
        "\n\n## Every system\n\n",
        _table(["system", f"warm swap TTFT {results['models'][0]['name']} median / p90",
                f"warm swap TTFT {results['models'][1]['name']} median / p90", "cold swap TTFT (median)",
                "no-swap TTFT", "tok/s 1 / 8 streams", "mixed load: requests; p50 / p95 / max latency",
                f"RSS before → after {plan['memory_swaps']} swaps", "version"], systems_rows(results)),
        "\n\nPeers have no cold swap: their files are already on their own disk, so nothing is transferred.\n",
        "\n## Mixed load\n\n", _mixed_section(results) or "model-swap did not run.\n",
        "\n## Transfer (workload 7)\n\n", _transfer_section(results) or "model-swap did not run.\n",
        "\n## Parallel slots (workload 8)\n\n", slots.section((results["systems"].get(SELF) or {}).get("slots")),
    ]
    return "".join(parts)


def machine(args, command: str, started: float) -> dict:
    """What ran where: CPU, memory, kernel, versions, load."""
    cpu = "unknown CPU"
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1)
        mem = int(re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.MULTILINE).group(1))
        memory = f"{mem / (1 << 20):.0f} GiB"
    except (OSError, AttributeError):
        memory = "unknown memory"
    versions = [f"Python {platform.python_version()}"]
    for package in ("llama-cpp-python", "gunicorn", "flask"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(started)),
            "machine": f"{cpu}, {os.cpu_count()} cores, {memory}, Linux {platform.release()}, load average at "
                       f"start {load}",
            "versions": ", ".join(versions), "command": command, "quick": args.quick}


def chart(results: dict, path: Path) -> None:
    from benchmarks.chart import draw

    draw(results, path)
