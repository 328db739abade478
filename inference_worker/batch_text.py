"""Token bytes to text pieces for one stream: whole UTF-8 characters only, cut at the first stop string."""

from __future__ import annotations

import codecs
from typing import Sequence


class TextAssembler:
    """Turns each sampled token's bytes into text that is safe to send now.

    A character split across tokens is held until it is whole; text that could be the start
    of a stop string is held until it is known not to be; the first stop string ends the text
    (the stop string itself is never sent), as llama-cpp-python's create_completion does.
    """

    def __init__(self, stops: Sequence[str] = ()):
        # errors="ignore" drops bytes that never form a character, as create_completion does.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that can be sent now ('' if none)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            text, self._pending = self._pending[:cut], ""
            return text
        keep = self._held_back()
        text = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return text

    def finish(self) -> str:
        """The stream ended without a stop string: return whatever was held back."""
        if self.stopped:
            return ""
        text, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        return text

    def _first_stop(self) -> int | None:
        found = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest end of the pending text that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
