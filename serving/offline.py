"""`tandem predict`: offline batch inference on Ray Data actor pools, one pool per serving deployment.

The input is files (a path, a glob or a folder of Parquet, CSV, NumPy `.npy` or JSON lines). The
driver splits them into chunks of about `predict.chunk_rows` rows (row counts from Parquet's
metadata, the `.npy` header, or a line count) and gives Ray Data only these small descriptors.
Each actor reads its chunk, checks every row, predicts in batches of `predict.batch_size` with
the deployment's engine (ONNX Runtime, int8 or not, on CPU nodes; torch on GPU nodes) and writes
the chunk's predictions, and its bad rows with the reason, as Parquet part files (an I/O thread
reads the next chunk and writes the last one while the engine runs):

    OUTPUT/predictions/part-NNNNNN.parquet   id, prediction, [probabilities], model_version, deployment
    OUTPUT/errors/part-NNNNNN.parquet        id, reason (only for chunks with bad rows)
    OUTPUT/summary.json                      rows, errors, wall time, rows/s and cores per actor

So an actor holds at most three chunks whatever the input's size, output appears while the job
runs, and the driver sees only per-chunk counts, which drive the progress display and the
summary. A bad row (wrong width, NaN, a value that does not parse) never stops the job; an input
with no good row at all is an error.

May import: `cluster`, `serving.engines`; Ray and pyarrow inside functions.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster.artifacts import local_artifact, model_version, read_manifest, resolve_artifact
from cluster.config import TandemConfig
from cluster.console import move_log
from cluster.errors import TandemError
from cluster.storage import Location, location
from cluster.tabular import check_columns, input_files, plan_chunks, read_chunk

PREDICTIONS, ERRORS, SUMMARY = "predictions", "errors", "summary.json"
CHUNKS_PER_CALL = 16
BLOCKS_PER_ACTOR = 8


class PredictError(TandemError):
    """An input `tandem predict` cannot run on (no files, an unknown format, no good row)."""


# ---------------------------------------------------------------------------------------------
# the actor
# ---------------------------------------------------------------------------------------------


def _write_part(where: Location, columns: dict[str, Any]) -> None:
    """Write one part file whole or not at all: to a hidden temporary name, then renamed, so a
    reader never sees half a part and a crash leaves no part that looks done. Not fsynced: a
    part is output to be read next, not state a restart depends on, and syncing each of
    thousands of small parts costs more than writing them. In an object store a part is one
    object, which appears whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if where.remote:
        pq.write_table(pa.table(columns), where.fs_path, filesystem=where.filesystem)
        return
    path = where.path
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(pa.table(columns), temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class PredictChunks:
    """A Ray Data actor: reads, checks, predicts and writes whole chunks; returns their counts."""

    def __init__(self, artifact_dir: str, deployment: dict[str, Any], settings: dict[str, Any], output_dir: str):
        from serving.engines import load_engine

        folder = local_artifact(artifact_dir)  # from the store through this node's cache
        self.engine = load_engine(
            folder,
            engine=deployment["engine"],
            precision=deployment["precision"],
            quantize=deployment["quantize"],
            threads=deployment["threads"],
            device="cuda" if deployment["gpus"] else "cpu",
        )
        manifest = read_manifest(folder)
        self.input_shape = tuple(manifest["model"]["input_shape"])
        self.width = int(np.prod(self.input_shape))
        self.version = model_version(manifest)
        self.settings, self.output, self.deployment = settings, location(output_dir), deployment["name"]
        self.name = f"{deployment['name']}@{os.uname().nodename}:{os.getpid()}"
        import ray

        # What Ray gave this actor (its node group's resource among them) and where, for the summary.
        self.resources = json.dumps(ray.get_runtime_context().get_assigned_resources(), sort_keys=True)
        self.node = ray.get_runtime_context().get_node_id()
        # One I/O thread: the next chunk's read and the last chunk's write (see __call__).
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-predict-io")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs a call's chunks as a pipeline: while this thread predicts chunk i, the I/O thread
        reads chunk i+1 and writes chunk i-1 (Parquet and ONNX Runtime release the GIL), so an
        actor's rate is its engine's rather than the sum of read, predict and write. Memory: at
        most three chunks. Every part is written when the call returns, so the driver's counts
        are rows on disk. A chunk's seconds and CPU seconds are the call's, shared by row count."""
        chunks = [_descriptor(batch, i) for i in range(len(batch["path"]))]
        started, cpu_started = time.perf_counter(), time.process_time()
        reading = self.io.submit(read_chunk, chunks[0], self.width, self.settings)
        writing: Any = None
        counts = []
        for chunk, following in zip(chunks, chunks[1:] + [None], strict=True):
            rows = reading.result()
            if following is not None:
                reading = self.io.submit(read_chunk, following, self.width, self.settings)
            parts = self.predict_chunk(chunk, rows)
            if writing is not None:
                writing.result()  # one write in flight bounds the chunks held
            writing = self.io.submit(_write_parts, parts)
            counts.append((len(rows.x) - len(rows.bad), len(rows.bad)))
        writing.result()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        total = max(1, sum(good + bad for good, bad in counts))
        share = [(good + bad) / total for good, bad in counts]
        return {
            "rows": np.asarray([good for good, _ in counts]),
            "errors": np.asarray([bad for _, bad in counts]),
            "seconds": np.asarray([seconds * f for f in share]),
            "cpu_seconds": np.asarray([cpu * f for f in share]),
            "actor": np.asarray([self.name] * len(chunks)),
            "resources": np.asarray([self.resources] * len(chunks)),
            "node": np.asarray([self.node] * len(chunks)),
        }

    def predict_chunk(self, chunk: dict[str, Any], rows: Any) -> list[tuple[Location, dict[str, Any]]]:
        """The part files (path, columns) of one chunk: its predictions and its bad rows."""
        keep = rows.good()
        part = f"part-{chunk['first_id']:012d}.parquet"
        parts = []
        if rows.bad:
            bad = sorted(rows.bad)
            parts.append((self.output / ERRORS / part, {"id": _take(rows.ids, bad), "reason": [rows.bad[i] for i in bad]}))
        if len(keep):
            x = (rows.x if len(keep) == len(rows.x) else rows.x[keep]).reshape(len(keep), *self.input_shape)
            step = int(self.settings["batch_size"])
            logits = np.concatenate([self.engine.predict(x[s : s + step]) for s in range(0, len(x), step)])
            columns: dict[str, Any] = {"id": _take(rows.ids, keep), "prediction": logits.argmax(1).astype(np.int64)}
            if self.settings.get("probabilities"):
                from serving.protocol import softmax

                columns["probabilities"] = list(softmax(logits).astype(np.float32))
            columns["model_version"] = _repeated(self.version, len(keep))
            columns["deployment"] = _repeated(self.deployment, len(keep))
            parts.append((self.output / PREDICTIONS / part, columns))
        return parts


def _descriptor(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """Chunk i of a block of descriptors, as plain Python values."""
    return {k: (v[i].tolist() if isinstance(v[i], np.ndarray) else v[i]) for k, v in batch.items()}


def _write_parts(parts: list[tuple[Location, dict[str, Any]]]) -> None:
    for path, columns in parts:
        _write_part(path, columns)


def _take(ids: Any, indices: Any) -> Any:
    """ids[indices] for an array of row numbers or a list of key-column values."""
    return ids[indices] if isinstance(ids, np.ndarray) else [ids[i] for i in indices]


def _repeated(value: str, count: int) -> Any:
    """A string column of one value, dictionary-encoded (no list of `count` strings to convert)."""
    import pyarrow as pa

    return pa.DictionaryArray.from_arrays(np.zeros(count, np.int32), pa.array([value]))


# ---------------------------------------------------------------------------------------------
# the job (driver)
# ---------------------------------------------------------------------------------------------


@dataclass
class PredictSummary:
    output_dir: Location
    rows: int
    errors: int
    wall_s: float
    per_actor: dict[str, dict[str, Any]]
    model_version: str

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s else 0.0


def prediction_pools(config: TandemConfig) -> list[tuple[Any, int]]:
    """(deployment, actors) for each pool: `predict.deployments` (default: every deployment)."""
    from cluster.config import AUTO

    wanted = config.predict.deployments or [d.name for d in config.serving.deployments]
    by_name = {d.name: d for d in config.serving.deployments}
    pools = []
    for name in wanted:
        deployment = by_name[name]
        count = deployment.autoscaling.max_replicas
        pools.append((deployment, config.predict.actors or (1 if count == AUTO else int(count))))
    return pools


def _pool_dataset(
    chunks: list[dict[str, Any]], deployment: Any, actors: int, artifact: Location, settings: dict[str, Any], output: Location
) -> Any:
    import ray.data

    from cluster.runtime import pin_to_group

    # A block of chunk descriptors is one call to an actor, which runs its chunks one after the
    # other (memory: one chunk). A call costs tens of ms of Ray Data's scheduling on a small
    # machine, so small chunks go CHUNKS_PER_CALL to a call; at least BLOCKS_PER_ACTOR calls per
    # actor keep the pool balanced and the progress moving. An actor pulls its next call when
    # one finishes (two in flight), so with few chunks (a wide model's 15 on 2 actors) one
    # chunk per call lets the actors end within a chunk of each other instead of two.
    blocks = max(1, min(len(chunks), max(actors * BLOCKS_PER_ACTOR, math.ceil(len(chunks) / CHUNKS_PER_CALL))))
    dataset = ray.data.from_items(chunks, override_num_blocks=blocks)
    return dataset.map_batches(
        PredictChunks,
        batch_size=None,
        concurrency=actors,
        num_cpus=deployment.cpus,
        num_gpus=deployment.gpus or None,
        resources=pin_to_group(deployment.node_group) or None,
        fn_constructor_kwargs={
            "artifact_dir": str(artifact),
            "deployment": deployment.model_dump(mode="json"),
            "settings": settings,
            "output_dir": str(output),
        },
    )


def predict(config: TandemConfig, input_spec: str, output_dir: Path | str, source: str = "latest", progress: Any = None) -> PredictSummary:
    """Predict every row of `input_spec` with the artifact `source`, writing under `output_dir`.

    progress(rows_done, errors, total_rows): called as chunks finish (the CLI draws its bar with it).
    """
    from cluster.runtime import connect, storage_root

    artifact = resolve_artifact(source, storage_root(config), config.name)
    version = model_version(artifact)
    files = input_files(input_spec)
    settings = config.predict.model_dump(mode="json")
    check_columns(files, settings)
    chunks = plan_chunks(files, config.predict.chunk_rows)
    total = sum(c["stop"] - c["start"] for c in chunks)
    if total == 0:
        raise PredictError(f"--input {input_spec}: the files hold no rows")
    output = location(output_dir)  # a folder, or a prefix in an object store
    for folder in (PREDICTIONS, ERRORS):
        (output / folder).make_dirs()
    if not output.remote:
        move_log(output.path)
    pools = prediction_pools(config)
    weights = [actors for _, actors in pools]
    # Chunks go to the pools in proportion to their actors, in turn, so every pool streams.
    order = [i for i, w in enumerate(weights) for _ in range(w)]
    shares: list[list[dict[str, Any]]] = [[] for _ in pools]
    for n, chunk in enumerate(chunks):
        shares[order[n % len(order)]].append(chunk)
    done = errors = 0
    per_actor: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    with connect(config):
        datasets = [
            _pool_dataset(share, deployment, actors, artifact, settings, output)
            for (deployment, actors), share in zip(pools, shares, strict=True)
            if share
        ]
        job = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        for result in job.iter_rows():
            done += int(result["rows"])
            errors += int(result["errors"])
            actor = per_actor.setdefault(
                str(result["actor"]),
                {"rows": 0, "seconds": 0.0, "cpu_seconds": 0.0, "resources": json.loads(result["resources"]), "node": str(result["node"])},
            )
            actor["rows"] += int(result["rows"]) + int(result["errors"])
            actor["seconds"] += float(result["seconds"])
            actor["cpu_seconds"] += float(result["cpu_seconds"])
            if progress:
                progress(done, errors, total)
    wall = time.perf_counter() - started
    for stats in per_actor.values():
        stats["rows_per_s"] = stats["rows"] / stats["seconds"] if stats["seconds"] else 0.0
        stats["cores"] = stats["cpu_seconds"] / stats["seconds"] if stats["seconds"] else 0.0
    summary = PredictSummary(output, done, errors, wall, per_actor, version)
    (output / SUMMARY).put_json(
        {
            "input": input_spec,
            "artifact": str(artifact),
            "model_version": version,
            "rows": done,
            "errors": errors,
            "wall_s": round(wall, 3),
            "rows_per_s": round(summary.rows_per_s, 1),
            "per_actor": per_actor,
        },
    )
    if done == 0:
        raise PredictError(f"no row of {input_spec} could be predicted ({errors} bad); the reasons are in {output / ERRORS}")
    return summary
