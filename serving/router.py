"""Choosing a model deployment for each request: spillover, round_robin, least_loaded.

The ingress keeps its own count of requests in flight to each deployment (incremented before the
handle call, decremented when it returns) and asks `Router.order()` for the deployments to try,
best first. The next one in the order is tried when a deployment refuses (Serve's back-pressure or
the batcher's shedding), so a refusal spills over instead of failing.

- spillover:    the first deployment (e.g. torch on the GPU) while its in-flight count is below
                `spill_threshold`, else the next one below it, in config order; when every one is
                at the threshold, the least loaded first.
- round_robin:  deployments in turn.
- least_loaded: fewest in flight first (ties in config order).

In-flight counts are per ingress replica, not global: with N ingress replicas a deployment sees up
to N * spill_threshold before every ingress spills. That is a deliberate trade: asking the
replicas for their queue lengths would add a round trip per request to save a few requests.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

POLICIES = ("spillover", "round_robin", "least_loaded")


class Router:
    def __init__(self, names: Sequence[str], policy: str = "spillover", spill_threshold: int = 32):
        if not names:
            raise ValueError("a router needs at least one deployment name")
        if policy not in POLICIES:
            raise ValueError(f"router policy '{policy}' is not one of {', '.join(POLICIES)}")
        self.names = list(names)
        self.policy = policy
        self.spill_threshold = spill_threshold
        self.in_flight = {name: 0 for name in self.names}
        self.served = {name: 0 for name in self.names}
        self.spilled = 0
        self._turn = itertools.cycle(range(len(self.names)))

    def order(self) -> list[str]:
        """Deployments to try for the next request, best first."""
        if self.policy == "round_robin":
            start = next(self._turn)
            return self.names[start:] + self.names[:start]
        if self.policy == "least_loaded":
            return sorted(self.names, key=lambda n: self.in_flight[n])
        below = [n for n in self.names if self.in_flight[n] < self.spill_threshold]
        above = sorted((n for n in self.names if n not in below), key=lambda n: self.in_flight[n])
        return below + above

    def started(self, name: str) -> None:
        self.in_flight[name] += 1

    def finished(self, name: str, served: bool) -> None:
        self.in_flight[name] -= 1
        if served:
            self.served[name] += 1
            if name != self.names[0]:
                self.spilled += 1

    def stats(self) -> dict[str, object]:
        return {"policy": self.policy, "in_flight": dict(self.in_flight), "served": dict(self.served), "spilled": self.spilled}
