"""The per-worker train loop: a plain function that Ray Train runs once per worker.

Each worker: builds the model from the config, wraps it in a DeepSpeed engine (gloo on CPU,
NCCL on GPU; Ray Train already created the process group, DeepSpeed reuses it), trains its shard
of the data, evaluates its shard of the validation split, and every `checkpoint.every_epochs`
saves a DeepSpeed checkpoint on EVERY rank (ZeRO shards are per rank) plus, from rank 0, the
consolidated fp32 state_dict, all reported to Ray Train as one checkpoint.

Whatever runs the loop provides a `WorkerSession` (rank, checkpoint to resume, reports): Ray Train
in `tandem train`, a plain process in the GPU check (tests/gpu/gpu_check.py), which has no Ray.

Sharding (training/worker_data.py): a DistributedSampler over in-memory arrays for a
'module:function' source (small data sets, which every worker loads; the same order again after a
resume), or the worker's Ray Data shard for files, streamed batch by batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from cluster.config import TandemConfig, validate_config
from training.augment import build_augmentation
from training.ds_config import (
    build_optimizer,
    build_scheduler,
    clear_stale_extension_locks,
    deepspeed_config,
    import_deepspeed,
    use_environment_extension_dir,
)
from training.models import build_model, model_spec
from training.resume import HANDOFFS, apply_config_hparams, restore, take_over
from training.worker_data import worker_data

CONSOLIDATED = "model_fp32.pt"
FAULT_STEP_ENV = "TANDEM_FAULT_AT_STEP"  # test-only: a worker dies at this global step ...
FAULT_RANK_ENV = "TANDEM_FAULT_RANK"  # ... on this rank (default 1) ...
FAULT_MARKER_ENV = "TANDEM_FAULT_MARKER"  # ... once: the marker file records that it happened.
# Test-only: each rank writes {rank, pid, step} to <dir>/rank-<r>.json after every step, so a test
# can SIGKILL a worker from outside mid-epoch and count the steps the restart re-did; Ray Train's
# reports come once an epoch and carry neither the worker's pid nor the step inside the epoch.
PROGRESS_DIR_ENV = "TANDEM_PROGRESS_DIR"


class WorkerSession(Protocol):
    """What the loop needs from whatever runs it: Ray Train's worker context in `tandem train`
    (RayTrainSession), a plain process in tests/gpu/gpu_check.py (no Ray on the GPU machine).

    The process group must already exist (Ray Train creates it; DeepSpeed reuses it)."""

    rank: int
    world_size: int
    local_rank: int

    def latest_checkpoint(self) -> AbstractContextManager[Path | None]:
        """The checkpoint folder a retried worker group resumes from, or None."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """One epoch's metrics, with this rank's checkpoint folder (deleted after the call) when one was saved."""
        ...

    def node_id(self) -> str: ...


class RayTrainSession:
    """WorkerSession over ray.train (the context, get_checkpoint, report)."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = context.get_world_rank(), context.get_world_size(), context.get_local_rank()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train
        from ray.train import Checkpoint

        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    run_worker(loop_config, RayTrainSession())


