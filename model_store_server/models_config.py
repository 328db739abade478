"""The models config (MODELS_CONFIG, a TOML file): aliases and per-model settings for the store's files.

```toml
[models.gemma]                        # "gemma" is a name users can type
file = "gemma-3-270m-q4_k_m.gguf"     # a file in MODELS_DIR
aliases = ["gemma3"]                  # more names for it
n_ctx = 4096                          # settings the worker applies when it loads the model
chat_template = "gemma"
[models.gemma.sampling]               # defaults for requests that do not say
temperature = 0.7

[presets.pirate]                      # a request (or a session) names it with "preset"
system = "You are a pirate."          # the system prompt put in front of the chat
model = "gemma"                       # optional: the model when the request names none
[presets.pirate.sampling]             # optional: defaults between the request's and the model's
temperature = 1.0
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from model_swap.config import ConfigError
from model_swap.errors import ApiError
from model_swap.model_settings import ModelSettings
from model_swap.names import check_model_name, check_requested_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 takes the same parser from its backport
    import tomli as tomllib

SETTING_KEYS = ("n_ctx", "n_gpu_layers", "chat_template", "logprobs")
# Defaults a model may give its requests, in the OpenAI spelling the routes translate into.
SAMPLING_TYPES: Mapping[str, tuple[type, ...]] = {
    "temperature": (int, float), "top_p": (int, float), "max_tokens": (int,), "seed": (int,),
    "stop": (str, list), "presence_penalty": (int, float), "frequency_penalty": (int, float),
}


@dataclass(frozen=True)
class ModelEntry:
    """One [models.NAME] table."""

    name: str
    file: str
    aliases: tuple[str, ...] = ()
    settings: ModelSettings = ModelSettings()
    sampling: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this entry answers to besides its file name."""
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class Preset:
    """One [presets.NAME] table: a system prompt, and optionally a default model and sampling."""

    name: str
    system: str
    model: str | None = None
    sampling: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    def apply_sampling(self, body: dict) -> dict:
        """The request body with the preset's sampling filled in where the request is silent."""
        return _fill_sampling(body, self.sampling)


@dataclass(frozen=True)
class ModelsConfig:
    """The parsed models config; empty when there is none."""

    entries: tuple[ModelEntry, ...] = ()
    source: Path | None = None
    presets: Mapping[str, Preset] = field(default_factory=lambda: MappingProxyType({}))

    def preset(self, name: object) -> Preset:
        """The preset a request names; 404 preset_not_found (with the preset names) otherwise."""
        if isinstance(name, str) and name in self.presets:
            return self.presets[name]
        raise ApiError(404, "preset_not_found", f"no preset {name!r} in the models config",
                       param="preset", details={"available": sorted(self.presets)})

    def for_file(self, file: str) -> ModelEntry | None:
        return next((e for e in self.entries if e.file == file), None)

    def settings_for(self, file: str) -> ModelSettings:
        """What the worker should load `file` with."""
        entry = self.for_file(file)
        return entry.settings if entry else ModelSettings()

    def apply_sampling_defaults(self, file: str, body: dict) -> dict:
        """The request body with the model's sampling defaults filled in where the request is silent."""
        entry = self.for_file(file)
        return body if entry is None else _fill_sampling(body, entry.sampling)


def _fill_sampling(body: dict, sampling: Mapping[str, object]) -> dict:
    merged = dict(body)
    for key, value in sampling.items():
        # max_completion_tokens is the newer spelling of max_tokens: a request giving it is not silent.
        if merged.get(key) is None and not (key == "max_tokens" and merged.get("max_completion_tokens")):
            merged[key] = value
    return merged


def _sampling(where: str, sampling: object) -> Mapping[str, object]:
    """A validated [....sampling] table."""
    if not isinstance(sampling, dict):
        raise ConfigError(f"[{where}.sampling] must be a table")
    for key, value in sampling.items():
        if key not in SAMPLING_TYPES:
            raise ConfigError(f"[{where}.sampling]: unknown key {key!r} (known: {', '.join(SAMPLING_TYPES)})")
        if isinstance(value, bool) or not isinstance(value, SAMPLING_TYPES[key]):
            raise ConfigError(f"[{where}.sampling] {key} has the wrong type: {value!r}")
    return MappingProxyType(dict(sampling))


