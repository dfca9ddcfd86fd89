"""`tandem predict`: offline batch inference on Ray Data actor pools, one pool per serving deployment.

The input is files (a path, a glob or a folder of Parquet, CSV, NumPy `.npy` or JSON lines). The
driver splits them into chunks of about `predict.chunk_rows` rows (row counts from Parquet's
metadata, the `.npy` header, or a line count) and gives Ray Data only these small descriptors.
Each actor reads its chunk, checks every row, predicts in batches of `predict.batch_size` with
the deployment's engine (ONNX Runtime, int8 or not, on CPU nodes; torch on GPU nodes) and writes
the chunk's predictions, and its bad rows with the reason, as Parquet part files:

    OUTPUT/predictions/part-NNNNNN.parquet   id, prediction, [probabilities], model_version, deployment
    OUTPUT/errors/part-NNNNNN.parquet        id, reason (only for chunks with bad rows)
    OUTPUT/summary.json                      rows, errors, wall time, rows/s per actor

So an actor holds one chunk at a time whatever the input's size, output appears while the job
runs, and the driver sees only per-chunk counts, which drive the progress display and the
summary. A bad row (wrong width, NaN, a value that does not parse) never stops the job; an input
with no good row at all is an error.

May import: `cluster`, `serving.engines`; Ray and pyarrow inside functions.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.artifacts import atomic_write_bytes, atomic_write_json, model_version, read_manifest, resolve_artifact
from cluster.config import TandemConfig
from cluster.console import move_log
from cluster.errors import TandemError

FORMATS = {".parquet": "parquet", ".csv": "csv", ".npy": "npy", ".jsonl": "jsonl", ".json": "jsonl"}
PREDICTIONS, ERRORS, SUMMARY = "predictions", "errors", "summary.json"


class PredictError(TandemError):
    """An input `tandem predict` cannot run on (no files, an unknown format, no good row)."""


# ---------------------------------------------------------------------------------------------
# input files and chunks (driver)
# ---------------------------------------------------------------------------------------------


def input_files(spec: str) -> list[Path]:
    """The files a path, a glob or a folder names, sorted; each must have a known format."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise PredictError(f"--input {spec}: no file there; give a file, a folder or a glob of {', '.join(sorted(FORMATS))} files")
    unknown = [p for p in files if p.suffix.lower() not in FORMATS]
    if unknown:
        raise PredictError(
            f"--input {spec}: {unknown[0]} is not one of {', '.join(sorted(FORMATS))}; convert it or leave it out of the input"
        )
    return files


def _line_starts(path: Path, every: int, skip_header: bool) -> tuple[list[int], int]:
    """Byte offsets of rows 0, every, 2 x every, ... of a line-per-row file, and its row count
    (a CSV's header line is not a row). One pass, reading 1 MiB at a time."""
    starts, rows, position, at_line_start = [], 0, 0, True
    header = skip_header
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            cursor = 0
            while cursor < len(block):
                if at_line_start:
                    if header:
                        header = False
                    else:
                        if rows % every == 0:
                            starts.append(position + cursor)
                        rows += 1
                newline = block.find(b"\n", cursor)
                if newline < 0:
                    at_line_start = False
                    break
                cursor, at_line_start = newline + 1, True
            position += len(block)
    return starts, rows


def check_columns(files: list[Path], settings: dict[str, Any]) -> None:
    """The configured columns exist in every Parquet and CSV file (JSON lines are checked row by
    row): a misnamed column fails here, on the driver, not in every actor."""
    import pyarrow.parquet as pq

    for path in files:
        fmt = FORMATS[path.suffix.lower()]
        if fmt == "parquet":
            names = list(pq.read_schema(path).names)
        elif fmt == "csv":
            with open(path, newline="") as handle:
                names = next(csv.reader(handle), [])
        else:
            continue
        _columns_of(names, settings, where=path)
        for field_name in ("id_column", "label_column"):
            column = settings.get(field_name)
            if column and column not in names:
                raise PredictError(f"predict.{field_name}: {path} has no column '{column}' (columns: {', '.join(names)})")


