"""`train(config) -> TrainResult`: Ray Train's TorchTrainer with DeepSpeed in every worker.

Parse, check, build, run, consolidate:
1. `preflight` runs on the driver before any worker starts: the data source's output, the
   model's forward on two examples, and the DeepSpeed JSON (override conflicts) must all be
   right, or a ConfigError names the field.
2. `build_trainer` maps the config onto ScalingConfig (workers, GPUs, CPUs, node-group pinning,
   placement), RunConfig (storage, CheckpointConfig, FailureConfig) and the workers' runtime_env
   (DS_ACCELERATOR: cpu or cuda, so the same code runs on both).
3. After fit, the last checkpoint's consolidated fp32 state_dict (written by rank 0 next to every
   rank's ZeRO shards) becomes `artifacts/model.pt` with a manifest (config hash, final metrics,
   sha256 of each file, lineage to the checkpoint). The last, not the best: the artifact is the
   model the run ended with, which is what a resumed or longer run continues.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.artifacts import ArtifactError, model_version, new_run_dir, save_model_artifact
from cluster.config import ConfigError, Problem, TandemConfig, looks_like_files
from cluster.console import move_log
from cluster.errors import TrainingFailedError
from cluster.runtime import connect, pin_to_group, require_reachable_storage, require_shared_storage, storage_root
from cluster.storage import Location, location, location_of, native
from cluster.tracking import follow_metrics, track_run
from training.ds_config import deepspeed_config
from training.startup import controller_env, prestart_train_coordinator, skipped_callbacks, trainer_class

CHECKPOINTS = "checkpoints"
PLACEMENT = {"pack": "PACK", "spread": "SPREAD", "strict_pack": "STRICT_PACK", "strict_spread": "STRICT_SPREAD"}
PASS_THROUGH_ENV = (
    "TORCH_EXTENSIONS_DIR",
    "TANDEM_FAULT_AT_STEP",
    "TANDEM_FAULT_RANK",
    "TANDEM_FAULT_MARKER",
    "TANDEM_PROGRESS_DIR",
    "OMP_NUM_THREADS",
)


@dataclass
class TrainResult:
    """run_dir and artifact_dir: Paths for local storage, Locations (URIs) in an object store."""

    run_dir: Path | Location
    artifact_dir: Path | Location
    metrics: dict[str, Any]
    checkpoint_dir: str
    history: list[dict[str, Any]] = field(default_factory=list)


def preflight(config: TandemConfig) -> dict[str, Any]:
    """Everything that can be checked on the driver, before any worker starts."""
    import torch

    from training.data import load_dataset
    from training.file_source import inspect_file_source
    from training.models import build_model

    file_source = inspect_file_source(config) if looks_like_files(config.data.source) else None
    dataset = file_source.sample if file_source else load_dataset(config)
    num_classes = file_source.num_classes if file_source else dataset.num_classes
    try:
        model = build_model(config, dataset.input_shape, num_classes)
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: torch refusing a size (hidden: [-3])
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            [
                Problem(
                    path="model.args",
                    value=config.model.args,
                    message=f"{config.model.builder} could not be built ({message}); fix model.args",
                )
            ]
        ) from None
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(dataset.x[:2]))
    except RuntimeError as exc:
        raise ConfigError(
            [
                Problem(
                    path="data.source",
                    value=config.data.source,
                    message=f"examples of shape {dataset.input_shape} do not fit {config.model.builder} ({str(exc).splitlines()[0]}); fix "
                    "the data source or model.args",
                )
            ]
        ) from None
    expected = config.model.args.get("num_classes", num_classes)
    if tuple(logits.shape) != (2, expected) or num_classes > expected:
        raise ConfigError(
            [
                Problem(
                    path="model.args.num_classes",
                    value=expected,
                    message=f"the model outputs {tuple(logits.shape[1:])} per example but the data has {num_classes} classes; fix "
                    "model.args.num_classes",
                )
            ]
        )
    ds = deepspeed_config(config, config.training.workers)  # raises on override conflicts
    teacher_dir(config)  # a missing or altered teacher artifact is refused here, not in the workers
    return {"input_shape": dataset.input_shape, "num_classes": num_classes, "deepspeed": ds, "file_source": file_source}


def resolve_use_gpu(config: TandemConfig) -> bool:
    import ray

    if config.training.use_gpu == "false":
        return False
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if config.training.use_gpu == "true" and not has_gpus:
        raise ConfigError(
            [Problem(path="training.use_gpu", value="true", message="the Ray cluster has no GPUs; set use_gpu: auto or false")]
        )
    if config.training.precision == "fp16" and not has_gpus:
        raise ConfigError(
            [Problem(path="training.precision", value="fp16", message="the Ray cluster has no GPUs; fp16 needs one, use bf16 or fp32")]
        )
    return has_gpus


def worker_env(use_gpu: bool) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASS_THROUGH_ENV if k in os.environ}
    env["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    env.setdefault("OMP_NUM_THREADS", "1")  # one intra-op thread per worker: workers share the cores
    # User models named relative to the driver's directory must import in the workers too.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    return env


def teacher_dir(config: TandemConfig) -> str | None:
    """The verified teacher artifact folder for training.distill (None without distillation)."""
    if config.training.distill is None:
        return None
    from cluster.artifacts import local_artifact, resolve_artifact, verify_artifact

    folder = resolve_artifact(config.training.distill.teacher, storage_root(config), config.name)
    verify_artifact(local_artifact(folder))
    return str(folder)  # each worker loads it from the store (its node's cache), verified again


def build_trainer(
    config: TandemConfig,
    run_dir: Location,
    use_gpu: bool,
    resume_from: str | None = None,
    callbacks: list | None = None,
    hparams_from_config: bool = False,
    echo_epochs: bool = True,
    local_run: bool = False,
    file_source: Any = None,
):
    """echo_epochs: print a line per epoch (off inside tuning trials, whose progress is per trial).
    hparams_from_config: after loading `resume_from`, take lr and weight decay from `config`
    rather than from the checkpoint (PBT: an exploiting trial keeps its own mutated values).
    local_run: a local Ray started for this run (training/startup.py, `skipped_callbacks`).
    file_source: what preflight learned about a file `data.source` (found again when not given)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from training.file_source import inspect_file_source, ray_datasets
    from training.loop import train_loop_per_worker

    for name, value in controller_env(config).items():
        os.environ.setdefault(name, value)  # the user's own value wins
    t = config.training
    resources: dict[str, float] = {"CPU": t.cpus_per_worker, **pin_to_group(t.node_group)}
    if use_gpu:
        resources["GPU"] = 1
    scaling = ScalingConfig(
        num_workers=t.workers, use_gpu=use_gpu, resources_per_worker=resources, placement_strategy=PLACEMENT[t.placement]
    )
    run = RunConfig(
        name=CHECKPOINTS,
        storage_path=str(run_dir),
        checkpoint_config=CheckpointConfig(
            num_to_keep=t.checkpoint.keep, checkpoint_score_attribute=t.checkpoint.metric, checkpoint_score_order=t.checkpoint.mode
        ),
        failure_config=FailureConfig(max_failures=t.max_failures),
        worker_runtime_env={"env_vars": worker_env(use_gpu)},
        callbacks=[MetricsLog(run_dir, t.epochs, echo_epochs)] + list(callbacks or []),
    )
    loop_config = {
        "config": config.to_dict(),
        "use_gpu": use_gpu,
        "resume_from": resume_from,
        "teacher_dir": teacher_dir(config),
        "hparams_from_config": hparams_from_config,
    }
    if file_source is None and looks_like_files(config.data.source):
        file_source = inspect_file_source(config)
    datasets = None
    if file_source is not None:  # the datasets callback hands out the files' shards
        loop_config["file_source"] = file_source
        datasets = ray_datasets(file_source, config)
    trainer = trainer_class(skipped_callbacks(local_run=local_run, datasets=datasets is not None))
    return trainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling, run_config=run, datasets=datasets)


