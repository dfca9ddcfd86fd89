"""`tandem export`: turn a trained artifact into the artifacts serving loads, each with a parity report.

    result = export(config, source="latest")        # or a run folder / an artifacts folder
    console.print(format_report(result.report))

Steps, all from the verified model.pt and the config's `export` section:

1. model.onnx          ONNX with a dynamic batch axis at export.opset, checked in an ORT session
2. model.int8.onnx     int8 by export.quantize (dynamic | static | auto picks by measurement)
3. model.pruned.pt     magnitude pruning to export.prune.sparsity, made permanent
   model.pruned.onnx   (and its ONNX export)
4. parity              every artifact against model.pt on the held-out split (serving.optimize.parity)
5. gate                export.gate; when crossed, nothing is written
6. commit              new files move into the artifacts folder, manifest.json gets "parity" and
                       "export" and fresh sha256 for every file

Everything is built in a hidden staging folder inside the artifacts folder (same filesystem, so
moving a file in is an atomic rename) and moved in only after the gate passes: a failed export
leaves the earlier files and manifest exactly as they were. A successful export replaces the
previous export's files; files it no longer produces (an int8 model after quantize: none) are
removed so that the manifest never lists a model without its parity entry.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.artifacts import (
    MODEL_FILE,
    atomic_save_torch,
    load_model,
    local_artifact,
    model_version,
    resolve_artifact,
    write_manifest,
)
from cluster.config import TandemConfig
from cluster.storage import Location, publish_folder
from cluster.tracking import track_export
from serving.engines import INT8_FILE, ONNX_FILE, PRUNED_FILE, PRUNED_ONNX_FILE, OnnxEngine, TorchEngine, torch_threads
from serving.optimize.onnx_export import ExportError, export_onnx
from serving.optimize.parity import (
    SOURCE,
    ParityGateError,
    batch_of,
    compare_logits,
    format_report,
    gate_failures,
    median_latency_ms,
    parity_entry,
    predict_all,
)
from serving.optimize.prune import PruneResult, apply_masks, fine_tune_pruned, prune_model
from serving.optimize.quantize import calibration_sample, candidate_modes, quantize_int8

__all__ = ["ExportResult", "ExportError", "ParityGateError", "export", "export_onnx", "format_report"]

DERIVED_FILES = (ONNX_FILE, INT8_FILE, PRUNED_FILE, PRUNED_ONNX_FILE)
AUTO_SPEED_MARGIN = 0.10  # quantize: auto takes a slower int8 method if it is this close in speed and more faithful

FineTune = Callable[[Any, TandemConfig], Any]


@dataclass
class ExportResult:
    artifact_dir: Path
    report: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# the pieces of an export
# ---------------------------------------------------------------------------------------------


@dataclass
class HeldOut:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def held_out_data(config: TandemConfig, input_shape: tuple[int, ...]) -> HeldOut:
    """The validation split training used (same data.val_fraction and data.seed) and the training split for calibration."""
    from training.data import load_dataset, split

    dataset = load_dataset(config)  # the trainer's loader: same checks, same errors naming data.source
    if tuple(dataset.input_shape) != tuple(input_shape):
        raise ExportError(
            f"data.source {config.data.source} gives examples of shape {dataset.input_shape} but the artifact's model takes "
            f"{tuple(input_shape)}; export with the config the model was trained with (data.source, data.args)"
        )
    train, val = split(dataset, config.data.val_fraction, config.data.seed)
    return HeldOut(x_train=train.x.astype(np.float32), y_train=train.y, x_val=val.x.astype(np.float32), y_val=val.y)


@dataclass
class Measure:
    """What every parity entry of one export shares: data, source logits, batch sizes, threads."""

    data: HeldOut
    source_logits: np.ndarray
    shape: tuple[int, ...]
    classes: int
    batch_sizes: list[int]
    budget_s: float
    threads: int
    source_latency: dict[str, float] | None = None

    def compare(self, engine: Any) -> dict[str, Any]:
        return compare_logits(predict_all(engine, self.data.x_val), self.source_logits, self.data.y_val)

    def entry(self, engine: Any, file: Path) -> dict[str, Any]:
        return parity_entry(
            engine,
            self.source_logits,
            self.data.x_val,
            self.data.y_val,
            file,
            self.batch_sizes,
            self.budget_s,
            self.threads,
            self.source_latency,
        )

    def onnx_engine(self, path: Path, name: str) -> OnnxEngine:
        return OnnxEngine(path, input_shape=self.shape, num_classes=self.classes, name=name, threads=self.threads, device="cpu")

    def torch_engine(self, model: Any) -> TorchEngine:
        return TorchEngine(model, input_shape=self.shape, num_classes=self.classes, precision="fp32", device="cpu", threads=self.threads)


def _measure_candidate(path: Path, measure: Measure, probe_batch: int | None) -> dict[str, Any]:
    """Agreement and accuracy of one int8 candidate, and its latency at probe_batch when there is a choice to make."""
    engine = measure.onnx_engine(path, "onnx-int8")
    stats = measure.compare(engine)
    if probe_batch is not None:
        stats["probe_latency_ms"] = round(median_latency_ms(engine, batch_of(measure.data.x_val, probe_batch), measure.budget_s), 5)
    return stats


def pick_int8(candidates: dict[str, dict[str, Any]], gate: Any, margin: float = AUTO_SPEED_MARGIN) -> str:
    """The fastest candidate that passes the gate, unless a more faithful one is within `margin` of
    its speed (timings on a busy machine wobble by that much; fidelity does not). If none passes,
    the most faithful one (the gate then fails on it and says so)."""

    def fidelity(mode: str) -> tuple[float, float, float]:
        stats = candidates[mode]
        return (stats["argmax_agreement"], -stats["accuracy_drop"], -stats.get("max_abs_logit_diff", 0.0))

    passing = [mode for mode, stats in candidates.items() if not gate_failures({INT8_FILE: stats}, gate)]
    if not passing:
        return max(candidates, key=fidelity)
    fastest = min(candidates[mode].get("probe_latency_ms", 0.0) for mode in passing)
    close = [mode for mode in passing if candidates[mode].get("probe_latency_ms", 0.0) <= fastest * (1 + margin)]
    return max(close, key=fidelity)


def quantize_stage(config: TandemConfig, onnx_path: Path, staging: Path, measure: Measure) -> dict[str, Any]:
    """Write staging/model.int8.onnx by export.quantize; auto measures every mode and keeps the best.

    auto's speed is measured at serving.batching.max_batch_size, the batch a busy replica runs.
    """
    modes = candidate_modes(config.export.quantize, onnx_path)
    if not modes:
        return {"requested": "none"}
    calibration = calibration_sample(measure.data.x_train, config.data.seed)
    probe = config.serving.batching.max_batch_size if len(modes) > 1 else None
    candidates = {}
    for mode in modes:
        quantize_int8(mode, onnx_path, staging / f"int8-{mode}.onnx", calibration)
        candidates[mode] = _measure_candidate(staging / f"int8-{mode}.onnx", measure, probe)
    chosen = pick_int8(candidates, config.export.gate)
    os.replace(staging / f"int8-{chosen}.onnx", staging / INT8_FILE)
    for mode in modes:
        (staging / f"int8-{mode}.onnx").unlink(missing_ok=True)
    info: dict[str, Any] = {
        "requested": config.export.quantize,
        "method": chosen,
        "calibration_examples": int(len(calibration)) if "static" in modes else 0,
    }
    if len(modes) > 1:
        keep = ("accuracy_drop", "argmax_agreement", "max_abs_logit_diff", "probe_latency_ms")
        info["probe_batch"] = probe
        info["candidates"] = {mode: {k: stats[k] for k in keep} for mode, stats in candidates.items()}
    return info


def prune_stage(model: Any, config: TandemConfig, fine_tune: FineTune | None, data: HeldOut) -> tuple[Any, PruneResult, dict[str, Any]]:
    """A pruned copy of the model (the source stays whole), optionally fine-tuned with the zeros kept."""
    spec = config.export.prune
    assert spec is not None
    pruned = copy.deepcopy(model)
    result = prune_model(pruned, spec.sparsity, spec.structured)
    info = result.summary()
    if spec.fine_tune_epochs:
        if fine_tune is None:
            pruned = fine_tune_pruned(pruned, config, result.masks, data.x_train, data.y_train)
        else:
            pruned = fine_tune(pruned, config)
        apply_masks(pruned, result.masks)  # a given fine-tune may have moved the zeros; prune them again
        pruned.eval()
        info["fine_tune"] = {"epochs": spec.fine_tune_epochs}
    return pruned, result, info


def _commit(staging: Path, folder: Path, produced: list[str]) -> None:
    """Move the new files in (atomic renames on one filesystem) and drop the previous export's leftovers."""
    for name in produced:
        os.replace(staging / name, folder / name)
    for name in DERIVED_FILES:
        if name not in produced:
            (folder / name).unlink(missing_ok=True)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


