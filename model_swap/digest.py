"""File digests, memoised by the file's identity so a big file is hashed once."""

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


def file_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What says a file's bytes may have changed: device, inode, size, mtime and ctime.

    Size and mtime alone miss a same-size rewrite whose mtime was put back (cp -p, rsync -t,
    a tool that restores times); inode catches a replacement by rename, and ctime, which no
    user call can set, catches any write or utime since.
    """
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class DigestMemo:
    """sha256 per path, recomputed whenever the file's identity (file_identity) changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, tuple[tuple[int, ...], str]] = {}

    def remember(self, path: Path, sha256: str) -> None:
        """Record a digest computed elsewhere (while receiving, say)."""
        identity = file_identity(os.stat(path))
        with self._lock:
            self._known[str(path)] = (identity, sha256)

    def sha256(self, path: Path) -> str:
        """Return the file's digest, hashing it only if it changed since last time."""
        identity = file_identity(os.stat(path))
        key = str(path)
        with self._lock:
            known = self._known.get(key)
        if known and known[0] == identity:
            return known[1]
        value = sha256_file(path)
        with self._lock:
            self._known[key] = (identity, value)
        return value

    def retime(self, path: Path, before: os.stat_result) -> None:
        """Keep the digest across a change of times only (our own utime), if nothing else changed first."""
        after = os.stat(path)
        key = str(path)
        with self._lock:
            known = self._known.get(key)
            if known and known[0] == file_identity(before):
                self._known[key] = (file_identity(after), known[1])

    def forget(self, path: Path) -> None:
        """Drop a path's digest (the file was deleted)."""
        with self._lock:
            self._known.pop(str(path), None)
