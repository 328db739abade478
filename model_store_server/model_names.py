"""Names people type: file name, file name without .gguf, any case, an alias from the models config."""

from __future__ import annotations

import difflib

from flask import current_app

from model_store_server.catalog import Catalog
from model_store_server.models_config import ModelsConfig
from model_swap.errors import ApiError
from model_swap.names import check_model_name, check_requested_name

MAX_LISTED = 20
MAX_CLOSEST = 3
OLLAMA_DEFAULT_TAG = ":latest"


def _stem(file: str) -> str:
    return file[: -len(".gguf")] if file.lower().endswith(".gguf") else file


class ModelNames:
    """Turns what a user typed into a file name in MODELS_DIR; resolve() is called at every route's entry."""

    def __init__(self, catalog: Catalog, config: ModelsConfig):
        self.catalog = catalog
        self.config = config

    def files(self) -> list[str]:
        """The store's file names now (read on demand, so files added while running are seen)."""
        # Only the names: the catalog's own listing also hashes every file.
        names = []
        for path in sorted(self.catalog.root.glob("*.gguf")):
            try:
                names.append(check_model_name(path.name))
            except ApiError:
                continue
        return names

    def aliases(self, file: str) -> tuple[str, ...]:
        """The config names of a file (its [models.NAME] key first), or none."""
        entry = self.config.for_file(file)
        return entry.names if entry else ()

    def resolve(self, typed: object) -> str:
        """The file a typed name means; 400 invalid_model_name, 400 ambiguous_model_name or 404 model_not_found,
        each naming the available models and the closest ones."""
        files = self.files()
        try:
            name = check_requested_name(typed)
        except ApiError as err:
            raise self._with_suggestions(err, typed if isinstance(typed, str) else "", files) from None
        if name.lower().endswith(OLLAMA_DEFAULT_TAG):  # Ollama clients add the default tag themselves
            name = name[: -len(OLLAMA_DEFAULT_TAG)]
        if name in files:
            return name
        lowered = name.lower()
        for entry in self.config.entries:
            if lowered in (n.lower() for n in entry.names):
                return entry.file
        matches = [f for f in files if lowered in (f.lower(), _stem(f).lower())]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ApiError(400, "ambiguous_model_name",
                           f"{typed!r} matches {', '.join(matches)}; give the exact file name", param="model",
                           details={"matches": matches})
        raise self._with_suggestions(ApiError(404, "model_not_found", f"model {name!r} not found", param="model"),
                                     name, files)

    def _with_suggestions(self, err: ApiError, name: str, files: list[str]) -> ApiError:
        """`err` with the available names and the closest ones, in its message and as details for scripts."""
        listed = [f + (f" ({', '.join(self.aliases(f))})" if self.aliases(f) else "") for f in files]
        more = f", and {len(listed) - MAX_LISTED} more" if len(listed) > MAX_LISTED else ""
        available = ", ".join(listed[:MAX_LISTED]) + more if listed else "none (MODELS_DIR has no .gguf files)"
        closest = self.closest(name, files)
        hint = f"; did you mean {' or '.join(closest)}?" if closest else ""
        return ApiError(err.status, err.code, f"{err.message}{hint} (available: {available})", err.headers,
                        param="model", details={"available": [n for f in files for n in (f, *self.aliases(f))],
                                                "closest": closest})

    def closest(self, name: str, files: list[str]) -> list[str]:
        """Up to MAX_CLOSEST names most like `name`, best first: prefix matches, names containing it, near
        spellings; each file is suggested by its config name if it has one, else by its file name."""
        lowered, stem = name.lower(), _stem(name.lower())
        if not stem:
            return []
        typed_as: dict[str, str] = {}  # every lower-cased name -> the name to suggest for its file
        for file in files:
            suggestion = (self.aliases(file) or (file,))[0]
            for candidate in (file, _stem(file), *self.aliases(file)):
                typed_as.setdefault(candidate.lower(), suggestion)
        ranked = [s for c, s in typed_as.items() if c.startswith(lowered)]
        ranked += [s for c, s in typed_as.items() if stem in c]
        ranked += [typed_as[c] for c in difflib.get_close_matches(lowered, list(typed_as), n=MAX_CLOSEST, cutoff=0.6)]
        return list(dict.fromkeys(ranked))[:MAX_CLOSEST]


def model_names() -> ModelNames:
    """The current app's name resolver."""
    return current_app.extensions["store"]["names"]
