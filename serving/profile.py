"""`tandem profile`: what training and inference of the configured model cost on this machine.

    report = profile(config, source="latest")       # or a run folder, an artifacts folder, None
    console.print(report.summary())                 # rich tables
    report.html_path                                # <run>/profile/profile.html, with PNG plots

One call measures, on the machine it runs on:

1. machine limits   fp32/bf16 GEMM peaks per thread count and triad bandwidth (CPU, and GPU
                    where present), serving.profile_measure
2. training         counted forward+backward FLOPs per example, a timed in-process step with the
                    configured optimizer, batch size and precision on one thread (what one Ray
                    Train worker gets), achieved fraction of peak, the epoch and run time at the
                    configured worker count, and ZeRO 0-3 bytes per rank by formula beside the
                    bytes a run measured (--from a run with metrics.jsonl)
3. inference        forward FLOPs, latency per batch size for every engine the artifact has
                    (torch fp32/bf16, ONNX fp32/int8, pruned, a distilled student), throughput,
                    memory and fraction of peak; a running Serve app at concurrency 1 and 32
                    when its URL is given
4. comparison       training vs inference per example (FLOPs, time), inferences per epoch, and
                    recommendations, each with the figure it rests on

The modules: profile (this one: what is profiled, the phases, the atomic write), profile_measure
(peaks, FLOPs, timings, the served load), profile_advice (comparison, recommendations),
profile_plots (PNGs) and profile_report (profile.json, profile.html, rich tables).

Without a trained artifact (source None and none under storage) the untrained model built from
the config is profiled, with torch rows only, and the report says so. Everything is measured
before anything is written; the report is then built in a hidden temp folder beside its target
and renamed into place, so a failing profile leaves no partial report (and an earlier report
stays until the new one is complete).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cluster.artifacts import MODEL_FILE, ArtifactError, find_latest_artifact, load_model, resolve_artifact
from cluster.config import ConfigError, Problem, TandemConfig
from cluster.runtime import storage_root
from serving.engines import INT8_FILE, ONNX_FILE, PRUNED_FILE, PRUNED_ONNX_FILE, Engine, TorchEngine, load_engine
from serving.parity import batch_of
from serving.profile_advice import compare, recommendations
from serving.profile_measure import (
    WEIGHT_BYTES,
    activation_bytes_per_example,
    forward_flops,
    inference_bytes,
    latency_by_batch,
    measure_machine,
    peak_flops,
    probe_serve_app,
    served_latency,
    time_calls,
    torch_threads,
    training_bytes,
    training_flops,
    training_step,
    usable_cores,
)
from training.data import ArrayDataset, load_dataset, split
from training.ds_config import build_optimizer, zero_memory_formula
from training.models import build_model, parameter_count
from training.trainer import preflight, read_history

__all__ = ["ProfileError", "ProfileReport", "Plan", "profile", "plan_for"]

REPORT_DIR = "profile"
ENGINE_THREADS = 1  # a serving replica's default (serving.deployments[].threads) and a Ray Train worker's OMP_NUM_THREADS


class ProfileError(ArtifactError):
    """The profile could not be measured or written; the message names the cause and the fix."""


# ---------------------------------------------------------------------------------------------
# how hard to measure
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    batch_sizes: tuple[int, ...]
    gemm_size: dict[str, int]
    triad_elements: dict[str, int]
    peak_budget_s: float
    step_budget_s: float
    latency_budget_s: float
    served_requests: int


def plan_for(quick: bool) -> Plan:
    """quick: small matrices and arrays, three batch sizes, short budgets (tests; figures are rough)."""
    if quick:
        return Plan((1, 8, 32), {"cpu": 256, "cuda": 1024}, {"cpu": 1 << 18, "cuda": 1 << 22}, 0.05, 0.1, 0.03, 16)
    # 2048^2 fp32 takes ~0.1 s per product on one core here; 2^24-float arrays (64 MB each) are
    # far beyond any CPU cache, so the triad measures DRAM, not L3.
    return Plan((1, 2, 4, 8, 16, 32, 64, 128), {"cpu": 2048, "cuda": 8192}, {"cpu": 1 << 24, "cuda": 1 << 27}, 0.5, 1.0, 0.25, 200)


# ---------------------------------------------------------------------------------------------
# what is profiled
# ---------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """The trained artifact and its run folder, or neither (the untrained model from the config)."""

    artifact_dir: Path | None
    run_dir: Path | None
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def trained(self) -> bool:
        return self.artifact_dir is not None


def find_subject(config: TandemConfig, source: str | Path | None) -> Subject:
    """source None: the latest artifact under storage when there is one, else the untrained model."""
    storage = storage_root(config)
    if source is None:
        try:
            folder = find_latest_artifact(storage, config.name)
        except ArtifactError:
            return Subject(None, None)
    else:
        folder = resolve_artifact(source, storage, config.name)
    _, manifest = load_model(folder)  # verifies model.pt's sha256 before anything is measured
    return Subject(folder, run_folder_of(folder, manifest), manifest)


def run_folder_of(artifact_dir: Path, manifest: dict[str, Any]) -> Path | None:
    """The run folder of an artifact (where metrics.jsonl and config.yaml live), if it has one.

    The artifact's own parent first: the manifest's run_dir is where the run was trained, and a
    copied or moved run would otherwise send the report (and the metrics read) to the original.
    """
    for candidate in (artifact_dir.parent, manifest.get("run_dir")):
        if candidate and ((Path(candidate) / "metrics.jsonl").exists() or (Path(candidate) / "config.yaml").exists()):
            return Path(candidate)
    return None


def checked_dataset(config: TandemConfig, subject: Subject) -> ArrayDataset:
    """The configured data, after the checks training runs (preflight) and, for an artifact, its model's input shape."""
    preflight(config)  # data source, model build, forward on two examples, DeepSpeed JSON: ConfigError naming the field
    dataset = load_dataset(config)
    if subject.trained:
        expected = tuple(subject.manifest["model"]["input_shape"])
        if dataset.input_shape != expected:
            raise ConfigError([Problem(path="data.source", value=config.data.source, message=(
                f"returns examples of shape {dataset.input_shape}, but the model of {subject.artifact_dir} takes {expected}; "
                "fix the data source, or profile another run with --from"))])
    return dataset