def plan_chunks(files: list[Path], chunk_rows: int) -> list[dict[str, Any]]:
    """Chunk descriptors {path, format, start, stop, first_id, offset, groups}: rows [start, stop)
    of a file, whose first row is row `first_id` of the whole input. Parquet chunks are its row
    groups; a text chunk starts reading at byte `offset`."""
    import pyarrow.parquet as pq

    chunks: list[dict[str, Any]] = []
    first_id = 0
    for path in files:
        fmt = FORMATS[path.suffix.lower()]
        pieces: list[tuple[int, int, Any, int]] = []  # (start, stop, row groups, byte offset)
        if fmt == "parquet":
            meta = pq.ParquetFile(path).metadata
            start = 0
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                pieces.append((start, start + rows, [group], 0))
                start += rows
        elif fmt == "npy":
            total = int(np.load(path, mmap_mode="r").shape[0])
            pieces = [(s, min(s + chunk_rows, total), None, 0) for s in range(0, total, chunk_rows)]
        else:
            starts, total = _line_starts(path, chunk_rows, skip_header=fmt == "csv")
            pieces = [(n * chunk_rows, min((n + 1) * chunk_rows, total), None, offset) for n, offset in enumerate(starts)]
        for start, stop, groups, offset in pieces:
            chunks.append(
                {"path": str(path), "format": fmt, "start": start, "stop": stop, "first_id": first_id, "groups": groups, "offset": offset}
            )
            first_id += stop - start
    return chunks


# ---------------------------------------------------------------------------------------------
# reading and checking one chunk (actor)
# ---------------------------------------------------------------------------------------------


@dataclass
class Rows:
    ids: list[Any]
    x: np.ndarray  # float32 (n, width); a bad row's values are undefined
    bad: dict[int, str] = field(default_factory=dict)  # row index in the chunk -> reason


def _columns_of(names: list[str], settings: dict[str, Any], where: Any = "the input") -> list[str]:
    if settings.get("features"):
        missing = [c for c in settings["features"] if c not in names]
        if missing:
            raise PredictError(f"predict.features: {where} has no column '{missing[0]}' (columns: {', '.join(names)})")
        return list(settings["features"])
    skip = {settings.get("id_column"), settings.get("label_column")}
    return [n for n in names if n not in skip]


def _row_values(record: dict[str, Any], columns: list[str]) -> tuple[list[float] | None, str | None]:
    """A record's feature values flattened (a column may hold a list), or the reason it is bad."""
    values: list[float] = []
    for column in columns:
        value = record.get(column)
        items = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
        for item in items:
            if item is None or (isinstance(item, str) and not item.strip()):
                return None, f"column '{column}' is empty"
            try:
                number = float(item)
            except (TypeError, ValueError):
                return None, f"value {str(item)[:40]!r} in column '{column}' does not parse as a number"
            if not math.isfinite(number):
                return None, f"column '{column}' holds {number}"
            values.append(number)
    return values, None


def _records(chunk: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and the chunk's rows as records (Parquet, CSV and JSON lines)."""
    path, fmt, start, stop = chunk["path"], chunk["format"], chunk["start"], chunk["stop"]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path).read_row_groups(chunk["groups"])
        return table.column_names, table.to_pylist()
    with open(path, "rb") as raw:
        header = raw.readline().decode() if fmt == "csv" else ""
        raw.seek(chunk["offset"])
        lines = [line.decode("utf-8", errors="replace") for line in itertools.islice(raw, stop - start)]
    if fmt == "csv":
        names = next(csv.reader([header]), [])
        rows = csv.reader(lines)
        return names, [dict(zip(names, row, strict=False)) | ({"__width__": len(row)} if len(row) != len(names) else {}) for row in rows]
    records: list[dict[str, Any]] = []
    for line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            value = {"__error__": f"not JSON ({exc.msg})"}
        records.append(value if isinstance(value, dict) else {"__error__": "a JSON line must be an object of columns"})
    names = list(dict.fromkeys(k for r in records for k in r if not k.startswith("__")))
    return names, records