def run_worker(loop_config: dict[str, Any], session: WorkerSession) -> Any:
    """The loop itself; returns the DeepSpeed engine (for checks that inspect it, e.g. its loss scaler)."""
    deepspeed = import_deepspeed()

    config = validate_config(loop_config["config"])
    rank, world = session.rank, session.world_size
    parent_pid = os.getppid()  # the raylet under Ray: see _exit_if_orphaned
    use_gpu = bool(loop_config.get("use_gpu")) and torch.cuda.is_available()
    device = torch.device("cuda", session.local_rank) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    # Same initial weights on every rank; data order and augmentation differ per rank below.
    torch.manual_seed(config.training.seed)

    data = worker_data(config, loop_config.get("file_source"), rank, world)
    model = build_model(config, data.input_shape, data.num_classes)
    spec = model_spec(config, data.input_shape, data.num_classes)
    steps_per_epoch = _steps_per_epoch(config, data.micro_batches)
    total_steps = steps_per_epoch * config.training.epochs
    optimizer = build_optimizer(config, model.parameters())
    scheduler = build_scheduler(config, optimizer, total_steps)

    use_environment_extension_dir()
    # A build lock left by a worker killed mid-compile would hang DeepSpeed's op loading forever.
    clear_stale_extension_locks()
    # gloo on CPU, nccl on GPU; the group Ray Train made is reused, not re-created.
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config, world))
    start_epoch = restore(engine, loop_config.get("resume_from"), session)
    if loop_config.get("resume_from") and loop_config.get("hparams_from_config"):
        apply_config_hparams(engine, config)
    augment = build_augmentation(config.data.augment)
    dtype = _compute_dtype(config)
    loss_fn = _loss_function(config, loop_config.get("teacher_dir"), device)
    # This worker's own memory before any batch, and its peak while training: what the data
    # (streamed or in memory) adds to it is the difference.
    private_memory = PrivateMemoryPeak()

    epoch = start_epoch
    while epoch < config.training.epochs:
        generator = torch.Generator().manual_seed(config.training.seed * 100_003 + rank * 1009 + epoch)
        started = time.perf_counter()
        train_loss, samples = _train_epoch(
            engine,
            data.train_batches(epoch),
            augment,
            generator,
            device,
            dtype,
            config,
            rank,
            steps_per_epoch,
            loss_fn,
            parent_pid,
            private_memory,
        )
        elapsed = time.perf_counter() - started
        val_loss, val_accuracy = _evaluate(engine, data.val_batches(), device, dtype)
        metrics = _epoch_metrics(
            engine, epoch, train_loss, samples, elapsed, val_loss, val_accuracy, steps_per_epoch, world, device, session
        )
        metrics["private_memory_before_training_mb"] = private_memory.start
        metrics["peak_private_memory_mb"] = private_memory.peak
        last = epoch + 1 == config.training.epochs
        if (epoch + 1) % config.training.checkpoint.every_epochs == 0 or last:
            _report_with_checkpoint(engine, metrics, epoch, rank, spec, config, session)
        else:
            session.report(metrics)
        # A PBT exploit handed over during the report (tuning/trial.py) continues from the donor's epoch.
        config, epoch = take_over(engine, handoff, config) if (handoff := HANDOFFS.take()) else (config, epoch + 1)
    return engine


def _loss_function(config: TandemConfig, teacher_dir: str | None, device):
    """Cross-entropy, or with training.distill the distillation loss against a frozen teacher:

        alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, y)

    The T^2 keeps the soft-target gradients on the same scale as the label loss (Hinton et al.).
    """
    distill = config.training.distill
    if distill is None:
        return lambda logits, x, y: F.cross_entropy(logits, y)
    from cluster.artifacts import load_model, local_artifact

    # A path or a URI; from this node's cache when in an object store. Verified by checksum, weights_only=True.
    teacher, _ = load_model(local_artifact(teacher_dir))
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t, alpha = distill.temperature, distill.alpha

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = F.softmax(teacher(x.float()).float() / t, dim=1)
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean") * t * t
        return alpha * kd + (1 - alpha) * F.cross_entropy(logits, y)

    return loss


