"""A small GGUF header reader: magic, version, counts, metadata and tensor infos, with sane bounds.

gguf-py's GGUFReader builds a numpy view per value and takes seconds on a 262k-token
vocabulary; this reads the header through one mmap and skips long arrays by their lengths.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_TENSORS = 1 << 20  # far above any real model (a few thousand), far below a garbage count
MAX_KV = 1 << 16
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_VALUES_KEPT = 64  # longer arrays (vocabularies) are kept as their type and length only

# ggml type id -> (elements per block, bytes per block), as in ggml.c's type traits (a test compares
# them with the gguf package's GGML_QUANT_SIZES).
GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}

# GGUF metadata value types -> struct format of a scalar (8 string, 9 array are read apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GgufError(ValueError):
    """The file is not a GGUF model this reader accepts; the message says why."""


@dataclass(frozen=True)
class LongArray:
    """A metadata array too long to keep: its item type and length."""

    item_type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's name, shape, ggml type and offset inside the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def nbytes(self) -> int:
        block, size = GGML_TYPE_SIZES[self.ggml_type]
        elements = 1
        for dim in self.shape:
            elements *= dim
        return elements // block * size


@dataclass(frozen=True)
class GgufHeader:
    """Everything before the tensor data."""

    version: int
    tensor_count: int
    kv_count: int
    metadata: dict
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    file_size: int

    @property
    def tensor_bytes(self) -> int:
        """The weights' size at their quantization (what llama.cpp reports as the model size)."""
        return sum(t.nbytes for t in self.tensors)

    def arch_value(self, key: str, default=None):
        """`<architecture>.<key>` from the metadata, e.g. arch_value("block_count")."""
        arch = self.metadata.get("general.architecture")
        return self.metadata.get(f"{arch}.{key}", default)


class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str):
        width = struct.calcsize(fmt)
        if self.pos + width > self.size:
            raise GgufError(f"truncated header at byte {self.pos}")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += width
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GgufError(f"truncated header at byte {self.pos}")
        self.pos += n

    def string(self) -> str:
        length = self.take("<Q")
        start = self.pos
        self.skip(length)
        return self.buf[start:self.pos].decode("utf-8", "replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_type, length = self.take("<I"), self.take("<Q")
            if length > self.size:  # every item takes at least one byte
                raise GgufError(f"array of {length} items is longer than the file")
            if item_type == _ARRAY:
                raise GgufError("nested arrays are not supported")
            if length > MAX_ARRAY_VALUES_KEPT:
                self._skip_items(item_type, length)
                return LongArray(item_type, length)
            return [self.value(item_type) for _ in range(length)]
        raise GgufError(f"unknown metadata value type {kind}")

    def _skip_items(self, item_type: int, length: int) -> None:
        if item_type in _SCALARS:
            self.skip(struct.calcsize(_SCALARS[item_type]) * length)
        elif item_type == _STRING:
            for _ in range(length):
                self.skip(self.take("<Q"))
        else:
            raise GgufError(f"unknown array item type {item_type}")


def _parse(cur: _Cursor, file_size: int) -> GgufHeader:
    if cur.size < 4 or cur.buf[:4] != GGUF_MAGIC:
        raise GgufError("does not start with the GGUF magic")
    cur.skip(4)
    version = cur.take("<I")
    if version not in SUPPORTED_VERSIONS:
        raise GgufError(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
    tensor_count, kv_count = cur.take("<Q"), cur.take("<Q")
    if tensor_count > MAX_TENSORS or kv_count > MAX_KV:
        raise GgufError(f"implausible header counts: {tensor_count} tensors, {kv_count} metadata keys")
    metadata: dict = {}
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(cur.take("<I"))
    tensors = []
    for _ in range(tensor_count):
        name = cur.string()
        n_dims = cur.take("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GgufError(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(cur.take("<Q") for _ in range(n_dims))
        ggml_type, offset = cur.take("<I"), cur.take("<Q")
        if ggml_type not in GGML_TYPE_SIZES:
            raise GgufError(f"tensor {name} has unknown ggml type {ggml_type}")
        tensors.append(TensorInfo(name, shape, ggml_type, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GgufError(f"general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment
    header = GgufHeader(version, tensor_count, kv_count, metadata, tuple(tensors), data_offset, file_size)
    for t in header.tensors:
        if data_offset + t.offset + t.nbytes > file_size:
            raise GgufError(f"tensor {t.name} ends past the end of the file ({file_size} bytes): truncated?")
    return header


def read_header(path: Path | str) -> GgufHeader:
    """Parse a GGUF file's header; raise GgufError if it is not a well-formed, complete GGUF file."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise GgufError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, size), size)