def _preset(name: str, table: object) -> Preset:
    if not isinstance(table, dict):
        raise ConfigError(f"[presets.{name}] must be a table")
    unknown = set(table) - {"system", "model", "sampling"}
    if unknown:
        raise ConfigError(f"[presets.{name}]: unknown keys {', '.join(sorted(unknown))}")
    system = table.get("system")
    if not isinstance(system, str) or not system.strip():
        raise ConfigError(f"[presets.{name}] needs a system prompt: system = \"...\"")
    model = table.get("model")
    try:
        check_requested_name(name)
        if model is not None:
            check_requested_name(model)
    except ApiError as err:
        raise ConfigError(f"[presets.{name}]: {err.message}") from None
    return Preset(name, system, model, _sampling(f"presets.{name}", table.get("sampling", {})))


def _entry(name: str, table: object) -> ModelEntry:
    if not isinstance(table, dict):
        raise ConfigError(f"[models.{name}] must be a table")
    unknown = set(table) - {"file", "aliases", "sampling", *SETTING_KEYS}
    if unknown:
        raise ConfigError(f"[models.{name}]: unknown keys {', '.join(sorted(unknown))}")
    try:
        check_requested_name(name)
        file = check_model_name(table.get("file"))
        aliases = table.get("aliases", [])
        if not isinstance(aliases, list):
            raise ConfigError(f"[models.{name}] aliases must be a list of names")
        for alias in aliases:
            check_requested_name(alias)
    except ApiError as err:
        raise ConfigError(f"[models.{name}]: {err.message}") from None
    sampling = _sampling(f"models.{name}", table.get("sampling", {}))
    try:
        settings = ModelSettings(**{k: table[k] for k in SETTING_KEYS if k in table})
    except ValueError as err:
        raise ConfigError(f"[models.{name}]: {err}") from None
    return ModelEntry(name, file, tuple(aliases), settings, sampling)


def parse_models_config(data: dict, source: Path | None = None) -> ModelsConfig:
    """Validate a parsed TOML document; raise ConfigError on the first problem."""
    unknown = set(data) - {"models", "presets"}
    if unknown:
        raise ConfigError(f"models config: unknown top-level keys {', '.join(sorted(unknown))}")
    tables = data.get("models", {})
    if not isinstance(tables, dict):
        raise ConfigError("models config: [models] must be a table of [models.NAME] tables")
    entries = tuple(_entry(name, table) for name, table in tables.items())
    seen_names: dict[str, str] = {}
    seen_files: dict[str, str] = {}
    for entry in entries:
        if entry.file in seen_files:
            raise ConfigError(f"models config: {entry.file} is configured twice "
                              f"([models.{seen_files[entry.file]}] and [models.{entry.name}])")
        seen_files[entry.file] = entry.name
    for entry in entries:
        for name in entry.names:
            key = name.lower()
            clash = seen_names.get(key) or next((f for f in seen_files if f.lower() in (key, key + ".gguf")
                                                 and f != entry.file), None)
            if clash and clash != entry.file:
                raise ConfigError(f"models config: the name {name!r} of [models.{entry.name}] "
                                  f"already means {clash}")
            seen_names[key] = entry.file
    presets = data.get("presets", {})
    if not isinstance(presets, dict):
        raise ConfigError("models config: [presets] must be a table of [presets.NAME] tables")
    return ModelsConfig(entries, source, MappingProxyType({n: _preset(n, t) for n, t in presets.items()}))


def load_models_config(path: Path | str | None) -> ModelsConfig:
    """Read MODELS_CONFIG; no path means no config."""
    if path is None or str(path).strip() == "":
        return ModelsConfig()
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"MODELS_CONFIG {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"MODELS_CONFIG {path} is not valid TOML: {err}") from None
    return parse_models_config(data, path)
