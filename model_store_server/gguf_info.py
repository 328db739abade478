"""A GGUF file's scalar metadata (architecture, context length, chat template), for /api/show."""

from __future__ import annotations

from pathlib import Path

from model_swap.gguf import LongArray, read_header


def read_metadata(path: Path) -> dict[str, object]:
    """The file's scalar key/value pairs (arrays are left out); ValueError if it is not a readable GGUF file."""
    # Arrays (vocabularies, merges, per-layer figures) are not metadata anyone shows.
    return {key: value for key, value in read_header(path).metadata.items()
            if not isinstance(value, (list, LongArray))}
