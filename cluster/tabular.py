"""Tabular input files, read a chunk at a time: what `tandem predict` scores and what training
streams when `data.source` names files.

Formats: Parquet, CSV, NumPy `.npy` and JSON lines (`FORMATS`). The driver lists the files
(`input_files`), checks the configured columns (`check_columns`) and splits the files into chunks
of about `chunk_rows` rows (`plan_chunks`: Parquet row groups, `.npy` slices, line offsets), each
with the input-wide id of its first row. A reader (a Ray Data task or actor) turns one chunk into
`Rows` (`read_chunk`): ids, a float32 feature matrix, integer labels when a label column is
configured, and the bad rows with the reason each is bad. Memory is one chunk, whatever the input.

`settings` (a dict, so it travels to Ray Data workers as plain data): `section` (the config section
errors name: `predict` or `data`), `features`, `id_column`, `label_column`, and `labels` (true:
read the label column into `Rows.y`; a `.npy` file then holds the label in its last column).

May import: the standard library, numpy; pyarrow and cluster.storage (object-store URIs) inside functions.
"""

from __future__ import annotations

import csv
import functools
import glob
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.errors import TandemError

SAMPLE_ROWS = 64  # rows read to find the feature width
FORMATS = {".parquet": "parquet", ".csv": "csv", ".npy": "npy", ".jsonl": "jsonl", ".json": "jsonl"}


class InputFilesError(TandemError):
    """Input files that cannot be read as configured (none there, an unknown format, a missing column)."""


# ---------------------------------------------------------------------------------------------
# input files and chunks (driver)
# ---------------------------------------------------------------------------------------------


