"""What a request (or an admin action) caused on the worker, filled in as its change goes.

The executor writes it step by step, so a request that fails part-way still reports what it
did: the response headers and the request's log line read the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Outcome:
    """What one request caused on the worker; filled in as the change goes, so errors report it too."""

    action: str | None = None  # None until a decision was made
    evicted: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    decision_ms: float = 0.0
    worker_ms: float = 0.0
    queue_ms: float = 0.0
    transport: str = ""
    cached: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    worker: str = ""  # the worker it went to
    placement: str = ""  # the placement rule that chose it
    placement_ms: float = 0.0  # choosing the worker, before the worker's own plan (decision_ms)

    @property
    def decided(self) -> bool:
        return self.action is not None

    def headers(self) -> dict[str, str]:
        """The X-Cache-* headers that report this outcome."""
        return {
            "X-Cache-Action": self.action or "",
            "X-Cache-Evicted": ",".join(self.evicted),
            "X-Cache-Unloaded": ",".join(self.unloaded),
            "X-Decision-Ms": f"{self.decision_ms:.2f}",
            "X-Worker-Ms": f"{self.worker_ms:.1f}",
            "X-Queue-Ms": f"{max(0.0, self.queue_ms):.1f}",
            "X-Transport": self.transport,
            "X-Worker": self.worker,
            "X-Placement-Ms": f"{self.placement_ms:.3f}",
        }

    def sse_comment(self) -> str:
        """The same report as an SSE comment, for a stream whose status line went out before the decision."""
        return (f": x-cache-action={self.action or ''} evicted={','.join(self.evicted)} "
                f"unloaded={','.join(self.unloaded)} worker_ms={self.worker_ms:.1f} worker={self.worker}\n\n")
