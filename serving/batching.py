"""Latency-aware adaptive batching inside one replica: pure asyncio, no Ray, unit-testable.

    batcher = AdaptiveBatcher(engine.predict, BatcherSettings(max_batch_size=32, target_p99_ms=50))
    logits = await batcher.submit(x)        # x: float32 (n, *input_shape); FIFO, batched with others

Why not `@serve.batch`: it waits a fixed `batch_wait_timeout_s` for every batch, so a lone request
pays the whole wait (on the fast path, 8.4 ms p50 at concurrency 1 against 2.4 ms unbatched), and
a short wait gives small batches under load. This batcher chooses, batch by batch, from what it
has measured.

The algorithm
-------------
1. Service time model. Every batch's forward time is recorded as (batch size b, seconds t). The
   model t(b) = a*b + c is a least-squares line through the *median* time of each batch size seen
   in the last `window` batches (medians: one GC pause or a noisy neighbour does not move the
   line). `calibrate()` runs sizes 1, max/2 and max at start, alone, so the first fit exists
   before the first request, and keeps that line's shape. When the window's sizes are too
   clustered for a line (under steady load they sit near the cap) the model keeps the calibrated
   shape and fits only a factor: contention stretches every batch about equally, and a free line
   through clustered sizes would learn "batch size is free" (slope 0).
2. One batch at a time. The replica is "free" when no forward pass is running; requests that
   arrive meanwhile queue first-in-first-out. Running the next batch as soon as the last one ends
   ("work conserving") already makes batches grow with the load: what arrived during one forward
   pass is the next batch.
3. Wait only when waiting pays. When the replica is free with k queued examples, waiting for one
   more arrival (expected after g seconds, an EWMA of inter-arrival gaps) raises throughput
   exactly when (k+1) / (g + t(k+1)) > k / t(k), which with the linear model is  g < c / k.
   So a lone request never waits (at concurrency 1 the next arrival only comes after the answer,
   g > t(1) >= c), and a queue under load waits only while arrivals are dense enough to amortise
   the fixed cost c. The wait never lasts longer than 2 g (the estimate may be stale: load stops),
   and never past the point where the oldest request would miss its deadline:
   arrival + target_p99 - t(next batch).
4. Batch size cap. A request may wait for one whole batch before its own runs, so the batch is
   capped at the largest b with 2 t(b) <= target_p99 (and at max_batch_size). On a fast model
   that is max_batch_size; on a slow one it keeps the target reachable.
5. Shedding. A request is refused with `Overloaded` (HTTP 503 with Retry-After) only when both
   hold: the queue is over `max_queued` requests, and the predicted finish time of the request
   (queue drained in capped batches) lies past its deadline. A long queue that still drains in
   time is served; a short queue is never shed.
6. Requests are never split across batches unless a single request exceeds the batch cap (it is
   then run alone, in cap-sized chunks). Forward passes run in one worker thread, so the event
   loop keeps accepting requests while the model computes (torch and onnxruntime release the GIL);
   when nothing is expected to arrive meanwhile (arrival gap > 2 t(b)) or the forward is shorter
   than the thread hand-off (t(b) < 0.2 ms), it runs inline on the loop instead.

`adaptive=False` gives the classic fixed policy (wait up to `max_wait_ms` after the oldest request,
or until the batch is full): the benchmark's static arm and an escape hatch.

Metrics: `stats()` returns batch sizes (last, mean), queue waits (last, mean), the current cap and
wait, the fitted a and c, queue depth (now and its high-water mark since start) and shed count;
the optional `on_batch` callback receives each batch's size, the requests' queue waits and the
forward time (the Serve app feeds Ray metrics).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from statistics import median

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]
INLINE_BELOW_S = 0.0002  # forward passes shorter than this run on the event loop (see _run_inline)
BatchCallback = Callable[[int, Sequence[float], float], None]


class Overloaded(RuntimeError):
    """The request would miss its deadline and the queue is over its limit: answer 503."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # survives pickling across a Serve handle call (default keeps args only)
        return (Overloaded, (str(self), self.retry_after_s))


