"""Failover in the router ingress: resending a request whose model replica was lost, and marking a
deployment down until a probe finds it answering again.

`Failover(call, probe, metrics)` takes the two coroutines it needs (a handle call to a deployment,
a cheap probe of one) so it runs, and is unit-tested, without Ray Serve: like the batcher, the
policy is here and serving/app.py only wires it to DeploymentHandles.

A model replica that dies mid-request (killed, out of memory, node lost) fails the ingress's
handle call. A prediction is a pure function of its input, so the ingress sends it again: to the
next deployment in the router's order first, then to the same one (Serve has by then marked the
dead replica and picks another replica or its replacement). Bounded, with a short doubling
backoff: a request that keeps losing its replica answers 503 rather than waiting on.

A deployment whose last replica died has nothing to answer with until Serve's replacement is up
(tens of seconds on a loaded 2-core machine: process start, model load, calibration), and Serve's
router holds requests for it meanwhile instead of failing them. So a death marks the deployment
down: calls waiting on it are abandoned and resent, and it gets no new requests (unless every
other deployment refuses) until a probe answers. An attempt that takes longer than
ATTEMPT_TIMEOUT_S is treated the same way: Serve answers back-pressure within milliseconds and the
batcher sheds at its latency target, so an answer this late means no live replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from serving.batching import Overloaded
from serving.router import Router

logger = logging.getLogger("tandem.serving")

REPLICA_RETRIES = 3
RETRY_BACKOFF_S = 0.05
ATTEMPT_TIMEOUT_S = 5.0
PROBE_EVERY_S = 0.5


class ReplicaLost(RuntimeError):
    """The ingress abandoned a call: its deployment went down ("down"), or no answer came in time ("timeout")."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def retry_after(exc: BaseException) -> float | None:
    """Retry-After seconds when exc is a refusal (batcher shedding or Serve back-pressure), else None."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = getattr(exc, "cause", None)  # a RayTaskError from a handle call carries the replica's exception
    if isinstance(cause, Overloaded):
        exc = cause
    if isinstance(exc, Overloaded):
        return exc.retry_after_s
    if isinstance(exc, BackPressureError):
        return exc.retry_after_s or 1.0
    if isinstance(exc, DeploymentUnavailableError):
        return 1.0
    return None


def replica_died(exc: BaseException) -> bool:
    """Whether exc says the replica (not the request) failed: then the request is safe to resend.

    RayActorError covers ActorDiedError (the actor is gone) and ActorUnavailableError (Serve's
    gRPC transport reports a replica that stopped answering with it); ReplicaUnavailableError is
    Serve's own "the chosen replica left before the request was sent". A RayTaskError whose cause
    is an exception of the model (a user error) is none of these and is never retried.
    """
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    died = (RayActorError, ReplicaUnavailableError, ReplicaLost)
    return isinstance(exc, died) or isinstance(getattr(exc, "cause", None), died)


def empty_retries() -> dict[str, Any]:
    """The retry counters /v1/stats shows (all zero where there is no failover: one deployment)."""
    return {"total": 0, "gave_up": 0, "by_deployment": {}, "by_error": {}, "marked_down": {}}


def last_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[-1] if text else type(exc).__name__


class Failover:
    """Sends requests to model deployments in the router's order, resending those a lost replica dropped."""

    def __init__(
        self,
        call: Callable[[str, np.ndarray], Awaitable[np.ndarray]],
        probe: Callable[[str], Awaitable[Any]],
        metrics: Any = None,
    ):
        self.call = call
        self.probe = probe
        self.metrics = metrics
        # Requests resent because a model replica died, by deployment and by error, and those that
        # still failed after REPLICA_RETRIES (answered 503).
        self.retries = empty_retries()
        self._down: dict[str, asyncio.Event] = {}  # per deployment: an Event set while it is down
        self._probes: dict[str, asyncio.Task] = {}

    async def send(self, x: np.ndarray, router: Router) -> tuple[np.ndarray, str]:
        """Send x to the deployments in the router's order until one answers.

        A refusal (back-pressure, shedding) moves on to the next deployment; a replica lost under
        the request puts its deployment at the back of the queue and the request is resent (see
        REPLICA_RETRIES). Deployments that are down go last. Any other error is the model's and
        goes to the caller as it is.
        """
        refusals: list[tuple[str, float]] = []
        order = router.order()
        queue = [n for n in order if not self.is_down(n)] + [n for n in order if self.is_down(n)]
        deaths = 0
        while queue:
            target = queue.pop(0)
            router.started(target)
            served = False
            try:
                logits = await self._attempt(target, x)
                served = True
            except Exception as exc:
                if replica_died(exc):
                    self._mark_down(target)
                    if deaths == REPLICA_RETRIES:
                        self.retries["gave_up"] += 1
                        raise Overloaded(
                            f"unavailable: model replicas were lost under this request {deaths + 1} times ({target} last); retry later", 1.0
                        ) from exc
                    deaths += 1
                    self._note_retry(target, exc)
                    queue.append(target)
                    await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (deaths - 1))
                    continue
                retry = retry_after(exc)
                if retry is None:
                    raise
                refusals.append((target, retry))
                continue
            finally:
                router.finished(target, served)
            if target != router.names[0] and self.metrics is not None:
                self.metrics.spillover.inc(tags={"target": target})
            return logits, target
        names = ", ".join(name for name, _ in refusals)
        raise Overloaded(f"overloaded: every deployment refused the request ({names}); retry later", min(r for _, r in refusals))

    def is_down(self, name: str) -> bool:
        event = self._down.get(name)
        return event is not None and event.is_set()

    async def _attempt(self, target: str, x: np.ndarray) -> np.ndarray:
        """One call, abandoned (ReplicaLost) when the deployment goes down meanwhile or no answer
        comes within ATTEMPT_TIMEOUT_S."""
        down = self._down.setdefault(target, asyncio.Event())
        call = asyncio.ensure_future(self.call(target, x))
        # A call made while the deployment is down (every other one refused) only has the timeout.
        watch = asyncio.ensure_future(down.wait()) if not down.is_set() else None
        try:
            done, _ = await asyncio.wait(
                {call} | ({watch} if watch else set()), timeout=ATTEMPT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            if watch is not None:
                watch.cancel()
        if call in done:
            return call.result()
        call.cancel()
        if down.is_set():
            raise ReplicaLost("down", f"deployment {target} went down")
        raise ReplicaLost("timeout", f"deployment {target} gave no answer within {ATTEMPT_TIMEOUT_S:.0f} s")

    def _mark_down(self, target: str) -> None:
        down = self._down.setdefault(target, asyncio.Event())
        if down.is_set():
            return
        down.set()  # wakes every call waiting on this deployment: they are resent elsewhere
        self.retries["marked_down"][target] = self.retries["marked_down"].get(target, 0) + 1
        logger.warning("deployment %s marked down (a replica was lost); probing it every %.1f s", target, PROBE_EVERY_S)
        self._probes[target] = asyncio.ensure_future(self._probe_until_up(target))

    async def _probe_until_up(self, target: str) -> None:
        """Until a replica of target answers the probe, then mark it up (a fresh, unset Event)."""
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            try:
                await asyncio.wait_for(self.probe(target), timeout=ATTEMPT_TIMEOUT_S)
            except Exception:
                continue
            self._down[target] = asyncio.Event()
            self._probes.pop(target, None)
            logger.warning("deployment %s is up again", target)
            return

    def _note_retry(self, target: str, exc: BaseException) -> None:
        error = type(getattr(exc, "cause", None) or exc).__name__
        if isinstance(exc, ReplicaLost):
            error = f"{error}:{exc.reason}"
        self.retries["total"] += 1
        self.retries["by_deployment"][target] = self.retries["by_deployment"].get(target, 0) + 1
        self.retries["by_error"][error] = self.retries["by_error"].get(error, 0) + 1
        if self.retries["total"] == 1 or self.retries["total"] % 100 == 0:
            logger.warning("a replica of %s died under a request (%s); resent it (%d resent so far)", target, error, self.retries["total"])
        if self.metrics is not None:
            self.metrics.replica_retries.inc(tags={"target": target, "error": error})
