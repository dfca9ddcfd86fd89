"""The chunk reader's array paths (cluster/tabular.py), without Ray: each bad row named with its
reason, the good rows' values exact, and a Parquet file rewritten in place read afresh."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.tabular import input_files, plan_chunks, read_chunk

SETTINGS = {"section": "predict", "features": None, "id_column": None, "label_column": None}


def only_chunk(path):
    (chunk,) = plan_chunks(input_files(str(path)), 100)
    return chunk


def test_npy_rows_are_checked_at_once_and_bad_ones_named(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    x[3, 2], x[7, 0] = np.nan, np.inf
    np.save(tmp_path / "rows.npy", x)
    rows = read_chunk(only_chunk(tmp_path / "rows.npy"), 4, SETTINGS)
    assert sorted(rows.bad) == [3, 7]
    assert rows.bad[3] == "value nan at position 2" and rows.bad[7] == "value inf at position 0"
    good = rows.good()
    assert list(good) == [0, 1, 2, 4, 5, 6, 8, 9] and list(rows.ids[good]) == list(good)
    np.testing.assert_array_equal(rows.x[good], x[good])
    assert not isinstance(rows.x, np.memmap) and rows.x.base is None  # a copy, not the mapped file

    wrong = read_chunk(only_chunk(tmp_path / "rows.npy"), 5, SETTINGS)
    assert wrong.bad == {i: "4 values, the model takes 5" for i in range(10)}


def test_parquet_nulls_and_nans_are_named_and_a_rewritten_file_is_read_afresh(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"a": pa.array([1.0, None, 3.0]), "b": pa.array([4, 5, 6]), "c": pa.array([7.0, 8.0, np.nan])}), path)
    rows = read_chunk(only_chunk(path), 3, SETTINGS)
    assert rows.bad == {1: "an empty value", 2: "value nan among the features"}
    np.testing.assert_array_equal(rows.x[0], [1.0, 4.0, 7.0])

    pq.write_table(pa.table({"a": [10.0, 20.0], "b": [1, 2], "c": [3.0, 4.0], "d": [5.0, 6.0]}), path)
    rows = read_chunk(only_chunk(path), 4, SETTINGS)  # the cached footer was the old file's
    assert rows.bad == {} and rows.x.tolist() == [[10.0, 1.0, 3.0, 5.0], [20.0, 2.0, 4.0, 6.0]]