@dataclass(frozen=True)
class BatcherSettings:
    max_batch_size: int = 32
    target_p99_ms: float = 50.0
    max_queued: int = 256
    adaptive: bool = True
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.target_p99_ms <= 0:
            raise ValueError(f"target_p99_ms must be positive, got {self.target_p99_ms}")
        if self.max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {self.max_queued}")


# A free line needs batch sizes that differ: their spread (standard deviation) must be at least
# this fraction of their mean, over at least MIN_SIZES distinct sizes. Under steady load the sizes
# cluster near the cap (say 22-32) and the least-squares slope through them is noise.
MIN_RELATIVE_SPREAD = 0.25
MIN_SIZES = 3


class ServiceTimeModel:
    """t(b) = slope * b + intercept, fitted on per-batch-size medians of the recent batches.

    With well-spread sizes the line is fitted freely. Otherwise, once `calibrated()` recorded the
    shape measured alone at start, only a factor is fitted: contention (the GIL, a busy event
    loop, the thread hand-off, a noisy neighbour) stretches every batch by about the same factor,
    and a free line through clustered sizes would learn "batch size is free" (slope 0)."""

    def __init__(self, window: int = 128, slope: float = 1e-4, intercept: float = 1e-3):
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)
        self.slope = slope
        self.intercept = intercept
        self.shape: tuple[float, float] | None = None  # (slope, intercept) measured alone
        self.factor = 1.0  # the recent batches' time over the shape's, when the shape is used

    def calibrated(self) -> None:
        """Keep the current fit as the shape of t(b) measured alone (calibrate() calls this)."""
        if self.slope > 0:
            self.shape = (self.slope, self.intercept)

    def observe(self, batch_size: int, seconds: float) -> None:
        self._recent.append((batch_size, seconds))
        self._fit()

    def predict(self, batch_size: int) -> float:
        return self.slope * batch_size + self.intercept

    def _fit(self) -> None:
        by_size: dict[int, list[float]] = {}
        for size, seconds in self._recent:
            by_size.setdefault(size, []).append(seconds)
        sizes = np.array(sorted(by_size), dtype=np.float64)
        times = np.array([median(by_size[int(s)]) for s in sizes])
        weights = np.array([len(by_size[int(s)]) for s in sizes], dtype=np.float64)
        if len(sizes) >= 2:
            # Weighted least squares on the medians; weights = how often each size was seen.
            mean_b = np.average(sizes, weights=weights)
            mean_t = np.average(times, weights=weights)
            spread = np.average((sizes - mean_b) ** 2, weights=weights)
            slope = float(np.average((sizes - mean_b) * (times - mean_t), weights=weights) / spread)
            well_spread = len(sizes) >= MIN_SIZES and np.sqrt(spread) >= MIN_RELATIVE_SPREAD * mean_b
            if slope > 0 and (well_spread or self.shape is None):
                self.slope = slope
                self.intercept = max(float(mean_t - slope * mean_b), 0.0)
                return
        if self.shape is not None:
            slope0, intercept0 = self.shape
            self.factor = float(median(t / (slope0 * b + intercept0) for b, t in self._recent))
            self.slope, self.intercept = self.factor * slope0, self.factor * intercept0
        elif len(sizes) == 1:
            # One size only (e.g. a sequential client): keep the slope, move the intercept.
            self.intercept = max(float(times[0] - self.slope * sizes[0]), 0.0)


@dataclass
class _Pending:
    x: np.ndarray
    arrival: float
    future: asyncio.Future

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


@dataclass
class _Counters:
    batches: int = 0
    examples: int = 0
    requests: int = 0
    wait_s_total: float = 0.0
    last_batch_size: int = 0
    last_wait_s: float = 0.0
    last_planned_wait_s: float = 0.0
    shed: int = 0
    max_queue_depth: int = 0
    forward_s_total: float = 0.0  # timed in the forward thread: GIL waits included, the hand-off not
    recent_sizes: deque = field(default_factory=lambda: deque(maxlen=256))


