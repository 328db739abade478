"""The store's own GGUF files in MODELS_DIR, and the files there it cannot serve (with why)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from model_swap.digest import DigestMemo, file_identity
from model_swap.errors import ApiError
from model_swap.gguf import GgufError, read_header
from model_swap.names import check_model_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredModel:
    """One model file the store can send."""

    name: str
    path: Path
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Unusable:
    """A file that looks like a model but that the store will not serve, and why."""

    name: str  # relative to MODELS_DIR
    reason: str

    def to_json(self) -> dict:
        return {"name": self.name, "reason": self.reason}


def _name_problem(name: str) -> str | None:
    """Why a top-level *.gguf-looking file name cannot be a model name, or None."""
    try:
        check_model_name(name)
    except ApiError as err:
        if not name.endswith(".gguf"):
            return f"the suffix must be .gguf in lower case (rename it to {name[:-5]}.gguf)"
        return err.message
    return None


class Catalog:
    """Reads MODELS_DIR on demand, so models added while running are seen; digests and header checks are memoised."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self._digests = DigestMemo()
        self._lock = threading.Lock()
        self._header_checks: dict[str, tuple[tuple[int, ...], str | None]] = {}
        self._reported: set[tuple[str, str]] = set()

    def get(self, name: str) -> StoredModel:
        """Return a stored model; 404 model_not_found, or 422 invalid_model for a file that is not a usable GGUF."""
        path = self.root / check_model_name(name)
        try:
            st = path.stat()
            if not path.is_file():
                raise FileNotFoundError(name)
        except FileNotFoundError:
            # Routes resolve names first (model_names, which suggests the closest): this is a file gone meanwhile.
            raise ApiError(404, "model_not_found", f"{name} is not in the store ({self.root})", param="model") from None
        problem = self._header_problem(path, st)
        if problem is not None:
            self._report(Unusable(name, problem))
            raise ApiError(422, "invalid_model", f"{name} is not a usable GGUF model: {problem}")
        return StoredModel(name, path, st.st_size, self._digests.sha256(path))

    def has(self, name: str) -> bool:
        """Whether a checked model name is a file in the store."""
        return (self.root / check_model_name(name)).is_file()

    def list(self) -> list[StoredModel]:
        """Every usable model in the store."""
        return self.scan()[0]

    def scan(self) -> tuple[list[StoredModel], list[Unusable]]:
        """The usable models, and every other file that looks like one with the reason it is not served."""
        models: list[StoredModel] = []
        unusable: list[Unusable] = []
        for path in self._candidates():
            rel = path.relative_to(self.root).as_posix()
            if path.parent != self.root:
                problem = "in a subfolder: the store serves only files directly in MODELS_DIR"
            else:
                problem = _name_problem(rel)
            if problem is None:
                try:
                    models.append(self.get(rel))
                    continue
                except ApiError as err:
                    if err.code != "invalid_model":
                        continue  # vanished meanwhile
                    problem = self._header_checks[str(path)][1] or err.message
            entry = Unusable(rel, problem)
            self._report(entry)
            unusable.append(entry)
        return models, unusable

    def _candidates(self) -> list[Path]:
        """Files whose name ends in .gguf in any case, here and in (non-hidden) subfolders."""
        found = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(Path(folder) / f for f in files if f.lower().endswith(".gguf"))
        return sorted(found, key=lambda p: (p.parent != self.root, p.as_posix()))

    def _header_problem(self, path: Path, st: os.stat_result) -> str | None:
        """Why the file is not a sound GGUF (memoised on the file's identity), or None."""
        identity = file_identity(st)
        with self._lock:
            known = self._header_checks.get(str(path))
        if known and known[0] == identity:
            return known[1]
        try:
            read_header(path)
            problem = None
        except GgufError as err:
            problem = str(err)
        except OSError as err:
            problem = f"cannot be read: {err.strerror or err}"
        with self._lock:
            self._header_checks[str(path)] = (identity, problem)
        return problem

    def _report(self, entry: Unusable) -> None:
        """Log each unusable file once per reason, so a listing every second does not flood the log."""
        with self._lock:
            if (entry.name, entry.reason) in self._reported:
                return
            self._reported.add((entry.name, entry.reason))
        log.warning("[catalog] skipping %r: %s", entry.name, entry.reason)
