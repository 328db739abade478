"""Check a GGUF file's header without loading the model: what makes a file unusable before any transfer.

Walks the header as llama.cpp's gguf.cpp reads it (magic, version, key/value pairs, tensor
infos) and checks that every count and length fits in the file and that the tensor data the
header declares ends inside it. It does not judge whether llama.cpp knows the architecture.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Far above any real model (a 405B llama has about 1,100 tensors and 50 keys) and far below
# what a corrupt count looks like; llama.cpp itself gives up on such counts much later.
MAX_TENSORS = 1 << 20
MAX_KEYS = 1 << 20
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8
DEFAULT_ALIGNMENT = 32

# GGUF value types -> struct format of one scalar (8 = string and 9 = array are walked).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# ggml tensor types -> (elements per block, bytes per block), as in the gguf package's
# GGML_QUANT_SIZES (a test compares them; the gguf package is only a test dependency).
GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}


class GgufError(ValueError):
    """The file is not a usable GGUF model; the message says why."""


class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str):
        n = struct.calcsize("<" + fmt)
        if self.pos + n > self.size:
            raise GgufError(f"truncated: the header runs past the end of the file ({self.size} bytes)")
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GgufError(f"truncated: {what} of {n} bytes runs past the end of the file ({self.size} bytes)")
        self.pos += n

    def string(self, what: str) -> bytes:
        n = self.take("Q")
        start = self.pos
        self.skip(n, what)
        return bytes(self.buf[start:self.pos])


def _skip_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> object:
    """Step over one value; return it if it is a scalar (general.alignment is needed)."""
    if vtype in _SCALARS:
        return cur.take(_SCALARS[vtype])
    if vtype == _STRING:
        n = cur.take("Q")
        cur.skip(n, f"string value of {key!r}")
        return None
    if vtype != _ARRAY:
        raise GgufError(f"key {key!r} has unknown value type {vtype}")
    if depth >= MAX_ARRAY_NESTING:
        raise GgufError(f"key {key!r} nests arrays more than {MAX_ARRAY_NESTING} deep")
    item_type, count = cur.take("I"), cur.take("Q")
    if item_type in _SCALARS:
        cur.skip(count * struct.calcsize("<" + _SCALARS[item_type]), f"array {key!r}")
    elif count > cur.size - cur.pos:  # every item takes at least one byte
        raise GgufError(f"array {key!r} declares {count} items, more than the file holds")
    else:
        for _ in range(count):
            _skip_value(cur, item_type, key, depth + 1)
    return None


def _check(cur: _Cursor) -> None:
    if cur.size < 4 or bytes(cur.buf[:4]) != GGUF_MAGIC:
        raise GgufError("does not start with the GGUF magic")
    cur.pos = 4
    version = cur.take("I")
    if version not in SUPPORTED_VERSIONS:
        raise GgufError(f"GGUF version {version} is not supported (llama.cpp reads {SUPPORTED_VERSIONS})")
    n_tensors, n_keys = cur.take("Q"), cur.take("Q")
    if n_tensors > MAX_TENSORS or n_keys > MAX_KEYS:
        raise GgufError(f"absurd header counts: {n_tensors} tensors, {n_keys} keys")
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_keys):
        key = cur.string("a key").decode("utf-8", "replace")
        value = _skip_value(cur, cur.take("I"), key)
        if key == "general.alignment":
            alignment = value if isinstance(value, int) and value > 0 and value & (value - 1) == 0 else 0
            if not alignment:
                raise GgufError(f"general.alignment {value!r} is not a power of two")
    data_end = 0
    for _ in range(n_tensors):
        name = cur.string("a tensor name").decode("utf-8", "replace")
        n_dims = cur.take("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GgufError(f"tensor {name!r} has {n_dims} dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= cur.take("Q")
        ggml_type, offset = cur.take("I"), cur.take("Q")
        block, block_bytes = GGML_BLOCKS.get(ggml_type, (1, 0))  # an unknown type: check its offset only
        if elements % block:
            raise GgufError(f"tensor {name!r} has {elements} elements, not a multiple of its block of {block}")
        data_end = max(data_end, offset + elements // block * block_bytes)
    data_start = -(-cur.pos // alignment) * alignment
    if data_start + data_end > cur.size:
        raise GgufError(f"truncated: the tensors end at byte {data_start + data_end}, the file has {cur.size}")


def check_gguf(path: Path) -> None:
    """Raise GgufError if the file at `path` is not a structurally sound GGUF model."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise GgufError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                _check(_Cursor(view, size))
            finally:
                view.release()