def _steps_per_epoch(config: TandemConfig, micro_batches: int) -> int:
    """Optimizer steps per epoch (micro-batches / accumulation, capped by max_steps_per_epoch)."""
    steps = max(1, micro_batches // config.training.gradient_accumulation)
    cap = config.training.max_steps_per_epoch
    return min(steps, cap) if cap else steps


def _compute_dtype(config: TandemConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.training.precision, torch.float32)


def _maybe_inject_fault(engine: Any, rank: int) -> None:
    """Test-only fault hook: SIGKILL-like death of one worker at a given step, once."""
    step = os.environ.get(FAULT_STEP_ENV)
    marker = os.environ.get(FAULT_MARKER_ENV)
    if not step or not marker or rank != int(os.environ.get(FAULT_RANK_ENV, "1")):
        return
    if engine.global_steps >= int(step) and not Path(marker).exists():
        Path(marker).write_text(str(engine.global_steps))
        os._exit(1)


def _write_progress(engine: Any, rank: int) -> None:
    """Test-only progress file (see PROGRESS_DIR_ENV); a rename, so a reader never sees half a file."""
    folder = os.environ.get(PROGRESS_DIR_ENV)
    if not folder:
        return
    path = Path(folder) / f"rank-{rank}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "step": int(engine.global_steps)}))
    os.replace(tmp, path)


def _exit_if_orphaned(parent_pid: int, rank: int) -> None:
    """Stop a worker whose parent (the raylet) died, e.g. with a SIGKILLed `tandem train` driver.

    Ray's workers sit in process groups of their own and notice a dead raylet only seconds later;
    meanwhile they would train on and write checkpoints no controller registers (measured: whole
    runs of small models finished that way). One getppid() per step costs nothing next to a step."""
    if os.getppid() != parent_pid:
        message = f"[tandem] rank {rank}: the process that started this worker (pid {parent_pid}) is gone; stopping"
        print(message, file=sys.stderr, flush=True)
        os._exit(1)


def _train_epoch(
    engine, loader, augment, generator, device, dtype, config, rank, steps_per_epoch, loss_fn, parent_pid, private_memory
) -> tuple[float, int]:
    engine.train()
    total_loss, batches, samples = 0.0, 0, 0
    micro_limit = steps_per_epoch * config.training.gradient_accumulation
    for i, (x, y) in enumerate(loader):
        if i >= micro_limit:
            break
        if augment is not None:
            x = augment(x, generator)
        x, y = x.to(device=device, dtype=dtype), y.to(device)
        loss = loss_fn(engine(x).float(), x, y)
        engine.backward(loss)
        engine.step()  # DeepSpeed steps optimizer and scheduler only at accumulation boundaries
        total_loss += loss.item()  # a host-device sync on GPU; once per micro-batch is cheap here
        batches += 1
        samples += len(y)
        _maybe_inject_fault(engine, rank)
        _exit_if_orphaned(parent_pid, rank)
        _write_progress(engine, rank)
        private_memory.sample()
    return total_loss / max(1, batches), samples


@torch.no_grad()
def _evaluate(engine, batches, device, dtype) -> tuple[float, float]:
    """Loss and accuracy over the whole validation split, each rank evaluating its shard
    (training/worker_data.py: every rank runs the same number of forward passes, as ZeRO-3 needs;
    a padding batch is not counted). The sums are reduced on the worker's device (NCCL reduces
    CUDA tensors only; see _epoch_metrics)."""
    import torch.distributed as dist

    engine.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y, counted in batches:
        x, y = x.to(device=device, dtype=dtype), y.to(device)
        logits = engine(x).float()
        if counted:
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum().item())
            count += len(y)
    totals = torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    engine.train()
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def _rank_state_bytes(engine) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state this rank actually holds (tensors, not RSS)."""
    params = 0
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", None)  # ZeRO-3 keeps only this rank's partition
        params += (local.numel() * local.element_size()) if local is not None else p.numel() * p.element_size()
    optim = 0
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed wraps the torch optimizer
    for state in inner.state.values():
        optim += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    # fp32 master partitions live in the ZeRO wrapper, not in the torch optimizer's state.
    for group in getattr(engine.optimizer, "single_partition_of_fp32_groups", []) or []:
        if engine.bfloat16_enabled() or engine.fp16_enabled():
            optim += group.numel() * group.element_size()
    for group in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []) or []:
        if engine.bfloat16_enabled() or engine.fp16_enabled():
            optim += group.numel() * group.element_size()
    return {"param_bytes": float(params), "optimizer_bytes": float(optim)}


def _gather_per_rank(values: dict[str, float], world: int, device) -> dict[str, list[float]]:
    import torch.distributed as dist

    local = torch.tensor([values[k] for k in sorted(values)], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return {f"{k}_per_rank": [float(g[i]) for g in gathered] for i, k in enumerate(sorted(values))}


class PrivateMemoryPeak:
    """This process's private resident memory (RssAnon, Linux) at creation and at its highest
    sample: what the worker allocated itself. ru_maxrss (peak_memory_mb) also counts the pages of
    Ray's shared object store that reading streamed blocks maps in, which grow with the input up
    to the object store's size though no block stays in the worker."""

    def __init__(self) -> None:
        self.start = self.peak = process_status_mb("RssAnon")

    def sample(self) -> None:
        self.peak = max(self.peak, process_status_mb("RssAnon"))


