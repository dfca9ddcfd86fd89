"""A model deployment's engine behind its adaptive batcher, and the replica that serves it behind
the router ingress (no HTTP of its own; Serve allows one FastAPI deployment per application).

serving/app.py's TandemServer uses `LocalModel` when it is itself the model deployment.
"""

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve as ray_serve

from cluster.artifacts import read_manifest
from cluster.config import TandemConfig, validate_config
from serving.batching import AdaptiveBatcher, BatcherSettings, Overloaded
from serving.engines import load_engine
from serving.settings import batcher_queue_limit

logger = logging.getLogger("tandem.serving")


def tandem_metrics() -> Any:
    """Tandem's Prometheus metrics, or None where they cannot register (they are an aid, never a
    reason for a replica to fail)."""
    try:
        from serving.metrics import TandemMetrics

        return TandemMetrics()
    except Exception:
        logger.exception("Tandem metrics are off: could not create them")
        return None


class LocalModel:
    """The engine of one deployment behind its adaptive batcher, calibrated at start."""

    def __init__(self, config: TandemConfig, artifact: Path, deployment: dict[str, Any], input_shape: tuple[int, ...], metrics: Any):
        self.engine = load_engine(
            artifact,
            engine=deployment["engine"],
            precision=deployment["precision"],
            quantize=deployment["quantize"],
            threads=deployment["threads"],
            device="auto",
        )
        batching = config.serving.batching
        settings = BatcherSettings(
            max_batch_size=batching.max_batch_size,
            target_p99_ms=batching.target_p99_ms,
            max_queued=batcher_queue_limit(config.serving),
            adaptive=batching.adaptive,
            max_wait_ms=batching.max_wait_ms,
        )
        self.batcher = AdaptiveBatcher(self.engine.predict, settings)
        self.metrics = metrics
        if metrics is not None:
            self.batcher.on_batch = metrics.on_batch(self.batcher)
        self.batcher.calibrate(np.zeros(input_shape, dtype=np.float32))

    async def logits(self, x: np.ndarray) -> np.ndarray:
        try:
            return await self.batcher.submit(x)
        except Overloaded:
            if self.metrics is not None:
                self.metrics.shed.inc()
            raise


@ray_serve.deployment
class ModelReplica:
    """A model deployment behind the router ingress: no HTTP of its own (Serve allows one FastAPI
    deployment per application), called through a DeploymentHandle with validated arrays."""

    def __init__(self, spec: dict[str, Any]):
        config = validate_config(spec["config"])
        manifest = read_manifest(Path(spec["artifact"]))
        shape = tuple(int(s) for s in manifest["model"]["input_shape"])
        self.name = spec["name"]
        self.model = LocalModel(config, Path(spec["artifact"]), spec["deployment"], shape, tandem_metrics())

    async def predict_array(self, x: np.ndarray) -> np.ndarray:
        return await self.model.logits(x)

    def stats(self) -> dict[str, Any]:
        import ray

        resources = ray.get_runtime_context().get_assigned_resources()
        return {"deployment": self.name, "pid": os.getpid(), "resources": resources, "batcher": self.model.batcher.stats()}
