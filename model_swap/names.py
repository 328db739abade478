"""Model names are plain file names; this module is the one place that says which."""

from __future__ import annotations

import re

from model_swap.errors import ApiError

MAX_NAME_LENGTH = 200
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\.gguf")


def check_model_name(name: object) -> str:
    """Return `name` if it is a safe model file name, else raise 400 invalid_model_name."""
    if name is None or name == "":
        raise ApiError(400, "invalid_model_name", "model name is required")
    if not isinstance(name, str):
        raise ApiError(400, "invalid_model_name", "model name must be a string (a .gguf file name)")
    if len(name) > MAX_NAME_LENGTH:
        raise ApiError(400, "invalid_model_name", f"model name longer than {MAX_NAME_LENGTH} characters")
    # The regex forbids separators, a leading dot and anything but a .gguf suffix;
    # '..' inside a name is refused too so no name ever looks like a path step.
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise ApiError(
            400,
            "invalid_model_name",
            f"{name!r} is not a plain model file name "
            "(letters, digits, '.', '_', '-', '+', ending in .gguf, no leading dot, no '..')",
        )
    return name
