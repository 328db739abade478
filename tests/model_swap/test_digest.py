"""The digest memo re-hashes whenever anything about a file changed (fast seam: real files, no server)."""

from __future__ import annotations

import hashlib
import os

from model_swap.digest import DigestMemo


def test_same_size_rewrite_with_the_old_mtime_is_hashed_again(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"A" * 4096)
    memo = DigestMemo()
    assert memo.sha256(path) == hashlib.sha256(b"A" * 4096).hexdigest()
    before = path.stat()
    with open(path, "r+b") as f:
        f.write(b"B" * 4096)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert memo.sha256(path) == hashlib.sha256(b"B" * 4096).hexdigest()


def test_replacement_by_rename_is_hashed_again(tmp_path):
    path, new = tmp_path / "m.gguf", tmp_path / "new"
    path.write_bytes(b"A" * 10)
    memo = DigestMemo()
    memo.sha256(path)
    new.write_bytes(b"B" * 10)
    os.utime(new, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    os.replace(new, path)
    assert memo.sha256(path) == hashlib.sha256(b"B" * 10).hexdigest()


def test_retime_keeps_the_digest_across_our_own_utime(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"A" * 10)
    memo = DigestMemo()
    memo.sha256(path)
    before = path.stat()
    os.utime(path, ns=(before.st_atime_ns + 10**9, before.st_mtime_ns))
    memo.retime(path, before)
    monkeypatch.setattr("model_swap.digest.sha256_file", lambda p: (_ for _ in ()).throw(AssertionError("re-hashed")))
    assert memo.sha256(path) == hashlib.sha256(b"A" * 10).hexdigest()
