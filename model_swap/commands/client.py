"""The store over HTTP, as the CLI sees it: JSON calls and streams, every failure one of two errors."""

from __future__ import annotations

import json
from typing import Iterator

import requests

CONNECT_TIMEOUT_S = 5.0


class StoreError(Exception):
    """The store answered with an error: its status and the envelope's code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


class StoreUnreachable(Exception):
    """No answer from the store at all."""


def _error_of(response: requests.Response) -> StoreError:
    """The store's envelope {"error": {"code", "message"}}, or Ollama's {"error": "...", "code"}."""
    try:
        body = response.json()
        error = body["error"]
        if isinstance(error, dict):
            return StoreError(response.status_code, str(error["code"]), str(error["message"]))
        return StoreError(response.status_code, str(body.get("code", f"http_{response.status_code}")), str(error))
    except (ValueError, KeyError, TypeError):
        return StoreError(response.status_code, f"http_{response.status_code}", response.text[:200])


class StoreClient:
    """Calls one store; sends the API key when there is one."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def _request(self, method: str, path: str, stream: bool = False, read_timeout_s: float | None = None,
                 **kwargs) -> requests.Response:
        timeout = (CONNECT_TIMEOUT_S, read_timeout_s if read_timeout_s is not None or stream else self.timeout_s)
        try:
            response = self._session.request(method, self.url + path, stream=stream, timeout=timeout, **kwargs)
        except requests.ConnectionError as err:
            raise StoreUnreachable(f"cannot reach the store at {self.url} ({err.__class__.__name__}); "
                                   "is it running? (--url or MODEL_SWAP_URL)") from err
        except requests.Timeout as err:
            raise StoreUnreachable(f"the store at {self.url} did not answer in time") from err
        if response.status_code >= 400:
            err = _error_of(response)
            response.close()
            raise err
        return response

    def get(self, path: str) -> dict:
        return self._request("GET", path).json()

    def post(self, path: str, body: dict) -> dict:
        return self._request("POST", path, json=body).json()

    def sse(self, path: str, body: dict | None = None, headers: dict | None = None) -> Iterator[tuple[str, str]]:
        """Server-sent events as (field, value): ("event", kind), ("data", text) and ("comment", text);
        ("end", "") after each blank line. POST with a body, else GET; closed when the caller stops."""
        method = "POST" if body is not None else "GET"
        response = self._request(method, path, stream=True, json=body, headers=headers)
        try:
            for raw in response.iter_lines(chunk_size=None):  # each chunk as it arrives, not 512 bytes at a time
                line = raw.decode("utf-8", "replace")
                if not line:
                    yield "end", ""
                elif line.startswith(":"):
                    yield "comment", line[1:].strip()
                else:
                    field, _, value = line.partition(":")
                    yield field, value[1:] if value.startswith(" ") else value
        except requests.RequestException as err:
            raise StoreUnreachable(f"the store at {self.url} closed the stream: {err.__class__.__name__}") from err
        finally:
            response.close()


def data_events(frames: Iterator[tuple[str, str]]) -> Iterator[tuple[str | None, object]]:
    """Group SSE fields into (event kind or None, parsed data); comments come as ("comment", text)."""
    kind: str | None = None
    for field, value in frames:
        if field == "comment":
            yield "comment", value
        elif field == "event":
            kind = value
        elif field == "data":
            yield kind, value if value == "[DONE]" else json.loads(value)
        elif field == "end":
            kind = None
