"""A GGUF file's scalar metadata (architecture, context length, chat template), for /api/show."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

# GGUF value types: struct format of each fixed-size scalar; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_KEYS = 1 << 16


class _Reader:
    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.unpack("<Q")
        if self.pos + size > len(self.buf):
            raise ValueError("string runs past the end of the file")
        text = bytes(self.buf[self.pos:self.pos + size]).decode("utf-8", "replace")
        self.pos += size
        return text

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if item_kind in _SCALARS:  # skip fixed-size items in one step
                self.pos += struct.calcsize(_SCALARS[item_kind]) * count
            else:
                for _ in range(count):
                    self.value(item_kind)
            return None  # arrays (vocabularies, merges) are not metadata anyone shows
        raise ValueError(f"unknown GGUF value type {kind}")


def read_metadata(path: Path) -> dict[str, object]:
    """The file's scalar key/value pairs (arrays are left out); ValueError if it is not a readable GGUF file."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        reader = _Reader(buf)
        try:
            if bytes(buf[:4]) != b"GGUF":
                raise ValueError("not a GGUF file")
            reader.pos = 4
            version = reader.unpack("<I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is not supported")
            reader.unpack("<Q")  # tensor count
            count = reader.unpack("<Q")
            if count > MAX_KEYS:
                raise ValueError(f"{count} metadata keys is not plausible")
            metadata: dict[str, object] = {}
            for _ in range(count):
                key, kind = reader.string(), reader.unpack("<I")
                value = reader.value(kind)
                if value is not None:
                    metadata[key] = value
            return metadata
        except struct.error as err:
            raise ValueError(f"truncated GGUF header: {err}") from None
