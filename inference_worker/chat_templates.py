"""Which chat template a loaded model uses, and how messages become its prompt tokens.

A GGUF file without `tokenizer.chat_template` (a base model such as the bundled Gemma 3 270M)
would get llama-cpp-python's own fallback, the llama-2 `[INST]` format, which such a model
answers with nothing at all: an empty 200. Here it gets a plain `User:`/`Assistant:`
transcript instead, which base models continue sensibly; the header `X-Chat-Template` and the
load's log line say which template a model uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from model_swap.errors import ApiError
from model_swap.model_settings import CHAT_TEMPLATE_NAMES

log = logging.getLogger(__name__)

FALLBACK = "plain"
PLAIN = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
         "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
         "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}Assistant:{% endif %}")
# Gemma has no system role: a system message becomes a user turn, as Google's template does in effect.
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
         "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _named(name: str) -> tuple[str, tuple[str, ...], bool]:
    """A named template: (Jinja template, stop strings, whether it writes the BOS token itself)."""
    from llama_cpp import llama_chat_format as formats  # imported late: the package imports without llama.cpp

    return {
        "plain": (PLAIN, ("\nUser:",), False),
        "chatml": (formats.CHATML_CHAT_TEMPLATE, ("<|im_end|>",), False),
        "gemma": (GEMMA, ("<end_of_turn>",), True),
        "llama-3": (formats.LLAMA3_INSTRUCT_CHAT_TEMPLATE, ("<|eot_id|>",), True),
        "mistral-instruct": (formats.MISTRAL_INSTRUCT_CHAT_TEMPLATE, (), True),
    }[name]


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template; `label` says where it came from (gguf, config:NAME, fallback:plain)."""

    label: str
    formatter: Any  # llama_cpp.llama_chat_format.Jinja2ChatFormatter
    stop: tuple[str, ...]
    writes_bos: bool

    def render(self, llm, messages: Sequence[dict]) -> list[int]:
        """The prompt tokens for `messages`, ending where the assistant's answer starts."""
        try:
            prompt = self.formatter(messages=list(messages)).prompt
        except Exception as err:  # a template may refuse a conversation (raise_exception), or fail on it
            raise ApiError(400, "invalid_request", f"the model's chat template ({self.label}) refused the messages: "
                                                   f"{err}", param="messages") from None
        return llm.tokenize(prompt.encode("utf-8"), add_bos=not self.writes_bos, special=True)


def _token_text(llm, token_id: int) -> str:
    return llm._model.token_get_text(token_id) if token_id != -1 else ""


def choose_chat_template(llm, setting: str | None) -> ChatTemplate:
    """The configured template, else the file's own, else the plain fallback; ValueError if a setting cannot apply."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    eos, bos = _token_text(llm, eos_id), _token_text(llm, bos_id)
    own = llm.metadata.get("tokenizer.chat_template")
    if setting == "gguf" and not own:
        raise ValueError("chat_template = \"gguf\" but the file has no tokenizer.chat_template")
    if setting is None or setting == "gguf":
        label, (template, stop, writes_bos) = ("gguf", (own, (), True)) if own else \
            (f"fallback:{FALLBACK}", _named(FALLBACK))
    elif setting in CHAT_TEMPLATE_NAMES:
        label, (template, stop, writes_bos) = f"config:{setting}", _named(setting)
    else:  # a Jinja template from the models config, written like the ones GGUF files carry
        label, template, stop, writes_bos = "config:custom", setting, (), True
    # Generation stops at end-of-generation tokens by itself; the stop strings catch turn markers
    # a model writes as plain text.
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
    return ChatTemplate(label, formatter, stop, writes_bos)