def _numeric_parquet_rows(chunk: dict[str, Any], width: int, settings: dict[str, Any]) -> Rows | None:
    """A Parquet chunk whose feature columns are all numbers (or lists of numbers), checked with
    array operations; None when a column holds anything else (the row-by-row path decides)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.ParquetFile(chunk["path"]).read_row_groups(chunk["groups"])
    columns = _columns_of(table.column_names, settings)
    parts, null = [], np.zeros(table.num_rows, bool)
    for name in columns:
        column = table.column(name).combine_chunks()
        null |= column.is_null().to_numpy(zero_copy_only=False)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            parts.append(pc.fill_null(column, 0).to_numpy(zero_copy_only=False).astype(np.float32)[:, None])
        elif pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            if not pa.types.is_floating(column.type.value_type) and not pa.types.is_integer(column.type.value_type):
                return None
            if np.unique(lengths[~null]).size > 1:
                return None  # rows of different widths: the row-by-row path names each one
            size = int(lengths[~null][0]) if (~null).any() else 0
            values = pc.fill_null(column, pa.scalar([0.0] * size, column.type)).flatten().to_numpy(zero_copy_only=False)
            parts.append(values.astype(np.float32).reshape(table.num_rows, size))
        else:
            return None
    x = np.concatenate(parts, axis=1) if parts else np.zeros((table.num_rows, 0), np.float32)
    id_column = settings.get("id_column")
    ids = table.column(id_column).to_pylist() if id_column else list(range(chunk["first_id"], chunk["first_id"] + table.num_rows))
    rows = Rows(ids=ids, x=np.zeros((table.num_rows, width), np.float32))
    if x.shape[1] != width:
        rows.bad = {i: f"{x.shape[1]} values, the model takes {width}" for i in range(table.num_rows)}
        return rows
    finite = np.isfinite(x).all(axis=1)
    rows.x = x
    rows.bad = {int(i): "an empty value" for i in np.flatnonzero(null)}
    rows.bad.update({int(i): f"value {x[i][~np.isfinite(x[i])][0]} among the features" for i in np.flatnonzero(~finite & ~null)})
    return rows


def read_chunk(chunk: dict[str, Any], width: int, settings: dict[str, Any]) -> Rows:
    """The chunk's ids, feature matrix and bad rows (with reasons)."""
    first_id, count = chunk["first_id"], chunk["stop"] - chunk["start"]
    if chunk["format"] == "npy":
        block = np.asarray(np.load(chunk["path"], mmap_mode="r")[chunk["start"] : chunk["stop"]], dtype=np.float32).reshape(count, -1)
        rows = Rows(ids=list(range(first_id, first_id + count)), x=np.zeros((count, width), np.float32))
        for i, row in enumerate(block):
            if row.size != width:
                rows.bad[i] = f"{row.size} values, the model takes {width}"
            elif not np.isfinite(row).all():
                rows.bad[i] = f"value {row[~np.isfinite(row)][0]} at position {int(np.argmax(~np.isfinite(row)))}"
            else:
                rows.x[i] = row
        return rows
    if chunk["format"] == "parquet":
        fast = _numeric_parquet_rows(chunk, width, settings)
        if fast is not None:
            return fast
    names, records = _records(chunk)
    columns = _columns_of(names, settings)
    id_column = settings.get("id_column")
    rows = Rows(ids=[], x=np.zeros((len(records), width), np.float32))
    for i, record in enumerate(records):
        rows.ids.append(record.get(id_column, f"row {first_id + i}") if id_column else first_id + i)
        if "__error__" in record:
            rows.bad[i] = record["__error__"]
            continue
        if id_column and id_column not in record:
            rows.bad[i] = f"no '{id_column}' field"
            continue
        if "__width__" in record:
            rows.bad[i] = f"{record['__width__']} fields, the header has {len(names)}"
            continue
        values, reason = _row_values(record, columns)
        if reason is None and len(values) != width:
            reason = f"{len(values)} values, the model takes {width}"
        if reason:
            rows.bad[i] = reason
        else:
            rows.x[i] = values
    return rows


# ---------------------------------------------------------------------------------------------
# the actor
# ---------------------------------------------------------------------------------------------