def process_status_mb(field: str, pid: int | str = "self") -> float:
    """A memory field of /proc/PID/status (VmRSS, RssAnon, ...) in MB; 0 where there is none."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def _epoch_metrics(
    engine, epoch, train_loss, samples, elapsed, val_loss, val_accuracy, steps_per_epoch, world, device, session
) -> dict[str, Any]:
    import torch.distributed as dist

    # On the worker's device: on GPU Ray Train makes an NCCL-only process group, and NCCL reduces
    # CUDA tensors only (a CPU tensor raises "No backend type associated with device type cpu").
    totals = torch.tensor([train_loss, float(samples)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    metrics = {
        "epoch": epoch + 1,
        "step": int(engine.global_steps),
        "train_loss": float(totals[0] / world),
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "samples_per_s": float(totals[1]) / max(elapsed, 1e-9),
        "step_time_s": elapsed / max(1, steps_per_epoch),
        "peak_memory_mb": _peak_memory_mb(device),
        "lr": float(engine.get_lr()[0]),
        "world_size": world,
    }
    # samples_per_rank: the rows each rank trained on this epoch (its shard, streamed or sampled).
    metrics.update(_gather_per_rank({**_rank_state_bytes(engine), "samples": float(samples)}, world, device))
    metrics["node_ids"] = _gather_node_ids(session.node_id(), world)
    return metrics


def _gather_node_ids(node_id: str, world: int) -> list[str]:
    """The Ray node of every rank, so placement (spread, node groups) can be checked from the metrics."""
    import torch.distributed as dist

    ids: list[Any] = [None] * world
    dist.all_gather_object(ids, node_id)
    return [str(i) for i in ids]


def consolidated_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full fp32 weights, assembled from ZeRO partitions (a collective: call on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # None without a ZeRO optimizer (stage 0)
        state[name] = (full if full is not None else param.detach()).float().cpu().clone()
    for name, buffer in engine.module.named_buffers():
        state[name] = buffer.detach().cpu().clone()
    # Keep the module's own key order so load_state_dict sees the usual layout.
    order = list(engine.module.state_dict().keys())
    return {k: state[k] for k in order if k in state}


def _report_with_checkpoint(
    engine, metrics: dict[str, Any], epoch: int, rank: int, spec: dict[str, Any], config: TandemConfig, session: WorkerSession
) -> None:
    from cluster.artifacts import atomic_save_torch, atomic_write_json

    state = consolidated_fp32_state_dict(engine)
    with tempfile.TemporaryDirectory(prefix="tandem-ckpt-") as folder:
        tag = f"epoch-{epoch + 1:04d}"
        # Every rank writes its own ZeRO shard; Ray Train merges all ranks' files into one checkpoint.
        engine.save_checkpoint(folder, tag=tag, client_state={"epoch": epoch})
        if rank == 0:
            atomic_save_torch(state, Path(folder) / CONSOLIDATED)
            atomic_write_json(Path(folder) / "model_spec.json", {"model": spec, "metrics": metrics, "config_hash": config.config_hash()})
        session.report(metrics, folder)
