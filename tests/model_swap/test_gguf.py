"""The small GGUF header reader: agrees with gguf-py on real files, refuses malformed ones."""

from __future__ import annotations

import struct

import gguf
import pytest

from model_swap.gguf import GgufError, LongArray, read_header


@pytest.fixture
def tiny(make_model, tmp_path):
    return make_model(tmp_path, "t.gguf", seed=3)


def test_agrees_with_gguf_py(tiny):
    ours = read_header(tiny)
    ref = gguf.GGUFReader(str(tiny))
    assert ours.data_offset == ref.data_offset
    assert [(t.name, t.shape, t.ggml_type, t.nbytes) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_bytes)) for t in ref.tensors]
    assert ours.tensor_count == len(ref.tensors) and ours.kv_count == len(ref.fields) - 3  # less GGUF.* pseudo-keys
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        if isinstance(value, LongArray):
            assert value.length == len(field.data), key
        else:
            assert value == pytest.approx(field.contents()), key


def test_architecture_keys(tiny):
    header = read_header(tiny)
    assert header.metadata["general.architecture"] == "llama"
    assert header.arch_value("block_count") == 2
    assert header.arch_value("attention.head_count_kv") == 4
    assert header.arch_value("no.such.key", "x") == "x"
    assert isinstance(header.metadata["tokenizer.ggml.tokens"], LongArray)


def _patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt):]


@pytest.mark.parametrize("case,reason", [
    ("empty", "empty"),
    ("magic", "magic"),
    ("version", "version"),
    ("tensor_count", "implausible"),
    ("kv_count", "implausible"),
    ("cut_header", "truncated"),
    ("cut_data", "past the end"),
    ("string_length", "truncated"),
])
def test_malformed_files_are_refused(tiny, tmp_path, case, reason):
    data = tiny.read_bytes()
    bad = {
        "empty": lambda: b"",
        "magic": lambda: b"GGUX" + data[4:],
        "version": lambda: _patched(data, 4, "<I", 99),
        "tensor_count": lambda: _patched(data, 8, "<Q", 1 << 40),
        "kv_count": lambda: _patched(data, 16, "<Q", 1 << 40),
        "cut_header": lambda: data[:200],
        "cut_data": lambda: data[:-1000],
        "string_length": lambda: _patched(data, 24, "<Q", 1 << 50),  # the first key's length
    }[case]()
    path = tmp_path / "bad.gguf"
    path.write_bytes(bad)
    with pytest.raises(GgufError) as err:
        read_header(path)
    assert reason in str(err.value)
