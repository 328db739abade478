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


_REQUESTED_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:-]*")


def check_requested_name(name: object) -> str:
    """Return a name as a user typed it (file name, alias, `name:tag`) if it is safe to look up, else raise 400.

    Looked-up names never reach the filesystem (only the file they resolve to does), but a name
    that looks like a path is refused all the same, so nothing that resembles one is echoed back.
    """
    if name is None or name == "":
        raise ApiError(400, "invalid_model_name", "model name is required", param="model")
    if not isinstance(name, str):
        raise ApiError(400, "invalid_model_name", "model name must be a string", param="model")
    if len(name) > MAX_NAME_LENGTH:
        raise ApiError(400, "invalid_model_name", f"model name longer than {MAX_NAME_LENGTH} characters",
                       param="model")
    if not _REQUESTED_RE.fullmatch(name) or ".." in name:
        raise ApiError(400, "invalid_model_name",
                       f"{name!r} is not a model name (letters, digits, '.', '_', '-', '+', ':'; no leading dot, "
                       "no '..', no separators)", param="model")
    return name
