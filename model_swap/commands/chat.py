"""`model-swap chat MODEL`: a streaming chat over /v1/chat/completions, in one session.

Each request carries the session id (`X-Session-Id`) and only the new user message: the store
keeps the conversation, so `/switch OTHER` continues the same one on another model. Without a
model, the request names none and the store picks (the preset's model, else the session's last).
"""

from __future__ import annotations

import sys
import uuid
from typing import Callable, Iterator, TextIO

from rich.console import Console

from model_swap.commands.client import StoreClient, StoreError, data_events

HELP = "/switch MODEL  continue this conversation on another model\n/exit          leave (so does Ctrl-D)"


def _lines(stdin: TextIO, prompt: Callable[[], str]) -> Iterator[str]:
    """The user's lines: with a prompt and line editing at a terminal, plain lines from a pipe."""
    if stdin.isatty():
        while True:
            try:
                yield input(prompt())
            except EOFError:
                return
    else:
        for line in stdin:
            yield line.rstrip("\n")


class Chat:
    """One conversation: a session id, the model the next message goes to, and the turns' failures."""

    def __init__(self, client: StoreClient, out: Console, err: Console, model: str | None, session: str | None,
                 max_tokens: int | None, preset: str | None = None):
        self.client, self.out, self.err = client, out, err
        self.model = model
        self.preset = preset
        self.session = session or uuid.uuid4().hex
        self.max_tokens = max_tokens
        self.failed = 0

    def run(self, stdin: TextIO = sys.stdin) -> int:
        preset = f"preset {self.preset}" if self.preset else ""
        with_what = f"{self.model} ({preset})" if self.model and preset else self.model or preset or "its model"
        self.err.print(f"[dim]session {self.session} with {with_what}; /switch MODEL, /exit[/dim]", highlight=False)
        for line in _lines(stdin, lambda: f"{self.model or 'chat'}> "):
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                break
            if text.startswith("/"):
                self.command(text)
                continue
            self.turn(line)
        return 1 if self.failed else 0

    def command(self, text: str) -> None:
        verb, _, arg = text.partition(" ")
        if verb == "/switch" and arg.strip():
            self.model = arg.strip()
            self.err.print(f"[dim]switched to {self.model}; session {self.session} continues[/dim]")
        else:
            self.err.print(HELP)

    def turn(self, message: str) -> None:
        """Send one user message and stream the answer to stdout."""
        body: dict = {"messages": [{"role": "user", "content": message}], "stream": True}
        for key, value in (("model", self.model), ("preset", self.preset), ("max_tokens", self.max_tokens)):
            if value is not None:
                body[key] = value  # the session keeps the preset; naming it again each time changes nothing
        wrote, said = False, ""
        try:
            frames = self.client.sse("/v1/chat/completions", body, headers={"X-Session-Id": self.session})
            for kind, data in data_events(frames):
                if kind == "comment":
                    if data and data != said and not data.startswith("x-cache-action"):
                        self.err.print(f"[dim]{data}[/dim]", highlight=False)  # transferring X... 45%
                        said = data  # the store repeats it every half second while the request waits
                elif data == "[DONE]":
                    break
                elif isinstance(data, dict) and "error" in data:
                    error = data["error"]
                    raise StoreError(0, str(error.get("code")), str(error.get("message")))
                elif isinstance(data, dict):
                    for choice in data.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content")
                        piece = piece if wrote or not piece else piece.lstrip()  # no blank before the answer
                        if piece:
                            self.out.file.write(piece)
                            self.out.file.flush()
                            wrote = True
        except StoreError as err:
            if wrote:
                self.out.file.write("\n")
            self.err.print(f"[red]error[/red] {err.code}: {err.message}")
            self.failed += 1
            return
        self.out.file.write("\n")
        self.out.file.flush()
