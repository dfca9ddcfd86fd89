"""The adaptive batcher with a plain Python function as the model (no Ray, no engine)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serving.batching import AdaptiveBatcher, BatcherSettings, Overloaded, ServiceTimeModel

FIXED_MS = 4.0
PER_EXAMPLE_MS = 0.1


def slow_model(x: np.ndarray) -> np.ndarray:
    """A fake model with a fixed cost per batch plus a cost per example: t(b) = 0.1 ms * b + 4 ms."""
    time.sleep((FIXED_MS + PER_EXAMPLE_MS * x.shape[0]) / 1000)
    return np.stack([x.sum(axis=1), -x.sum(axis=1)], axis=1).astype(np.float32)


def example(value: float) -> np.ndarray:
    return np.full((1, 4), value, dtype=np.float32)


async def closed_loop(batcher: AdaptiveBatcher, clients: int, requests_each: int) -> list[float]:
    latencies: list[float] = []

    async def client(cid: int) -> None:
        for i in range(requests_each):
            value = float(cid * 1000 + i)
            start = time.perf_counter()
            out = await batcher.submit(example(value))
            latencies.append(time.perf_counter() - start)
            assert out.shape == (1, 2) and out[0, 0] == pytest.approx(4 * value)

    await asyncio.gather(*(client(c) for c in range(clients)))
    return latencies


def test_concurrent_load_makes_batches_larger_than_one():
    async def main():
        batcher = AdaptiveBatcher(slow_model, BatcherSettings(max_batch_size=32, target_p99_ms=100))
        batcher.calibrate(example(0)[0])
        await closed_loop(batcher, clients=16, requests_each=10)
        stats = batcher.stats()
        await batcher.close()
        return stats

    stats = asyncio.run(main())
    assert stats["requests"] == 160
    assert stats["mean_batch_size"] > 4, stats
    assert stats["shed"] == 0


def test_sequential_caller_gets_batch_size_one_and_no_added_wait():
    """One caller at a time: the adaptive batcher plans no wait, so it answers sooner than the fixed
    policy (wait up to max_wait_ms for company), measured side by side in the same run."""

    async def run(settings: BatcherSettings):
        batcher = AdaptiveBatcher(slow_model, settings)
        batcher.calibrate(example(0)[0])
        latencies = await closed_loop(batcher, clients=1, requests_each=40)
        stats = batcher.stats()
        await batcher.close()
        return stats, latencies

    adaptive, adaptive_latencies = asyncio.run(run(BatcherSettings(max_batch_size=32, target_p99_ms=100)))
    fixed, fixed_latencies = asyncio.run(run(BatcherSettings(max_batch_size=32, adaptive=False, max_wait_ms=5.0)))
    assert adaptive["mean_batch_size"] == fixed["mean_batch_size"] == 1.0
    assert adaptive["planned_wait_ms"] == 0.0 and fixed["planned_wait_ms"] > 0.0, (adaptive, fixed)
    # The queue wait is only the event-loop hop, where the fixed policy waits out its window alone.
    assert adaptive["mean_queue_wait_ms"] < fixed["mean_queue_wait_ms"], (adaptive, fixed)
    assert float(np.median(adaptive_latencies)) < float(np.median(fixed_latencies))


def test_outputs_return_to_their_callers_in_fifo_order():
    async def main():
        batcher = AdaptiveBatcher(slow_model, BatcherSettings(max_batch_size=8))
        results = await asyncio.gather(*(batcher.submit(example(v)) for v in range(20)))
        order = list(batcher.counters.recent_sizes)
        await batcher.close()
        return results, order

    results, sizes = asyncio.run(main())
    assert [float(r[0, 0]) for r in results] == [4.0 * v for v in range(20)]
    assert sum(sizes) == 20 and max(sizes) <= 8


def test_overloaded_queue_sheds_requests_that_would_miss_the_deadline():
    def fixed_20ms(x: np.ndarray) -> np.ndarray:
        time.sleep(0.02)
        return np.zeros((x.shape[0], 2), dtype=np.float32)

    async def main():
        settings = BatcherSettings(max_batch_size=2, target_p99_ms=60, max_queued=4)
        batcher = AdaptiveBatcher(fixed_20ms, settings)
        batcher.calibrate(example(0)[0], repeats=1)
        outcomes = await asyncio.gather(*(batcher.submit(example(v)) for v in range(40)), return_exceptions=True)
        await batcher.close()
        return outcomes, batcher.stats()

    outcomes, stats = asyncio.run(main())
    shed = [o for o in outcomes if isinstance(o, Overloaded)]
    served = [o for o in outcomes if isinstance(o, np.ndarray)]
    assert shed and served, stats
    assert len(shed) + len(served) == 40
    assert stats["shed"] == len(shed)
    assert all(o.retry_after_s > 0 for o in shed)
    assert "queued" in str(shed[0]) and "retry" in str(shed[0])
    # Only requests over the queue limit are shed: the first max_queued are always accepted.
    assert all(isinstance(o, np.ndarray) for o in outcomes[:4])


def test_a_long_queue_that_drains_in_time_is_not_shed():
    def fast(x: np.ndarray) -> np.ndarray:
        return np.zeros((x.shape[0], 2), dtype=np.float32)

    async def main():
        batcher = AdaptiveBatcher(fast, BatcherSettings(max_batch_size=32, target_p99_ms=1000, max_queued=2))
        batcher.calibrate(example(0)[0], repeats=1)
        outcomes = await asyncio.gather(*(batcher.submit(example(v)) for v in range(64)), return_exceptions=True)
        await batcher.close()
        return outcomes

    assert all(isinstance(o, np.ndarray) for o in asyncio.run(main()))


def test_waits_only_when_arrivals_are_denser_than_the_fixed_cost():
    now = [100.0]
    batcher = AdaptiveBatcher(slow_model, BatcherSettings(max_batch_size=32, target_p99_ms=50), clock=lambda: now[0])
    batcher.model.slope, batcher.model.intercept = 0.0001, 0.004  # c = 4 ms

    def queue(k: int, gap_s: float) -> None:
        batcher._queue.clear()
        batcher._queue.extend(_pending(now[0]) for _ in range(k))
        batcher._queued_examples = k
        batcher._gap_s = gap_s

    queue(1, gap_s=0.010)  # next arrival in 10 ms > c / 1: go now
    assert batcher._planned_wait(now[0]) == 0.0
    queue(1, gap_s=0.001)  # 1 ms < 4 ms: wait, for at most two gaps
    assert batcher._planned_wait(now[0]) == pytest.approx(0.002)
    queue(8, gap_s=0.001)  # 1 ms > 4 ms / 8: the queue already amortises c
    assert batcher._planned_wait(now[0]) == 0.0
    queue(32, gap_s=0.0001)  # full batch: go
    assert batcher._planned_wait(now[0]) == 0.0
    queue(1, gap_s=0.001)  # the oldest would miss its deadline by waiting: go
    batcher._queue[0].arrival = now[0] - 0.049
    assert batcher._planned_wait(now[0]) == 0.0


def test_fixed_policy_waits_for_max_wait_after_the_oldest():
    now = [10.0]
    batcher = AdaptiveBatcher(slow_model, BatcherSettings(max_batch_size=32, adaptive=False, max_wait_ms=5), clock=lambda: now[0])
    batcher._queue.append(_pending(now[0] - 0.002))
    batcher._queued_examples = 1
    assert batcher._planned_wait(now[0]) == pytest.approx(0.003)


def test_batch_cap_keeps_the_target_reachable_on_a_slow_model():
    batcher = AdaptiveBatcher(slow_model, BatcherSettings(max_batch_size=64, target_p99_ms=20))
    batcher.model.slope, batcher.model.intercept = 0.001, 0.002  # t(b) = 1 ms * b + 2 ms
    assert batcher.batch_cap() == 8  # 2 * t(8) = 20 ms
    batcher.model.slope = 0.00001
    assert batcher.batch_cap() == 64


def test_service_time_fit_is_robust_to_outliers():
    model = ServiceTimeModel()
    rng = np.random.default_rng(0)
    for _ in range(10):
        for b in (1, 8, 32):
            model.observe(b, 0.0002 * b + 0.003 + rng.normal(0, 1e-5))
    model.observe(8, 0.5)  # one GC pause
    assert model.slope == pytest.approx(0.0002, rel=0.05)
    assert model.intercept == pytest.approx(0.003, rel=0.05)


def test_model_error_reaches_every_caller_of_the_batch_and_the_batcher_keeps_serving():
    calls = {"n": 0}

    def flaky(x: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return np.zeros((x.shape[0], 2), dtype=np.float32)

    async def main():
        batcher = AdaptiveBatcher(flaky, BatcherSettings(max_batch_size=8))
        first = await asyncio.gather(batcher.submit(example(1)), return_exceptions=True)
        second = await batcher.submit(example(2))
        await batcher.close()
        return first, second

    first, second = asyncio.run(main())
    assert isinstance(first[0], RuntimeError)
    assert second.shape == (1, 2)


def test_a_request_larger_than_the_batch_runs_alone_in_chunks():
    sizes: list[int] = []

    def record(x: np.ndarray) -> np.ndarray:
        sizes.append(x.shape[0])
        return np.zeros((x.shape[0], 2), dtype=np.float32)

    async def main():
        batcher = AdaptiveBatcher(record, BatcherSettings(max_batch_size=4))
        out = await batcher.submit(np.zeros((10, 4), dtype=np.float32))
        await batcher.close()
        return out

    assert asyncio.run(main()).shape == (10, 2)
    assert sizes == [4, 4, 2]


def test_settings_name_the_bad_value():
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, got 0"):
        BatcherSettings(max_batch_size=0)


def _pending(arrival: float):
    from serving.batching import _Pending

    loop = asyncio.new_event_loop()
    try:
        return _Pending(example(0), arrival, loop.create_future())
    finally:
        loop.close()


def test_contention_on_clustered_batch_sizes_scales_the_calibrated_line_instead_of_flattening_it():
    """Under steady load the sizes sit near the cap and every batch is stretched alike (GIL,
    event loop): the slope must not collapse to 0, t(b) must follow the stretch."""
    model = ServiceTimeModel()
    for b in (1, 16, 32):
        model.observe(b, 0.0003 * b + 0.001)  # alone: 0.3 ms per example + 1 ms
    model.calibrated()
    rng = np.random.default_rng(0)
    for _ in range(128):
        b = int(rng.integers(24, 33))
        model.observe(b, 1.6 * (0.0003 * b + 0.001) * rng.normal(1, 0.05))  # 1.6x, 5% noise
    assert model.factor == pytest.approx(1.6, rel=0.05)
    assert model.slope == pytest.approx(1.6 * 0.0003, rel=0.05)
    assert model.predict(32) == pytest.approx(1.6 * (0.0003 * 32 + 0.001), rel=0.05)
    # Without the calibrated shape the same data fit freely (and learn little about the slope).
    free = ServiceTimeModel()
    for b, t in list(model._recent):
        free.observe(b, t)
    assert free.shape is None and free.factor == 1.0
