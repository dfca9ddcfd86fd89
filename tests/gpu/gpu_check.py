"""`make gpu-check`: Tandem's CUDA paths in one short run, on a GPU machine without Ray.

    python -m tests.gpu.gpu_check [--wheels DIR] [--dry-run] [--only PREFIX,...] [--out DIR] [--budget-s S]
    python -m tests.gpu.gpu_check --list          # the checks and what each line means

Every check prints one line, `PASS|FAIL|SKIP  name  figures`; the exit status is 1 when any check
failed (SKIP is not a failure: it says why the check could not run here). Without CUDA it says so
and exits 0 having run nothing. `--dry-run` runs every check on the CPU instead, fp32 only and
fewer steps, so that this script is itself tested where there is no GPU.

Why no Ray: the GPU machine this is built for has neither Ray nor DeepSpeed nor pydantic, and no
network. `make gpu-wheels` builds DeepSpeed's wheel and downloads pydantic's (Python 3.12,
manylinux) into gpu-wheels/; with `--wheels` they are installed with `pip --no-index` into a
temporary folder and this script runs again with that folder first on the path. Ray Train's part
of a training run (one process per rank, the process group, keeping reported checkpoints) is done
by `launch` and `LocalSession`; the per-worker loop itself is training.loop.run_worker, the same
function Ray Train runs.

Each training job runs in its own process (as a Ray Train worker does), with a timeout, its output
in `<out>/<check>/<job>/rank-N.log`; serving and profiling run in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.abc
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODULE = __spec__.name if __spec__ is not None and __spec__.name != "__main__" else "tests.gpu.gpu_check"
EXAMPLE = ROOT / "examples" / "digits.yaml"
SITE_ENV = "TANDEM_GPU_CHECK_SITE"  # set in the run that has the wheels installed
# Not on the GPU machine; refused here too, so a CPU run proves the checks do not need them.
ABSENT_ON_GPU_MACHINE = ("ray", "fastapi", "starlette", "uvicorn", "optuna")
# What `make gpu-wheels` downloads besides DeepSpeed: what the GPU machine lacks of DeepSpeed's and
# Tandem's needs (pydantic needs typing-extensions >= 4.16; the machine's may be older).
WHEELS_FROM_THIS_VENV = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "hjson")
WHEELS_LIMIT_BYTES = 48 * 2**20  # the device tool carries 64 MiB with the source tree
DEFAULT_BUDGET_S = 450.0  # the limit is 8 minutes on the GPU machine


# ---------------------------------------------------------------------------------------------
# the profile's functions (profiling/), in one place
# ---------------------------------------------------------------------------------------------


def profile_api() -> SimpleNamespace:
    from profiling.measure import measure_machine, time_calls
    from profiling.subject import plan_for
    from profiling.train_cost import profile_training
    from serving.engines import torch_threads

    return SimpleNamespace(
        plan_for=plan_for,
        profile_training=profile_training,
        measure_machine=measure_machine,
        time_calls=time_calls,
        torch_threads=torch_threads,
    )


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


class CheckFailed(AssertionError):
    """A check ran and its figures are out of bounds; the message holds the figures and the bound."""


class Skip(RuntimeError):
    """The check cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class Check:
    name: str
    means: str  # what the line's figures are and what PASS requires (printed by --list, in docs/guides/gpu.md)
    run: Callable[[Context], str]  # returns the figures; raises CheckFailed, Skip or anything else (FAIL)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def rate(value: float, unit: str) -> str:
    """1.23 TFLOP/s, 45.6 GFLOP/s: the prefix that keeps 3 significant digits readable."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def require(ok: bool, figures: str, bound: str) -> None:
    if not ok:
        raise CheckFailed(f"{figures} [{bound}]")


# ---------------------------------------------------------------------------------------------
# the run's context: device, sizes, the training config, the job launcher
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    dry_run: bool
    out: Path
    deadline: float
    epochs: int = 7  # 44 steps an epoch on the digits at batch 32: about 300 steps
    max_steps_per_epoch: int | None = None
    job_timeout_s: float = 180.0
    min_val_accuracy: float = 0.9
    data_note: str = ""
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def config(self, *, zero_stage: int, precision: str, workers: int = 1, epochs: int | None = None) -> Any:
        """The packaged example, on this device, at world size `workers`."""
        from cluster.config import config_with, load_config

        updates: dict[str, Any] = {
            "training.workers": workers,
            "training.deepspeed.zero_stage": zero_stage,
            "training.precision": precision,
            "training.epochs": epochs or self.epochs,
            "training.max_steps_per_epoch": self.max_steps_per_epoch,
            "training.use_gpu": "false" if self.dry_run else "true",
            # fp16 and use_gpu: true are refused unless a node group has GPUs (config cross-checks).
            "cluster.node_groups.cpu.gpus": 0 if self.dry_run else 1,
        }
        if importlib.util.find_spec("sklearn") is None:
            self.data_note = "data: training.data:synthetic (no scikit-learn here, so no digits)"
            updates |= {"data.source": "training.data:synthetic", "data.args": {"samples": 1797, "features": 64, "classes": 10}}
        return config_with(load_config(EXAMPLE), updates)

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def launch(self, folder: Path, config: Any, world: int, resume_from: str | None = None, probe: bool = False) -> list[dict[str, Any]]:
        """Run training.loop.run_worker in `world` fresh processes (ranks), as Ray Train would; their results.

        One process group over the ranks, NCCL on GPU, gloo on CPU, like Ray Train's TorchConfig.
        Ranks share GPU 0 when the machine has one GPU.
        """
        import torch

        from training.trainer import worker_env

        folder.mkdir(parents=True, exist_ok=True)
        gpus = torch.cuda.device_count() if not self.dry_run else 0
        port = free_port()
        env = {**os.environ, **worker_env(not self.dry_run)}
        if probe:
            # torch's error says only "invalid usage"; NCCL's WARN line in the rank's log says why.
            env.setdefault("NCCL_DEBUG", "WARN")
        procs = []
        for rank in range(world):
            spec = {
                "rank": rank,
                "world_size": world,
                "local_rank": rank % gpus if gpus else 0,
                "master_port": port,
                "backend": "gloo" if self.dry_run else "nccl",
                "use_gpu": not self.dry_run,
                "config": config.to_dict(),
                "resume_from": resume_from,
                "probe": probe,
                "timeout_s": self.job_timeout_s,
                "checkpoint_root": str(folder / "checkpoints"),
                "result": str(folder / f"result-{rank}.json"),
            }
            (folder / f"spec-{rank}.json").write_text(json.dumps(spec))
            log = open(folder / f"rank-{rank}.log", "w")
            procs.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-m", MODULE, "--worker", str(folder / f"spec-{rank}.json")],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=ROOT,
                    ),
                    log,
                )
            )
        limit = min(self.job_timeout_s, max(1.0, self.remaining_s()))
        stop_at = time.monotonic() + limit
        try:
            for proc, _ in procs:
                proc.wait(timeout=max(0.1, stop_at - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"timed out after {limit:.0f} s; see {folder}/rank-*.log") from None
        finally:
            for proc, log in procs:
                if proc.poll() is None:
                    proc.kill()  # only the ranks this call started
                    proc.wait()
                log.close()
        for rank, (proc, _) in enumerate(procs):
            if proc.returncode != 0:
                raise CheckFailed(
                    f"rank {rank} exited {proc.returncode}: {last_error(folder / f'rank-{rank}.log')} (log {folder}/rank-{rank}.log)"
                )
        return [json.loads((folder / f"result-{rank}.json").read_text()) for rank in range(world)]

    def val_split(self, config: Any) -> Any:
        from training.data import load_dataset, split

        return split(load_dataset(config), config.data.val_fraction, config.data.seed)[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def last_error(log: Path) -> str:
    """The exception line of a worker's log (its last 'SomethingError: ...'), else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if ":" in line and (head.endswith(("Error", "Exception", "Failed")) or head.startswith("torch.")):
            return line[:400]
    return lines[-1][:400] if lines else "(empty log)"


