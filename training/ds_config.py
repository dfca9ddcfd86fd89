"""The DeepSpeed JSON, derived from the Tandem config and never written by hand.

`deepspeed_config(config, world_size, use_gpu)` fills every value DeepSpeed needs from the
config; `training.deepspeed.overrides` is merged last. An override may add keys we do not derive
(e.g. `zero_optimization.overlap_comm`) but may not contradict a derived one: every such conflict
is listed in one ConfigError, each naming the override path, both values and the config field to
change instead.

The optimizer and the LR schedule are torch objects (`build_optimizer`, `build_scheduler`) handed
to `deepspeed.initialize`, which then steps both and saves both in its checkpoints. Why not
DeepSpeed's JSON `optimizer`/`scheduler` sections: on CPU the JSON optimizer compiles a fused Adam
op on first use (~40 s on a fresh machine), and DeepSpeed's schedulers have no step decay.
`zero_force_ds_cpu_optimizer: false` lets a torch optimizer run with optimizer offload too.

`import_deepspeed()` is how a worker imports DeepSpeed: without the seconds of start-up its
optional imports cost (mlflow, Muon's torch.compile wrappers).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cluster.config import ConfigError, Problem, TandemConfig

logger = logging.getLogger("tandem.training")


def _zero_section(config: TandemConfig) -> dict[str, Any]:
    ds = config.training.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1 and ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.zero_stage == 3:
        # Small models: gather every parameter at once rather than in tiny buckets.
        zero["stage3_param_persistence_threshold"] = 0
        if ds.offload_params == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return zero


def _precision_sections(config: TandemConfig) -> dict[str, Any]:
    precision = config.training.precision
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        # Dynamic loss scaling (loss_scale 0): fp16 gradients underflow without it.
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        }
    return {}


def derived_deepspeed_config(config: TandemConfig, world_size: int) -> dict[str, Any]:
    """Everything Tandem derives, before overrides."""
    t = config.training
    micro = config.data.batch_size
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "train_batch_size": micro * t.gradient_accumulation * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": _zero_section(config),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # Tandem prints per-epoch lines itself
        "wall_clock_breakdown": False,
    }
    derived.update(_precision_sections(config))
    return derived


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Which Tandem field a derived DeepSpeed key comes from, so a conflict can name the fix.
_SOURCE_FIELDS = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation",
    "train_batch_size": "data.batch_size x training.gradient_accumulation x training.workers",
    "gradient_clipping": "training.grad_clip",
    "zero_optimization.stage": "training.deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "training.deepspeed.offload_optimizer",
    "zero_optimization.offload_param.device": "training.deepspeed.offload_params",
    "bf16.enabled": "training.precision",
    "fp16.enabled": "training.precision",
}


def override_conflicts(derived: dict[str, Any], overrides: dict[str, Any]) -> list[Problem]:
    flat_derived = _flatten(derived)
    problems = []
    for path, value in _flatten(overrides).items():
        if path in ("optimizer", "scheduler") or path.startswith(("optimizer.", "scheduler.")):
            problems.append(
                Problem(
                    path=f"training.deepspeed.overrides.{path}",
                    value=value,
                    message="the optimizer and schedule come from training.optimizer and training.schedule; set them there",
                )
            )
            continue
        if path in flat_derived and flat_derived[path] != value:
            source = _SOURCE_FIELDS.get(path, "the Tandem config")
            problems.append(
                Problem(
                    path=f"training.deepspeed.overrides.{path}",
                    value=value,
                    message=f"conflicts with the derived value {flat_derived[path]!r} (from {source}); change {source} instead or drop the "
                    "override",
                )
            )
    return problems


def deepspeed_config(config: TandemConfig, world_size: int) -> dict[str, Any]:
    """The full DeepSpeed JSON for `world_size` workers; raises ConfigError listing every override conflict."""
    derived = derived_deepspeed_config(config, world_size)
    overrides = config.training.deepspeed.overrides
    problems = override_conflicts(derived, overrides)
    if problems:
        raise ConfigError(problems)
    return _merge(derived, overrides)


def build_optimizer(config: TandemConfig, parameters: Any) -> torch.optim.Optimizer:
    opt = config.training.optimizer
    if opt.name == "adamw":
        return torch.optim.AdamW(parameters, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    if opt.name == "adam":
        return torch.optim.Adam(parameters, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    return torch.optim.SGD(parameters, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def lr_factor(config: TandemConfig, step: int, total_steps: int) -> float:
    """Learning-rate multiplier at optimizer step `step`: linear warmup, then the schedule."""
    s = config.training.schedule
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    after = step - s.warmup_steps
    span = max(1, total_steps - s.warmup_steps)
    progress = min(1.0, after / span)
    if s.name == "cosine":
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if s.name == "linear":
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * (1 - progress)
    if s.name == "step":
        return s.gamma ** (after // s.step_size)
    return 1.0


def build_scheduler(config: TandemConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step, total_steps))


def zero_memory_formula(
    num_params: int, world_size: int, zero_stage: int, precision: str = "fp32", optimizer: str = "adamw"
) -> dict[str, float]:
    """Bytes per rank for parameters, gradients and optimizer state under a ZeRO stage.

    The ZeRO paper's accounting: with mixed precision each parameter has 2-byte weights and
    gradients plus 12 bytes of fp32 master weights and Adam moments (K = 12); in fp32 the
    weights and gradients are 4 bytes and Adam keeps 8 bytes of moments. Stage 1 partitions the
    optimizer state, stage 2 also the gradients, stage 3 also the parameters.
    """
    weight = 2 if precision in ("bf16", "fp16") else 4
    adam_moments = 8 if optimizer in ("adam", "adamw") else 4
    master = 4 if precision in ("bf16", "fp16") else 0
    params = num_params * weight
    grads = num_params * weight
    optim = num_params * (adam_moments + master)
    n = world_size
    return {
        "params": params / n if zero_stage >= 3 else params,
        "grads": grads / n if zero_stage >= 2 else grads,
        "optimizer": optim / n if zero_stage >= 1 else optim,
    }


# A first-use build of DeepSpeed's ops takes about a minute here (several under load); a build
# lock older than this belongs to a process that died while building.
STALE_EXTENSION_LOCK_S = 15 * 60


def extension_dirs() -> list[Path]:
    """Where torch builds C++ extensions for this process: TORCH_EXTENSIONS_DIR, else torch's default."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    return [Path(configured)] if configured else [Path.home() / ".cache" / "torch_extensions"]


