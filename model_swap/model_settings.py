"""Per-model settings the worker applies when it loads a model; the store sends them with each load.

They travel as a JSON body (`{"settings": {...}}`) rather than a header: a chat template can be
larger than a header may be.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import jinja2

from model_swap.errors import ApiError

MAX_TEMPLATE_CHARS = 64 << 10
# Chat templates the worker knows by name; any other value must be a Jinja chat template.
# "gguf" is the file's own tokenizer.chat_template; "plain" is a User:/Assistant: transcript.
CHAT_TEMPLATE_NAMES = ("gguf", "plain", "chatml", "gemma", "llama-3", "mistral-instruct")


@dataclass(frozen=True)
class ModelSettings:
    """What a model is opened with; None means the worker's own default."""

    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    chat_template: str | None = None  # a template name the worker knows, or a Jinja template
    logprobs: bool = False  # keep every position's logits (llama.cpp's logits_all), which logprobs need

    def __post_init__(self) -> None:
        if self.n_ctx is not None and (isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, int)
                                       or not 16 <= self.n_ctx <= 1 << 22):
            raise ValueError(f"n_ctx must be an integer from 16 to {1 << 22}, got {self.n_ctx!r}")
        if self.n_gpu_layers is not None and (isinstance(self.n_gpu_layers, bool)
                                              or not isinstance(self.n_gpu_layers, int) or self.n_gpu_layers < -1):
            raise ValueError(f"n_gpu_layers must be an integer of at least -1, got {self.n_gpu_layers!r}")
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template
                                               or len(self.chat_template) > MAX_TEMPLATE_CHARS):
            raise ValueError(f"chat_template must be a non-empty string of at most {MAX_TEMPLATE_CHARS} characters")
        if self.chat_template is not None and self.chat_template not in CHAT_TEMPLATE_NAMES:
            if "{{" not in self.chat_template and "{%" not in self.chat_template:
                raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATE_NAMES)} or a Jinja template, "
                                 f"got {self.chat_template!r}")
            try:
                jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(self.chat_template)
            except jinja2.TemplateSyntaxError as err:
                raise ValueError(f"chat_template is not a valid Jinja template: {err}") from None
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be true or false, got {self.logprobs!r}")

    def to_json(self) -> dict:
        """The settings that differ from the defaults (an empty object when none do)."""
        return {k: v for k, v in asdict(self).items() if v not in (None, False)}

    @classmethod
    def from_json(cls, value: object) -> "ModelSettings":
        """Parse a load request's settings object, or raise 400 invalid_request."""
        if value is None:
            return cls()
        try:
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            return cls(**value)
        except (ValueError, TypeError) as err:
            raise ApiError(400, "invalid_request", f"model settings are not valid: {err}", param="settings") from None
