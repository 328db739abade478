"""File digests, memoised by size and mtime so a big file is hashed once."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

GGUF_MAGIC = b"GGUF"
BLOCK_SIZE = 1 << 20


def sha256_file(path: Path) -> str:
    """Hash a file in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()


class DigestMemo:
    """sha256 per path, recomputed only when the file's size or mtime changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, tuple[int, int, str]] = {}

    def remember(self, path: Path, sha256: str) -> None:
        """Record a digest computed elsewhere (while receiving, say)."""
        st = os.stat(path)
        with self._lock:
            self._known[str(path)] = (st.st_size, st.st_mtime_ns, sha256)

    def sha256(self, path: Path) -> str:
        """Return the file's digest, hashing it only if it changed since last time."""
        st = os.stat(path)
        key = str(path)
        with self._lock:
            known = self._known.get(key)
        if known and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        value = sha256_file(path)
        with self._lock:
            self._known[key] = (st.st_size, st.st_mtime_ns, value)
        return value

    def forget(self, path: Path) -> None:
        """Drop a path's digest (the file was deleted)."""
        with self._lock:
            self._known.pop(str(path), None)
