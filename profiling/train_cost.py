"""Training cost: FLOPs and a timed step per example, the epoch and run time, ZeRO 0-3 memory per rank."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import numpy as np
import torch
import yaml

from cluster.artifacts import load_model
from cluster.config import TandemConfig
from profiling.measure import (
    activation_bytes_per_example,
    forward_flops,
    peak_flops,
    time_calls,
    torch_threads,
    training_bytes,
    training_flops,
    training_step,
    usable_cores,
)
from profiling.subject import ENGINE_THREADS, Plan, Subject
from serving.optimize.parity import batch_of
from training.data import ArrayDataset
from training.ds_config import build_optimizer, zero_memory_formula
from training.models import build_model, parameter_count
from training.trainer import read_history


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
        step = training_step(
            model, build_optimizer(config, model.parameters()), x.to(device), y.to(device), t.precision, device, t.grad_clip
        )
        times = time_calls(step, plan.step_budget_s, min_runs=5)
    step_s = float(np.median(times))
    params = parameter_count(model)
    compute_dtype = "fp32" if t.precision == "fp32" else t.precision
    peak = peak_flops(machine, device, compute_dtype, threads)
    achieved = flops["per_example"] * batch / step_s
    traffic = training_bytes(
        params, t.optimizer.name, batch, 4 * math.prod(train_set.input_shape), activation_bytes_per_example(model.cpu(), x)
    )
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
        expected_step = (
            estimate["step_s"] * estimate["core_sharing"] * (estimate["micro_batches_per_epoch"] / estimate["optimizer_steps_per_epoch"])
        )
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
        rows.append(
            {
                "stage": stage,
                "params_bytes": f["params"],
                "grads_bytes": f["grads"],
                "optimizer_bytes": f["optimizer"],
                "total_bytes": f["params"] + f["grads"] + f["optimizer"],
            }
        )
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
    model, _ = load_model(subject.local_dir) if subject.local_dir else (None, None)
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
