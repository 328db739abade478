"""What both services' config loaders share."""

from __future__ import annotations

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ConfigError(ValueError):
    """A setting is invalid; the message says which and why."""


def parse_optional_number(value: str | None, name: str, kind: type = int):
    """Parse an env/flag string as `kind`; empty means unset (None)."""
    if value is None or value.strip() == "":
        return None
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def parse_number(value: str | None, name: str, kind: type = int):
    """Parse a required env/flag string as `kind`."""
    number = parse_optional_number(value, name, kind)
    if number is None:
        raise ConfigError(f"{name} must be set")
    return number
