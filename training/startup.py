"""What Tandem changes in Ray Train's start-up, and why: seconds of every small run.

A one-epoch `tandem train` of the packaged example used to spend most of its time starting
(benchmarks/startup.py, the start-up table of docs/benchmarks.md). Each change below keeps Ray Train,
DeepSpeed, checkpoints and resume as they are; `TANDEM_RAY_TRAIN_DEFAULTS=1` turns them all off
(Ray Train as it comes: the benchmark's other arm, and a way out if one is ever suspected).

- `controller_env`: the controller polls its workers every 0.5 s instead of 2 s (it advances one
  state per poll), and on a local Ray it starts no preemption watcher (nothing to drain).
- `prestart_train_coordinator`: before placing workers, the controller asks Ray Data's
  autoscaling coordinator (a detached actor) for resources and waits for the answer. Created by
  the controller, whose runtime_env no idle worker process matches, it is a new process on the
  critical path (1.4 s here); created by the driver right after a local Ray starts, it takes one
  of the worker processes Ray starts ahead of time, while the controller is still starting.
- `trainer_class(skipped_callbacks(...))`: two of Ray Train's default callbacks start an actor
  process each, for nothing in two common cases. The datasets callback's DatasetManager hands out
  Ray Data shards: without Ray Data inputs there are none (every in-memory run, every tuning
  trial). The placement-group cleaner removes the workers' placement group when the controller
  dies while the cluster lives on: on a local Ray that Tandem started for this run, the cluster
  ends with the run. (In a tuning trial it stays: Tune stops trials by killing them.) On 2 cores,
  a process importing Ray while the workers import torch is about 1 s to the first step, and
  about 1.4 s of CPU for each of a search's trials.

What the workers import is trimmed in training/ds_config.py (`import_deepspeed`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cluster.config import TandemConfig

logger = logging.getLogger("tandem.training")

RAY_TRAIN_DEFAULTS_ENV = "TANDEM_RAY_TRAIN_DEFAULTS"
# Ray Train's default callbacks that Tandem may leave out (class names in ray.train.v2).
DATASETS_CALLBACK, PLACEMENT_GROUP_CLEANER = "DatasetsCallback", "PlacementGroupCleanerCallback"


def ray_train_defaults() -> bool:
    """True when the user asked for Ray Train as it comes (TANDEM_RAY_TRAIN_DEFAULTS=1)."""
    return os.environ.get(RAY_TRAIN_DEFAULTS_ENV, "0") not in ("", "0", "false")


def controller_env(config: TandemConfig) -> dict[str, str]:
    """Ray Train settings for its controller (Ray Train hands the driver's env vars to it).

    A poll is one small RPC per worker, so 0.5 s costs nothing measurable; the preemption watcher
    is one more actor process per run, and its constructor logs an error where the node has no
    drain state.
    """
    if ray_train_defaults():
        return {}
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    if config.cluster.address == "local" and not os.environ.get("RAY_ADDRESS"):
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return env


def prestart_train_coordinator() -> None:
    """Create Ray Data's autoscaling coordinator from the driver (see the module docstring).

    Ray Train's controller gets the same named, detached actor (`get_if_exists`). The function is
    Ray's own; if a Ray upgrade moves it, the run starts as Ray Train would start it.
    """
    if ray_train_defaults():
        return
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import get_or_create_autoscaling_coordinator
    except ImportError:
        logger.debug("Ray Data's autoscaling coordinator moved; the controller creates it")
        return
    get_or_create_autoscaling_coordinator()


def skipped_callbacks(local_run: bool, datasets: bool) -> tuple[str, ...]:
    """Ray Train's default callbacks this run does without (see the module docstring).

    local_run: a local Ray started by Tandem for this run alone; datasets: Ray Data inputs.
    """
    if ray_train_defaults():
        return ()
    return tuple(name for name, skip in ((DATASETS_CALLBACK, not datasets), (PLACEMENT_GROUP_CLEANER, local_run)) if skip)


def trainer_class(skipped: tuple[str, ...]) -> Any:
    """TorchTrainer, or a TorchTrainer without the default callbacks named in `skipped`."""
    from ray.train.torch import TorchTrainer

    if not skipped:
        return TorchTrainer

    class LeanTorchTrainer(TorchTrainer):
        # The one hook Ray Train has for its default callbacks; kept to filtering what it returns.
        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            return [cb for cb in callbacks if type(cb).__name__ not in skipped]

    return LeanTorchTrainer
