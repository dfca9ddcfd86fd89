"""Parity reports: what an optimized artifact cost in accuracy and bought in speed and size.

Every artifact is compared with its source model (model.pt, torch fp32) on the held-out split
that training used (the same `data.val_fraction` and `data.seed`):

    accuracy, accuracy_drop     against the labels, and the drop from the source model's accuracy
    argmax_agreement            fraction of examples where both models predict the same class
    max/mean_abs_logit_diff     against the source model's logits
    bytes                       size on disk
    latency_ms                  median time of one batch, per batch size, threads fixed, on this CPU
    speedup                     the source model's latency over this one's, per batch size

`gate_failures` turns the report and `export.gate` into messages naming the artifact, the
metric, the value, the limit and the field to change; `format_report` draws the table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster.config import ParityGate
from cluster.errors import TandemError
from serving.engines import Engine

SOURCE = "model.pt"
PREDICT_CHUNK = 256


class ParityGateError(TandemError, ValueError):
    """An export crossed export.gate; `failures` lists every crossing, `report` holds the numbers."""

    def __init__(self, artifact_dir: Path, failures: list[str], report: dict[str, Any]):
        self.failures = failures
        self.report = report
        lines = [f"export gate failed for {artifact_dir}; nothing was written and the earlier artifacts there are unchanged:"]
        lines += [f"  - {failure}" for failure in failures]
        super().__init__("\n".join(lines))


def predict_all(engine: Engine, x: np.ndarray, chunk: int = PREDICT_CHUNK) -> np.ndarray:
    """Logits for every example, in chunks so a large split never becomes one huge batch."""
    return np.concatenate([engine.predict(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def batch_of(x: np.ndarray, size: int) -> np.ndarray:
    """`size` real examples (repeated when the split is smaller), C-contiguous float32."""
    rows = np.resize(np.arange(len(x)), size)
    return np.ascontiguousarray(x[rows], dtype=np.float32)


def median_latency_ms(engine: Engine, batch: np.ndarray, budget_s: float, min_runs: int = 5, max_runs: int = 2000) -> float:
    """Median wall time of engine.predict(batch) over runs that fill about `budget_s`."""
    for _ in range(2):  # warm-up: first runs allocate buffers and pick kernels
        engine.predict(batch)
    times: list[float] = []
    spent = 0.0
    while len(times) < max_runs and (len(times) < min_runs or spent < budget_s):
        start = time.perf_counter()
        engine.predict(batch)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    return float(np.median(times) * 1e3)


def latency_table(engine: Engine, x: np.ndarray, batch_sizes: list[int], budget_s: float) -> dict[str, float]:
    return {str(size): round(median_latency_ms(engine, batch_of(x, size), budget_s), 5) for size in batch_sizes}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def compare_logits(logits: np.ndarray, source_logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and agreement numbers of one model's logits against the source model's."""
    source_accuracy = accuracy(source_logits, labels)
    own = accuracy(logits, labels)
    diff = np.abs(logits.astype(np.float64) - source_logits.astype(np.float64))
    return {
        "accuracy": round(own, 6),
        "source_accuracy": round(source_accuracy, 6),
        "accuracy_drop": round(source_accuracy - own, 6),
        "argmax_agreement": round(float((logits.argmax(axis=1) == source_logits.argmax(axis=1)).mean()), 6),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "examples": int(len(labels)),
    }


def parity_entry(
    engine: Engine,
    source_logits: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    file: Path,
    batch_sizes: list[int],
    budget_s: float,
    threads: int,
    source_latency: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The full parity entry of one artifact (source_latency None: this is the source model)."""
    entry: dict[str, Any] = {"engine": engine.name, **compare_logits(predict_all(engine, x), source_logits, y)}
    entry["bytes"] = Path(file).stat().st_size
    entry["threads"] = threads
    entry["latency_ms"] = latency_table(engine, x, batch_sizes, budget_s)
    reference = source_latency or entry["latency_ms"]
    entry["speedup"] = {size: round(reference[size] / ms, 3) for size, ms in entry["latency_ms"].items() if ms > 0 and size in reference}
    return entry


def _fix_for(name: str) -> str:
    if "int8" in name:
        return "or pick another int8 method with export.quantize (static, dynamic) or turn it off with export.quantize: none"
    if "pruned" in name:
        return "or lower export.prune.sparsity, or fine-tune after pruning with export.prune.fine_tune_epochs"
    return "an fp32 export should match its source: this is a bug in the export, please report it"


def gate_failures(report: dict[str, dict[str, Any]], gate: ParityGate) -> list[str]:
    """One message per artifact and metric that crosses the gate (the source model is exempt)."""
    failures = []
    for name, entry in report.items():
        if name == SOURCE:
            continue
        drop, limit = entry["accuracy_drop"], gate.max_accuracy_drop
        if drop > limit + 1e-9:
            failures.append(
                f"{name}: accuracy {entry['accuracy']:.4f} is {drop * 100:.2f} points below the source model's "
                f"{entry['source_accuracy']:.4f}, more than export.gate.max_accuracy_drop: {limit} ({limit * 100:g} points); "
                f"raise export.gate.max_accuracy_drop, {_fix_for(name)}"
            )
        agreement, floor = entry["argmax_agreement"], gate.min_argmax_agreement
        if agreement < floor - 1e-9:
            failures.append(
                f"{name}: argmax agreement with the source model {agreement:.4f} is below export.gate.min_argmax_agreement: {floor}; "
                f"lower export.gate.min_argmax_agreement, {_fix_for(name)}"
            )
    return failures


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def format_report(report: dict[str, dict[str, Any]], title: str = "parity against model.pt (held-out split)") -> Any:
    """A rich Table: one row per artifact, latency columns per batch size with speedups; in a log,
    one record per artifact (cluster/tables.py), as 80 columns cut every cell of the table."""
    from rich.table import Table

    from cluster.tables import readable

    sizes = sorted({int(s) for entry in report.values() for s in entry.get("latency_ms", {})})
    table = Table(title=title)
    for column in ("artifact", "engine", "size", "accuracy", "drop (pts)", "agreement", "max |Δlogit|", "mean |Δlogit|"):
        table.add_column(column, justify="left" if column in ("artifact", "engine") else "right")
    for size in sizes:
        table.add_column(f"batch {size} ms (x)", justify="right")
    for name, entry in report.items():
        latency, speedup = entry.get("latency_ms", {}), entry.get("speedup", {})
        cells = [
            name,
            entry["engine"],
            _size(entry["bytes"]),
            f"{entry['accuracy']:.4f}",
            f"{entry['accuracy_drop'] * 100:+.2f}",
            f"{entry['argmax_agreement']:.4f}",
            f"{entry['max_abs_logit_diff']:.2e}",
            f"{entry['mean_abs_logit_diff']:.2e}",
        ]
        cells += [f"{latency[str(s)]:.3f} ({speedup.get(str(s), 0):.2f})" if str(s) in latency else "-" for s in sizes]
        table.add_row(*cells)
    return readable(table)