# ---------------------------------------------------------------------------------------------
# one rank of a training job (a process of its own)
# ---------------------------------------------------------------------------------------------


@dataclass
class LocalSession:
    """training.loop.WorkerSession for a plain process: Ray Train's worker context, as far as the loop uses it."""

    rank: int
    world_size: int
    local_rank: int
    checkpoint_root: Path
    reports: list[dict[str, Any]] = field(default_factory=list)

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        # No retried worker group here: a resume goes through loop_config["resume_from"], as --resume does.
        return contextlib.nullcontext(None)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        kept = None
        if checkpoint_dir is not None:
            # As Ray Train does: every rank's files merged into one folder per checkpoint.
            kept = self.checkpoint_root / f"epoch-{int(metrics['epoch']):04d}"
            shutil.copytree(checkpoint_dir, kept, dirs_exist_ok=True)
        self.reports.append({**metrics, "checkpoint": str(kept) if kept else None})

    def node_id(self) -> str:
        return socket.gethostname()


def engine_facts(engine: Any) -> dict[str, Any]:
    """What the check asserts about the DeepSpeed engine the loop built."""
    param = next(engine.module.parameters())
    facts = {
        "zero_stage": int(engine.zero_optimization_stage()),
        "device": str(engine.device),
        "param_dtype": str(param.dtype).replace("torch.", ""),
        "param_device": param.device.type,
        "fp16": bool(engine.fp16_enabled()),
        "bf16": bool(engine.bfloat16_enabled()),
        "global_steps": int(engine.global_steps),
        "skipped_steps": int(engine.skipped_steps),
    }
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None:
        facts["loss_scale"] = float(scaler.cur_scale)
        facts["dynamic_loss_scale"] = bool(scaler.dynamic)
    return facts


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    rank, world = spec["rank"], spec["world_size"]
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(spec["local_rank"]),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(spec["master_port"]),
        }
    )
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if spec["use_gpu"]:
        torch.cuda.set_device(spec["local_rank"])
    # What Ray Train does before the loop starts (DeepSpeed's init_distributed reuses the group).
    dist.init_process_group(spec["backend"], rank=rank, world_size=world, timeout=timedelta(seconds=spec["timeout_s"]))
    result: dict[str, Any] = {"rank": rank}
    if spec["probe"]:
        # NCCL refuses two ranks on one GPU ("Duplicate GPU detected") at its first collective.
        probe = torch.ones(1, device="cuda" if spec["use_gpu"] else "cpu")
        try:
            dist.all_reduce(probe)
            result["probe_sum"] = float(probe.item())
        except Exception as exc:  # noqa: BLE001 - the refusal is the finding
            result["refused"] = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:1000] or type(exc).__name__
            write_json(Path(spec["result"]), result)
            os._exit(0)  # a failed NCCL communicator can hang the normal shutdown
    from training.loop import run_worker

    session = LocalSession(rank, world, spec["local_rank"], Path(spec["checkpoint_root"]))
    started = time.perf_counter()
    engine = run_worker({"config": spec["config"], "use_gpu": spec["use_gpu"], "resume_from": spec["resume_from"]}, session)
    result.update(seconds=time.perf_counter() - started, reports=session.reports, engine=engine_facts(engine))
    write_json(Path(spec["result"]), result)
    dist.destroy_process_group()
    return 0


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# 1 and 2: DeepSpeed through training.loop.run_worker
# ---------------------------------------------------------------------------------------------