def input_files(spec: str, what: str = "--input") -> list[Path]:
    """The files a path, a glob or a folder names, sorted; each must have a known format.
    what: how the error names the spec (`--input`, `data.source`). A URI (s3://, gs://) names
    Parquet files in an object store: one file, or every .parquet under a prefix."""
    from cluster.storage import is_uri

    if is_uri(spec):
        return _store_files(spec, what)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise InputFilesError(f"{what} {spec}: no file there; give a file, a folder or a glob of {', '.join(sorted(FORMATS))} files")
    unknown = [p for p in files if p.suffix.lower() not in FORMATS]
    if unknown:
        raise InputFilesError(
            f"{what} {spec}: {unknown[0]} is not one of {', '.join(sorted(FORMATS))}; convert it or leave it out of the input"
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

    for path in files:
        fmt = FORMATS[_suffix(path)]
        if fmt == "parquet":
            names = list(_parquet_file(path).schema_arrow.names)
        elif fmt == "csv":
            with open(path, newline="") as handle:
                names = next(csv.reader(handle), [])
        else:
            continue
        _columns_of(names, settings, where=path)
        for field_name in ("id_column", "label_column"):
            column = settings.get(field_name)
            if column and column not in names:
                raise InputFilesError(
                    f"{settings.get('section', 'predict')}.{field_name}: {path} has no column '{column}' (columns: {', '.join(names)})"
                )


def _store_files(spec: str, what: str) -> list[Any]:
    """The Parquet files of an object-store URI (their URIs), refusing other formats: CSV, JSON
    lines and .npy are read by byte offsets and memory maps, which only local files give."""
    from cluster.storage import StorageError, location

    where = location(spec)
    try:
        files = [where] if where.is_file() else [f for f in where.files_below() if not f.name.startswith((".", "_"))]
    except StorageError as exc:
        raise InputFilesError(f"{what} {spec}: {exc}") from None
    if not files:
        raise InputFilesError(f"{what} {spec}: no object there; give the URI of a Parquet file or of a prefix holding Parquet files")
    other = [f for f in files if not f.name.lower().endswith(".parquet")]
    if other:
        raise InputFilesError(
            f"{what} {spec}: {other[0]} is not Parquet; from an object store Tandem reads Parquet only. Convert the input to Parquet "
            "or copy it to a local folder"
        )
    return sorted(str(f) for f in files)


def _suffix(path: Any) -> str:
    return os.path.splitext(str(path))[1].lower()


def plan_chunks(files: list[Path], chunk_rows: int) -> list[dict[str, Any]]:
    """Chunk descriptors {path, format, start, stop, first_id, offset, groups}: rows [start, stop)
    of a file, whose first row is row `first_id` of the whole input. Parquet chunks are its row
    groups; a text chunk starts reading at byte `offset`."""

    chunks: list[dict[str, Any]] = []
    first_id = 0
    for path in files:
        fmt = FORMATS[_suffix(path)]
        pieces: list[tuple[int, int, Any, int]] = []  # (start, stop, row groups, byte offset)
        if fmt == "parquet":
            meta = _parquet_file(path).metadata
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
    ids: list[Any] | np.ndarray  # an int64 array when the ids are row numbers
    x: np.ndarray  # float32 (n, width); a bad row's values are undefined
    bad: dict[int, str] = field(default_factory=dict)  # row index in the chunk -> reason
    y: np.ndarray | None = None  # int64 (n,) when settings["labels"]; a bad row's label is undefined

    def good(self) -> np.ndarray:
        """Indices of the rows that are not bad."""
        return good_rows(len(self.x), self.bad)


def good_rows(count: int, bad: dict[int, str]) -> np.ndarray:
    """Indices 0..count-1 that are not keys of `bad` (a chunk's rows, or its labels)."""
    keep = np.ones(count, bool)
    keep[list(bad)] = False
    return np.flatnonzero(keep)


def _label(value: Any) -> tuple[int, str | None]:
    """A label as a class number, or the reason it is not one."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0, f"label {str(value)[:40]!r} is not a class number"
    if not math.isfinite(number) or not number.is_integer() or number < 0:
        return 0, f"label {value!r} is not a class number (0, 1, 2, ...)"
    return int(number), None


def _labels_of(values: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Class numbers from a float array (NaN: missing), and the rows whose label is not one."""
    ok = np.isfinite(values) & (values >= 0) & (np.floor(values) == values)
    bad = {int(i): f"label {values[i]} is not a class number (0, 1, 2, ...)" for i in np.flatnonzero(~ok)}
    return np.where(ok, values, 0).astype(np.int64), bad


def _columns_of(names: list[str], settings: dict[str, Any], where: Any = "the input") -> list[str]:
    if settings.get("features"):
        missing = [c for c in settings["features"] if c not in names]
        if missing:
            raise InputFilesError(
                f"{settings.get('section', 'predict')}.features: {where} has no column '{missing[0]}' (columns: {', '.join(names)})"
            )
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
        table = _parquet_file(path).read_row_groups(chunk["groups"])
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

    source = _parquet_file(chunk["path"])
    columns = _columns_of(source.schema_arrow.names, settings)
    wanted = columns + [settings[key] for key in ("id_column", "label_column") if settings.get(key)]
    table = source.read_row_groups(chunk["groups"], columns=list(dict.fromkeys(wanted)))  # only the columns used
    parts, null = [], np.zeros(table.num_rows, bool)
    for name in columns:
        column = table.column(name)
        if column.null_count:  # most inputs have none: skip the mask and the fill
            null |= column.is_null().to_numpy(zero_copy_only=False)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            parts.append(_filled(column, 0).to_numpy())
        elif pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
            column = column.combine_chunks()
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            if not pa.types.is_floating(column.type.value_type) and not pa.types.is_integer(column.type.value_type):
                return None
            if np.unique(lengths[~null]).size > 1:
                return None  # rows of different widths: the row-by-row path names each one
            size = int(lengths[~null][0]) if (~null).any() else 0
            values = _filled(column, pa.scalar([0.0] * size, column.type)).flatten().to_numpy(zero_copy_only=False)
            parts.append(values.reshape(table.num_rows, size))
        else:
            return None
    x = _feature_matrix(parts, table.num_rows)
    id_column = settings.get("id_column")
    ids = table.column(id_column).to_pylist() if id_column else np.arange(chunk["first_id"], chunk["first_id"] + table.num_rows)
    rows = Rows(ids=ids, x=x)
    label_bad: dict[int, str] = {}
    if settings.get("labels"):  # from the table already read, not a second read of the row groups
        rows.y, label_bad = _column_labels(table.column(settings["label_column"]))
    if x.shape[1] != width:
        rows.x = np.zeros((table.num_rows, width), np.float32)
        rows.bad = {i: f"{x.shape[1]} values, the model takes {width}" for i in range(table.num_rows)}
        return rows
    finite = np.isfinite(x).all(axis=1)
    rows.bad = {int(i): "an empty value" for i in np.flatnonzero(null)}
    rows.bad.update({int(i): f"value {x[i][~np.isfinite(x[i])][0]} among the features" for i in np.flatnonzero(~finite & ~null)})
    rows.bad = label_bad | rows.bad
    return rows


def _parquet_file(path: str) -> Any:
    """The open Parquet file, its footer parsed once per reader process: a footer holds every
    row group's metadata, so parsing it again for each chunk of a big file costs more than
    reading the chunk (half of an actor's time on a 5M-row input of 610 row groups)."""
    from cluster.storage import is_uri, location

    if is_uri(path):
        return _open_parquet(str(path), *location(path).stat())
    stat = os.stat(path)
    return _open_parquet(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _open_parquet(path: str, mtime_ns: int, size: int) -> Any:
    # mtime and size are in the key so that a file rewritten in place is opened afresh.
    import pyarrow.parquet as pq

    from cluster.storage import is_uri, location

    if is_uri(path):
        where = location(path)
        return pq.ParquetFile(where.filesystem.open_input_file(where.fs_path))
    return pq.ParquetFile(path)


def _filled(column: Any, value: Any) -> Any:
    """An Arrow column with its nulls replaced by `value` (the column itself when it has none)."""
    import pyarrow.compute as pc

    return pc.fill_null(column, value) if column.null_count else column


def _feature_matrix(parts: list[np.ndarray], rows: int) -> np.ndarray:
    """The float32 (rows, width) matrix of the feature columns (a part: one column, or a list
    column's (rows, size) values), written in place rather than concatenated from copies."""
    width = sum(1 if p.ndim == 1 else p.shape[1] for p in parts)
    x = np.empty((rows, width), np.float32)
    at = 0
    for part in parts:
        if part.ndim == 1:
            x[:, at] = part
            at += 1
        else:
            x[:, at : at + part.shape[1]] = part
            at += part.shape[1]
    return x


def _parquet_labels(chunk: dict[str, Any], column: str) -> tuple[np.ndarray, dict[int, str]]:
    """The label column alone (the driver's scan of a Parquet input)."""
    return _column_labels(_parquet_file(chunk["path"]).read_row_groups(chunk["groups"], columns=[column]).column(column))


def _column_labels(values: Any) -> tuple[np.ndarray, dict[int, str]]:
    """Class numbers from an Arrow column, and the rows whose label is not one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        numbers = pc.cast(values, "float64").to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # strings: judge each one
        parsed = [_label(value) for value in values.to_pylist()]
        return np.array([n for n, _ in parsed], np.int64), {i: reason for i, (_, reason) in enumerate(parsed) if reason}
    return _labels_of(numbers)


def feature_width(chunk: dict[str, Any], settings: dict[str, Any]) -> int:
    """Feature values per row, from the chunk's first row that reads (0 when none does); a
    column may hold a list of values, a labelled `.npy` row ends with its label."""
    if chunk["format"] == "npy":
        array = np.load(chunk["path"], mmap_mode="r")
        return int(np.prod(array.shape[1:])) - (1 if settings.get("labels") else 0)
    if chunk["format"] == "parquet":
        batch = next(_parquet_file(chunk["path"]).iter_batches(batch_size=SAMPLE_ROWS), None)
        names, records = (batch.schema.names, batch.to_pylist()) if batch is not None else ([], [])
    else:
        names, records = _records(dict(chunk, stop=min(chunk["stop"], chunk["start"] + SAMPLE_ROWS)))
    for record in records:
        values, reason = _row_values(record, _columns_of(names, settings))
        if reason is None:
            return len(values)
    return 0


def chunk_labels(chunk: dict[str, Any], width: int, settings: dict[str, Any]) -> tuple[np.ndarray, dict[int, str]]:
    """The chunk's labels and the rows whose label is bad, reading as little as the format allows:
    Parquet's label column and a `.npy` file's last column only; text formats whole (a row's
    fields must be parsed to find its label)."""
    if chunk["format"] == "parquet":
        return _parquet_labels(chunk, settings["label_column"])
    if chunk["format"] == "npy":
        array = np.load(chunk["path"], mmap_mode="r")[chunk["start"] : chunk["stop"]]
        return _labels_of(np.asarray(array.reshape(len(array), -1)[:, -1], dtype=np.float64))
    rows = read_chunk(chunk, width, settings)
    return rows.y, rows.bad


def read_chunk(chunk: dict[str, Any], width: int, settings: dict[str, Any]) -> Rows:
    """The chunk's ids, feature matrix and bad rows (with reasons)."""
    first_id, count = chunk["first_id"], chunk["stop"] - chunk["start"]
    if chunk["format"] == "npy":
        block = np.asarray(np.load(chunk["path"], mmap_mode="r")[chunk["start"] : chunk["stop"]], dtype=np.float32).reshape(count, -1)
        rows = Rows(ids=np.arange(first_id, first_id + count), x=np.zeros((count, width), np.float32))
        if settings.get("labels"):  # a labelled .npy holds the label in its last column
            rows.y, rows.bad = _labels_of(block[:, -1].astype(np.float64))
            block = block[:, :-1]
        if block.shape[1] != width:  # every row of a .npy slice has the same width
            rows.bad = {i: f"{block.shape[1]} values, the model takes {width}" for i in range(count)}
            return rows
        rows.x = np.array(block, dtype=np.float32)  # a copy, never a view that keeps the file mapped
        for i in np.flatnonzero(~np.isfinite(block).all(axis=1)):
            row = block[i]
            rows.bad[int(i)] = f"value {row[~np.isfinite(row)][0]} at position {int(np.argmax(~np.isfinite(row)))}"
        return rows
    if chunk["format"] == "parquet":
        fast = _numeric_parquet_rows(chunk, width, settings)
        if fast is not None:
            return fast
    names, records = _records(chunk)
    columns = _columns_of(names, settings)
    id_column = settings.get("id_column")
    rows = Rows(ids=[], x=np.zeros((len(records), width), np.float32))
    labels = settings.get("labels")
    if labels:
        rows.y = np.zeros(len(records), np.int64)
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
        if reason is None and labels:
            rows.y[i], reason = _label(record.get(settings["label_column"]))
        if reason:
            rows.bad[i] = reason
        else:
            rows.x[i] = values
    return rows