def _metrics_log_class():
    from ray.train import UserCallback

    class _MetricsLog(UserCallback):
        """Runs in the Train controller: appends rank 0's metrics to metrics.jsonl and prints an epoch line."""

        def __init__(self, run_dir: Location, epochs: int, echo: bool):
            self.path, self.epochs, self.echo = location(run_dir) / "metrics.jsonl", epochs, echo

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            self.path.append_line(json.dumps(m))
            if not self.echo:
                return
            print(
                f"[tandem] epoch {m['epoch']:>3}/{self.epochs}  step {m['step']:>5}  train_loss {m['train_loss']:.4f}  "
                f"val_loss {m['val_loss']:.4f}  val_acc {m['val_accuracy']:.4f}  {m['samples_per_s']:.0f} samples/s  lr {m['lr']:.2e}"
                + ("  [checkpoint]" if checkpoint is not None else ""),
                flush=True,
            )

    return _MetricsLog


def MetricsLog(run_dir: Location, epochs: int, echo: bool = True):  # noqa: N802 - a factory that reads like the class it returns
    """echo: print each epoch's line (the progress of `tandem train`; a tuning trial's go only to its files)."""
    return _metrics_log_class()(run_dir, epochs, echo)


def find_run_and_checkpoint(config: TandemConfig, resume: str) -> tuple[Location, str | None]:
    """For --resume: the run folder to continue, and an explicit checkpoint folder when one was named.

    'latest' or a run folder: continue that run; Ray Train restores its own checkpoint state from
    `<run>/checkpoints`. A checkpoint folder (holding DeepSpeed's `latest` tag file): start a new
    run from it.
    """
    base = storage_root(config) / config.name
    if resume == "latest":
        # Run folders are named by their start time; a tuning folder holds no checkpoints/ of its own.
        runs = [run for run in base.children() if (run / CHECKPOINTS).is_dir()]
        if not runs:
            raise ArtifactError(f"no run with checkpoints under {base}; nothing to resume")
        return max(runs, key=lambda run: run.name), None
    path = location(resume)
    if (path / "latest").is_file():
        return new_run_dir(storage_root(config), config.name), str(path)
    if (path / CHECKPOINTS).is_dir():
        return path, None
    raise ArtifactError(f"{path} is neither a run folder (with {CHECKPOINTS}/) nor a DeepSpeed checkpoint folder (with a 'latest' file)")