def loss_figures(reports: list[dict[str, Any]]) -> tuple[float, float, str]:
    first, last = reports[0]["train_loss"], reports[-1]["train_loss"]
    return first, last, f"loss {first:.3f} -> {last:.3f}"


def consolidated_on_cpu(ctx: Context, config: Any, run_dir: Path, checkpoint: str) -> tuple[float, str]:
    """The checkpoint's consolidated weights as `tandem train` makes them (artifacts/model.pt), loaded on the CPU.

    torch.load without map_location and with weights_only=True: every tensor must come back on the
    CPU as fp32, so the file loads on a machine without CUDA and holds nothing but tensors.
    """
    import torch

    from cluster.artifacts import MODEL_FILE, load_model
    from training.trainer import consolidate

    # consolidate() reads only result.checkpoint's path and filesystem (Ray's Checkpoint, without Ray here: a local
    # pyarrow filesystem's type_name); its "[tandem] artifact" line is not a check's.
    result = SimpleNamespace(checkpoint=SimpleNamespace(path=checkpoint, filesystem=SimpleNamespace(type_name="local")))
    with open(run_dir / "consolidate.log", "w") as log, contextlib.redirect_stdout(log):
        artifact = consolidate(config, run_dir, result).artifact_dir
    state = torch.load(artifact / MODEL_FILE, weights_only=True)
    odd = [k for k, v in state.items() if v.device.type != "cpu" or (v.is_floating_point() and v.dtype != torch.float32)]
    require(not odd, f"model.pt tensors not CPU fp32: {odd[:3]}", "all CPU fp32")
    model, _ = load_model(artifact)  # verifies the sha256, weights_only=True
    val = ctx.val_split(config)
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(val.x)).argmax(1).numpy() == val.y).mean())
    return accuracy, f"model.pt on CPU (weights_only) acc {accuracy:.3f}"