def use_environment_extension_dir() -> None:
    """Build DeepSpeed's ops inside this Python environment unless TORCH_EXTENSIONS_DIR says where.

    A build records the environment's absolute paths (headers, torch's libraries), so two
    checkouts or virtual environments sharing torch's default folder (~/.cache/torch_extensions)
    rebuild each other's op on their next run: a minute before the first step here. One folder
    per environment (sys.prefix) is built once; the same folder for `make`, the CLI and every
    worker of the machine. Where the environment is not writable (a system Python), torch's
    default stays.
    """
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return
    folder = Path(sys.prefix) / "var" / "torch_extensions"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    if os.access(folder, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)


def clear_stale_extension_locks(max_age_s: float = STALE_EXTENSION_LOCK_S, now: float | None = None) -> list[Path]:
    """Remove build locks left by a process killed while DeepSpeed compiled its ops; returns them.

    torch's extension builder waits, forever and silently, for another process's `lock` file in
    the build folder to vanish. A worker SIGKILLed during that first-use build (a fault test, an
    OOM kill, a preempted node) leaves the file behind, and every later run on the machine then
    hangs at DeepSpeed initialization with idle CPUs. Seen here: a 24-minute hang of a tuning run.
    """
    now = time.time() if now is None else now
    removed = []
    for root in extension_dirs():
        for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
            try:
                if now - lock.stat().st_mtime > max_age_s:
                    lock.unlink()
                    removed.append(lock)
            except FileNotFoundError:  # its owner finished meanwhile
                continue
    for lock in removed:
        logger.warning("removed a stale torch extension build lock %s (its builder died; it would hang DeepSpeed)", lock)
    return removed


def import_deepspeed() -> Any:
    """`import deepspeed`, without two start-up costs of things Tandem never runs.

    Each is seconds of every worker's start on a 2-core machine (benchmarks/startup.py):
    - DeepSpeed's autotuner imports mlflow when it is installed (Tandem's tracking extra): 1.2 s.
      It is hidden during the import only; Tandem tracks from the driver, and a user's model code
      can still import mlflow.
    - With ZeRO on, DeepSpeed imports its Muon optimizer (to list it as supported and for
      isinstance checks every step), whose kernels are decorated with torch.compile: building
      those wrappers imports Inductor, 1.1 s. Importing it here with torch.compile deferred to a
      kernel's first call keeps Muon intact and costs nothing for the torch optimizers Tandem builds.
    """
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    with _without_module("mlflow"):
        import deepspeed
    with _torch_compile_on_first_call():
        try:
            import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
        except ImportError:  # a DeepSpeed without Muon
            pass
    return deepspeed


@contextlib.contextmanager
def _without_module(name: str) -> Iterator[None]:
    """Inside the block `import name` raises ImportError (unless already imported)."""
    hidden = name not in sys.modules
    if hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # Python's marker for "this import fails"
    try:
        yield
    finally:
        if hidden and sys.modules.get(name, "imported") is None:
            del sys.modules[name]


@contextlib.contextmanager
def _torch_compile_on_first_call() -> Iterator[None]:
    """Inside the block torch.compile(fn, ...) returns fn wrapped to compile on its first call."""
    real_compile = torch.compile

    def deferred(model: Any = None, **options: Any) -> Any:
        if model is None:  # the decorator form, @torch.compile(...)
            return lambda fn: deferred(fn, **options)
        compiled: list[Any] = []

        @functools.wraps(model)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not compiled:
                compiled.append(real_compile(model, **options))
            return compiled[0](*args, **kwargs)

        return call

    torch.compile = deferred  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = real_compile
