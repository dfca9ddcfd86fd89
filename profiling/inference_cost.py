"""Inference cost: latency per batch size, throughput and memory of every engine the artifact has, and of a running app."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cluster.artifacts import MANIFEST, MODEL_FILE, load_model, local_artifact
from cluster.config import TandemConfig
from cluster.runtime import storage_root
from cluster.storage import Location, location
from profiling.measure import (
    WEIGHT_BYTES,
    activation_bytes_per_example,
    forward_flops,
    inference_bytes,
    latency_by_batch,
    peak_flops,
    served_latency,
    torch_threads,
)
from profiling.subject import ENGINE_THREADS, Plan, Subject
from serving.engines import INT8_FILE, ONNX_FILE, PRUNED_FILE, PRUNED_ONNX_FILE, Engine, TorchEngine, load_engine
from serving.optimize.parity import batch_of
from training.data import ArrayDataset
from training.models import build_model, parameter_count


@dataclass
class Candidate:
    """One engine row: how to load it, the torch model that counts its FLOPs, its weight format."""

    label: str
    load: Callable[[], Engine]
    model: torch.nn.Module
    weight_format: str
    file: str | None = None
    folder: Path | None = None  # the local artifact folder `file` is in (its manifest gives the file's size)


def untrained_candidates(model: torch.nn.Module, input_shape: tuple[int, ...], num_classes: int) -> list[Candidate]:
    def torch_engine(precision: str) -> Callable[[], Engine]:
        return lambda: TorchEngine(
            copy.deepcopy(model), input_shape=input_shape, num_classes=num_classes, precision=precision, threads=ENGINE_THREADS
        )

    return [Candidate("torch-fp32", torch_engine("fp32"), model, "fp32"), Candidate("torch-bf16", torch_engine("bf16"), model, "bf16")]


def artifact_candidates(folder: Path, prefix: str = "", where: Path | Location | None = None) -> tuple[list[Candidate], list[str]]:
    """Every engine an artifact folder can run, and a note for each ONNX file it lacks.

    folder: the artifact's files on this machine; where: the artifact the notes name (default
    folder; a stored artifact's URI rather than this node's cache)."""
    model, manifest = load_model(folder)
    files = manifest.get("files", {})
    specs = [
        ("torch-fp32", MODEL_FILE, {"engine": "torch", "precision": "fp32"}, "fp32"),
        ("torch-bf16", MODEL_FILE, {"engine": "torch", "precision": "bf16"}, "bf16"),
        ("onnx-fp32", ONNX_FILE, {"engine": "onnxruntime"}, "fp32"),
        ("onnx-int8", INT8_FILE, {"engine": "onnxruntime", "quantize": "int8"}, "int8"),
        ("pruned-torch-fp32", PRUNED_FILE, {"engine": "torch", "pruned": True}, "fp32"),
        ("pruned-onnx-fp32", PRUNED_ONNX_FILE, {"engine": "onnxruntime", "pruned": True}, "fp32"),
    ]
    candidates, notes = [], []
    for label, name, kwargs, weight_format in specs:
        if name not in files:
            if name in (ONNX_FILE, INT8_FILE):
                notes.append(f"{prefix}{label}: {(where or folder) / name} is absent; run `tandem export` for this row")
            continue
        counted = load_model(folder, name)[0] if name == PRUNED_FILE else model
        candidates.append(
            Candidate(
                prefix + label,
                lambda kwargs=kwargs: load_engine(folder, threads=ENGINE_THREADS, **kwargs),
                counted,
                weight_format,
                name,
                folder,
            )
        )
    return candidates, notes


def distilled_students(config: TandemConfig, teacher: Path | Location) -> list[Location]:
    """Artifacts of runs under storage that were distilled from `teacher` (training.distill.teacher), newest last.

    One listing of `<storage>/<name>/` and one read of each run's config.yaml, in a folder or an object store alike."""
    found = []
    teacher = location(teacher)
    for run in (storage_root(config) / config.name).children():
        distill = distill_section(run / "config.yaml")
        named = distill.get("teacher")
        if not named or named == "latest":  # 'latest' meant whatever was newest then: not traceable
            continue
        named = location(named)
        student = run / "artifacts"
        if teacher in (named, named / "artifacts") and (student / MANIFEST).is_file():
            found.append(student)
    return sorted(found, key=lambda folder: (folder / MANIFEST).stat()[0])


def distill_section(config_file: Location) -> dict[str, Any]:
    """training.distill of a run's config.yaml; empty for an entry that is not a run folder or a file that is not YAML."""
    try:
        distill = ((yaml.safe_load(config_file.read_text()) or {}).get("training") or {}).get("distill") or {}
    except (FileNotFoundError, NotADirectoryError, yaml.YAMLError):
        return {}
    return distill if isinstance(distill, dict) else {}