def train_check(stage: int, precision: str) -> Callable[[Context], str]:
    def run(ctx: Context) -> str:
        config = ctx.config(zero_stage=stage, precision=precision)
        run_dir = ctx.out / f"train-zero{stage}-{precision}"
        (result,) = ctx.launch(run_dir / "train", config, world=1)
        reports, engine = result["reports"], result["engine"]
        first, last, loss_text = loss_figures(reports)
        steps, acc = reports[-1]["step"], reports[-1]["val_accuracy"]
        figures = [f"{steps} steps {1000 * reports[-1]['step_time_s']:.1f} ms/step, {loss_text}, val_acc {acc:.3f}"]
        require(len(reports) == config.training.epochs, f"{len(reports)} reports", f"one per epoch ({config.training.epochs})")
        require(
            engine["zero_stage"] == stage and engine["device"].startswith(ctx.device),
            f"engine {engine['device']} ZeRO-{engine['zero_stage']}",
            f"ZeRO-{stage} on {ctx.device}",
        )
        half = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
        require(
            engine["param_dtype"] == half and engine["fp16"] == (precision == "fp16") and engine["bf16"] == (precision == "bf16"),
            f"params {engine['param_dtype']}, fp16 {engine['fp16']}, bf16 {engine['bf16']}",
            f"{precision} weights",
        )
        if precision == "fp16":
            figures.append(
                f"loss scale {engine.get('loss_scale', 0):.0f} ({'dynamic' if engine.get('dynamic_loss_scale') else 'STATIC'}), "
                f"{engine['skipped_steps']} skipped steps"
            )
            require(bool(engine.get("dynamic_loss_scale")), figures[-1], "dynamic loss scaling on")
            require(engine["skipped_steps"] <= steps // 10, figures[-1], "at most 10% of steps skipped on overflow")
        require(last < 0.5 * first and acc >= ctx.min_val_accuracy, figures[0], f"loss halves, val_acc >= {ctx.min_val_accuracy}")
        checkpoint = reports[-1]["checkpoint"]
        require(checkpoint is not None and (Path(checkpoint) / "latest").is_file(), f"checkpoint {checkpoint}", "saved with a 'latest' tag")

        # Reloaded in a fresh process (as `tandem train --resume CHECKPOINT` does), one more epoch.
        resumed_config = ctx.config(zero_stage=stage, precision=precision, epochs=config.training.epochs + 1)
        (again,) = ctx.launch(run_dir / "resume", resumed_config, world=1, resume_from=checkpoint)
        after = again["reports"]
        per_epoch = reports[0]["step"]
        figures.append(f"reloaded at step {steps} -> {after[-1]['step']} loss {after[-1]['train_loss']:.3f}")
        require(len(after) == 1 and after[-1]["step"] == steps + per_epoch, figures[-1], f"one more epoch, to step {steps + per_epoch}")
        require(after[-1]["train_loss"] < 0.5 * first, figures[-1], f"loss stays below half of the first epoch's {first:.3f}")

        cpu_acc, cpu_text = consolidated_on_cpu(ctx, config, run_dir, checkpoint)
        figures.append(cpu_text)
        require(abs(cpu_acc - acc) <= 0.03, figures[-1], f"within 0.03 of the worker's val_acc {acc:.3f}")
        figures.append(f"peak {reports[-1]['peak_memory_mb']:.0f} MiB")
        return "; ".join(figures)

    return run


def two_process_check(ctx: Context) -> str:
    import torch

    precision = "fp32" if ctx.dry_run else "bf16"
    config = ctx.config(zero_stage=3, precision=precision, workers=2, epochs=3)
    run_dir = ctx.out / "two-process"
    results = ctx.launch(run_dir / "train", config, world=2, probe=True)
    refused = [r["refused"] for r in results if "refused" in r]
    logs = " ".join((run_dir / "train" / f"rank-{rank}.log").read_text(errors="replace") for rank in range(2))
    gpus = torch.cuda.device_count() if not ctx.dry_run else 0
    where = "2 ranks on CPU (gloo)" if ctx.dry_run else f"2 ranks on {gpus} GPU(s) (NCCL {'.'.join(map(str, torch.cuda.nccl.version()))})"
    if refused:
        duplicate = next(
            (line.strip() for text in (*refused, logs) for line in text.replace(" | ", "\n").splitlines() if "Duplicate GPU" in line), None
        )
        if duplicate:
            raise Skip(
                f"{where}: NCCL refuses two ranks on one GPU ('{duplicate[duplicate.index('Duplicate GPU') :][:90]}'); this check needs 2 "
                "GPUs"
            )
        raise CheckFailed(f"{where}: the first all_reduce failed: {refused[0][:300]}")
    reports = [r["reports"] for r in results]
    first, last, loss_text = loss_figures(reports[0])
    params = reports[0][-1]["param_bytes_per_rank"]
    acc = reports[0][-1]["val_accuracy"]
    figures = [
        f"{where}, ZeRO-3 {precision}: {reports[0][-1]['step']} steps, {loss_text}, val_acc {acc:.3f}",
        f"params per rank {params[0] / 1024:.0f}/{params[1] / 1024:.0f} KiB",
    ]
    require(
        last < 0.5 * first and acc >= ctx.min_val_accuracy - 0.1, figures[0], f"loss halves, val_acc >= {ctx.min_val_accuracy - 0.1:.2f}"
    )
    total = 4 * sum(p.numel() for p in build_untrained(config).parameters()) * (0.5 if precision != "fp32" else 1.0)
    require(max(params) < 0.75 * total, figures[1], f"each rank holds about half of {total / 1024:.0f} KiB (ZeRO-3 partitions)")
    require(reports[0][-1]["train_loss"] == reports[1][-1]["train_loss"], "train_loss differs between ranks", "all-reduced: equal")
    cpu_acc, cpu_text = consolidated_on_cpu(ctx, config, run_dir, reports[0][-1]["checkpoint"])
    figures.append(cpu_text)
    require(abs(cpu_acc - acc) <= 0.03, cpu_text, f"within 0.03 of the ranks' val_acc {acc:.3f}")
    return "; ".join(figures)


def build_untrained(config: Any) -> Any:
    from training.data import load_dataset
    from training.models import build_model

    dataset = load_dataset(config)
    return build_model(config, dataset.input_shape, dataset.num_classes)


# ---------------------------------------------------------------------------------------------
# 3: the torch engine inside the adaptive batcher
# ---------------------------------------------------------------------------------------------


def quick_artifact(ctx: Context) -> Path:
    """A digits MLP trained for a second on the CPU with plain torch, saved as a Tandem artifact.

    The serving checks use their own artifact so that a DeepSpeed failure does not hide them.
    """
    if "artifact" in ctx._cache:
        return ctx._cache["artifact"]
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cluster.artifacts import save_model_artifact
    from training.data import load_dataset, split
    from training.models import build_model, model_spec

    config = ctx.config(zero_stage=0, precision="fp32")
    dataset = load_dataset(config)
    train, _ = split(dataset, config.data.val_fraction, config.data.seed)
    torch.manual_seed(0)
    model = build_model(config, dataset.input_shape, dataset.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    with profile_api().torch_threads(1):  # a tiny model: more threads only wait for each other on a busy machine
        for _ in range(200):
            idx = torch.from_numpy(rng.integers(0, len(train.y), 64))
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    folder = ctx.out / "serve-artifact"
    save_model_artifact(folder, model.state_dict(), model_spec(config, dataset.input_shape, dataset.num_classes), {"name": "gpu-check"})
    ctx._cache["artifact"] = folder
    return folder


async def closed_loop(batcher: Any, x: Any, requests: int, concurrency: int) -> tuple[Any, list[float], float]:
    """`concurrency` clients, each sending one example at a time until `requests` were answered."""
    import numpy as np

    order = np.resize(np.arange(len(x)), requests)
    outputs: list[Any] = [None] * requests
    latencies: list[float] = []
    pending = iter(range(requests))  # shared by the clients: one event loop, no lock needed

    async def client() -> None:
        for i in pending:
            start = time.perf_counter()
            outputs[i] = (await batcher.submit(x[order[i]][None]))[0]
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return np.stack(outputs), latencies, time.perf_counter() - started


def serve_check(precision: str) -> Callable[[Context], str]:
    def run(ctx: Context) -> str:
        import numpy as np

        from serving.batching import AdaptiveBatcher, BatcherSettings
        from serving.engines import load_engine

        artifact = quick_artifact(ctx)
        val = ctx.val_split(ctx.config(zero_stage=0, precision="fp32"))
        reference = load_engine(artifact, engine="torch", precision="fp32", device="cpu", threads=1).predict(val.x)
        engine = load_engine(artifact, engine="torch", precision=precision, device=ctx.device, threads=1)
        settings = BatcherSettings(max_batch_size=32, target_p99_ms=50)
        requests, concurrency = (2000, 32) if not ctx.dry_run else (600, 16)

        async def drive() -> tuple[Any, list[float], float, dict[str, float]]:
            batcher = AdaptiveBatcher(engine.predict, settings)
            batcher.calibrate(val.x[0])
            try:
                outputs, latencies, wall = await closed_loop(batcher, val.x, requests, concurrency)
                return outputs, latencies, wall, batcher.stats()
            finally:
                await batcher.close()

        outputs, latencies, wall, stats = asyncio.run(drive())
        expected = reference[np.resize(np.arange(len(val.x)), requests)]
        agree = float((outputs.argmax(1) == expected.argmax(1)).mean())
        diff = float(np.abs(outputs - expected).max())
        batch = val.x[: settings.max_batch_size]
        timed = float(np.median(profile_api().time_calls(lambda: engine.predict(batch), 0.2, min_runs=10)))
        fitted = (stats["slope_ms"] * settings.max_batch_size + stats["intercept_ms"]) / 1000
        p50, p99 = np.percentile(latencies, [50, 99]) * 1000
        figures = [
            f"{engine.name} on {ctx.device}, {requests} requests at c={concurrency}: {requests / wall:.0f} req/s, p50 {p50:.2f} ms p99 "
            f"{p99:.2f} ms, "
            f"mean batch {stats['mean_batch_size']:.1f}",
            f"fit t(b) = {stats['slope_ms'] * 1000:.1f} us*b + {stats['intercept_ms']:.3f} ms, t(32) fit {1000 * fitted:.3f} vs timed "
            f"{1000 * timed:.3f} ms",
            f"vs CPU fp32: argmax {100 * agree:.1f}%, max|dlogit| {diff:.2g}",
        ]
        require(stats["mean_batch_size"] >= 2 and stats["shed"] == 0, figures[0], "batches form under load (mean >= 2), nothing shed")
        require(
            stats["intercept_ms"] > 0 and timed / 4 <= fitted <= 4 * timed,
            figures[1],
            "intercept > 0, fitted t(32) within 4x of the timed forward",
        )
        if precision == "fp32":
            require(agree >= 0.995 and diff <= 1e-3, figures[2], "argmax >= 99.5%, max|dlogit| <= 1e-3")
        else:
            require(agree >= 0.98, figures[2], "argmax >= 98%")
        return "; ".join(figures)

    return run


# ---------------------------------------------------------------------------------------------
# 4: tandem profile's machine peaks and the model's training step
# ---------------------------------------------------------------------------------------------


def measured_machine(ctx: Context) -> dict[str, Any]:
    if "machine" not in ctx._cache:
        api = profile_api()
        plan = api.plan_for(quick=ctx.dry_run)
        ctx._cache["machine"] = api.measure_machine([ctx.device], plan.gemm_size, plan.triad_elements, plan.peak_budget_s)
    return ctx._cache["machine"]


def peaks_check(ctx: Context) -> str:
    machine = measured_machine(ctx)
    # On the CPU the profile measures 1 thread and every core: show every core's.
    most = max(p["threads"] or 0 for p in machine["peaks"])
    peaks = [p for p in machine["peaks"] if p["device"] == ctx.device and (p["threads"] or 0) == most]
    parts = [f"{p['dtype']} {rate(p['flops_per_s'], 'FLOP/s')} ({p['op']}, n={p['size']})" for p in peaks]
    bandwidth = [b for b in machine["bandwidth"] if b["device"] == ctx.device and (b["threads"] or 0) == most][-1]
    name = machine["gpu"] or machine["cpu"]
    threads = f", {most} threads" if most else ""
    text = f"{name}{threads}: " + ", ".join(parts) + f", triad {rate(bandwidth['bytes_per_s'], 'B/s')}"
    figures = [p["flops_per_s"] for p in peaks] + [bandwidth["bytes_per_s"]]
    require(bool(peaks) and all(math.isfinite(f) and f > 0 for f in figures), text, "every peak finite and positive")
    return text


def train_step_check(ctx: Context) -> str:
    from training.data import load_dataset, split

    precision = "fp32" if ctx.dry_run else "bf16"
    config = ctx.config(zero_stage=2, precision=precision)
    train, _ = split(load_dataset(config), config.data.val_fraction, config.data.seed)
    api = profile_api()
    row = api.profile_training(config, train, measured_machine(ctx), api.plan_for(quick=ctx.dry_run))
    fraction = row["fraction_of_peak"]
    text = (
        f"{row['device']} {row['precision']} batch {row['batch_size']}: {1000 * row['step_s']:.3f} ms/step ({row['samples_per_s']:.0f} "
        "samples/s), "
        f"{rate(row['achieved_flops_per_s'], 'FLOP/s')} = {fraction:.2g} of the {precision} peak, epoch {row['epoch_s']:.2f} s"
    )
    require(row["device"] == ctx.device, text, f"measured on {ctx.device}")
    require(row["step_s"] > 0 and fraction is not None and 0 < fraction < 1, text, "0 < fraction of peak < 1")
    return text


# ---------------------------------------------------------------------------------------------
# the list
# ---------------------------------------------------------------------------------------------


TRAIN_MEANS = (
    "training.loop.run_worker at world size 1 in a fresh process (NCCL group, DeepSpeed on the device) on the packaged example: "
    "steps and ms/step, first -> last epoch's train loss, val accuracy; fp16 adds the loss scale and skipped steps. "
    "Then the last checkpoint reloaded in a new process for one more epoch (step count continues, loss stays low), "
    "and its consolidated artifacts/model.pt loaded on the CPU with weights_only=True (accuracy within 0.03). "
    "PASS: ZeRO stage and dtype as asked, loss halves, val_acc >= 0.9 (0.6 dry run), dynamic loss scale, <= 10% skipped steps."
)


def checks(dry_run: bool) -> list[Check]:
    """The checks in the order they run: the quick in-process ones first, then the training jobs."""
    precisions = ("fp32",) if dry_run else ("bf16", "fp16")
    serve_precisions = ("fp32",) if dry_run else ("fp32", "bf16")
    listed = [
        Check(
            "profile/peaks",
            "tandem profile's machine peaks on the device (GEMM per dtype, best of mm and linear, and the triad bandwidth). "
            "PASS: every figure finite and positive.",
            peaks_check,
        ),
        Check(
            "profile/train-step",
            "tandem profile's timed training step of the example model on the device (bf16 on GPU): ms/step, "
            "samples/s, achieved FLOP/s and its fraction of the measured peak. PASS: on the device, 0 < fraction < 1.",
            train_step_check,
        ),
    ]
    listed += [
        Check(
            f"serve/torch-{p}",
            "serving.engines' torch engine on the device inside serving.batching's AdaptiveBatcher, closed-loop clients: "
            "req/s, latency, mean batch; the service-time fit t(b) = a*b + c against a timed batch of 32; argmax agreement and max logit "
            "difference with the CPU fp32 engine. PASS: mean batch >= 2, c > 0, fit within 4x of the timing, argmax >= 99.5% "
            "and |dlogit| <= 1e-3 (fp32) or argmax >= 98% (bf16).",
            serve_check(p),
        )
        for p in serve_precisions
    ]
    listed += [Check(f"train/zero{stage}-{p}", TRAIN_MEANS, train_check(stage, p)) for stage in (2, 3) for p in precisions]
    listed.append(
        Check(
            "train/two-process",
            "two ranks through torch.distributed (NCCL on GPU, gloo in the dry run) on one GPU, ZeRO-3: steps, loss, "
            "val accuracy, parameter bytes per rank, consolidated model.pt on CPU. SKIP when NCCL refuses two ranks on one GPU "
            "('Duplicate GPU detected', NCCL 2.5 and later): it then needs a machine with 2 GPUs. PASS: loss halves, each rank holds about "
            "half the parameters.",
            two_process_check,
        )
    )
    return listed


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


class _RefuseModules(importlib.abc.MetaPathFinder):
    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"{fullname} is not on the GPU machine; the GPU check must run without it", name=fullname)
        return None


@contextlib.contextmanager
def without_modules(names: tuple[str, ...]) -> Iterator[None]:
    """New imports of `names` fail while inside (modules already imported stay)."""
    finder = _RefuseModules(names)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def probe_cuda() -> tuple[bool, str]:
    """Whether torch sees a CUDA device, asked in a child process so that this one imports nothing before the wheels."""
    code = "import torch; print(torch.__version__, int(torch.cuda.is_available()), torch.cuda.device_count())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, "torch took over 120 s to import"
    if out.returncode != 0:
        return False, f"torch does not import with {sys.executable} ({(out.stderr.strip().splitlines() or ['?'])[-1]})"
    version, available, count = out.stdout.split()
    return available == "1", f"torch {version} sees {count} CUDA device(s)"


def install_wheels(folder: Path) -> Path:
    """pip install every wheel of `folder` into a new temporary folder, without an index (the GPU machine has no network)."""
    wheels = sorted(str(w) for w in folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu-check: no wheels in {folder}; run `make gpu-wheels` on a machine with network first")
    site = Path(tempfile.mkdtemp(prefix="tandem-gpu-site-"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--target",
            str(site),
            *wheels,
        ],
        check=True,
    )
    return site


def header(ctx: Context) -> str:
    import torch

    try:
        deepspeed = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        deepspeed = "MISSING (make gpu-wheels, then --wheels gpu-wheels)"
    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}", f"deepspeed {deepspeed}"]
    if not ctx.dry_run:
        props = torch.cuda.get_device_properties(0)
        parts = [
            f"{props.name} x{torch.cuda.device_count()} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})",
            f"CUDA {torch.version.cuda}",
            f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}",
        ] + parts
    else:
        parts.insert(0, "dry run on the CPU (fp32, fewer steps)")
    return "gpu-check: " + ", ".join(parts)