def _export_info(config: TandemConfig, manifest: dict[str, Any], measure: Measure) -> dict[str, Any]:
    data = config.data
    return {
        "source_version": model_version(manifest),
        "config_hash": config.config_hash(),
        "threads": measure.threads,
        "versions": _versions(),
        "data": {
            "source": data.source,
            "args": data.args,
            "val_fraction": data.val_fraction,
            "seed": data.seed,
            "val_examples": int(len(measure.data.y_val)),
        },
        "gate": config.export.gate.model_dump(),
    }


def _onnx_artifacts(
    config: TandemConfig, model: Any, staging: Path, measure: Measure, report: dict[str, Any], info: dict[str, Any]
) -> list[str]:
    """model.onnx and model.int8.onnx into staging, with their parity entries; returns the files written."""
    if not config.export.onnx:
        if config.export.quantize != "none":
            info["quantize"] = {"requested": config.export.quantize, "skipped": "export.onnx is false and int8 quantizes the ONNX model"}
        return []
    info["onnx"] = export_onnx(model, measure.shape, staging / ONNX_FILE, config.export.opset)
    report[ONNX_FILE] = measure.entry(measure.onnx_engine(staging / ONNX_FILE, "onnx-fp32"), staging / ONNX_FILE)
    info["quantize"] = quantize_stage(config, staging / ONNX_FILE, staging, measure)
    if not (staging / INT8_FILE).exists():
        return [ONNX_FILE]
    report[INT8_FILE] = {
        **measure.entry(measure.onnx_engine(staging / INT8_FILE, "onnx-int8"), staging / INT8_FILE),
        "method": info["quantize"]["method"],
    }
    return [ONNX_FILE, INT8_FILE]