def engine_candidates(config: TandemConfig, subject: Subject, train_set: ArrayDataset) -> tuple[list[Candidate], list[str]]:
    if not subject.trained:
        model = build_model(config, train_set.input_shape, train_set.num_classes)
        notes = [
            "no trained artifact: the untrained model built from the config is profiled (torch rows only); "
            "latency and FLOPs do not depend on the weights. Run `tandem train` and `tandem export` for ONNX, int8 and pruned rows"
        ]
        return untrained_candidates(model, train_set.input_shape, int(config.model.args.get("num_classes", train_set.num_classes))), notes
    candidates, notes = artifact_candidates(subject.local_dir, where=subject.artifact_dir)
    students = distilled_students(config, subject.artifact_dir)
    if students:
        more, more_notes = artifact_candidates(local_artifact(students[-1]), prefix="distilled-", where=students[-1])
        candidates += [c for c in more if "bf16" not in c.label and "pruned" not in c.label]
        notes += [f"distilled student: {students[-1]}"] + more_notes
    return candidates, notes


def engine_memory(
    candidate: Candidate, engine: Engine, folder: Path | None, params: int, activation_bytes: float, largest_batch: int
) -> dict[str, Any]:
    """Weights in memory (or on disk for ONNX) and activations at the largest batch; measured on CUDA."""
    files = {}
    if folder is not None:
        from cluster.artifacts import read_manifest

        files = read_manifest(folder).get("files", {})
    memory = {
        "weights_bytes": params * WEIGHT_BYTES[candidate.weight_format],
        "file_bytes": files.get(candidate.file, {}).get("bytes") if candidate.file else None,
        "activation_bytes_at_largest_batch": activation_bytes * largest_batch,
        "largest_batch": largest_batch,
    }
    if getattr(engine, "device", "cpu") == "cuda" and torch.cuda.is_available():
        memory["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return memory


def profile_engine(candidate: Candidate, folder: Path | None, examples: np.ndarray, machine: dict[str, Any], plan: Plan) -> dict[str, Any]:
    x = torch.from_numpy(batch_of(examples, 2))
    flops = forward_flops(copy.deepcopy(candidate.model).float(), x)["per_example"]
    activations = activation_bytes_per_example(copy.deepcopy(candidate.model).float(), x)
    params = parameter_count(candidate.model)
    input_bytes = 4 * examples[0].size
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    engine = candidate.load()
    device = getattr(engine, "device", "cpu")
    threads = ENGINE_THREADS if device == "cpu" else None
    dtype = "bf16" if candidate.label.endswith("bf16") else candidate.weight_format
    peak = peak_flops(machine, device, dtype, threads)
    rows = latency_by_batch(engine.predict, examples, list(plan.batch_sizes), plan.latency_budget_s)
    for row in rows:
        row["achieved_flops_per_s"] = flops * row["batch"] / (row["p50_ms"] / 1e3)
        row["fraction_of_peak"] = row["achieved_flops_per_s"] / peak["flops_per_s"] if peak else None
        row["arithmetic_intensity"] = (
            flops * row["batch"] / inference_bytes(params, candidate.weight_format, row["batch"], input_bytes, activations)
        )
    memory = engine_memory(candidate, engine, folder, params, activations, max(plan.batch_sizes))
    del engine  # an ORT session's threads and buffers go before the next engine is timed
    return {
        "label": candidate.label,
        "engine": candidate.label,
        "file": candidate.file,
        "device": device,
        "threads": threads,
        "weight_format": candidate.weight_format,
        "parameters": params,
        "forward_flops_per_example": flops,
        "peak_dtype": "fp32" if dtype == "int8" else dtype,
        "peak_flops_per_s": peak["flops_per_s"] if peak else None,
        "memory": memory,
        "latency": rows,
    }


def profile_inference(
    config: TandemConfig, subject: Subject, train_set: ArrayDataset, val_set: ArrayDataset, machine: dict[str, Any], plan: Plan
) -> dict[str, Any]:
    candidates, notes = engine_candidates(config, subject, train_set)
    engines = []
    with torch_threads(ENGINE_THREADS):  # TorchEngine sets the process's threads; restore them after
        for candidate in candidates:
            engines.append(profile_engine(candidate, candidate.folder if candidate.file else None, val_set.x, machine, plan))
    if any(e["weight_format"] == "int8" for e in engines):
        notes.append("int8 rows are compared with the fp32 peak (no int8 peak is measured)")
    if any(e["label"].startswith("pruned") for e in engines):
        notes.append("pruned rows count dense FLOPs: zeros in the weights are still multiplied by dense kernels")
    return {"threads": ENGINE_THREADS, "batch_sizes": list(plan.batch_sizes), "engines": engines, "notes": notes}


def serve_token(config: TandemConfig) -> str | None:
    """The bearer token the app expects (serving.auth.token_env), when it is set here."""
    name = config.serving.auth.token_env
    return os.environ.get(name) if name else None


def profile_served(config: TandemConfig, url: str, example: np.ndarray, plan: Plan) -> list[dict[str, Any]]:
    return [
        served_latency(
            url, example, concurrency, requests=max(plan.served_requests, concurrency), deadline_s=60.0, token=serve_token(config)
        )
        for concurrency in (1, 32)
    ]


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
