"""File data sources, checked on the driver without Ray: what `tandem validate` and `tandem train`
refuse before Ray starts, and the split that files and memory share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.config import ConfigError, load_config
from training.data import digits, split
from training.file_source import read_split_rows
from training.trainer import preflight


def write_parquet(folder: Path, x: np.ndarray, y: np.ndarray, row_group: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({**{f"f{i}": x[:, i] for i in range(x.shape[1])}, "label": y}), folder / "part-0.parquet", row_group_size=row_group
    )


@pytest.mark.parametrize(
    ("overrides", "field", "says"),
    [
        (["data.label_column=target"], "data.label_column", "has no column 'target'"),
        (["data.features=[f0, nope]"], "data.features", "has no column 'nope'"),
        (["model.args.num_classes=5"], "data.label_column", "labels go up to 9"),
    ],
)
def test_a_bad_file_source_is_refused_before_ray_starts_naming_the_field(tmp_path, overrides, field, says):
    data = digits()
    write_parquet(tmp_path / "d", data.x[:300], data.y[:300], row_group=100)
    config = load_config(None, [f"cluster.storage={tmp_path}", f"data.source={tmp_path / 'd'}", *overrides])
    with pytest.raises(ConfigError) as raised:
        preflight(config)
    assert raised.value.problems[0].path == field and says in raised.value.problems[0].message


def write_formats(folder: Path, x: np.ndarray, y: np.ndarray) -> dict[str, Path]:
    """The same rows as .npy (label last), CSV and JSON lines (a list column)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "rows.npy", np.concatenate([x, y[:, None].astype(np.float32)], axis=1))
    with open(folder / "rows.csv", "w") as handle:
        handle.write(",".join([f"f{i}" for i in range(x.shape[1])] + ["label"]) + "\n")
        handle.writelines(",".join(map(str, row)) + f",{label}\n" for row, label in zip(x, y, strict=True))
    with open(folder / "rows.jsonl", "w") as handle:
        handle.writelines(json.dumps({"pixels": row.tolist(), "label": int(label)}) + "\n" for row, label in zip(x, y, strict=True))
    return {"npy": folder / "rows.npy", "csv": folder / "rows.csv", "jsonl": folder / "rows.jsonl"}


@pytest.mark.parametrize("fmt", ["npy", "csv", "jsonl"])
def test_every_format_splits_its_rows_as_the_same_rows_in_memory_do(tmp_path, fmt):
    data = digits()
    x, y = data.x[:500], data.y[:500]
    path = write_formats(tmp_path, x, y)[fmt]
    config = load_config(None, [f"cluster.storage={tmp_path}", f"data.source={path}"])
    source = preflight(config)["file_source"]
    assert source.width == 64 and source.num_classes == 10 and source.bad_rows == 0
    sides = {}
    for validation in (False, True):
        parts = [read_split_rows({"chunk": np.array([json.dumps(c)])}, source, 0, 0.2, validation) for c in source.chunks]
        sides[validation] = (np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts]))
    train, val = split(type(data)(x, y), 0.2, 0)
    assert source.train_rows == len(train.y) and source.val_rows == len(val.y)
    np.testing.assert_allclose(sides[False][0], train.x, atol=1e-6)
    np.testing.assert_array_equal(sides[True][1], val.y)


def test_bad_rows_are_counted_and_left_out(tmp_path):
    data = digits()
    path = write_formats(tmp_path, data.x[:200], data.y[:200])["csv"]
    with open(path, "a") as handle:
        handle.write(",".join(["x"] * 64) + ",1\n")  # features that are not numbers
        handle.write(",".join(["0.5"] * 64) + ",2.5\n")  # a label that is not a class number
    source = preflight(load_config(None, [f"cluster.storage={tmp_path}", f"data.source={path}"]))["file_source"]
    # The split counts file rows (the hash is per row position), bad ones included.
    assert source.bad_rows == 2 and source.train_rows + source.val_rows == 202
    # Read back, both sides together are exactly the 200 good rows: the bad two are left out.
    parts = [
        read_split_rows({"chunk": np.array([json.dumps(c)])}, source, 0, 0.2, validation)
        for validation in (False, True)
        for c in source.chunks
    ]
    x, y = np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts])
    assert len(y) == 200
    read = sorted(zip(map(tuple, x.round(5).tolist()), y.tolist(), strict=True))
    written = sorted(zip(map(tuple, data.x[:200].round(5).tolist()), data.y[:200].tolist(), strict=True))
    assert read == written
