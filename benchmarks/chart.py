"""bench.png: one panel per workload, every system side by side, the floor as a dashed line."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.client import median
from benchmarks.report import MIB, SELF, ran

COLORS = {"model-swap": "#1f77b4", "llama_cpp.server": "#ff7f0e", "llama-server-1": "#2ca02c",
          "llama-server-2": "#98df8a"}
FLOOR_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1}


def _label(value: float, unit: str) -> str:
    if unit != "s":
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _bars(ax, groups: list[str], series: dict[str, list[float]], floors: list[float] | None, unit: str) -> None:
    """Grouped bars: one group per x label, one bar per system; the floor of each group dashed."""
    n = max(1, len(series))
    width = 0.8 / n
    for i, (key, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        heights = [0 if math.isnan(v) else v for v in values]
        bars = ax.bar(xs, heights, width, label=key, color=COLORS.get(key, None))
        for bar, v in zip(bars, values):
            x = bar.get_x() + bar.get_width() / 2
            if math.isnan(v):
                ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=6, color="gray")
            else:
                ax.annotate(_label(v, unit), (x, v), ha="center", va="bottom", fontsize=6)
    for g, floor in enumerate(floors or []):
        if floor is not None and not math.isnan(floor):
            ax.hlines(floor, g - 0.45, g + 0.45, **FLOOR_STYLE, label="floor" if g == 0 else None)
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    ax.set_ylabel(unit)
    ax.tick_params(axis="y", labelsize=7)


def _get(result: dict, *keys, default=math.nan):
    """result[k1][k2]..., or NaN where a workload did not run."""
    for key in keys:
        if not isinstance(result, dict) or key not in result:
            return default
        result = result[key]
    return result


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = {k: r for k, r in results["systems"].items() if ran(r)}
    models = [m["name"] for m in results["models"]]
    short = [m.split(".")[0].split("-q4")[0][:24] for m in models]
    floors = results["floors"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    (warm, noswap, tput), (mixed, mem, moved) = axes

    _bars(warm, [f"swap to\n{short[0]}", f"swap to\n{short[1]}"],
          {k: [median(_get(r, "warm_swap", "ttft_s", m, default=[])) for m in models[:2]] for k, r in systems.items()},
          [median(_get(floors, "swap_ttft_s", m, default=[])) for m in models[:2]], "s")
    warm.set_title("1. Warm swap: TTFT, median (lower is better)", fontsize=9)

    _bars(noswap, ["no swap"], {k: [median(_get(r, "no_swap", "ttft_s", default=[]))] for k, r in systems.items()},
          [median(floors.get("ttft_s", []))], "s")
    noswap.set_title("3. No swap: TTFT, median (lower is better)", fontsize=9)

    _bars(tput, ["1 stream", "8 streams"],
          {k: [median(_get(r, f"throughput_{n}", "tokens_per_s", default=[])) for n in (1, 8)]
           for k, r in systems.items()},
          [median(floors.get("tokens_per_s", []))] * 2, "tok/s")
    tput.set_title("4. Throughput, 64 tokens each (higher is better)", fontsize=9)

    _bars(mixed, ["p50", "p95", "max"],
          {k: [_get(r, "mixed", q) for q in ("p50_s", "p95_s", "max_s")] for k, r in systems.items()}, None, "s")
    mixed.set_title("5. Mixed load: latency of whole requests (lower is better)", fontsize=9)

    _bars(mem, ["before", "after swaps"],
          {k: [_get(r, "memory", q) / MIB for q in ("before_bytes", "after_bytes")] for k, r in systems.items()},
          [None, floors.get("rss_one_model_bytes", math.nan) / MIB], "MiB")
    mem.set_title("6. Memory: RSS (lower is better)", fontsize=9)

    own = systems.get(SELF, {})
    if own:
        cold = [median(_get(own, "cold_swap", "ttft_s", m, default=[])) for m in models[:2]]
        cold_floor = [median(_get(floors, "raw_transfer_s", m, default=[]))
                      + median(_get(floors, "swap_ttft_s", m, default=[])) for m in models[:2]]
        _bars(moved, ["transfer\n(prefetch)", f"cold swap\n{short[0]}", f"cold swap\n{short[1]}"],
              {SELF: [median(_get(own, "transfer", "prefetch_s", default=[]))] + cold},
              [median(_get(own, "transfer", "floor_s", default=[]))] + cold_floor, "s")
    moved.set_title("7 and 2. Transfer and cold swap vs their floors (lower is better)", fontsize=9)

    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    missing = [f"{r['label']}: {r['status']}" for r in results["systems"].values() if not ran(r)]
    fig.legend(handles.values(), [results["systems"].get(k, {}).get("label", k) for k in handles],
               loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=len(handles), fontsize=8, frameon=False)
    title = f"model-swap vs peers, {results['meta']['date']}, {results['meta']['machine'].split(', load')[0]}"
    fig.suptitle(title, fontsize=10, y=0.995)
    if missing:
        fig.text(0.01, 0.005, "Not run: " + "; ".join(missing), fontsize=7, color="darkred")
    fig.tight_layout(rect=(0, 0.02, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