# ---------------------------------------------------------------------------------------------
# training phase
# ---------------------------------------------------------------------------------------------


def training_device(config: TandemConfig) -> str:
    return "cuda" if torch.cuda.is_available() and config.training.use_gpu != "false" else "cpu"


def optimizer_steps_per_epoch(config: TandemConfig, train_examples: int) -> tuple[int, int]:
    """(micro-batches, optimizer steps) one worker runs per epoch.

    As training.loop does it: DistributedSampler and DataLoader both drop the remainder, steps are
    micro-batches over gradient_accumulation, capped by max_steps_per_epoch.
    """
    t = config.training
    micro = (train_examples // t.workers) // config.data.batch_size
    steps = max(1, micro // t.gradient_accumulation)
    if t.max_steps_per_epoch:
        steps = min(steps, t.max_steps_per_epoch)
    return steps * t.gradient_accumulation, steps


def labels_of(dataset: ArrayDataset, size: int) -> np.ndarray:
    return dataset.y[np.resize(np.arange(len(dataset.y)), size)]


def profile_training(config: TandemConfig, train_set: ArrayDataset, machine: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Counted FLOPs and a timed in-process step of the configured model, optimizer, batch and precision."""
    t = config.training
    torch.manual_seed(t.seed)
    model = build_model(config, train_set.input_shape, train_set.num_classes)
    batch = config.data.batch_size
    x = torch.from_numpy(batch_of(train_set.x, batch))
    y = torch.from_numpy(labels_of(train_set, batch))
    flops = training_flops(copy.deepcopy(model), x, y)
    forward = forward_flops(copy.deepcopy(model), x)
    device = training_device(config)
    threads = ENGINE_THREADS if device == "cpu" else None
    with torch_threads(ENGINE_THREADS):
        model = model.to(device)
        step = training_step(model, build_optimizer(config, model.parameters()), x.to(device), y.to(device), t.precision, device, t.grad_clip)
        times = time_calls(step, plan.step_budget_s, min_runs=5)
    step_s = float(np.median(times))
    params = parameter_count(model)
    compute_dtype = "fp32" if t.precision == "fp32" else t.precision
    peak = peak_flops(machine, device, compute_dtype, threads)
    achieved = flops["per_example"] * batch / step_s
    traffic = training_bytes(params, t.optimizer.name, batch, 4 * math.prod(train_set.input_shape), activation_bytes_per_example(model.cpu(), x))
    micro, steps = optimizer_steps_per_epoch(config, len(train_set.y))
    # Ray Train workers share this machine's cores: more single-thread workers than cores queue.
    sharing = max(1.0, t.workers * ENGINE_THREADS / usable_cores()) if device == "cpu" else 1.0
    epoch_s = micro * step_s * sharing
    return {
        "device": device,
        "threads": threads,
        "precision": t.precision,
        "optimizer": t.optimizer.name,
        "batch_size": batch,
        "workers": t.workers,
        "parameters": params,
        "flops_per_example": flops["per_example"],
        "flops_by_op": flops["by_op"],
        "forward_flops_per_example": forward["per_example"],
        "step_s": step_s,
        "step_best_s": float(times.min()),
        "step_runs": len(times),
        "samples_per_s": batch / step_s,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak["flops_per_s"] if peak else None,
        "fraction_of_peak": achieved / peak["flops_per_s"] if peak else None,
        "arithmetic_intensity": flops["per_example"] * batch / traffic,
        "train_examples": len(train_set.y),
        "micro_batches_per_epoch": micro,
        "optimizer_steps_per_epoch": steps,
        "core_sharing": sharing,
        "epoch_s": epoch_s,
        "epochs": t.epochs,
        "run_s": epoch_s * t.epochs,
        "model": "untrained, built from the config (model.builder, model.args)",
    }


def run_measurements(subject: Subject, estimate: dict[str, Any]) -> dict[str, Any] | None:
    """The last epoch a run logged (Ray Train + DeepSpeed), beside the in-process estimate."""
    if subject.run_dir is None:
        return None
    history = read_history(subject.run_dir)
    if not history:
        return None
    last = history[-1]
    steps_per_epoch = int(last["step"] / last["epoch"]) if last.get("epoch") else None
    measured = {
        "run_dir": str(subject.run_dir),
        "epochs_logged": len(history),
        "step_time_s": last.get("step_time_s"),
        "samples_per_s": last.get("samples_per_s"),
        "world_size": last.get("world_size"),
        "optimizer_steps_per_epoch": steps_per_epoch,
    }
    if last.get("step_time_s") and steps_per_epoch:
        measured["epoch_s"] = last["step_time_s"] * steps_per_epoch
        expected_step = estimate["step_s"] * estimate["core_sharing"] * (estimate["micro_batches_per_epoch"] / estimate["optimizer_steps_per_epoch"])
        # Above 1: what DeepSpeed, gloo's all-reduce and the data loader add to the bare step.
        measured["step_time_vs_in_process"] = last["step_time_s"] / expected_step
    return measured


# ---------------------------------------------------------------------------------------------
# ZeRO memory
# ---------------------------------------------------------------------------------------------


def zero_rows(params: int, workers: int, precision: str, optimizer: str) -> list[dict[str, Any]]:
    rows = []
    for stage in range(4):
        f = zero_memory_formula(params, workers, stage, precision, optimizer)
        rows.append({"stage": stage, "params_bytes": f["params"], "grads_bytes": f["grads"], "optimizer_bytes": f["optimizer"],
                     "total_bytes": f["params"] + f["grads"] + f["optimizer"]})
    return rows


def run_settings(subject: Subject) -> dict[str, Any]:
    """ZeRO stage, workers, precision and optimizer a run used: its manifest, else its config.yaml, else deepspeed.json."""
    found: dict[str, Any] = {}
    recorded = subject.manifest.get("deepspeed") or {}
    found.update({k: recorded[k] for k in ("zero_stage", "workers", "precision") if k in recorded})
    config_file = subject.run_dir / "config.yaml" if subject.run_dir else None
    if config_file and config_file.exists():
        training = (yaml.safe_load(config_file.read_text()) or {}).get("training", {})
        found.setdefault("zero_stage", training.get("deepspeed", {}).get("zero_stage"))
        found.setdefault("workers", training.get("workers"))
        found.setdefault("precision", training.get("precision"))
        found.setdefault("optimizer", training.get("optimizer", {}).get("name"))
    ds_file = subject.run_dir / "deepspeed.json" if subject.run_dir else None
    if found.get("zero_stage") is None and ds_file and ds_file.exists():
        found["zero_stage"] = json.loads(ds_file.read_text()).get("zero_optimization", {}).get("stage")
    return {k: v for k, v in found.items() if v is not None}


def measured_state_bytes(subject: Subject, config: TandemConfig) -> dict[str, Any] | None:
    """Per-rank tensor bytes a run logged, with the formula for that run's own stage, workers and model."""
    if subject.run_dir is None:
        return None
    logged = [m for m in read_history(subject.run_dir) if "param_bytes_per_rank" in m]
    if not logged:
        return None
    last = logged[-1]
    settings = run_settings(subject)
    per_rank_params = last["param_bytes_per_rank"]
    per_rank_optim = last.get("optimizer_bytes_per_rank") or []
    workers = int(settings.get("workers") or len(per_rank_params))
    stage = int(settings.get("zero_stage", config.training.deepspeed.zero_stage))
    precision = settings.get("precision", config.training.precision)
    optimizer = settings.get("optimizer", config.training.optimizer.name)
    model, _ = load_model(subject.artifact_dir) if subject.artifact_dir else (None, None)
    params = parameter_count(model) if model is not None else None
    formula = zero_memory_formula(params, workers, stage, precision, optimizer) if params else None
    return {
        "stage": stage,
        "workers": workers,
        "precision": precision,
        "optimizer": optimizer,
        "parameters": params,
        "param_bytes_per_rank": per_rank_params,
        "optimizer_bytes_per_rank": per_rank_optim,
        "param_bytes": max(per_rank_params),
        "optimizer_bytes": max(per_rank_optim) if per_rank_optim else None,
        "formula": formula,
        "source": str(subject.run_dir / "metrics.jsonl"),
        "note": "gradients are not measured by the run (DeepSpeed frees or buckets them between steps)",
    }


def zero_memory(config: TandemConfig, params: int, subject: Subject) -> dict[str, Any]:
    t = config.training
    return {
        "parameters": params,
        "workers": t.workers,
        "precision": t.precision,
        "optimizer": t.optimizer.name,
        "configured_stage": t.deepspeed.zero_stage,
        "stages": zero_rows(params, t.workers, t.precision, t.optimizer.name),
        "run": measured_state_bytes(subject, config),
    }


# ---------------------------------------------------------------------------------------------
# inference phase
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One engine row: how to load it, the torch model that counts its FLOPs, its weight format."""

    label: str
    load: Callable[[], Engine]
    model: torch.nn.Module
    weight_format: str
    file: str | None = None


def untrained_candidates(model: torch.nn.Module, input_shape: tuple[int, ...], num_classes: int) -> list[Candidate]:
    def torch_engine(precision: str) -> Callable[[], Engine]:
        return lambda: TorchEngine(copy.deepcopy(model), input_shape=input_shape, num_classes=num_classes, precision=precision, threads=ENGINE_THREADS)

    return [Candidate("torch-fp32", torch_engine("fp32"), model, "fp32"), Candidate("torch-bf16", torch_engine("bf16"), model, "bf16")]


def artifact_candidates(folder: Path, prefix: str = "") -> tuple[list[Candidate], list[str]]:
    """Every engine an artifact folder can run, and a note for each ONNX file it lacks."""
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
                notes.append(f"{prefix}{label}: {folder / name} is absent; run `tandem export` for this row")
            continue
        counted = load_model(folder, name)[0] if name == PRUNED_FILE else model
        candidates.append(Candidate(prefix + label, lambda kwargs=kwargs: load_engine(folder, threads=ENGINE_THREADS, **kwargs), counted, weight_format, name))
    return candidates, notes


def distilled_students(config: TandemConfig, teacher: Path) -> list[Path]:
    """Artifacts of runs under storage that were distilled from `teacher` (training.distill.teacher), newest last."""
    found = []
    teacher = teacher.resolve()
    for config_file in (storage_root(config) / config.name).glob("*/config.yaml"):
        try:
            distill = ((yaml.safe_load(config_file.read_text()) or {}).get("training") or {}).get("distill") or {}
        except yaml.YAMLError:
            continue
        named = distill.get("teacher")
        if not named or named == "latest":  # 'latest' meant whatever was newest then: not traceable
            continue
        named = Path(named).expanduser().resolve()
        student = config_file.parent / "artifacts"
        if teacher in (named, named / "artifacts") and (student / "manifest.json").exists():
            found.append(student)
    return sorted(found, key=lambda p: (p / "manifest.json").stat().st_mtime)


def engine_candidates(config: TandemConfig, subject: Subject, train_set: ArrayDataset) -> tuple[list[Candidate], list[str]]:
    if not subject.trained:
        model = build_model(config, train_set.input_shape, train_set.num_classes)
        notes = ["no trained artifact: the untrained model built from the config is profiled (torch rows only); "
                 "latency and FLOPs do not depend on the weights. Run `tandem train` and `tandem export` for ONNX, int8 and pruned rows"]
        return untrained_candidates(model, train_set.input_shape, int(config.model.args.get("num_classes", train_set.num_classes))), notes
    candidates, notes = artifact_candidates(subject.artifact_dir)
    students = distilled_students(config, subject.artifact_dir)
    if students:
        more, more_notes = artifact_candidates(students[-1], prefix="distilled-")
        candidates += [c for c in more if "bf16" not in c.label and "pruned" not in c.label]
        notes += [f"distilled student: {students[-1]}"] + more_notes
    return candidates, notes


def engine_memory(candidate: Candidate, engine: Engine, folder: Path | None, params: int, activation_bytes: float, largest_batch: int) -> dict[str, Any]:
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
        row["arithmetic_intensity"] = flops * row["batch"] / inference_bytes(params, candidate.weight_format, row["batch"], input_bytes, activations)
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


def profile_inference(config: TandemConfig, subject: Subject, train_set: ArrayDataset, val_set: ArrayDataset, machine: dict[str, Any], plan: Plan) -> dict[str, Any]:
    candidates, notes = engine_candidates(config, subject, train_set)
    engines = []
    with torch_threads(ENGINE_THREADS):  # TorchEngine sets the process's threads; restore them after
        for candidate in candidates:
            folder = None
            if candidate.file:
                folder = subject.artifact_dir if not candidate.label.startswith("distilled-") else distilled_students(config, subject.artifact_dir)[-1]
            engines.append(profile_engine(candidate, folder, val_set.x, machine, plan))
    if any(e["weight_format"] == "int8" for e in engines):
        notes.append("int8 rows are compared with the fp32 peak (no int8 peak is measured)")
    if any(e["label"].startswith("pruned") for e in engines):
        notes.append("pruned rows count dense FLOPs: zeros in the weights are still multiplied by dense kernels")
    return {"threads": ENGINE_THREADS, "batch_sizes": list(plan.batch_sizes), "engines": engines, "notes": notes}


def serve_headers(config: TandemConfig) -> dict[str, str]:
    """The bearer token the app expects (serving.auth.token_env), when it is set here."""
    name = config.serving.auth.token_env
    token = os.environ.get(name) if name else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def profile_served(config: TandemConfig, url: str, example: np.ndarray, plan: Plan) -> list[dict[str, Any]]:
    return [served_latency(url, example, concurrency, requests=max(plan.served_requests, concurrency), deadline_s=60.0, headers=serve_headers(config))
            for concurrency in (1, 32)]


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


@dataclass
class ProfileReport:
    """Where the report was written and what it says (`data` is profile.json)."""

    out_dir: Path
    data: dict[str, Any]

    @property
    def json_path(self) -> Path:
        return self.out_dir / "profile.json"

    @property
    def html_path(self) -> Path:
        return self.out_dir / "profile.html"

    @property
    def html(self) -> Path:
        """The same file as html_path; cluster/cli.py's `tandem profile` prints it under this name."""
        return self.html_path

    @property
    def plot_paths(self) -> dict[str, Path]:
        return {name: self.out_dir / filename for name, filename in self.data["plots"].items()}

    def summary(self) -> Any:
        from serving.profile_report import summary

        return summary(self.data, self.out_dir)


def target_dir(config: TandemConfig, subject: Subject, out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        return Path(out_dir).expanduser().resolve()
    if subject.run_dir is not None:
        return subject.run_dir / REPORT_DIR
    if subject.artifact_dir is not None:
        return subject.artifact_dir.parent / REPORT_DIR
    return storage_root(config) / config.name / f"{REPORT_DIR}-untrained"


def write_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """`build` fills a hidden temp folder beside `target`, which then replaces `target` whole.

    Same filesystem, so each step is a rename; an existing report is moved aside only once the
    new one is complete, and removed after. Any failure removes the temp folder and leaves
    `target` as it was.
    """
    if target.exists() and not target.is_dir():
        raise ProfileError(f"{target} exists and is not a folder; pass another out_dir (--out)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(staging)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
        try:
            os.rename(staging, target)
        except OSError:
            if old is not None:
                os.rename(old, target)  # put the earlier report back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def profile(config: TandemConfig, source: str | Path | None = None, out_dir: str | Path | None = None,
            serve_url: str | None = None, quick: bool = False) -> ProfileReport:
    """Measure training and inference of the configured model here; write profile.json, profile.html and PNG plots.

    source: 'latest', a run folder or an artifacts folder (None: the latest artifact, else the
    untrained model); out_dir: default `<run>/profile/`; serve_url: a running Tandem Serve app,
    measured at concurrency 1 and 32; quick: fewer repetitions and batch sizes.
    """
    plan = plan_for(quick)
    subject = find_subject(config, source)
    dataset = checked_dataset(config, subject)
    train_set, val_set = split(dataset, config.data.val_fraction, config.data.seed)
    if serve_url:
        try:
            probe_serve_app(serve_url, val_set.x[0], headers=serve_headers(config))
        except ValueError as exc:
            raise ProfileError(str(exc)) from None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    machine = measure_machine(devices, plan.gemm_size, plan.triad_elements, plan.peak_budget_s)
    training = profile_training(config, train_set, machine, plan)
    run = run_measurements(subject, training)
    inference = profile_inference(config, subject, train_set, val_set, machine, plan)
    served = profile_served(config, serve_url, val_set.x[0], plan) if serve_url else None
    zero = zero_memory(config, training["parameters"], subject)
    data = {
        "name": config.name,
        "config_hash": config.config_hash(),
        "quick": quick,
        "source": {
            "trained": subject.trained,
            "artifact_dir": str(subject.artifact_dir) if subject.artifact_dir else None,
            "run_dir": str(subject.run_dir) if subject.run_dir else None,
            "model": subject.manifest.get("model") or {"builder": config.model.builder, "args": config.model.args},
        },
        "machine": machine,
        "training": {**training, "run": run},
        "zero": zero,
        "inference": inference,
        "served": {"url": serve_url, "levels": served} if serve_url else None,
        "comparison": compare(training, inference),
        "recommendations": recommendations(config, training, inference, zero, machine, run, served),
        "notes": report_notes(subject, machine, training, zero, quick) + above_peak_notes(training, inference) + inference["notes"],
    }
    data["plots"] = {}
    target = target_dir(config, subject, out_dir)

    def build(folder: Path) -> None:
        from serving.profile_plots import PLOTS, draw_plots
        from serving.profile_report import write_html, write_json

        data["plots"] = dict(PLOTS)
        draw_plots(data, folder)
        write_json(data, folder / "profile.json")
        write_html(data, folder / "profile.html")

    write_atomically(target, build)
    return ProfileReport(out_dir=target, data=data)


def peak_notes(machine: dict[str, Any]) -> list[str]:
    """Say so when more threads measured slower than one: other processes held the cores."""
    notes = []
    single = {(p["device"], p["dtype"]): p["flops_per_s"] for p in machine["peaks"] if p["threads"] == 1}
    for peak in machine["peaks"]:
        one = single.get((peak["device"], peak["dtype"]))
        if peak["threads"] and peak["threads"] > 1 and one and peak["flops_per_s"] < one:
            notes.append(f"{peak['device']} {peak['dtype']} with {peak['threads']} threads measured slower than with one "
                         f"({peak['flops_per_s'] / 1e9:.3g} vs {one / 1e9:.3g} GFLOP/s): other processes held the cores")
    return notes


def above_peak_notes(training: dict[str, Any], inference: dict[str, Any]) -> list[str]:
    """A measurement above its measured peak means the peak run was disturbed, not that the engine beat the hardware."""
    above = [f"{e['label']} at batch {r['batch']} ({r['fraction_of_peak']:.0%})" for e in inference["engines"] for r in e["latency"]
             if (r["fraction_of_peak"] or 0) > 1]
    if (training["fraction_of_peak"] or 0) > 1:
        above.insert(0, f"the training step ({training['fraction_of_peak']:.0%})")
    if not above:
        return []
    return [f"{len(above)} measurement(s) exceed the measured peak, e.g. {', '.join(above[:3])}: the peak's runs were slowed by other "
            "work on the machine, so fractions of peak and the roofline are unreliable here; profile again on an idle machine"]


def report_notes(subject: Subject, machine: dict[str, Any], training: dict[str, Any], zero: dict[str, Any], quick: bool) -> list[str]:
    notes = []
    if quick:
        notes.append("quick profile: small matrices and arrays, three batch sizes, short timings; peaks are rough and the triad "
                     "arrays fit in cache (it measures cache, not DRAM, bandwidth)")
    if not subject.trained:
        notes.append("profiled the untrained model built from the config: no trained artifact was found (pass --from RUN to profile one)")
    if machine["load_average"] > machine["cores"]:
        notes.append(f"the machine was busy while measuring (load average {machine['load_average']:.1f} on {machine['cores']} cores): "
                     "peaks, step times and latencies are lower than on an idle machine")
    notes += peak_notes(machine)
    notes.append(f"the training step is measured in this process on {training['threads'] or 'one GPU'} thread(s), without DeepSpeed's "
                 "communication; epoch and run times are estimates from it")
    run = zero.get("run")
    if run and run.get("parameters") and run["parameters"] != zero["parameters"]:
        notes.append(f"the run's model has {run['parameters']:,} parameters and the config's {zero['parameters']:,}: the measured "
                     "bytes are compared with the formula for the run's model")
    if run:
        notes.append(f"the run {run['source'].removesuffix('/metrics.jsonl')} trained with ZeRO-{run['stage']} (configured now: "
                     f"ZeRO-{zero['configured_stage']}); its measured bytes sit at the ZeRO-{run['stage']} row")
    if run and (run["workers"] != zero["workers"] or run["precision"] != zero["precision"]):
        notes.append(f"the run used {run['workers']} workers in {run['precision']}; the table is for the configured "
                     f"{zero['workers']} workers in {zero['precision']}")
    return notes
