"""Chart one smoke-test run: per step, time to first byte then generation, coloured by cache action.

Usage: python benchmarks/plot_run.py [RUN.txt | -] [-o OUT.png] [--title TITLE]
Reads the output of a smoke_tests/*.sh script (a file, or stdin for "-" or no argument) and
writes a PNG: next to the input (same stem, .png), or benchmarks/smoke_bench.png for stdin.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("plot_run")

DEFAULT_STDIN_OUTPUT = Path(__file__).resolve().parent / "smoke_bench.png"

# The formats smoke_tests/lib.sh prints; keep them in step.
BANNER_RE = re.compile(r"^### model-swap smoke test: policy=(?P<policy>\S+)")
MODELS_RE = re.compile(r"^### models: A=(?P<A>\S+) B=(?P<B>\S+) C=(?P<C>\S+)")
HEADER_RE = re.compile(r"^=== (?P<number>\d+)\. (?P<label>.*) -> expect: (?P<expected>\S+) ===$")
ACTUAL_RE = re.compile(r"^actual: action=(?P<action>\S+) evicted=\[(?P<evicted>[^\]]*)\]"
                       r"(?: unloaded=\[(?P<unloaded>[^\]]*)\])?")
SLEEP_RE = re.compile(r"^--- sleep (?P<seconds>\d+(?:\.\d+)?)s\b")
TIMING_RE = re.compile(
    r"^\[http (?P<status>\d{3}) \| tcp_connect=(?P<connect>[\d.]+)s\s+time_to_first_byte=(?P<ttfb>[\d.]+)s"
    r"\s+generation=(?P<generation>[\d.]+)s\s+total=(?P<total>[\d.]+)s \| throughput=~(?P<throughput>\d+) bytes/s\]$"
)

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
ACTION_COLOURS = {
    "load_from_store": "#D55E00",  # vermillion: transferred over the network, then loaded
    "load_from_local_store": "#0072B2",  # blue: already on the worker's disk, loaded
    "already_loaded": "#009E73",  # bluish green: in memory
    "rejected": "#CC79A7",  # reddish purple: refused (503), nothing transferred
}
UNKNOWN_COLOUR = "#999999"
ACTION_LABELS = {
    "load_from_store": "load_from_store (transfer + load)",
    "load_from_local_store": "load_from_local_store (load from worker disk)",
    "already_loaded": "already_loaded (hit)",
    "rejected": "rejected (HTTP 503, no transfer)",
}


class NoTimingLines(ValueError):
    """The input holds no smoke-test timing lines."""


@dataclass(frozen=True)
class Step:
    """One request of a smoke test, as printed by smoke_tests/lib.sh."""

    number: int
    label: str
    expected: str
    action: str
    evicted: tuple[str, ...]
    http_status: int
    tcp_connect_s: float
    ttfb_s: float
    generation_s: float
    total_s: float
    throughput_bps: int
    unloaded: tuple[str, ...] = ()  # models unloaded from the worker's memory (older output: none)


@dataclass(frozen=True)
class SmokeRun:
    """A parsed run: its policy and models (if the banner was present), steps, and sleeps after step N."""

    policy: str | None
    steps: list[Step]
    sleeps: list[tuple[int, float]] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)  # file name -> its letter (A, B, C)


def parse_run(text: str) -> SmokeRun:
    """Parse smoke-test output; every timing line becomes a step. Raises NoTimingLines if none."""
    policy: str | None = None
    models: dict[str, str] = {}
    header: re.Match | None = None
    actual: re.Match | None = None
    steps: list[Step] = []
    sleeps: list[tuple[int, float]] = []
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if m := BANNER_RE.match(line):
            policy = policy or m["policy"]
        elif m := MODELS_RE.match(line):
            models = models or {m[letter]: letter for letter in "CBA"}
        elif m := HEADER_RE.match(line):
            header, actual = m, None
        elif m := ACTUAL_RE.match(line):
            actual = m
        elif m := SLEEP_RE.match(line):
            sleeps.append((len(steps), float(m["seconds"])))
        elif m := TIMING_RE.match(line):
            steps.append(_step(m, header, actual, len(steps) + 1))
            header, actual = None, None
    if not steps:
        raise NoTimingLines("no timing lines ('[http NNN | tcp_connect=... | throughput=~N bytes/s]') in the input")
    return SmokeRun(policy, steps, sleeps, models)


def _step(timing: re.Match, header: re.Match | None, actual: re.Match | None, fallback_number: int) -> Step:
    status = int(timing["status"])
    if actual is not None:
        action = actual["action"]
        evicted = tuple(name for name in actual["evicted"].split(",") if name)
        unloaded = tuple(name for name in (actual["unloaded"] or "").split(",") if name)
    else:  # output from an older script without the actual: line
        action, evicted, unloaded = ("rejected" if status == 503 else "unknown"), (), ()
    return Step(
        number=int(header["number"]) if header else fallback_number,
        label=header["label"] if header else f"request {fallback_number}",
        expected=header["expected"] if header else "",
        action=action,
        evicted=evicted,
        unloaded=unloaded,
        http_status=status,
        tcp_connect_s=float(timing["connect"]),
        ttfb_s=float(timing["ttfb"]),
        generation_s=float(timing["generation"]),
        total_s=float(timing["total"]),
        throughput_bps=int(timing["throughput"]),
    )


def _format_rate(bps: int) -> str:
    if bps >= 1_000_000:
        return f"~{bps / 1e6:.1f} MB/s"
    if bps >= 1000:
        return f"~{bps / 1e3:.1f} kB/s"
    return f"~{bps} B/s"


def _y_label(step: Step) -> str:
    """'N. what: model' as two lines (what, then the model), each cut to a readable length."""
    what, sep, model = step.label.rpartition(": ")
    lines = [f"{step.number}. {what}", model] if sep else [f"{step.number}. {step.label}"]
    return "\n".join(line if len(line) <= 48 else line[:45] + "..." for line in lines)


def plot_run(run: SmokeRun, out: Path, title: str) -> Path:
    """Draw the run as stacked horizontal bars and write a PNG to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    steps = run.steps
    height = 1.8 + 0.75 * len(steps)
    fig, ax = plt.subplots(figsize=(11, height), dpi=120)
    ys = list(range(len(steps)))
    colours = [ACTION_COLOURS.get(s.action, UNKNOWN_COLOUR) for s in steps]
    longest = max(s.total_s for s in steps) or 1.0
    # A refused request takes milliseconds: give every bar a sliver of width so it shows;
    # the annotation carries the exact time.
    ttfb = [max(s.ttfb_s, longest * 0.012) for s in steps]
    gen = [s.generation_s for s in steps]
    ax.barh(ys, ttfb, color=colours, edgecolor="black", linewidth=0.6, height=0.6)
    ax.barh(ys, gen, left=ttfb, color=colours, alpha=0.45, hatch="///", edgecolor="black", linewidth=0.6,
            height=0.6)
    for y, s in zip(ys, steps):
        note = f"{s.total_s:.3f}s"
        if s.http_status == 200:
            note += f"  {_format_rate(s.throughput_bps)}"
        else:  # an error envelope's byte rate means nothing
            note += f"  HTTP {s.http_status}"
        if s.evicted:
            note += "  evicted: " + ", ".join(run.models.get(name, name) for name in s.evicted)
        if s.unloaded:
            note += "  unloaded: " + ", ".join(run.models.get(name, name) for name in s.unloaded)
        ax.text(max(s.total_s, ttfb[y]) + longest * 0.01, y, note, va="center", fontsize=8.5)
    for after, seconds in run.sleeps:  # a sleep between steps: a dashed rule where it happened
        if 0 < after < len(steps):
            ax.axhline(after - 0.5, color="black", linestyle="--", linewidth=0.8)
            ax.text(longest * 1.45, after - 0.5, f"sleep {seconds:g}s", va="bottom", ha="right", fontsize=8.5,
                    style="italic")
    ax.set_yticks(ys, [_y_label(s) for s in steps], fontsize=9)
    ax.invert_yaxis()  # step 1 at the top
    ax.set_xlim(0, longest * 1.5)  # room for the annotations
    ax.set_xlabel("seconds (solid: time to first byte, hatched: generation; "
                  "notes: total time, response bytes / total time)")
    ax.set_title(title)
    ax.grid(axis="x", linestyle=":", linewidth=0.6)
    ax.set_axisbelow(True)
    seen = [a for a in ACTION_COLOURS if any(s.action == a for s in steps)]
    handles = [Patch(facecolor=ACTION_COLOURS[a], edgecolor="black", label=ACTION_LABELS[a]) for a in seen]
    if any(s.action not in ACTION_COLOURS for s in steps):
        handles.append(Patch(facecolor=UNKNOWN_COLOUR, edgecolor="black", label="unknown action"))
    handles += [Patch(facecolor="white", edgecolor="black", label="time to first byte"),
                Patch(facecolor="white", edgecolor="black", hatch="///", label="generation")]
    # Below the axes, clear of the bars and notes; bbox_inches="tight" keeps it in the image.
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.7 / height), ncol=3,
              fontsize=8.5, frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="plot_run.py", description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", default="-", help="smoke-test output file, or - for stdin (default)")
    parser.add_argument("-o", "--output", type=Path, help="PNG path (default: next to the input, or "
                        "benchmarks/smoke_bench.png for stdin)")
    parser.add_argument("--title", help="chart title (default: from the policy in the output)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the parsed steps")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from_stdin = args.input == "-"
    source = "stdin" if from_stdin else args.input
    try:
        text = sys.stdin.read() if from_stdin else Path(args.input).read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        log.error("cannot read %s: %s", source, err)
        return 2
    try:
        run = parse_run(text)
    except NoTimingLines as err:
        log.error("%s: %s; is this smoke-test output?", source, err)
        return 1
    for step in run.steps:
        log.debug("step %d %s: action=%s ttfb=%.3fs generation=%.3fs", step.number, step.label, step.action,
                  step.ttfb_s, step.generation_s)
    out = args.output or (DEFAULT_STDIN_OUTPUT if from_stdin else Path(args.input).with_suffix(".png"))
    title = args.title or f"model-swap smoke test: {run.policy or 'unknown'} policy"
    plot_run(run, out, title)
    log.info("wrote %s (%d steps from %s)", out, len(run.steps), source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
