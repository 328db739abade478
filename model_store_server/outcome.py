"""What a request caused on the worker, whether its swap succeeded (a Lease) or not (SwapFailed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from model_swap.errors import ApiError
from model_swap.once import Once

NO_DECISION = "none"


@dataclass
class Outcome:
    """What one request caused on the worker; filled in step by step while its swap runs."""

    action: str = NO_DECISION
    evicted: tuple[str, ...] = ()
    decision_ms: float = 0.0
    worker_ms: float = 0.0
    transport: str = ""
    cached: list[str] = field(default_factory=list)

    @property
    def decided(self) -> bool:
        return self.action != NO_DECISION

    def headers(self) -> dict[str, str]:
        """The X-Cache-* headers that report this outcome."""
        return {
            "X-Cache-Action": self.action,
            "X-Cache-Evicted": ",".join(self.evicted),
            "X-Decision-Ms": f"{self.decision_ms:.2f}",
            "X-Worker-Ms": f"{self.worker_ms:.1f}",
            "X-Transport": self.transport,
        }


class SwapFailed(ApiError):
    """A swap that failed part-way: the error, plus what the request had caused (in its headers, once decided)."""

    def __init__(self, err: ApiError, outcome: Outcome):
        headers = dict(err.headers, **(outcome.headers() if outcome.decided else {}))
        super().__init__(err.status, err.code, err.message, headers, param=err.param, details=err.details)
        self.outcome = outcome


class Lease:
    """A request's hold on the loaded model; release() when its stream ends (idempotent)."""

    def __init__(self, outcome: Outcome, on_release: Callable[[], None]):
        self.outcome = outcome
        self.release = Once(on_release)
