"""Which of a session's messages are sent with the next request (pure functions).

The history is cut in turns (a user message and the answers after it), oldest first, until the
message count, the characters and the prompt tokens fit; the system prompt and the request's own
messages are always sent. Tokens are counted by a function the caller gives (the worker's
/tokenize, with the target model's tokenizer and chat template).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from model_swap.config import ConfigError
from model_swap.web import MAX_MESSAGES

# (messages) -> (prompt tokens, the model's context size)
TokenCounter = Callable[[list[dict]], tuple[int, int]]


@dataclass(frozen=True)
class SessionBounds:
    """How much history a request may carry (SESSION_MAX_MESSAGES, SESSION_MAX_CHARS, SESSION_MAX_PROMPT_TOKENS)."""

    max_messages: int = 128
    max_chars: int = 100_000
    max_prompt_tokens: int | None = None  # None: whatever fits the model's context

    def __post_init__(self) -> None:
        if not 2 <= self.max_messages < MAX_MESSAGES:
            raise ConfigError(f"SESSION_MAX_MESSAGES must be from 2 to {MAX_MESSAGES - 1}, got {self.max_messages}")
        if self.max_chars < 1:
            raise ConfigError(f"SESSION_MAX_CHARS must be positive, got {self.max_chars}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"SESSION_MAX_PROMPT_TOKENS must be positive, got {self.max_prompt_tokens}")


def turns(history: Sequence[dict]) -> list[list[dict]]:
    """The history cut before each user message (a leading answer without its question is a turn of its own)."""
    groups: list[list[dict]] = []
    for message in history:
        if message["role"] == "user" or not groups:
            groups.append([])
        groups[-1].append(message)
    return groups


def _flat(groups: Sequence[Sequence[dict]]) -> list[dict]:
    return [m for group in groups for m in group]


def _chars(messages: Sequence[dict]) -> int:
    return sum(len(m["content"]) for m in messages)


def bound_history(system: list[dict], history: Sequence[dict], new: Sequence[dict],
                  bounds: SessionBounds) -> list[dict]:
    """The newest whole turns of `history` that fit the message and character bounds beside system and new."""
    groups = turns(history)
    fixed = [*system, *new]
    while groups and (len(fixed) + len(_flat(groups)) > bounds.max_messages
                      or _chars(fixed) + _chars(_flat(groups)) > bounds.max_chars):
        groups.pop(0)
    return _flat(groups)


def prompt_budget(bounds: SessionBounds, n_ctx: int, max_tokens: int) -> int:
    """The prompt tokens a request may use: its bound, and room left in the context for the answer
    (max_tokens, at most half the context)."""
    room = n_ctx - min(max_tokens, n_ctx // 2)
    return room if bounds.max_prompt_tokens is None else min(bounds.max_prompt_tokens, room)


def fit_tokens(system: list[dict], history: Sequence[dict], new: Sequence[dict], bounds: SessionBounds,
               max_tokens: int, count: TokenCounter) -> list[dict]:
    """system + the newest whole turns of history + new, within the prompt budget (dropping all history
    if even that is too long: then the worker says whether the rest fits)."""
    groups = turns(history)

    def compose(dropped: int) -> list[dict]:
        return [*system, *_flat(groups[dropped:]), *new]

    tokens, n_ctx = count(compose(0))
    budget = prompt_budget(bounds, n_ctx, max_tokens)
    if tokens <= budget or not groups:
        return compose(0)
    # Fewer turns never mean more tokens: find the fewest to drop by bisection (a few counts, not one per turn).
    low, high = 1, len(groups)  # dropping `high` turns is the answer if nothing fewer fits
    while low < high:
        middle = (low + high) // 2
        if count(compose(middle))[0] <= budget:
            high = middle
        else:
            low = middle + 1
    return compose(high)
