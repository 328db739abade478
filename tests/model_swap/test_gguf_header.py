"""The GGUF header check the catalog runs on every file (fast seam: real files, no server)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from model_swap.gguf import GGML_TYPE_SIZES, GgufError, read_header as check_gguf

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def good(make_model, tmp_path) -> bytes:
    return make_model(tmp_path, "good.gguf", seed=1).read_bytes()


def test_valid_files_pass(make_model, tmp_path):
    check_gguf(make_model(tmp_path, "a.gguf", seed=3))
    check_gguf(make_model(tmp_path, "b.gguf", seed=4, size_mb=2))


@pytest.mark.parametrize("name", ["gemma-3-270m-q4_k_m.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"])
def test_the_real_models_pass(name):
    path = REPO / "models" / name
    if not path.exists():
        pytest.skip(f"{name} not fetched (./scripts/test.sh fetches it)")
    check_gguf(path)


@pytest.mark.parametrize("mangle", [
    lambda g: b"",
    lambda g: b"GGU",
    lambda g: b"GGML" + g[4:],
    lambda g: g[:2000],
    lambda g: g[: len(g) // 2],
    lambda g: g[:-1],
    lambda g: b"GGUF" + struct.pack("<I", 1) + g[8:],
    lambda g: b"GGUF" + struct.pack("<I", 99) + g[8:],
    lambda g: g[:8] + struct.pack("<Q", 1 << 60) + g[16:],
    lambda g: g[:16] + struct.pack("<Q", 1 << 40) + g[24:],
    lambda g: g[:8] + struct.pack("<Q", struct.unpack_from("<Q", g, 8)[0] + 1) + g[16:],
], ids=["empty", "short", "magic", "cut-in-header", "cut-in-half", "one-byte-short", "version-1", "version-99",
        "absurd-tensors", "absurd-keys", "one-tensor-too-many"])
def test_broken_files_are_refused_with_a_reason(tmp_path, good, mangle):
    path = tmp_path / "bad.gguf"
    path.write_bytes(mangle(good))
    with pytest.raises(GgufError) as err:
        check_gguf(path)
    assert str(err.value)


def test_block_table_matches_the_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES

    assert GGML_TYPE_SIZES == {int(k): tuple(v) for k, v in GGML_QUANT_SIZES.items()}
