"""Admission on arrival: refuse a request at once when it would miss the latency target.

    gate = Admission(target_p99_ms=50)
    ticket = gate.enter()          # raises Overloaded (HTTP 503 + Retry-After) when it would be late
    try: ... answer ...
    finally: gate.leave(ticket, answered=True)

Why: Serve lets max_ongoing_requests into a replica and queues max_queued_requests more for a
slot, and the adaptive batcher sees a request only after Serve, the HTTP parsing and the JSON
decoding have had it. Under overload every admitted request waits behind everything in the replica
(Little's law: latency = requests inside / rate served). Measured before this gate
(tests/reliability/test_serving_overload.py, 64 ongoing + 32 queued, ~500 answers/s): accepted
p99 724 ms against a 50 ms target, although the batcher itself kept its own queue in time.

The rule
--------
- Every answered request leaves a sample: its time in the handler divided by the requests that
  were in the handler when it arrived (itself included): the cost of one request at that load.
  Batching makes that cost fall as the load rises, so the estimate is the median of the last
  `window` samples (recent, and robust to one slow GC pause).
- A new request is admitted when (in_flight + 1) x cost <= budget, budget = `fraction` x
  target_p99. The rest of the target is left for time outside the handler (HAProxy, the socket,
  Serve's own queue) and for the spread between a median and a p99.
- Fewer than `min_in_flight` requests inside are always admitted (the app uses one full batch:
  serving.settings.admission_floor): batching needs requests together, a replica with little work never
  refuses, and the estimate stays fed after a burst. The floor also stops a spiral: refusals
  cost the replica time too, which slows the admitted requests, which raises the cost estimate,
  which refuses more (seen in a unit test with a floor of 2 and clients retrying every 5 ms: 284
  answers against 48,000 refusals in 1.5 s). Measured in the fault test before this floor
  (8 clients on a machine busy starting a replacement replica, 6-8 ms per request): a floor of 2
  refused a quarter of that ordinary load.
- A refusal is `Overloaded` carrying how far past the budget the request would finish; HTTP sends
  that as Retry-After in whole seconds, so in practice 1 s (RFC 9110 has no finer unit).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from statistics import median

from serving.batching import Overloaded

ADMIT_FRACTION = 0.3
MIN_IN_FLIGHT = 2


class Admission:
    """Counts the requests inside one replica's handler and refuses those predicted to be late."""

    def __init__(
        self,
        target_p99_ms: float,
        *,
        fraction: float = ADMIT_FRACTION,
        min_in_flight: int = MIN_IN_FLIGHT,
        window: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ):
        if target_p99_ms <= 0:
            raise ValueError(f"target_p99_ms must be positive, got {target_p99_ms}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.budget_s = fraction * target_p99_ms / 1000
        self.min_in_flight = max(1, min_in_flight)
        self.clock = clock
        self.in_flight = 0
        self.max_in_flight = 0
        self.admitted = 0
        self.refused = 0
        self._costs: deque[float] = deque(maxlen=window)
        self._cost_s: float | None = None  # median of _costs, refreshed every few samples
        self._samples = 0

    def cost_s(self) -> float | None:
        """Seconds one more request adds to the wait, at the recent load (None before any sample)."""
        return self._cost_s

    def predicted_s(self) -> float:
        """Predicted time in the handler of a request arriving now."""
        return (self.in_flight + 1) * (self._cost_s or 0.0)

    def enter(self) -> tuple[float, int]:
        """Admit a request (a ticket for `leave`) or raise Overloaded."""
        if self.in_flight >= self.min_in_flight and self._cost_s is not None:
            predicted = self.predicted_s()
            if predicted > self.budget_s:
                self.refused += 1
                raise Overloaded(
                    f"overloaded: {self.in_flight} requests are in this replica and one more would take about "
                    f"{1000 * predicted:.0f} ms, past its {1000 * self.budget_s:.0f} ms share of the latency target "
                    "(serving.batching.target_p99_ms); retry later",
                    retry_after_s=predicted - self.budget_s,
                )
        self.in_flight += 1
        self.admitted += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return self.clock(), self.in_flight

    def leave(self, ticket: tuple[float, int], answered: bool) -> None:
        """The request is done; an answered one's cost becomes a sample (refusals and errors are not
        the work being predicted)."""
        self.in_flight -= 1
        if not answered:
            return
        arrived, inside = ticket
        self._costs.append((self.clock() - arrived) / inside)
        self._samples += 1
        # The median of 256 floats costs tens of microseconds; every 8th sample keeps it fresh enough.
        if self._samples < 8 or self._samples % 8 == 0:
            self._cost_s = median(self._costs)

    def stats(self) -> dict[str, float]:
        return {
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "admitted": self.admitted,
            "refused": self.refused,
            "cost_ms": 1000 * self._cost_s if self._cost_s is not None else -1.0,
            "budget_ms": 1000 * self.budget_s,
        }
