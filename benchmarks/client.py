"""One streamed /v1/completions request, timed the way a user feels it, against any system."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import requests

PROMPT = "Once upon a time, in a small village by the sea, there lived"


@dataclass(frozen=True)
class Completion:
    """What one streamed request did: times from sending it, tokens seen, and how it ended."""

    ok: bool
    ttft_s: float | None  # first token event
    total_s: float
    tokens: int
    error: str | None = None  # the envelope's code, else the HTTP status or the exception's name
    cache_action: str | None = None  # model-swap's X-Cache-Action, or its SSE comment after a long wait
    action_at: float | None = None  # perf_counter() when that action was told


def _event_data(event: bytes) -> bytes:
    """The data of one server-sent event; comments (": ping", sent while a request waits) have none."""
    return b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))


def _told_action(event: bytes) -> str | None:
    """The action in model-swap's outcome comment, sent instead of headers when a request waited long."""
    for line in event.split(b"\n"):
        if line.startswith(b": x-cache-action="):
            return line[len(b": x-cache-action="):].split(b" ", 1)[0].decode()
    return None


def _error_code(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}"


def complete(base_url: str, model: str, max_tokens: int, prompt: str = PROMPT, timeout_s: float = 300.0,
             session: requests.Session | None = None) -> Completion:
    """Stream one completion; TTFT is the first server-sent event that carries a token."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    http = session or requests
    started = time.perf_counter()
    try:
        with http.post(base_url + "/v1/completions", json=body, stream=True, timeout=timeout_s) as response:
            action = response.headers.get("X-Cache-Action")
            action_at = time.perf_counter() if action else None
            if response.status_code != 200:
                return Completion(False, None, time.perf_counter() - started, 0, _error_code(response), action,
                                  action_at)
            ttft, tokens, buffer, error = None, 0, b"", None
            for chunk in response.iter_content(chunk_size=None):
                buffer += chunk.replace(b"\r\n", b"\n")
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if action is None and (action := _told_action(event)):
                        action_at = time.perf_counter()
                    data = _event_data(event)
                    if not data or data == b"[DONE]":
                        continue
                    payload = json.loads(data)
                    if isinstance(payload.get("error"), dict):  # failed after the status line was sent
                        error = str(payload["error"].get("code"))
                        continue
                    choices = payload.get("choices") or []
                    if choices and choices[0].get("finish_reason") is None:
                        tokens += 1
                        if ttft is None:
                            ttft = time.perf_counter() - started
            ok = tokens > 0 and error is None
            return Completion(ok, ttft, time.perf_counter() - started, tokens,
                              None if ok else error or "no_tokens", action, action_at)
    except (requests.RequestException, ValueError, OSError) as err:  # ValueError: a garbled event
        return Completion(False, None, time.perf_counter() - started, 0, type(err).__name__)


def median(values: list[float]) -> float:
    """The median, or NaN for no values."""
    return percentile(values, 50)


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (as numpy's default); NaN for no values."""
    data = sorted(v for v in values if v is not None and not math.isnan(v))
    if not data:
        return math.nan
    rank = (len(data) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)