def train(config: TandemConfig, resume: str | None = None, callbacks: list | None = None) -> TrainResult:
    """Train the configured model; returns the run folder, the artifact folder and final metrics."""
    checks = preflight(config)
    require_reachable_storage(config)
    with connect(config) as ray_handle:
        # A local Ray started here for this run: see training/startup.py.
        local_run = ray_handle.started and ray_handle.address == "local"
        if local_run:
            prestart_train_coordinator()
        require_shared_storage(config)
        use_gpu = resolve_use_gpu(config)
        if resume:
            run_dir, resume_from = find_run_and_checkpoint(config, resume)
        else:
            run_dir, resume_from = new_run_dir(storage_root(config), config.name), None
        (run_dir / "config.yaml").put_text(config.to_yaml())
        (run_dir / "deepspeed.json").put_text(json.dumps(checks["deepspeed"], indent=2))
        print(f"[tandem] run folder {run_dir}", flush=True)
        if not run_dir.remote:  # on an object store the console log stays where it started (logs are not run state)
            move_log(run_dir.path)
        trainer = build_trainer(config, run_dir, use_gpu, resume_from, callbacks, local_run=local_run, file_source=checks["file_source"])
        continuing = (run_dir / "metrics.jsonl").exists()  # a resumed run folder: its MLflow run goes on
        tracker = track_run(config, run_dir, continuing)
        try:
            with follow_metrics(run_dir / "metrics.jsonl", tracker, skip_existing=continuing):
                result = consolidate(config, run_dir, fit(trainer, run_dir))
        except BaseException:
            tracker.finish("FAILED")
            raise
        tracker.set_tags({"tandem.model_version": model_version(result.artifact_dir), "tandem.run_dir": str(run_dir)})
        tracker.log_files([result.artifact_dir / "manifest.json", run_dir / "deepspeed.json", run_dir / "config.yaml"])
        tracker.finish()
        return result


