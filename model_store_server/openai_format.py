"""OpenAI's request and response shapes, translated to and from the store's own (pure functions)."""

from __future__ import annotations

from model_swap.errors import ApiError
from model_swap.web import GENERATION_FIELDS, refuse_unknown

# Parameters model-swap cannot apply: accepted only with the value that asks for nothing.
NEUTRAL = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None,), "tools": (None, []),
           "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none")}
# Applied (GENERATION_FIELDS go to llama.cpp, the output options through internal_body, keep_alive to the
# store's core), or metadata with no effect on the answer ("user"); anything else is refused.
# session_id and preset are model-swap's own (session_chat.py).
ACCEPTED = GENERATION_FIELDS | {"model", "stream", "stream_options", "user", "keep_alive", "logprobs",
                                "top_logprobs", "response_format", "session_id", "preset"} | set(NEUTRAL)
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for /v1/completions; chat allows top_logprobs up to 20


def refuse_unsupported(body: dict) -> None:
    """400 unsupported_parameter for a parameter model-swap cannot honour (unknown, or not neutral)."""
    refuse_unknown(body, ACCEPTED)
    for key, neutral in NEUTRAL.items():
        if body.get(key) not in neutral:
            raise ApiError(400, "unsupported_parameter", f"{key}={body.get(key)!r} is not supported by model-swap",
                           param=key)


def text_content(content: object, where: str) -> str:
    """A message's content as one string: text parts are joined; image, audio and file parts are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, "invalid_request", f"{where}.content must be a string or a list of content parts",
                       param=where)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_image", "image", "input_audio", "audio", "file"):
            raise ApiError(400, "unsupported_content", f"{where} has a {kind} part; model-swap serves text models "
                                                       "and accepts only text parts", param=where)
        else:
            raise ApiError(400, "invalid_request", f"{where} has a content part that is not {{type: text, text}}",
                           param=where)
    return "".join(texts)


def _messages(value: object) -> object:
    if not isinstance(value, list):
        return value  # parse_generation says what is wrong
    return [dict(m, content=text_content(m.get("content"), f"messages[{i}]")) if isinstance(m, dict) else m
            for i, m in enumerate(value)]


def _logprobs(body: dict, chat: bool) -> int | None:
    """The number of alternatives per token to report, or None for no logprobs."""
    if not chat:
        value = body.get("logprobs")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value <= MAX_COMPLETION_LOGPROBS):
            raise ApiError(400, "invalid_request", f"logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}",
                           param="logprobs")
        return value
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted not in (None, True, False):
        raise ApiError(400, "invalid_request", "logprobs must be true or false", param="logprobs")
    if top is not None and not wanted:
        raise ApiError(400, "invalid_request", "top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if wanted else None


def _response_format(value: object) -> dict | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return {"type": "json_schema", "schema": schema}  # parse_output_options refuses a missing schema
    return value if kind == "json_object" else {"type": kind}


def internal_body(body: dict, chat: bool) -> dict:
    """The request in the store's own spelling (text messages, a logprobs count, a plain response format)."""
    internal = dict(body, logprobs=_logprobs(body, chat), response_format=_response_format(body.get("response_format")))
    internal.pop("top_logprobs", None)
    if chat:
        internal["messages"] = _messages(body.get("messages"))
    return internal


def include_usage(body: dict) -> bool:
    """Whether a stream should end with a usage chunk (stream_options.include_usage)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            options.get("include_usage") not in (None, True, False):
        raise ApiError(400, "invalid_request", "stream_options may only hold include_usage (true or false)",
                       param="stream_options")
    if not body.get("stream"):
        raise ApiError(400, "invalid_request", "stream_options is only allowed with stream: true",
                       param="stream_options")
    return bool(options.get("include_usage"))


def completion_logprobs(pieces: list[dict] | None, offset: int = 0) -> dict | None:
    """Logprobs in /v1/completions' shape; text_offset counts from `offset` characters into the answer."""
    if pieces is None:
        return None
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece["token"])
    return {"tokens": [p["token"] for p in pieces], "token_logprobs": [p["logprob"] for p in pieces],
            "top_logprobs": [{t["token"]: t["logprob"] for t in p["top_logprobs"]} for p in pieces],
            "text_offset": offsets}


def chat_logprobs(pieces: list[dict] | None) -> dict | None:
    """Logprobs in /v1/chat/completions' shape."""
    if pieces is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [dict(entry(p["token"], p["logprob"]),
                             top_logprobs=[entry(t["token"], t["logprob"]) for t in p["top_logprobs"]])
                        for p in pieces], "refusal": None}