def _parquet_bytes(columns: dict[str, Any]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


class PredictChunks:
    """A Ray Data actor: reads, checks, predicts and writes whole chunks; returns their counts."""

    def __init__(self, artifact_dir: str, deployment: dict[str, Any], settings: dict[str, Any], output_dir: str):
        from serving.engines import load_engine

        self.engine = load_engine(
            Path(artifact_dir),
            engine=deployment["engine"],
            precision=deployment["precision"],
            quantize=deployment["quantize"],
            threads=deployment["threads"],
            device="cuda" if deployment["gpus"] else "cpu",
        )
        manifest = read_manifest(Path(artifact_dir))
        self.input_shape = tuple(manifest["model"]["input_shape"])
        self.width = int(np.prod(self.input_shape))
        self.version = model_version(manifest)
        self.settings, self.output, self.deployment = settings, Path(output_dir), deployment["name"]
        self.name = f"{deployment['name']}@{os.uname().nodename}:{os.getpid()}"
        import ray

        # What Ray gave this actor (its node group's resource among them), for the summary.
        self.resources = json.dumps(ray.get_runtime_context().get_assigned_resources(), sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"rows": [], "errors": [], "seconds": [], "actor": [], "resources": []}
        for i in range(len(batch["path"])):
            chunk = {k: (v[i].tolist() if isinstance(v[i], np.ndarray) else v[i]) for k, v in batch.items()}
            started = time.perf_counter()
            good, bad = self.run_chunk(chunk)
            out["rows"].append(good)
            out["errors"].append(bad)
            out["seconds"].append(time.perf_counter() - started)
            out["actor"].append(self.name)
            out["resources"].append(self.resources)
        return {k: np.asarray(v) for k, v in out.items()}

    def run_chunk(self, chunk: dict[str, Any]) -> tuple[int, int]:
        rows = read_chunk(chunk, self.width, self.settings)
        keep = [i for i in range(len(rows.ids)) if i not in rows.bad]
        part = f"part-{chunk['first_id']:012d}.parquet"
        if rows.bad:
            reasons = {"id": [rows.ids[i] for i in sorted(rows.bad)], "reason": [rows.bad[i] for i in sorted(rows.bad)]}
            atomic_write_bytes(self.output / ERRORS / part, _parquet_bytes(reasons))
        if keep:
            x = rows.x[keep].reshape(len(keep), *self.input_shape)
            step = int(self.settings["batch_size"])
            logits = np.concatenate([self.engine.predict(x[s : s + step]) for s in range(0, len(x), step)])
            columns: dict[str, Any] = {"id": [rows.ids[i] for i in keep], "prediction": logits.argmax(1).astype(np.int64)}
            if self.settings.get("probabilities"):
                from serving.protocol import softmax

                columns["probabilities"] = list(softmax(logits).astype(np.float32))
            columns["model_version"] = [self.version] * len(keep)
            columns["deployment"] = [self.deployment] * len(keep)
            atomic_write_bytes(self.output / PREDICTIONS / part, _parquet_bytes(columns))
        return len(keep), len(rows.bad)


# ---------------------------------------------------------------------------------------------
# the job (driver)
# ---------------------------------------------------------------------------------------------


@dataclass
class PredictSummary:
    output_dir: Path
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
    chunks: list[dict[str, Any]], deployment: Any, actors: int, artifact: Path, settings: dict[str, Any], output: Path
) -> Any:
    import ray.data

    from cluster.runtime import pin_to_group

    dataset = ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks)))
    return dataset.map_batches(
        PredictChunks,
        batch_size=1,
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


def predict(config: TandemConfig, input_spec: str, output_dir: Path, source: str = "latest", progress: Any = None) -> PredictSummary:
    """Predict every row of `input_spec` with the artifact `source`, writing under `output_dir`.

    progress(rows_done, errors, total_rows): called as chunks finish (the CLI draws its bar with it).
    """
    from cluster.runtime import connect, storage_root

    artifact = resolve_artifact(source, storage_root(config), config.name)
    version = model_version(read_manifest(artifact))
    files = input_files(input_spec)
    settings = config.predict.model_dump(mode="json")
    check_columns(files, settings)
    chunks = plan_chunks(files, config.predict.chunk_rows)
    total = sum(c["stop"] - c["start"] for c in chunks)
    if total == 0:
        raise PredictError(f"--input {input_spec}: the files hold no rows")
    output = Path(output_dir).expanduser().resolve()
    for folder in (PREDICTIONS, ERRORS):
        (output / folder).mkdir(parents=True, exist_ok=True)
    move_log(output)
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
            actor = per_actor.setdefault(str(result["actor"]), {"rows": 0, "seconds": 0.0, "resources": json.loads(result["resources"])})
            actor["rows"] += int(result["rows"]) + int(result["errors"])
            actor["seconds"] += float(result["seconds"])
            if progress:
                progress(done, errors, total)
    wall = time.perf_counter() - started
    for stats in per_actor.values():
        stats["rows_per_s"] = stats["rows"] / stats["seconds"] if stats["seconds"] else 0.0
    summary = PredictSummary(output, done, errors, wall, per_actor, version)
    atomic_write_json(
        output / SUMMARY,
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