class AdaptiveBatcher:
    """FIFO queue + one dispatch loop; see the module docstring for the policy."""

    def __init__(
        self,
        predict: PredictFn,
        settings: BatcherSettings | None = None,
        *,
        on_batch: BatchCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        gap_alpha: float = 0.2,
    ):
        self.predict_fn = predict
        self.settings = settings or BatcherSettings()
        self.model = ServiceTimeModel()
        self.on_batch = on_batch
        self.clock = clock
        self._gap_alpha = gap_alpha
        self._queue: deque[_Pending] = deque()
        self._queued_examples = 0
        self._last_arrival: float | None = None
        self._gap_s = math.inf
        self._busy_until: float | None = None
        self._arrived = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        # One thread: one forward pass at a time is the "replica is free" notion above.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-batcher")
        self.counters = _Counters()

    # ---------------------------------------------------------------- public

    def calibrate(self, example: np.ndarray, repeats: int = 3) -> None:
        """Time batch sizes 1 and max on a sample (blocking) so the first fit exists."""
        example = np.asarray(example, dtype=np.float32)
        sizes = sorted({1, max(1, self.settings.max_batch_size // 2), self.settings.max_batch_size})
        for size in sizes:
            batch = np.repeat(example[None], size, axis=0)
            self.predict_fn(batch)  # warm-up: first calls allocate
            for _ in range(repeats):
                start = time.perf_counter()
                self.predict_fn(batch)
                self.model.observe(size, time.perf_counter() - start)
        self.model.calibrated()

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """Queue x (n, *shape); return its n output rows when its batch has run."""
        now = self.clock()
        n = int(x.shape[0])
        self._note_arrival(now)
        self._shed_if_late(now, n)
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(x, now, future))
        self._queued_examples += n
        if len(self._queue) > self.counters.max_queue_depth:
            self.counters.max_queue_depth = len(self._queue)
        self._ensure_loop()
        self._arrived.set()
        return await future

    def stats(self) -> dict[str, float]:
        c = self.counters
        return {
            "batches": c.batches,
            "requests": c.requests,
            "examples": c.examples,
            "mean_batch_size": c.examples / c.batches if c.batches else 0.0,
            "recent_mean_batch_size": float(np.mean(c.recent_sizes)) if c.recent_sizes else 0.0,
            "last_batch_size": c.last_batch_size,
            "batch_size_cap": self.batch_cap(),
            "mean_queue_wait_ms": 1000 * c.wait_s_total / c.requests if c.requests else 0.0,
            "last_queue_wait_ms": 1000 * c.last_wait_s,
            "planned_wait_ms": 1000 * c.last_planned_wait_s,
            "queue_depth": len(self._queue),
            "max_queue_depth": c.max_queue_depth,
            "queued_examples": self._queued_examples,
            "shed": c.shed,
            "forward_s_total": c.forward_s_total,
            "mean_forward_ms": 1000 * c.forward_s_total / c.batches if c.batches else 0.0,
            "slope_ms": 1000 * self.model.slope,
            "contention_factor": self.model.factor,
            "intercept_ms": 1000 * self.model.intercept,
            "arrival_gap_ms": 1000 * self._gap_s if math.isfinite(self._gap_s) else -1.0,
        }

    def batch_cap(self) -> int:
        """Largest batch whose forward pass, waited for once and run once, fits the target."""
        budget = self.settings.target_p99_ms / 1000 / 2
        if self.model.slope <= 0:
            return self.settings.max_batch_size
        fit = int((budget - self.model.intercept) / self.model.slope)
        return max(1, min(self.settings.max_batch_size, fit))

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- admission

    def _note_arrival(self, now: float) -> None:
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self._gap_s = gap if not math.isfinite(self._gap_s) else (1 - self._gap_alpha) * self._gap_s + self._gap_alpha * gap
        self._last_arrival = now

    def predicted_finish(self, now: float, extra_examples: int) -> float:
        """When a request of `extra_examples` queued now would finish, draining in capped batches."""
        cap = self.batch_cap()
        backlog = self._queued_examples + extra_examples
        full, rest = divmod(backlog, cap)
        drain = full * self.model.predict(cap) + (self.model.predict(rest) if rest else 0.0)
        running = max(0.0, (self._busy_until or now) - now)
        return now + running + drain

    def _shed_if_late(self, now: float, n: int) -> None:
        if len(self._queue) < self.settings.max_queued:
            return
        finish = self.predicted_finish(now, n)
        deadline = now + self.settings.target_p99_ms / 1000
        if finish <= deadline:
            return
        self.counters.shed += 1
        retry_after = max(0.001, finish - deadline)
        raise Overloaded(
            f"overloaded: {len(self._queue)} requests queued (limit {self.settings.max_queued}) and this one would finish "
            f"{1000 * (finish - now):.0f} ms from now, past the {self.settings.target_p99_ms:.0f} ms target; retry later",
            retry_after_s=retry_after,
        )

    # ---------------------------------------------------------------- dispatch

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._dispatch_loop())

    async def _dispatch_loop(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            wait_s = self._planned_wait(self.clock())
            self.counters.last_planned_wait_s = wait_s
            if wait_s > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout=wait_s)
                except asyncio.TimeoutError:
                    pass
                else:
                    continue  # someone arrived: decide again with the new queue
            await self._run_batch(self._take_batch())

    def _planned_wait(self, now: float) -> float:
        """Seconds to wait for more requests before dispatching (0: dispatch now)."""
        k = self._queued_examples
        cap = self.batch_cap()
        if k >= cap:
            return 0.0
        oldest = self._queue[0].arrival
        if not self.settings.adaptive:
            return max(0.0, oldest + self.settings.max_wait_ms / 1000 - now)
        gap = self._gap_s
        if not math.isfinite(gap) or gap >= self.model.intercept / k:
            return 0.0  # waiting for the next arrival costs more than it saves
        latest_start = oldest + self.settings.target_p99_ms / 1000 - self.model.predict(min(k + 1, cap))
        return max(0.0, min(now + 2 * gap, latest_start) - now)

    def _take_batch(self) -> list[_Pending]:
        cap = self.batch_cap()
        batch = [self._queue.popleft()]
        total = batch[0].size
        while self._queue and total + self._queue[0].size <= cap:
            item = self._queue.popleft()
            batch.append(item)
            total += item.size
        self._queued_examples -= total
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # a cancelled caller needs no answer
        if not live:
            return
        start = self.clock()
        x = live[0].x if len(live) == 1 else np.concatenate([p.x for p in live])
        size = int(x.shape[0])
        self._busy_until = start + self.model.predict(size)
        try:
            began = time.perf_counter()
            if self._run_inline(size):
                out = self._forward(x)
            else:
                out = await asyncio.get_running_loop().run_in_executor(self._executor, self._forward, x)
            seconds = time.perf_counter() - began
        except Exception as exc:  # the model failed: every caller of this batch gets the error
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self._busy_until = None
        if size <= self.settings.max_batch_size:  # a chunked oversized request is not one forward pass
            self.model.observe(size, seconds)
        waits = [start - p.arrival for p in live]
        self._record(size, waits, seconds)
        offset = 0
        for p in live:
            if not p.future.done():
                p.future.set_result(out[offset : offset + p.size])
            offset += p.size

    def _run_inline(self, size: int) -> bool:
        """Run the forward pass on the event loop instead of the worker thread?

        The thread lets the loop accept and decode requests during the forward pass, which only
        pays when requests arrive meanwhile. A sequential client's next request comes after the
        answer, and a tiny model's forward is shorter than the thread hand-off (tens of
        microseconds, milliseconds on a busy machine), so both run inline.
        """
        seconds = self.model.predict(size)
        return seconds < INLINE_BELOW_S or self._gap_s > 2 * seconds

    def _forward(self, x: np.ndarray) -> np.ndarray:
        began = time.perf_counter()
        try:
            cap = self.settings.max_batch_size
            if x.shape[0] <= cap:
                return self.predict_fn(x)
            return np.concatenate([self.predict_fn(x[i : i + cap]) for i in range(0, x.shape[0], cap)])
        finally:
            self.counters.forward_s_total += time.perf_counter() - began

    def _record(self, size: int, waits: list[float], seconds: float) -> None:
        c = self.counters
        c.batches += 1
        c.examples += size
        c.requests += len(waits)
        c.wait_s_total += sum(waits)
        c.last_batch_size = size
        c.last_wait_s = max(waits)
        c.recent_sizes.append(size)
        if self.on_batch is not None:
            self.on_batch(size, waits, seconds)
