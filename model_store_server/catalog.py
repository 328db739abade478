"""The store's own GGUF files in MODELS_DIR."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model_swap.digest import DigestMemo
from model_swap.errors import ApiError
from model_swap.names import check_model_name


@dataclass(frozen=True)
class StoredModel:
    """One model file the store can send."""

    name: str
    path: Path
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


class Catalog:
    """Reads MODELS_DIR on demand, so models added while running are seen; digests are memoised."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self._digests = DigestMemo()

    def get(self, name: str) -> StoredModel:
        """Return a stored model or raise 404 model_not_found."""
        path = self.root / check_model_name(name)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ApiError(404, "model_not_found", f"{name} is not in the store ({self.root})") from None
        if not path.is_file():
            raise ApiError(404, "model_not_found", f"{name} is not a file in the store")
        return StoredModel(name, path, size, self._digests.sha256(path))

    def has(self, name: str) -> bool:
        """Whether a checked model name is a file in the store."""
        return (self.root / check_model_name(name)).is_file()

    def list(self) -> list[StoredModel]:
        """Every valid-named .gguf file in the store."""
        models = []
        for path in sorted(self.root.glob("*.gguf")):
            try:
                models.append(self.get(path.name))
            except ApiError:
                continue
        return models