def run_checks(ctx: Context, selected: list[Check], print_line: Callable[[str], None] = print) -> int:
    print_line(header(ctx))
    summary, failed = [], 0
    started = time.monotonic()
    for check in selected:
        t0 = time.monotonic()
        if ctx.remaining_s() <= 5:
            status, figures = "FAIL", "not run: the time budget was spent (--budget-s)"
        else:
            try:
                status, figures = "PASS", check.run(ctx)
            except Skip as exc:
                status, figures = "SKIP", str(exc)
            except CheckFailed as exc:
                status, figures = "FAIL", str(exc)
            except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
                status, figures = "FAIL", first_line(exc)
        failed += status == "FAIL"
        summary.append({"check": check.name, "status": status, "figures": figures, "seconds": time.monotonic() - t0})
        print_line(f"{status:<4}  {check.name:<18}  {figures}  ({time.monotonic() - t0:.0f} s)")
    if ctx.data_note:
        print_line(f"note: {ctx.data_note}")
    counts = {s: sum(r["status"] == s for r in summary) for s in ("PASS", "FAIL", "SKIP")}
    print_line(
        f"gpu-check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {time.monotonic() - started:.0f} s; "
        f"logs in {ctx.out}"
    )
    write_json(ctx.out / "summary.json", summary)
    return 1 if failed else 0