def fit(trainer: Any, run_dir: Location) -> Any:
    """trainer.fit(), with the workers' own error (the user's code, usually) as a TandemError: the
    CLI prints it, traceback snippet included, without the frames of Ray's driver around it."""
    from ray.train import TrainingFailedError as RayTrainingFailed

    # Ray Train V2's fit() makes Ctrl-C abort the run (a SIGINT handler on the main thread) and leaves
    # that handler in place: afterwards Ctrl-C only asked the finished run to abort, so `tandem run`'s
    # later stages and --keep-serving ignored it. The caller's handler comes back when fit() returns.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    # Ray Train V2's fit() raises the workers' error itself (it never returns a result holding one).
    try:
        return trainer.fit()
    except RayTrainingFailed as exc:
        raise TrainingFailedError(f"training failed (run folder {run_dir}):\n{exc}") from exc
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGINT, previous)


def consolidate(config: TandemConfig, run_dir: Location | Path, result: Any, extra: dict[str, Any] | None = None) -> TrainResult:
    """Turn the final checkpoint's consolidated fp32 weights into artifacts/model.pt + manifest.json.

    On an object store the checkpoint is read through Ray's Checkpoint (a local copy for the
    block) and the artifact is published with its manifest last (save_model_artifact).
    extra: more manifest entries (a tuning run's lineage)."""
    from cluster.artifacts import load_state_dict, write_manifest
    from training.loop import CONSOLIDATED

    run_dir = location(run_dir)
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise ArtifactError(f"the run in {run_dir} registered no checkpoint; nothing to consolidate")
    checkpoint_uri = str(location_of(checkpoint.filesystem, checkpoint.path))
    history = read_history(run_dir)
    # A local checkpoint is read in place; one in an object store through a local copy for the block.
    opened = checkpoint.as_directory() if run_dir.remote else contextlib.nullcontext(checkpoint.path)
    with opened as local_checkpoint:
        folder = Path(local_checkpoint)
        spec = json.loads((folder / "model_spec.json").read_text())
        # The checkpoint file is ours (written by rank 0); verify it like any artifact before loading.
        write_manifest(folder, {"kind": "checkpoint"})
        state = load_state_dict(folder, CONSOLIDATED)
        manifest = save_model_artifact(
            run_dir / "artifacts",
            state,
            spec["model"],
            {
                "name": config.name,
                "config_hash": config.config_hash(),
                "metrics": spec["metrics"],
                "checkpoint": checkpoint_uri,
                "run_dir": str(run_dir),
                # The last epoch's number, not the count of metrics lines: a driver killed between a
                # checkpoint and its metrics line, then resumed, leaves one line fewer than epochs.
                "epochs": int(history[-1]["epoch"]) if history else 0,
                "deepspeed": {
                    "zero_stage": config.training.deepspeed.zero_stage,
                    "workers": config.training.workers,
                    "precision": config.training.precision,
                },
                **(extra or {}),
            },
        )
    print(f"[tandem] artifact {run_dir / 'artifacts'} (version {manifest['version']})", flush=True)
    return TrainResult(
        run_dir=native(run_dir),
        artifact_dir=native(run_dir / "artifacts"),
        metrics=spec["metrics"],
        checkpoint_dir=checkpoint_uri,
        history=history,
    )


def read_history(run_dir: Location | Path | str) -> list[dict[str, Any]]:
    path = location(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
