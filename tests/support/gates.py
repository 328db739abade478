"""Gates for a decode loop's on_step hook: the test, not the machine's speed, decides when steps run."""

from __future__ import annotations

import threading


class Gate:
    """An on_step callback that holds the decode loop after each step until opened: steps on demand.

    It takes BatchedModel's on_step(info) and ModelRegistry's on_step(name, info) alike and keeps
    each step's StepInfo in `infos`.
    """

    def __init__(self):
        self._open = threading.Event()
        self.infos: list = []

    @property
    def steps(self) -> int:
        return len(self.infos)

    def __call__(self, *args) -> None:
        self.infos.append(args[-1])
        if not self._open.wait(timeout=30):
            self._open.set()  # a test that failed before opening must not hang close()

    def open(self) -> None:
        self._open.set()
