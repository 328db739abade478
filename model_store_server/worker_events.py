"""The worker's ndjson events ({"text", "logprobs"} per piece, then a summary), read by the API routes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Iterator

from model_store_server.forwarding import Forward

PASSED_HEADERS = ("X-Chat-Template",)


def events(forward: Forward) -> Iterator[dict]:
    """The worker's ndjson events as dicts, as they arrive."""
    buffer = b""
    for chunk in forward.chunks():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


@dataclass
class Collected:
    """A whole generation: its text, its tokens' logprobs (when asked for) and the worker's summary."""

    text: str = ""
    logprobs: list[dict] | None = None
    summary: dict = field(default_factory=dict)
    first_text_at: float | None = None  # time.perf_counter() when the first text arrived


def collect(forward: Forward) -> Collected:
    """Read a generation to its end (for answers that are not streamed); the lease ends with it."""
    texts: list[str] = []
    result = Collected()
    try:
        for event in events(forward):
            if "text" in event:
                result.first_text_at = result.first_text_at or time.perf_counter()
                texts.append(event["text"])
                if "logprobs" in event:
                    result.logprobs = (result.logprobs or []) + event["logprobs"]
            else:
                result.summary = event
    finally:
        forward.close()
    result.text = "".join(texts)
    return result


def usage(summary: dict) -> dict | None:
    """OpenAI's usage object from the worker's summary, or None when the stream ended without one."""
    if summary.get("prompt_tokens") is None:
        return None
    prompt, completion = summary["prompt_tokens"], summary["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def worker_headers(forward: Forward) -> dict[str, str]:
    """Headers of the worker's answer the client should see too (which chat template was used)."""
    return {h: forward.upstream.headers[h] for h in PASSED_HEADERS if h in forward.upstream.headers}
