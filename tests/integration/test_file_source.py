"""Training from files streamed by Ray Data: the same accuracy as in memory, a shard per worker,
memory that does not grow with the input, and bad sources refused before Ray starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.config import load_config
from tests.integration.conftest import DEFAULT_EXAMPLE_EPOCHS
from training.data import digits, synthetic
from training.trainer import preflight, train

pytestmark = pytest.mark.integration


def write_parquet(folder: Path, x: np.ndarray, y: np.ndarray, files: int, row_group: int) -> None:
    """`files` Parquet files of feature columns f0.. and a label column, row groups of `row_group` rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, rows in enumerate(np.array_split(np.arange(len(y)), files)):
        table = pa.table({**{f"f{i}": x[rows, i] for i in range(x.shape[1])}, "label": y[rows]})
        pq.write_table(table, folder / f"part-{n}.parquet", row_group_size=row_group)


@pytest.mark.slow
def test_training_from_parquet_matches_the_in_memory_source_with_a_shard_per_worker(default_example_run, tmp_path):
    in_memory, config = default_example_run
    data = digits()
    write_parquet(tmp_path / "digits", data.x, data.y, files=3, row_group=200)
    file_config = load_config(
        None,
        [
            f"cluster.storage={tmp_path / 'runs'}",
            f"training.epochs={DEFAULT_EXAMPLE_EPOCHS}",
            f"data.source={tmp_path / 'digits' / '*.parquet'}",
        ],
    )
    assert file_config.training.seed == config.training.seed and file_config.data.seed == config.data.seed
    source = preflight(file_config)["file_source"]
    streamed = train(file_config)

    # The same rows validate in both (the split is a per-row hash), so the accuracies compare.
    final = streamed.history[-1]
    assert abs(final["val_accuracy"] - in_memory.history[-1]["val_accuracy"]) <= 0.01, (final, in_memory.history[-1])
    # Each of the 2 workers trained on its own half of the training rows, every epoch.
    for epoch in streamed.history:
        per_rank = epoch["samples_per_rank"]
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
        assert 0.45 * source.train_rows <= per_rank[0] <= 0.5 * source.train_rows


@pytest.mark.slow
def test_an_input_ten_times_the_memory_cap_trains_within_the_cap(ray_session, tmp_path):
    cap_mb = 40
    features = 1024  # 4 KiB a row: 100k rows are 400 MB of features, 10x the cap
    data = synthetic(samples=100_000, features=features, classes=4, seed=1, noise=1.0)
    # The features as one list column (an embedding's usual layout): 1024 scalar columns would
    # spend the test's time in Parquet's per-column overhead.
    (tmp_path / "wide").mkdir()
    for n, rows in enumerate(np.array_split(np.arange(len(data.y)), 4)):
        x = pa.FixedSizeListArray.from_arrays(pa.array(data.x[rows].ravel()), features)
        pq.write_table(pa.table({"x": x, "label": data.y[rows]}), tmp_path / "wide" / f"part-{n}.parquet", row_group_size=1024)
    on_disk_mb = sum(p.stat().st_size for p in (tmp_path / "wide").glob("*.parquet")) / 2**20
    assert on_disk_mb >= 10 * cap_mb
    config = load_config(
        None,
        [
            f"cluster.storage={tmp_path / 'runs'}",
            "training.epochs=1",
            "data.augment=[]",
            "data.batch_size=256",
            "model.args.hidden=[16]",
            f"data.source={tmp_path / 'wide'}",
        ],
    )
    result = train(config)
    epoch = result.history[-1]
    assert sum(epoch["samples_per_rank"]) >= 0.75 * len(data.y)  # the whole input went through
    # What streaming added to a worker's own memory, over model, DeepSpeed and Ray (private pages:
    # the object store's shared pages that reading blocks maps in are Ray's, bounded by its size).
    grown = epoch["peak_private_memory_mb"] - epoch["private_memory_before_training_mb"]
    assert grown < cap_mb, f"a worker's peak memory grew {grown:.0f} MB while streaming {on_disk_mb:.0f} MB"
