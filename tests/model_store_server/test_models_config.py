"""The models config (TOML) and the names people type, resolved against a real models directory."""

from __future__ import annotations

import pytest

from model_store_server.catalog import Catalog
from model_store_server.config import load_store_config
from model_store_server.model_names import ModelNames
from model_store_server.models_config import load_models_config, parse_models_config
from model_swap.config import ConfigError
from model_swap.errors import ApiError
from model_swap.model_settings import ModelSettings
from model_swap.testing import REPO

CONFIG = """
[models.gemma]
file = "gemma-3-270m-q4_k_m.gguf"
aliases = ["gemma3", "Gemma-3"]
n_ctx = 4096
chat_template = "gemma"
[models.gemma.sampling]
temperature = 0.7
max_tokens = 64

[models.smol]
file = "SmolLM2-135M-Instruct.Q4_1.gguf"
logprobs = true
"""


@pytest.fixture
def names(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for file in ("gemma-3-270m-q4_k_m.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf", "tiny.gguf", "Twin.gguf",
                 "twin.gguf"):
        (models / file).write_bytes(b"GGUF")  # resolution reads names only
    (tmp_path / "models.toml").write_text(CONFIG)
    return ModelNames(Catalog(models), load_models_config(tmp_path / "models.toml"))


@pytest.mark.parametrize(("typed", "file"), [
    ("gemma-3-270m-q4_k_m.gguf", "gemma-3-270m-q4_k_m.gguf"),  # the file name
    ("gemma-3-270m-q4_k_m", "gemma-3-270m-q4_k_m.gguf"),  # without .gguf
    ("GEMMA-3-270M-Q4_K_M.GGUF", "gemma-3-270m-q4_k_m.gguf"),  # any case
    ("gemma", "gemma-3-270m-q4_k_m.gguf"),  # the config's name
    ("GEMMA3", "gemma-3-270m-q4_k_m.gguf"),  # an alias, any case
    ("gemma:latest", "gemma-3-270m-q4_k_m.gguf"),  # Ollama's default tag
    ("smollm2-135m-instruct.q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("Tiny", "tiny.gguf"),
    ("twin.gguf", "twin.gguf"),  # an exact name wins over a case-insensitive twin
])
def test_resolve_names_people_type(names, typed, file):
    assert names.resolve(typed) == file


def test_unknown_name_lists_available_and_closest(names):
    with pytest.raises(ApiError) as err:
        names.resolve("gema")
    assert (err.value.status, err.value.code, err.value.param) == (404, "model_not_found", "model")
    assert err.value.details["closest"][0] == "gemma"  # the config's name, not the file's
    assert {"gemma-3-270m-q4_k_m.gguf", "gemma", "gemma3", "smol", "tiny.gguf"} <= set(err.value.details["available"])
    with pytest.raises(ApiError) as err:
        names.resolve("smo")  # a unique prefix is the closest
    assert err.value.details["closest"] == ["smol"]
    with pytest.raises(ApiError) as err:
        names.resolve("llama3")
    assert err.value.code == "model_not_found" and err.value.details["closest"] == []


@pytest.mark.parametrize("typed", ["../tiny.gguf", "a/b", ".hidden", "", None, 7, "x" * 201])
def test_names_that_look_like_paths_are_refused(names, typed):
    with pytest.raises(ApiError) as err:
        names.resolve(typed)
    assert (err.value.status, err.value.code) == (400, "invalid_model_name")


def test_ambiguous_case_insensitive_name(names):
    with pytest.raises(ApiError) as err:
        names.resolve("TWIN")
    assert (err.value.status, err.value.code) == (400, "ambiguous_model_name")
    assert sorted(err.value.details["matches"]) == ["Twin.gguf", "twin.gguf"]


def test_settings_and_sampling_defaults(names):
    config = names.config
    assert config.settings_for("gemma-3-270m-q4_k_m.gguf") == ModelSettings(n_ctx=4096, chat_template="gemma")
    assert config.settings_for("SmolLM2-135M-Instruct.Q4_1.gguf").logprobs is True
    assert config.settings_for("tiny.gguf") == ModelSettings()
    assert names.aliases("gemma-3-270m-q4_k_m.gguf") == ("gemma", "gemma3", "Gemma-3")
    filled = config.apply_sampling_defaults("gemma-3-270m-q4_k_m.gguf", {"temperature": 0.1, "prompt": "x"})
    assert filled == {"temperature": 0.1, "prompt": "x", "max_tokens": 64}  # the request's own value wins
    newer = config.apply_sampling_defaults("gemma-3-270m-q4_k_m.gguf", {"max_completion_tokens": 5})
    assert "max_tokens" not in newer
    assert config.apply_sampling_defaults("tiny.gguf", {"a": 1}) == {"a": 1}


@pytest.mark.parametrize(("document", "complaint"), [
    ({"models": {"x": {"file": "x.gguf", "n_ctxx": 5}}}, "unknown keys n_ctxx"),
    ({"models": {"x": {"file": "../x.gguf"}}}, "not a plain model file name"),
    ({"models": {"x": {}}}, "model name is required"),
    ({"models": {"x": {"file": "x.gguf", "aliases": "y"}}}, "aliases must be a list"),
    ({"models": {"x": {"file": "x.gguf", "aliases": ["a/b"]}}}, "is not a model name"),
    ({"models": {"x": {"file": "x.gguf", "n_ctx": 8}}}, "n_ctx must be"),
    ({"models": {"x": {"file": "x.gguf", "chat_template": "nonesuch"}}}, "chat_template must be one of"),
    ({"models": {"x": {"file": "x.gguf", "chat_template": "{% for %}"}}}, "not a valid Jinja template"),
    ({"models": {"x": {"file": "x.gguf", "sampling": {"top_kk": 1}}}}, "unknown key 'top_kk'"),
    ({"models": {"x": {"file": "x.gguf", "sampling": {"temperature": "hot"}}}}, "wrong type"),
    ({"models": {"x": {"file": "x.gguf"}, "y": {"file": "x.gguf"}}}, "configured twice"),
    ({"models": {"x": {"file": "x.gguf", "aliases": ["same"]}, "y": {"file": "y.gguf", "aliases": ["SAME"]}}},
     "already means x.gguf"),
    ({"models": {"x": {"file": "x.gguf", "aliases": ["y"]}, "z": {"file": "y.gguf"}}}, "already means y.gguf"),
    ({"model": {}}, "unknown top-level keys model"),
    ({"presets": {"p": {"model": "x"}}}, "needs a system prompt"),
    ({"presets": {"p": {"system": "s", "temperature": 1}}}, "unknown keys temperature"),
    ({"presets": {"p": {"system": "s", "model": "a/b"}}}, "is not a model name"),
    ({"presets": {"p": {"system": "s", "sampling": {"temperature": "hot"}}}}, "wrong type"),
    ({"presets": []}, "[presets] must be a table"),
])
def test_invalid_config_is_refused_with_the_reason(document, complaint):
    with pytest.raises(ConfigError, match=complaint.replace("(", r"\(").replace("[", r"\[")):
        parse_models_config(document)


def test_presets_give_a_system_prompt_a_model_and_sampling_under_the_request():
    config = parse_models_config({"presets": {"pirate": {"system": "Arr.", "model": "gemma",
                                                         "sampling": {"temperature": 1.0, "max_tokens": 9}}}})
    preset = config.preset("pirate")
    assert (preset.system, preset.model) == ("Arr.", "gemma")
    assert preset.apply_sampling({"temperature": 0.2}) == {"temperature": 0.2, "max_tokens": 9}
    with pytest.raises(ApiError) as err:
        config.preset("ninja")
    assert err.value.code == "preset_not_found" and err.value.details["available"] == ["pirate"]


def test_store_config_reads_models_config_at_start(tmp_path):
    (tmp_path / "m.toml").write_text(CONFIG)
    config = load_store_config(["--models-config", str(tmp_path / "m.toml")], env={})
    assert [e.name for e in config.models_config.entries] == ["gemma", "smol"]
    assert load_store_config([], env={"MODELS_CONFIG": str(tmp_path / "m.toml")}).models_config.entries
    (tmp_path / "bad.toml").write_text("[models.x\nfile=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_store_config(["--models-config", str(tmp_path / "bad.toml")], env={})
    with pytest.raises(ConfigError, match="No such file"):
        load_store_config(["--models-config", str(tmp_path / "absent.toml")], env={})


def test_the_shipped_models_config_is_valid():
    config = load_models_config(REPO / "models.toml")  # what scripts/serve.sh gives the store
    assert {e.file for e in config.entries} == {"gemma-3-270m-q4_k_m.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert config.preset("brief").model == "smollm2"
