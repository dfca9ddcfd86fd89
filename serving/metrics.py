"""Tandem's own Prometheus metrics, next to Ray Serve's (which stay on).

Created inside a replica with `ray.serve.metrics`, which tags every series with the deployment,
replica and application. Recorded once per *batch* (not per request) where possible: on a 2-core
machine the metric calls are a visible share of a sub-millisecond request.

    tandem_batch_size            histogram  examples per forward pass
    tandem_queue_wait_ms         histogram  mean queue wait of a batch's requests
    tandem_model_latency_ms      histogram  forward-pass time of a batch
    tandem_batch_cap             gauge      current batch-size cap of the adaptive batcher
    tandem_planned_wait_ms       gauge      the wait the batcher chose before its last batch
    tandem_shed_total            counter    requests refused with 503 by the batcher
    tandem_admission_shed_total  counter    requests refused with 503 on arrival (serving/admission.py)
    tandem_cache_lookups_total   counter    cache lookups, tagged result=hit|miss
    tandem_cache_hit_rate        gauge      hits / lookups since start
    tandem_spillover_total       counter    requests served by a deployment other than the first
    tandem_replica_retries_total counter    requests the ingress resent because a model replica died
                                            under them, tagged target=<the deployment that died>, error=<type>
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
MS_BOUNDARIES = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]


class TandemMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self.batch_size = metrics.Histogram("tandem_batch_size", "Examples per forward pass.", BATCH_BOUNDARIES)
        self.queue_wait = metrics.Histogram("tandem_queue_wait_ms", "Mean queue wait of a batch's requests (ms).", MS_BOUNDARIES)
        self.model_latency = metrics.Histogram("tandem_model_latency_ms", "Forward-pass time of a batch (ms).", MS_BOUNDARIES)
        self.batch_cap = metrics.Gauge("tandem_batch_cap", "Current batch-size cap of the adaptive batcher.")
        self.planned_wait = metrics.Gauge("tandem_planned_wait_ms", "Wait the batcher chose before its last batch (ms).")
        self.shed = metrics.Counter("tandem_shed_total", "Requests refused with 503 by the batcher.")
        self.admission_shed = metrics.Counter(
            "tandem_admission_shed_total", "Requests refused with 503 on arrival, predicted to miss the latency target."
        )
        self.cache_lookups = metrics.Counter("tandem_cache_lookups_total", "Result-cache lookups by result.", tag_keys=("result",))
        self.cache_hit_rate = metrics.Gauge("tandem_cache_hit_rate", "Result-cache hits / lookups since start.")
        self.spillover = metrics.Counter(
            "tandem_spillover_total", "Requests served by a deployment other than the first.", tag_keys=("target",)
        )
        self.replica_retries = metrics.Counter(
            "tandem_replica_retries_total",
            "Requests resent by the ingress because a model replica died under them.",
            tag_keys=("target", "error"),  # "deployment" is a tag Ray Serve reserves: Counter() would refuse it
        )

    def on_batch(self, batcher: Any) -> Any:
        """A callback for AdaptiveBatcher(on_batch=...) that records one batch."""

        def record(size: int, waits: Sequence[float], seconds: float) -> None:
            self.batch_size.observe(size)
            self.queue_wait.observe(1000 * sum(waits) / len(waits))
            self.model_latency.observe(1000 * seconds)
            self.batch_cap.set(batcher.batch_cap())
            self.planned_wait.set(1000 * batcher.counters.last_planned_wait_s)

        return record

    def cache_result(self, hits: int, misses: int, hit_rate: float) -> None:
        if hits:
            self.cache_lookups.inc(hits, tags={"result": "hit"})
        if misses:
            self.cache_lookups.inc(misses, tags={"result": "miss"})
        self.cache_hit_rate.set(hit_rate)