def _pruned_artifacts(
    config: TandemConfig,
    model: Any,
    staging: Path,
    measure: Measure,
    report: dict[str, Any],
    info: dict[str, Any],
    fine_tune: FineTune | None,
) -> list[str]:
    """model.pruned.pt (and model.pruned.onnx) into staging, with their parity entries; returns the files written."""
    if config.export.prune is None:
        return []
    pruned, result, info["prune"] = prune_stage(model, config, fine_tune, measure.data)
    atomic_save_torch({k: v.detach().contiguous() for k, v in pruned.state_dict().items()}, staging / PRUNED_FILE)
    sparsity = {"sparsity": round(result.sparsity, 6)}
    report[PRUNED_FILE] = {**measure.entry(measure.torch_engine(pruned), staging / PRUNED_FILE), **sparsity}
    if not config.export.onnx:
        return [PRUNED_FILE]
    info["pruned_onnx"] = export_onnx(pruned, measure.shape, staging / PRUNED_ONNX_FILE, config.export.opset)
    report[PRUNED_ONNX_FILE] = {
        **measure.entry(measure.onnx_engine(staging / PRUNED_ONNX_FILE, "onnx-pruned"), staging / PRUNED_ONNX_FILE),
        **sparsity,
    }
    return [PRUNED_FILE, PRUNED_ONNX_FILE]


