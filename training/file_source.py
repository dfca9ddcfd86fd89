"""Training data from files: `data.source` naming Parquet, CSV, `.npy` or JSON-lines files,
streamed to the Ray Train workers by Ray Data.

Driver, before Ray starts (`inspect_file_source`, also what `tandem validate` runs): the files
exist and have a known format, the feature and label columns exist, a sample of rows reads as
numbers, every label is a class number below the model's classes, and how many rows the split
puts on each side. What it learns travels to the workers as a plain `FileSource`.

Ray Data (`ray_datasets`): one small descriptor per chunk of about CHUNK_ROWS rows (Parquet row
groups, `.npy` slices, line offsets: cluster/tabular.py, the same reader `tandem predict` uses);
a read task turns a chunk into rows and keeps those on its side of the split. Ray Train splits
both datasets across the workers (`get_dataset_shard`, equal row counts per worker), so a worker
holds a few blocks at a time, never the data set.

The split is `training.arrays.validation_rows`: a seeded coin flip per row of the whole input, so a
row is on the same side however the files are chunked, read or sharded, and the same rows in
memory split the same way. Bad rows (a value that is not a number, a missing label) are left
out by the read tasks; validation reports them before training starts.

May import: `cluster`, `training.arrays`; Ray inside functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from cluster.config import ConfigError, Problem, TandemConfig
from cluster.tabular import (
    FORMATS,
    SAMPLE_ROWS,
    InputFilesError,
    check_columns,
    chunk_labels,
    feature_width,
    good_rows,
    input_files,
    plan_chunks,
    read_chunk,
)
from training.arrays import ArrayDataset, validation_rows

CHUNK_BYTES = 4 << 20  # features per read task (a Ray Data block): a few MB, whatever the input's size
ROW_COUNT_BLOCK = 1 << 20  # row ids per step when counting the split's sides (bounded memory)


@dataclass(frozen=True)
class FileSource:
    """What the driver learned about the files; plain data, sent to the Train workers."""

    chunks: list[dict[str, Any]]
    settings: dict[str, Any]
    width: int
    num_classes: int
    train_rows: int
    val_rows: int
    bad_rows: int
    sample: ArrayDataset  # good rows of the first chunk, for the model check on the driver

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.width,)


def reader_settings(config: TandemConfig) -> dict[str, Any]:
    d = config.data
    return {"section": "data", "features": d.features, "label_column": d.label_column, "id_column": None, "labels": True}


def _problem(path: str, value: Any, message: str) -> ConfigError:
    return ConfigError([Problem(path=path, value=value, message=message)])


def inspect_file_source(config: TandemConfig) -> FileSource:
    """Check the files against the config and count the split; a ConfigError names the field."""
    source = config.data.source
    settings = reader_settings(config)
    try:
        files = input_files(source, what="data.source")
        if any(FORMATS[p.suffix.lower()] == "npy" for p in files) and config.data.features:
            raise InputFilesError("data.features: a .npy file has no named columns; leave data.features out")
        check_columns(files, settings)
        width = feature_width(plan_chunks(files[:1], SAMPLE_ROWS)[0], settings)
        chunks = plan_chunks(files, chunk_rows(width))
    except InputFilesError as exc:
        # The reader's messages start with what they are about ("data.features: ...").
        about, _, message = str(exc).partition(": ")
        field_path = about if about in ("data.features", "data.label_column") else "data.source"
        raise _problem(field_path, getattr(config.data, field_path.split(".")[-1]), message) from None
    total = sum(c["stop"] - c["start"] for c in chunks)
    if total == 0:
        raise _problem("data.source", source, "the files hold no rows")
    sample_chunk = dict(chunks[0], stop=min(chunks[0]["stop"], chunks[0]["start"] + SAMPLE_ROWS))
    sample_rows = read_chunk(sample_chunk, width, settings)
    good = sample_rows.good()
    if len(good) == 0:
        reason = next(iter(sample_rows.bad.values()))
        raise _problem(
            "data.features", config.data.features, f"no row of {chunks[0]['path']} reads as numbers ({reason}); fix data.features"
        )
    max_label, bad_rows = _scan_labels(chunks, width, settings)
    classes = config.model.args.get("num_classes", max_label + 1)
    if max_label >= classes:
        raise _problem(
            "data.label_column",
            config.data.label_column,
            f"labels go up to {max_label} but model.args.num_classes is {classes}; fix the labels or model.args.num_classes",
        )
    val_rows = _count_validation_rows(total, config.data.seed, config.data.val_fraction)
    return FileSource(
        chunks=chunks,
        settings=settings,
        width=width,
        num_classes=int(classes),
        train_rows=total - val_rows,
        val_rows=val_rows,
        bad_rows=bad_rows,
        sample=ArrayDataset(sample_rows.x[good], sample_rows.y[good]),
    )


def chunk_rows(width: int) -> int:
    """Rows per chunk for rows of `width` float32 features: about CHUNK_BYTES (Parquet chunks are
    the files' row groups, whatever this says)."""
    return max(256, min(65536, CHUNK_BYTES // max(1, 4 * width)))


def _scan_labels(chunks: list[dict[str, Any]], width: int, settings: dict[str, Any]) -> tuple[int, int]:
    """The largest label and the number of rows whose label (or, in text formats, any value) is
    bad, one chunk at a time. Parquet and `.npy` are scanned by their label column alone, so a
    bad feature value there is found by the read task, which leaves that row out."""
    largest, bad = -1, 0
    for chunk in chunks:
        labels, bad_rows = chunk_labels(chunk, width, settings)
        bad += len(bad_rows)
        keep = good_rows(len(labels), bad_rows)
        if len(keep):
            largest = max(largest, int(labels[keep].max()))
    return largest, bad


def _count_validation_rows(total: int, seed: int, fraction: float) -> int:
    return sum(
        int(validation_rows(np.arange(start, min(start + ROW_COUNT_BLOCK, total)), seed, fraction).sum())
        for start in range(0, total, ROW_COUNT_BLOCK)
    )


def read_split_rows(
    batch: dict[str, np.ndarray], source: FileSource, seed: int, fraction: float, validation: bool
) -> dict[str, np.ndarray]:
    """A Ray Data read task: the chunks in `batch` as rows {x, y}, those on one side of the split."""
    xs, ys = [], []
    for encoded in batch["chunk"]:
        chunk = json.loads(encoded)
        rows = read_chunk(chunk, source.width, source.settings)
        good = rows.good()
        ids = np.asarray(rows.ids)  # input-wide row numbers (no id column in training)
        keep = good[validation_rows(ids[good], seed, fraction) == validation]
        xs.append(rows.x[keep])
        ys.append(rows.y[keep])
    return {
        "x": np.concatenate(xs) if xs else np.zeros((0, source.width), np.float32),
        "y": np.concatenate(ys) if ys else np.zeros(0, np.int64),
    }


def ray_datasets(source: FileSource, config: TandemConfig) -> dict[str, Any]:
    """{"train", "val"} Ray Datasets streaming the files (read lazily, when the workers iterate)."""
    import ray.data

    descriptors = [{"chunk": json.dumps(c)} for c in source.chunks]

    def side(validation: bool):
        return ray.data.from_items(descriptors, override_num_blocks=len(descriptors)).map_batches(
            read_split_rows,
            batch_size=1,
            fn_kwargs={"source": source, "seed": config.data.seed, "fraction": config.data.val_fraction, "validation": validation},
        )

    return {"train": side(False), "val": side(True)}


def read_into_memory(config: TandemConfig, limit: int) -> ArrayDataset:
    """The first `limit` good rows of the files as arrays, in input order."""
    source = inspect_file_source(config)
    xs, ys, count = [], [], 0
    for chunk in source.chunks:
        rows = read_chunk(chunk, source.width, source.settings)
        good = rows.good()[: limit - count]
        xs.append(rows.x[good])
        ys.append(rows.y[good])
        count += len(good)
        if count >= limit:
            break
    return ArrayDataset(np.concatenate(xs), np.concatenate(ys))
