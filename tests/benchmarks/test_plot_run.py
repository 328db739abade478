"""benchmarks/plot_run.py: parsing captured smoke-test output and drawing the chart."""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "plot_run.py"
DATA = Path(__file__).resolve().parent / "data"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = "gemma-3-270m-q4_k_m.gguf"
TINY = "tiny-smoke.gguf"


def _load_plot_run():
    """Import benchmarks/plot_run.py by path (benchmarks/ is not a package)."""
    if "plot_run" in sys.modules:
        return sys.modules["plot_run"]
    spec = importlib.util.spec_from_file_location("plot_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["plot_run"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


plot_run = _load_plot_run()


def test_parses_a_captured_lru_ttl_run() -> None:
    run = plot_run.parse_run((DATA / "lru_ttl_run.txt").read_text())

    assert run.policy == "lru-ttl"
    assert run.models == {SMOL: "A", GEMMA: "B", TINY: "C"}
    assert [s.number for s in run.steps] == [1, 2, 3, 4, 5]
    assert [s.action for s in run.steps] == ["load_from_store", "load_from_store", "load_from_local_store",
                                             "load_from_store", "load_from_store"]
    assert [s.expected for s in run.steps] == [s.action for s in run.steps]
    assert run.steps[3].evicted == (TINY,)
    assert run.steps[4].evicted == (SMOL, GEMMA)
    assert run.steps[0].evicted == ()
    assert run.sleeps == [(4, 6.0)]  # after step 4
    first = run.steps[0]
    assert first.label == f"A first request (miss): {SMOL}"
    assert (first.http_status, first.tcp_connect_s, first.ttfb_s, first.generation_s, first.total_s,
            first.throughput_bps) == (200, 0.0, 0.556, 0.247, 0.803, 161)


def test_parses_a_refused_request_as_rejected() -> None:
    run = plot_run.parse_run((DATA / "no_evict_run.txt").read_text())

    refused = run.steps[3]
    assert (refused.action, refused.expected, refused.http_status) == ("rejected", "rejected", 503)
    assert [s.action for s in run.steps] == ["load_from_store", "already_loaded", "load_from_store", "rejected",
                                             "load_from_local_store"]


@pytest.mark.parametrize(
    ("status", "action"),
    [("200", "unknown"), ("503", "rejected")],
)
def test_timing_lines_alone_make_numbered_steps(status: str, action: str) -> None:
    text = (f"[http {status} | tcp_connect=0.001s  time_to_first_byte=0.208s  generation=0.030s  total=0.238s"
            " | throughput=~933 bytes/s]\n") * 2

    run = plot_run.parse_run(text)

    assert run.policy is None
    assert [(s.number, s.label, s.action) for s in run.steps] == [(1, "request 1", action), (2, "request 2", action)]
    assert run.steps[0].generation_s == 0.030


def test_streamed_text_does_not_end_a_step() -> None:
    text = "\n".join([
        "=== 1. A miss: m.gguf -> expect: load_from_store ===",
        "some text [http 200 | not a timing line]",
        "actual: action=load_from_store evicted=[] transport=http decision_ms=0.1 worker_ms=2 error=none",
        "[http 200 | tcp_connect=0.000s  time_to_first_byte=0.100s  generation=0.050s  total=0.150s"
        " | throughput=~10 bytes/s]",
    ])

    (step,) = plot_run.parse_run(text).steps

    assert (step.number, step.label, step.action) == (1, "A miss: m.gguf", "load_from_store")


def test_input_without_timing_lines_raises() -> None:
    with pytest.raises(plot_run.NoTimingLines):
        plot_run.parse_run("=== 1. A -> expect: load_from_store ===\nFAIL: step 1\n")


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000


def test_cli_writes_the_png_next_to_the_input(tmp_path: Path) -> None:
    run_file = tmp_path / "lru-ttl.txt"
    shutil.copy(DATA / "lru_ttl_run.txt", run_file)

    result = subprocess.run([sys.executable, str(SCRIPT), str(run_file), "--title", "a title"],
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert _is_png(tmp_path / "lru-ttl.png")
    assert "wrote" in result.stderr


def test_cli_reads_stdin_and_writes_the_given_path(tmp_path: Path) -> None:
    out = tmp_path / "charts" / "refused.png"

    result = subprocess.run([sys.executable, str(SCRIPT), "-o", str(out)],
                            input=(DATA / "no_evict_run.txt").read_text(), capture_output=True, text=True,
                            timeout=120)

    assert result.returncode == 0, result.stderr
    assert _is_png(out)


def test_stdin_defaults_to_the_benchmarks_chart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = tmp_path / "smoke_bench.png"
    monkeypatch.setattr(plot_run, "DEFAULT_STDIN_OUTPUT", default)
    monkeypatch.setattr(sys, "stdin", io.StringIO((DATA / "no_evict_run.txt").read_text()))

    assert plot_run.main([]) == 0
    assert _is_png(default)


def test_cli_fails_clearly_without_timing_lines(tmp_path: Path) -> None:
    bad = tmp_path / "empty-run.txt"
    bad.write_text("=== reset: POST http://localhost:8000/admin/reset ===\nFAIL: reset: no store\n")

    result = subprocess.run([sys.executable, str(SCRIPT), str(bad)], capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert "no timing lines" in result.stderr
    assert str(bad) in result.stderr
    assert not (tmp_path / "empty-run.png").exists()


def test_cli_fails_clearly_on_a_missing_file(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "absent.txt")], capture_output=True,
                            text=True, timeout=120)

    assert result.returncode == 2
    assert "cannot read" in result.stderr
