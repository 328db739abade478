"""Model names: the one check every service applies wherever a name arrives."""

from __future__ import annotations

import pytest

from model_swap.errors import ApiError
from model_swap.names import MAX_NAME_LENGTH, check_model_name


@pytest.mark.parametrize("name", ["a.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf",
                                  "x+y_1.gguf", "a" * (MAX_NAME_LENGTH - 5) + ".gguf"])
def test_plain_names_pass(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", [None, "", 3, "a.bin", "a.gguf.tmp", "../a.gguf", "a/../b.gguf", "/etc/a.gguf",
                                  "dir/a.gguf", "a\\b.gguf", ".a.gguf", "..gguf", "a..gguf", "-a.gguf",
                                  "a b.gguf", "a\x00.gguf", "a\n.gguf", "a.gguf\n", "ä.gguf",
                                  "a" * (MAX_NAME_LENGTH - 4) + ".gguf"])
def test_unsafe_names_refused(name):
    with pytest.raises(ApiError) as err:
        check_model_name(name)
    assert (err.value.status, err.value.code) == (400, "invalid_model_name")
