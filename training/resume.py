"""Where a worker's training continues from: a retried worker group's checkpoint, `--resume`'s, or a
PBT donor's handed over to a running trial (an exploit in place, tuning/trial.py).

Each is a DeepSpeed checkpoint folder (every rank's shards, the `latest` tag file) loaded into the
live engine: weights, optimizer state and the learning-rate schedule's position. May import
cluster only.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from cluster.config import TandemConfig

TAG_FILE = "latest"


def restore(engine: Any, resume_from: str | None, session: Any) -> int:
    """Load the newest checkpoint (a retried worker group's, else --resume's); return the next epoch."""
    with session.latest_checkpoint() as folder:
        if folder is not None:
            return _load_engine_checkpoint(engine, folder)
    if resume_from:
        return _load_engine_checkpoint(engine, Path(resume_from))
    return 0


def apply_config_hparams(engine: Any, config: TandemConfig) -> None:
    """Override the checkpoint's lr and weight decay with the config's, keeping the schedule's position.

    load_checkpoint restores the optimizer's param_groups and the LambdaLR's base_lrs; a PBT trial
    that exploited another's checkpoint must train on with its own mutated values instead.
    """
    opt, scheduler = config.training.optimizer, engine.lr_scheduler
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.base_lrs = [opt.lr] * len(scheduler.base_lrs)
    for group in engine.optimizer.param_groups:
        group["initial_lr"], group["lr"], group["weight_decay"] = opt.lr, opt.lr * factor, opt.weight_decay
    scheduler._last_lr = [group["lr"] for group in engine.optimizer.param_groups]


class Handoffs:
    """This worker's mailbox for a PBT exploit in place: a Tune trial's callback puts the handoff while
    `ray.train.report` waits for Tune (tuning/trial.py WaitForTune), the loop takes it after the report.
    One Train worker per process, so one slot."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def put(self, handoff: dict[str, Any]) -> None:
        self.pending = handoff

    def take(self) -> dict[str, Any] | None:
        handoff, self.pending = self.pending, None
        return handoff


HANDOFFS = Handoffs()
# The config fields a live engine takes without a restart (apply_config_hparams); any other change restarts.
HOT_SWAPPABLE = ("training.optimizer.lr", "training.optimizer.weight_decay")


def take_over(engine: Any, handoff: dict[str, Any], config: TandemConfig) -> tuple[TandemConfig, int]:
    """Load a donor's checkpoint (weights, optimizer state, schedule position) into the running engine
    and train on with the exploiter's mutated values; return the config and the epoch to train next.

    handoff: {"checkpoint": a folder or URI every rank can read (the exploiter's handoff copy, which
    nothing deletes while this runs), "updates": {field: value} with fields from HOT_SWAPPABLE}."""
    from cluster.config import config_with

    config = config_with(config, handoff["updates"])
    with _local_folder(handoff["checkpoint"]) as folder:
        next_epoch = _load_engine_checkpoint(engine, Path(folder))
    apply_config_hparams(engine, config)
    return config, next_epoch


def _local_folder(where: str) -> contextlib.AbstractContextManager[str | Path]:
    """A checkpoint folder on this node: the folder itself, or Ray's local copy of one in an object
    store (Checkpoint.as_directory, with Tandem's filesystem for the store, as the trials use)."""
    from cluster.storage import location

    source = location(where)
    if not source.remote:
        return contextlib.nullcontext(source.path)
    from ray.train import Checkpoint

    return Checkpoint(source.fs_path, filesystem=source.filesystem).as_directory()


def _load_engine_checkpoint(engine: Any, folder: Path) -> int:
    tag = (folder / TAG_FILE).read_text().strip()
    _, client_state = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if engine.global_rank == 0:
        print(f"[tandem] resumed from {folder} (tag {tag}, step {engine.global_steps})", flush=True)
    return int(client_state["epoch"]) + 1