def wheel_pins() -> list[str]:
    """NAME==VERSION of each wheel `make gpu-wheels` downloads, as installed in this venv (constraints.txt's pins)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS_FROM_THIS_VENV]


def check_wheels(folder: Path) -> int:
    wheels = sorted(folder.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    names = [w.name.split("-")[0].lower().replace("_", "-") for w in wheels]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    print(
        f"gpu-wheels: {len(wheels)} wheels, {size / 2**20:.1f} MiB in {folder} (limit {WHEELS_LIMIT_BYTES / 2**20:.0f} MiB): "
        f"{', '.join(w.name for w in wheels)}"
    )
    if duplicates or size > WHEELS_LIMIT_BYTES or not any(n == "deepspeed" for n in names):
        print(f"gpu-wheels: bad folder: two versions of {duplicates}" if duplicates else "gpu-wheels: over the limit or no deepspeed wheel")
        return 1
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m " + MODULE, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="run every check on the CPU (fp32, fewer steps): tests this script without a GPU"
    )
    parser.add_argument("--wheels", type=Path, help="on a CUDA machine: pip install these wheels (no index) into a temporary folder first")
    parser.add_argument("--only", default="", help="comma-separated name prefixes, e.g. serve,profile")
    parser.add_argument("--out", type=Path, help="where jobs write logs, checkpoints and summary.json (default: a new temporary folder)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="checks not started by then fail as 'not run'")
    parser.add_argument("--list", action="store_true", help="print the checks and what each line means")
    parser.add_argument("--wheel-pins", action="store_true", help="print the NAME==VERSION pins `make gpu-wheels` downloads")
    parser.add_argument("--check-wheels", type=Path, help="check a wheels folder: size and one version of each")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        with without_modules(ABSENT_ON_GPU_MACHINE):
            return worker_main(args.worker)
    if args.wheel_pins:
        print(" ".join(wheel_pins()))
        return 0
    if args.check_wheels:
        return check_wheels(args.check_wheels)
    selected = [
        c for c in checks(args.dry_run) if not args.only or c.name.startswith(tuple(p.strip() for p in args.only.split(",") if p.strip()))
    ]
    if args.list:
        for check in selected:
            print(f"{check.name:<18}  {check.means}")
        return 0
    if not args.dry_run and SITE_ENV not in os.environ:
        has_cuda, why = probe_cuda()
        if not has_cuda:
            print(f"gpu-check: no CUDA device here ({why}); nothing was run. The checks need a GPU; `--dry-run` runs them on the CPU.")
            return 0
        if args.wheels:
            # Again in a child whose path starts with the wheels, so that nothing older was imported first.
            site = install_wheels(args.wheels)
            env = {
                **os.environ,
                SITE_ENV: str(site),
                "PYTHONPATH": os.pathsep.join(p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH")) if p),
            }
            try:
                return subprocess.call([sys.executable, "-m", MODULE, *(argv if argv is not None else sys.argv[1:])], env=env, cwd=ROOT)
            finally:
                shutil.rmtree(site, ignore_errors=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="tandem-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(dry_run=args.dry_run, out=out.resolve(), deadline=time.monotonic() + args.budget_s)
    if args.dry_run:
        os.environ["DS_ACCELERATOR"] = "cpu"
        ctx.epochs, ctx.max_steps_per_epoch, ctx.min_val_accuracy, ctx.job_timeout_s = 3, 15, 0.6, 300.0
    else:
        os.environ["DS_ACCELERATOR"] = "cuda"
    with without_modules(ABSENT_ON_GPU_MACHINE):
        return run_checks(ctx, selected)


if __name__ == "__main__":
    sys.exit(main())