def _build(
    config: TandemConfig, folder: Path, staging: Path, model: Any, manifest: dict[str, Any], measure: Measure, fine_tune: FineTune | None
):
    """Write every artifact into staging and measure it; returns (report, info, produced file names)."""
    source_engine = measure.torch_engine(model)
    measure.source_logits = predict_all(source_engine, measure.data.x_val)
    report = {SOURCE: measure.entry(source_engine, folder / MODEL_FILE)}
    measure.source_latency = report[SOURCE]["latency_ms"]
    info = _export_info(config, manifest, measure)
    produced = _onnx_artifacts(config, model, staging, measure, report, info)
    produced += _pruned_artifacts(config, model, staging, measure, report, info, fine_tune)
    return report, info, produced


def export(
    config: TandemConfig,
    source: str | Path = "latest",
    *,
    threads: int = 1,
    latency_budget_s: float = 0.2,
    fine_tune: FineTune | None = None,
) -> ExportResult:
    """Export, quantize and prune the artifact `source` ('latest', a run folder or an artifacts folder).

    threads: intra-op threads of every measurement (torch and ORT alike); latency_budget_s: time
    spent timing each artifact at each batch size; fine_tune(model, config) -> model: the
    fine-tune for export.prune.fine_tune_epochs (default: prune.fine_tune_pruned, in this process). Raises ParityGateError (a ValueError)
    when export.gate is crossed, leaving the artifacts folder as it was.
    """
    from cluster.runtime import storage_root

    where = resolve_artifact(source, storage_root(config), config.name)
    if where.remote:
        return _export_in_store(config, where, threads=threads, latency_budget_s=latency_budget_s, fine_tune=fine_tune)
    folder = where.path
    model, manifest = load_model(folder)  # verifies model.pt's sha256 first
    spec = manifest["model"]
    shape, classes = tuple(int(s) for s in spec["input_shape"]), int(spec["num_classes"])
    measure = Measure(
        data=held_out_data(config, shape),
        source_logits=np.empty(0),
        shape=shape,
        classes=classes,
        batch_sizes=list(config.export.latency_batch_sizes),
        budget_s=latency_budget_s,
        threads=threads,
    )
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    try:
        with torch_threads(threads):
            report, info, produced = _build(config, folder, staging, model, manifest, measure, fine_tune)
        failures = gate_failures(report, config.export.gate)
        if failures:
            raise ParityGateError(folder, failures, report)
        info["exported"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _commit(staging, folder, produced)
        write_manifest(folder, {"parity": report, "export": info})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # The parity report and the exported models join the MLflow run that made the artifact.
    track_export(config, folder, report, [folder / name for name in produced])
    return ExportResult(artifact_dir=folder, report=report, info=info, files=produced)


def _export_in_store(config: TandemConfig, where: Location, **options: Any) -> ExportResult:
    """Export an artifact that lives in an object store: in a local working copy (from this node's
    cache), then published back file by file with the manifest last, so a reader of the store
    sees the old manifest and files or the new ones. A crossed gate publishes nothing."""
    work = Path(tempfile.mkdtemp(prefix="tandem-export-"))
    try:
        copy = work / "artifacts"
        shutil.copytree(local_artifact(where), copy)
        result = export(config, source=str(copy), **options)
        publish_folder(copy, where)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    track_export(config, where, result.report, [where / name for name in result.files])
    return ExportResult(artifact_dir=where, report=result.report, info=result.info, files=result.files)
