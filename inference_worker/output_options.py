"""A request's output options as llama-cpp-python arguments: logprobs, and JSON through a grammar."""

from __future__ import annotations

import functools
import json

from model_swap.errors import ApiError
from model_swap.web import GenerationRequest


@functools.lru_cache(maxsize=32)
def _grammar(schema_json: str | None):
    """llama.cpp's JSON grammar, or one made from a JSON schema; cached because clients repeat schemas."""
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar  # late: the package imports without llama.cpp

    if schema_json is None:
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    return LlamaGrammar.from_json_schema(schema_json, verbose=False)


def completion_kwargs(request: GenerationRequest, logits_kept: bool) -> dict:
    """Arguments for create_completion; 400 invalid_request for what this model or schema cannot do."""
    kwargs: dict = {}
    if request.logprobs is not None:
        if not logits_kept:
            raise ApiError(400, "invalid_request", "this model was not loaded with logprobs = true in the models "
                                                   "config, so it cannot report logprobs", param="logprobs")
        kwargs["logprobs"] = request.logprobs
    if request.response_format is not None:
        schema = request.response_format.get("schema")
        try:
            kwargs["grammar"] = _grammar(None if schema is None else json.dumps(schema, sort_keys=True))
        except Exception as err:  # the converter raises plain exceptions for schema features it lacks
            raise ApiError(400, "invalid_request", f"this JSON schema cannot be turned into a grammar: {err}",
                           param="response_format") from None
    return kwargs


def piece_logprobs(logprobs: dict | None, top: int | None) -> list[dict] | None:
    """llama-cpp-python's per-chunk logprobs as [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]."""
    if not logprobs or top is None:
        return None
    pieces = []
    for token, logprob, alternatives in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        # llama-cpp-python adds the chosen token to the alternatives even when it is not among the best.
        best = sorted((alternatives or {}).items(), key=lambda item: item[1], reverse=True)[:top]
        pieces.append({"token": token, "logprob": float(logprob) if logprob is not None else None,
                       "top_logprobs": [{"token": t, "logprob": float(lp)} for t, lp in best]})
    return pieces
