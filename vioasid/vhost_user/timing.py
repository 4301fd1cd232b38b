"""Where the back-end's time goes: per-phase wall-clock sums of the data path (docs/performance.md).

Always on (a ``perf_counter`` pair per phase costs well under a microsecond): the bench and the
guest runs' summaries read :meth:`PhaseTimes.to_json`. Phases, per request: ``pop`` (avail index
and descriptor walk, ring pages translated), ``translate`` (the data buffers' pages), ``io``
(``preadv``/``pwritev``), ``push`` (status byte, used element and index), ``call`` (the call
eventfd); per front-end message: ``message`` (``recvmsg`` → handled → reply sent) and
``between_messages`` (one message answered → the next one read, when under 5 ms: in strict mode
the rest of an invalidation round trip — QEMU, the guest and both processes' wake-ups); and
``kick_to_run`` (a kick seen → its queue task running).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("kick_to_run", "pop", "translate", "io", "push", "call", "message", "between_messages")


@dataclass
class PhaseTimes:
    """Seconds and counts per phase, plus the span from the first to the last request."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    first_request: float | None = None
    last_request: float | None = None

    def add(self, phase: str, dt: float, n: int = 1) -> None:
        self.seconds[phase] += dt
        self.counts[phase] += n

    def request_at(self, t: float) -> None:
        if self.first_request is None:
            self.first_request = t
        self.last_request = t

    def to_json(self) -> dict[str, object]:
        span = (
            (self.last_request - self.first_request)
            if self.first_request is not None and self.last_request is not None
            else 0.0
        )
        busy = sum(self.seconds[p] for p in PHASES if p not in ("kick_to_run", "between_messages"))
        return {
            "span_s": round(span, 4),
            "busy_s": round(busy, 4),
            "phases": {
                p: {
                    "s": round(self.seconds[p], 4),
                    "n": self.counts[p],
                    "us_each": round(1e6 * self.seconds[p] / self.counts[p], 1)
                    if self.counts[p]
                    else 0.0,
                }
                for p in PHASES
            },
        }


def merged(a: PhaseTimes, b: PhaseTimes) -> PhaseTimes:
    """``a`` plus the phase sums of ``b`` (a thread's own counters); ``a``'s request span."""
    out = PhaseTimes(dict(a.seconds), dict(a.counts), a.first_request, a.last_request)
    for p in PHASES:
        out.seconds[p] += b.seconds[p]
        out.counts[p] += b.counts[p]
    return out
