"""Coalescing in the router ingress: the examples of concurrent requests for one deployment go to
it in one handle call.

Why: a DeploymentHandle call costs the ingress and the model replica about a millisecond of CPU
each (serialization, Ray's actor call, Serve's replica choice), whatever its size, while the
model replica's batcher would have put those requests in one forward anyway. Sending every HTTP
request as its own call made the router shape cost several times the single-deployment shape per
request (docs/benchmarks.md, "Serving hot path").

How: at most `max_in_flight` calls per deployment are outstanding (the router: one per
replica). A request that finds a free slot is sent at once (at low load nothing waits); one that
finds them all busy waits with the others, and they go together, up to `max_rows` examples, as
soon as a call returns. So the coalesced size follows the load the way the replica's batcher
does, with no timer. Each caller gets its own rows of the answer, or the call's exception (the
failover above resends it).

Pure asyncio and numpy: no Ray here, unit-tested with a fake call.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

Call = Callable[[str, np.ndarray], Awaitable[np.ndarray]]


class Coalescer:
    """`await coalescer(target, x)`: `call(target, rows)` shared with concurrent callers."""

    def __init__(self, call: Call, max_rows: int, max_in_flight: int = 2, per_target: dict[str, int] | None = None):
        """max_in_flight: outstanding calls per target; per_target overrides it by target (the
        router gives each deployment one per replica)."""
        self.call = call
        self.max_rows = max_rows
        self.max_in_flight = max_in_flight
        self.per_target = dict(per_target or {})
        self.pending: dict[str, deque[tuple[np.ndarray, asyncio.Future]]] = defaultdict(deque)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.calls = 0
        self.requests = 0
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, target: str, x: np.ndarray) -> np.ndarray:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pending[target].append((x, future))
        self.requests += 1
        if self.in_flight[target] < self.per_target.get(target, self.max_in_flight):
            self._send_pending(target)
        return await future

    def _send_pending(self, target: str) -> None:
        """Take waiting requests (whole, up to max_rows examples; always at least one) into one call."""
        queue = self.pending[target]
        taken: list[tuple[np.ndarray, asyncio.Future]] = []
        rows = 0
        while queue and (not taken or rows + len(queue[0][0]) <= self.max_rows):
            x, future = queue.popleft()
            if future.done():  # its caller gave up (failover timeout, client gone): nothing to send
                continue
            taken.append((x, future))
            rows += len(x)
        if not taken:
            return
        self.in_flight[target] += 1
        self.calls += 1
        task = asyncio.ensure_future(self._send(target, taken))
        self._tasks.add(task)  # a reference until done: the loop keeps only weak ones
        task.add_done_callback(self._tasks.discard)

    async def _send(self, target: str, taken: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        try:
            rows = taken[0][0] if len(taken) == 1 else np.concatenate([x for x, _ in taken])
            answer = await self.call(target, rows)
        except BaseException as exc:  # noqa: BLE001 (each caller gets the call's own exception)
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            start = 0
            for x, future in taken:
                if not future.done():
                    future.set_result(answer[start : start + len(x)])
                start += len(x)
        finally:
            self.in_flight[target] -= 1
            if self.pending[target]:
                self._send_pending(target)

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "calls": self.calls, "mean_requests_per_call": self.requests / self.calls if self.calls else 0.0}
