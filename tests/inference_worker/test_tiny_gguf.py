"""Tests for the tiny GGUF model generator."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from inference_worker.testing.tiny_gguf import write_tiny_gguf

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _sha(path: pathlib.Path) -> str:
    """Return the sha256 hex digest of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stream_text(path: pathlib.Path, n_ctx: int = 2048) -> list[str]:
    """Load the model with llama.cpp and return the streamed completion text chunks."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)
    try:
        chunks = llm.create_completion("hello", max_tokens=8, stream=True)
        return [c["choices"][0]["text"] for c in chunks]
    finally:
        llm.close()


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Return an environment where the repository root is importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def test_different_seeds_give_different_valid_files(tmp_path: pathlib.Path) -> None:
    a = write_tiny_gguf(tmp_path / "a.gguf", seed=1)
    b = write_tiny_gguf(tmp_path / "b.gguf", seed=2)
    assert a.read_bytes()[:4] == b"GGUF"
    assert b.read_bytes()[:4] == b"GGUF"
    assert _sha(a) != _sha(b)
    assert a.stat().st_size < 1024 * 1024


def test_same_seed_is_deterministic(tmp_path: pathlib.Path) -> None:
    a = write_tiny_gguf(tmp_path / "a.gguf", seed=7)
    b = write_tiny_gguf(tmp_path / "b.gguf", seed=7)
    assert a.read_bytes() == b.read_bytes()


def test_atomic_write_leaves_no_temp_files(tmp_path: pathlib.Path) -> None:
    out = write_tiny_gguf(tmp_path / "m.gguf", seed=3)
    write_tiny_gguf(out, seed=4)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_bad_size_rejected(tmp_path: pathlib.Path, bad: float) -> None:
    with pytest.raises(ValueError):
        write_tiny_gguf(tmp_path / "m.gguf", size_mb=bad)
    assert not (tmp_path / "m.gguf").exists()


def test_loads_and_streams_text(tmp_path: pathlib.Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", seed=0)
    chunks = _stream_text(path)
    assert chunks, "no tokens were streamed"
    assert "".join(chunks), "streamed tokens produced no text"


def test_size_mb_gives_roughly_that_size_and_loads(tmp_path: pathlib.Path) -> None:
    path = write_tiny_gguf(tmp_path / "big.gguf", seed=5, size_mb=2)
    size = path.stat().st_size
    assert 0.75 * 2 * 1024 * 1024 <= size <= 1.25 * 2 * 1024 * 1024
    assert "".join(_stream_text(path, n_ctx=512))


def test_cli_writes_model(tmp_path: pathlib.Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "cli.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "inference_worker.testing.tiny_gguf", str(out), "--seed", "11"],
        capture_output=True, text=True, env=cli_env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
    assert _sha(out) == _sha(write_tiny_gguf(tmp_path / "api.gguf", seed=11))


@pytest.mark.parametrize("bad_args", [["--size-mb", "-3"], ["--seed", "abc"], ["--seed", "-1"], []])
def test_cli_rejects_bad_arguments(tmp_path: pathlib.Path, cli_env: dict[str, str], bad_args: list[str]) -> None:
    out = tmp_path / "bad.gguf"
    argv = [str(out), *bad_args] if bad_args else []
    proc = subprocess.run(
        [sys.executable, "-m", "inference_worker.testing.tiny_gguf", *argv],
        capture_output=True, text=True, env=cli_env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip()
    assert not out.exists()
