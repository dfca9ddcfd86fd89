"""serving/coalesce.py: the router ingress's coalescing, with a fake deployment call (no Ray)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving.coalesce import Coalescer


class FakeDeployment:
    """Answers each row with its own first value times 10, after `delay_s`; records the calls."""

    def __init__(self, delay_s: float = 0.01, fail: BaseException | None = None):
        self.delay_s, self.fail = delay_s, fail
        self.calls: list[tuple[str, int]] = []
        self.outstanding = self.max_outstanding = 0

    async def __call__(self, target: str, x: np.ndarray) -> np.ndarray:
        self.calls.append((target, len(x)))
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail is not None:
                raise self.fail
            return x[:, :1] * 10
        finally:
            self.outstanding -= 1


def rows(value: float, count: int = 1) -> np.ndarray:
    return np.full((count, 4), value, dtype=np.float32)


def test_a_lone_request_is_sent_at_once_and_alone():
    async def run():
        deployment = FakeDeployment()
        coalescer = Coalescer(deployment, max_rows=32)
        answer = await coalescer("a", rows(1.0))
        return deployment, coalescer, answer

    deployment, coalescer, answer = asyncio.run(run())
    assert deployment.calls == [("a", 1)] and answer.tolist() == [[10.0]]
    assert coalescer.stats()["mean_requests_per_call"] == 1.0


def test_concurrent_requests_share_calls_and_each_gets_its_own_rows():
    async def run():
        deployment = FakeDeployment(delay_s=0.02)
        coalescer = Coalescer(deployment, max_rows=32, max_in_flight=2)
        answers = await asyncio.gather(*(coalescer("a", rows(float(i), count=1 + i % 3)) for i in range(40)))
        return deployment, answers

    deployment, answers = asyncio.run(run())
    for i, answer in enumerate(answers):
        assert answer.tolist() == [[10.0 * i]] * (1 + i % 3)  # its own rows, in order
    # Two sent at once, the other 38 waited and went together: far fewer calls than requests,
    # none larger than max_rows, and never more than two outstanding.
    assert len(deployment.calls) <= 6 and all(size <= 32 for _, size in deployment.calls)
    assert deployment.max_outstanding == 2
    assert sum(size for _, size in deployment.calls) == sum(1 + i % 3 for i in range(40))


def test_targets_are_coalesced_separately():
    async def run():
        deployment = FakeDeployment()
        coalescer = Coalescer(deployment, max_rows=32, max_in_flight=1)
        await asyncio.gather(*(coalescer(target, rows(1.0)) for target in "abab"))
        return deployment

    deployment = asyncio.run(run())
    assert sorted(deployment.calls) == [("a", 1), ("a", 1), ("b", 1), ("b", 1)]


def test_a_failed_call_fails_each_of_its_callers_and_the_next_call_goes_out():
    async def run():
        failing = FakeDeployment(fail=RuntimeError("replica died"))
        coalescer = Coalescer(failing, max_rows=32, max_in_flight=1)
        results = await asyncio.gather(*(coalescer("a", rows(1.0)) for _ in range(5)), return_exceptions=True)
        failing.fail = None
        after = await coalescer("a", rows(2.0))
        return results, after

    results, after = asyncio.run(run())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert after.tolist() == [[20.0]]  # nothing stuck: the slot was given back


def test_a_caller_that_gave_up_is_not_sent():
    async def run():
        deployment = FakeDeployment(delay_s=0.05)
        coalescer = Coalescer(deployment, max_rows=32, max_in_flight=1)
        first = asyncio.ensure_future(coalescer("a", rows(1.0)))
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(coalescer("a", rows(2.0)))
        await asyncio.sleep(0)
        waiting.cancel()
        await first
        await asyncio.sleep(0.01)
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return deployment

    deployment = asyncio.run(run())
    assert deployment.calls == [("a", 1)]
