"""The router ingress's failover, without Ray Serve: fake deployments as coroutines.

A refusal spills to the next deployment; a lost replica marks its deployment down, the request is
resent, and a probe brings the deployment back; a model's own error is never resent.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving import failover
from serving.batching import Overloaded
from serving.failover import Failover, ReplicaLost
from serving.router import Router

X = np.zeros((1, 4), dtype=np.float32)


def deployments(behaviour: dict[str, list[str]]):
    """call/probe coroutines over scripted outcomes per deployment: 'ok', 'refuse', 'die', 'hang', 'bug'."""
    calls: list[str] = []
    up = {name: True for name in behaviour}

    async def call(target: str, x: np.ndarray) -> np.ndarray:
        calls.append(target)
        outcome = behaviour[target].pop(0) if behaviour[target] else "ok"
        if outcome == "refuse":
            raise Overloaded(f"{target} is full", 0.5)
        if outcome == "die":
            up[target] = False
            raise ReplicaLost("down", f"{target}'s replica died")
        if outcome == "hang":
            await asyncio.sleep(60)
        if outcome == "bug":
            raise ValueError("the model failed")
        return np.full((len(x), 2), ord(target[0]), dtype=np.float32)

    async def probe(target: str) -> dict:
        if not up[target]:
            raise ReplicaLost("down", "its replacement is still starting")
        return {"deployment": target}

    return call, probe, calls, up


def send(fail: Failover, router: Router) -> tuple[np.ndarray, str]:
    return asyncio.run(fail.send(X, router))


def test_a_refusal_spills_to_the_next_deployment_and_all_refusing_is_a_503():
    call, probe, calls, up = deployments({"gpu": ["refuse"], "cpu": []})
    logits, served_by = send(Failover(call, probe), Router(["gpu", "cpu"]))
    assert served_by == "cpu" and calls == ["gpu", "cpu"] and logits[0, 0] == ord("c")

    call, probe, _, _ = deployments({"gpu": ["refuse"], "cpu": ["refuse"]})
    with pytest.raises(Overloaded, match=r"every deployment refused the request \(gpu, cpu\)") as refused:
        send(Failover(call, probe), Router(["gpu", "cpu"]))
    assert refused.value.retry_after_s == 0.5


def test_a_lost_replica_is_resent_marked_down_and_probed_back_up(monkeypatch):
    monkeypatch.setattr(failover, "PROBE_EVERY_S", 0.01)
    call, probe, calls, up = deployments({"gpu": ["die"], "cpu": []})
    fail = Failover(call, probe)
    router = Router(["gpu", "cpu"])

    async def scenario() -> list[str]:
        _, first = await fail.send(X, router)
        down_after_loss = fail.is_down("gpu")
        _, second = await fail.send(X, router)  # gpu is down: cpu first
        up["gpu"] = True  # the replacement replica is ready: the next probe finds it
        for _ in range(100):
            if not fail.is_down("gpu"):
                break
            await asyncio.sleep(0.01)
        _, third = await fail.send(X, router)
        return [first, str(down_after_loss), second, third]

    assert asyncio.run(scenario()) == ["cpu", "True", "cpu", "gpu"]
    assert calls == ["gpu", "cpu", "cpu", "gpu"]
    assert fail.retries["total"] == 1 and fail.retries["marked_down"] == {"gpu": 1}
    assert fail.retries["by_error"] == {"ReplicaLost:down": 1}


def test_it_gives_up_after_the_retry_budget_with_a_503(monkeypatch):
    monkeypatch.setattr(failover, "RETRY_BACKOFF_S", 0.001)
    call, probe, calls, up = deployments({"cpu": ["die"] * 10})
    fail = Failover(call, probe)
    with pytest.raises(Overloaded, match="replicas were lost under this request 4 times"):
        send(fail, Router(["cpu"]))
    assert len(calls) == failover.REPLICA_RETRIES + 1 and fail.retries["gave_up"] == 1


def test_an_answer_that_never_comes_counts_as_a_lost_replica(monkeypatch):
    monkeypatch.setattr(failover, "ATTEMPT_TIMEOUT_S", 0.05)
    call, probe, calls, up = deployments({"gpu": ["hang"], "cpu": []})
    fail = Failover(call, probe)
    _, served_by = send(fail, Router(["gpu", "cpu"]))
    assert served_by == "cpu" and fail.retries["by_error"] == {"ReplicaLost:timeout": 1}


def test_a_model_error_is_not_resent():
    call, probe, calls, up = deployments({"gpu": ["bug"], "cpu": []})
    with pytest.raises(ValueError, match="the model failed"):
        send(Failover(call, probe), Router(["gpu", "cpu"]))
    assert calls == ["gpu"]
