"""Population Based Training whose exploits cannot lose their checkpoint or land on the last epoch.

Ray Tune's PBT hands an exploiting trial a *reference* to the donor's newest Tune checkpoint. The
exploiter then restarts (a new actor, a new Train run, DeepSpeed loading the shards) while the
donor trains on, and the donor's checkpoint retention (`CheckpointConfig.num_to_keep`) may delete
that folder before the exploiter has read it: `FileNotFoundError: .../checkpoint_00000N/latest`.
And a donor that has already reported its last epoch hands over a checkpoint with nothing left
to train, so the exploiter ends without training a step.

`HandoffPBT` closes both in `_exploit`, which Tune runs in the driver's event loop between two
results, so nothing is deleted while it runs:
- the donor's checkpoint is copied into a handoff folder, `<donor trial>/pbt-handoff-<exploiter>`,
  that no retention owns, and the exploiter starts from the copy (with `handoff.json`: donor,
  epoch, source). A later exploit of the same trial replaces its handoff; `remove_handoffs` clears
  them when the tune ends;
- an exploit whose donor checkpoint is at or past the final epoch is skipped: the trial keeps
  training its own configuration.

An exploit happens **in place** when it can (`tuning.scheduler.exploit: in_place`, the default):
the exploiting trial keeps its Ray Train run, worker group and DeepSpeed engines, and its workers
load the handoff copy (weights, optimizer state, schedule position) into the live engines before
their next epoch, then train on with the mutated learning rate and weight decay. The scheduler
tells the trial through its channel (tuning/trial.py) while the trial waits for this very decision,
so the workers are still held at the report. It restarts the trial instead (Ray's way: a new actor
and Train run from the copy) when the mutation changes anything else (a batch size), when trials
wait for a place (PBT then pauses the exploiter, and a paused trial restarts anyway), when the trial
has no channel, or with `exploit: restart`.

The population's state (each trial's last score, result, checkpoint and perturbation clock, and
the exploit counts) goes into Tune's experiment state with each snapshot (`saved_state`, through
tuning/housekeeping.py `SchedulerState`) and comes back on `--resume`, keyed by trial id: Ray's PBT
keys it by Trial objects, which a restore creates anew, so it would otherwise start from nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray.tune import Checkpoint
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.schedulers.pbt import _make_experiment_tag

from cluster.artifacts import atomic_write_json
from cluster.storage import Location, location, location_of
from training.resume import HOT_SWAPPABLE

logger = logging.getLogger(__name__)

HANDOFF_PREFIX = "pbt-handoff-"
HANDOFF_RECORD = "handoff.json"


def read_handoff(checkpoint_dir: str | Path | None) -> dict[str, Any] | None:
    """The handoff record of a checkpoint folder a PBT exploit made (None for any other checkpoint)."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / HANDOFF_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_at(folder: Location) -> Checkpoint:
    """A Tune checkpoint of a folder in local storage or in an object store (with Tandem's filesystem
    for the store, so an endpoint override reaches every reader of the checkpoint)."""
    if folder.remote:
        return Checkpoint(folder.fs_path, filesystem=folder.filesystem)
    return Checkpoint.from_directory(folder.uri)


def handoffs(experiment_dir: Location, exploiter_id: str = "") -> list[Location]:
    """The handoff folders of the experiment (of one exploiter, when named)."""
    return [
        folder
        for trial in experiment_dir.children()
        if trial.is_dir()
        for folder in trial.children()
        if folder.name.startswith(f"{HANDOFF_PREFIX}{exploiter_id}") and not folder.name.endswith(".partial")
    ]


def copy_for_exploiter(checkpoint: Checkpoint, donor_dir: Location, exploiter_id: str, donor_id: str, epoch: int) -> Checkpoint:
    """A copy of the donor's checkpoint that only the exploiter uses, written whole before it is named
    (locally: renamed into place; in an object store: handoff.json, which names it, uploaded last)."""
    for superseded in handoffs(donor_dir.parent, exploiter_id):
        superseded.delete_tree()
    target = donor_dir / f"{HANDOFF_PREFIX}{exploiter_id}"
    record = {"donor": donor_id, "epoch": epoch, "source": checkpoint.path, "exploiter": exploiter_id}
    if target.remote:
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory(prefix="tandem-handoff-") as staging:
            checkpoint.to_directory(staging)
            pafs.copy_files(staging, target.fs_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=target.filesystem)
        (target / HANDOFF_RECORD).put_json(record)
        return checkpoint_at(target)
    partial = target.path.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    checkpoint.to_directory(str(partial))
    atomic_write_json(partial / HANDOFF_RECORD, record)
    partial.rename(target.path)
    return checkpoint_at(target)


def channel_name(trial_id: str) -> str:
    """The name of a running trial's channel actor (tuning/trial.py), by which the scheduler finds it."""
    return f"tandem-trial-channel-{trial_id}"


def find_channel(trial_id: str) -> Any:
    """The running trial's channel, or None (from the driver: the trial's actor is in the same job)."""
    import ray

    try:
        return ray.get_actor(channel_name(trial_id))
    except ValueError:
        return None


def remove_handoffs(experiment_dir: Location | Path | str) -> None:
    """Every handoff folder of a finished tune (the exploiters have trained on from them)."""
    for folder in handoffs(location(experiment_dir)):
        folder.delete_tree()


def _restorable(state: dict[str, Any]) -> dict[str, Any]:
    """A trial's PBT state without a checkpoint save still in flight (a handle into this driver's
    Ray, meaningless after a restart): that trial is exploitable again from its next checkpoint."""
    from ray.tune.execution.tune_controller import _FutureTrainingResult

    pending = isinstance(state.get("last_checkpoint"), _FutureTrainingResult)
    return {**state, "last_checkpoint": None} if pending else dict(state)


class HandoffPBT(PopulationBasedTraining):
    """PopulationBasedTraining with the exploited checkpoint copied for the exploiter (see module doc)."""

    def __init__(self, *, final_epoch: int, exploit: str = "in_place", **kwargs: Any):
        super().__init__(**kwargs)
        self.final_epoch = final_epoch
        self.exploit_mode = exploit
        self.in_place_exploits = 0
        self.restored: dict[str, dict[str, Any]] = {}  # trial id -> its state from before a resume

    def saved_state(self) -> dict[str, Any]:
        return {
            "trials": {trial.trial_id: _restorable(vars(state)) for trial, state in self._trial_state.items()},
            "num_checkpoints": self._num_checkpoints,
            "num_perturbations": self._num_perturbations,
            "in_place_exploits": self.in_place_exploits,
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Tune restores the scheduler's state before it adds the restored trials: each trial's
        own state is put back as it is added (on_trial_add)."""
        self.restored = dict(state["trials"])
        self._num_checkpoints, self._num_perturbations = state["num_checkpoints"], state["num_perturbations"]
        self.in_place_exploits = state.get("in_place_exploits", 0)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        for name, value in self.restored.pop(trial.trial_id, {}).items():
            setattr(self._trial_state[trial], name, value)

    def _exploit(self, tune_controller: Any, trial: Any, trial_to_clone: Any) -> None:
        donor_epoch = int(self._trial_state[trial_to_clone].last_result.get(self._time_attr, 0))
        if donor_epoch >= self.final_epoch:
            logger.info("[pbt] not exploiting %s into %s: its checkpoint is at the final epoch", trial_to_clone, trial)
            return
        if self.exploit_mode == "in_place" and self._exploit_in_place(tune_controller, trial, trial_to_clone, donor_epoch):
            return
        super()._exploit(tune_controller, trial, trial_to_clone)
        handed = trial.run_metadata.checkpoint_manager._latest_checkpoint_result
        donor_dir = location_of(trial_to_clone.storage.storage_filesystem, trial_to_clone.path)
        handed.checkpoint = copy_for_exploiter(handed.checkpoint, donor_dir, trial.trial_id, trial_to_clone.trial_id, donor_epoch)

    def _exploit_in_place(self, tune_controller: Any, trial: Any, trial_to_clone: Any, donor_epoch: int) -> bool:
        """The exploit without a restart (see module doc); False where it must restart instead."""
        import ray
        from ray.train._internal.session import _TrainingResult
        from ray.tune.experiment import Trial

        new_config, _ = self._get_new_config(trial, trial_to_clone)
        changed = sorted(k for k in set(new_config) | set(trial.config) if new_config.get(k) != trial.config.get(k))
        waiting = any(t.status in (Trial.PENDING, Trial.PAUSED) for t in tune_controller.get_trials())
        if trial.status != Trial.RUNNING or waiting or not set(changed) <= set(HOT_SWAPPABLE):
            return False
        channel = find_channel(trial.trial_id)
        if channel is None:
            return False
        donor = self._trial_state[trial_to_clone]
        donor_dir = location_of(trial_to_clone.storage.storage_filesystem, trial_to_clone.path)
        handed = copy_for_exploiter(donor.last_checkpoint, donor_dir, trial.trial_id, trial_to_clone.trial_id, donor_epoch)
        exploit = {
            "checkpoint": location_of(handed.filesystem, handed.path).uri,
            "config": {k: new_config[k] for k in self._hyperparam_mutations},
            "changed": changed,
            "donor": trial_to_clone.trial_id,
            "epoch": donor_epoch,
        }
        try:
            # Waited for: the trial reads it as soon as Tune lets its report return, right after this.
            ray.get(channel.decide_exploit.remote(exploit), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            logger.info("[pbt] %s cannot take the exploit in place (%s); restarting it instead", trial, type(exc).__name__)
            return False
        trial.set_experiment_tag(_make_experiment_tag(self._trial_state[trial].orig_tag, new_config, self._hyperparam_mutations))
        trial.set_config(new_config)
        # A restore from here on (a killed driver) starts from the donor's copy, as after a restart.
        trial.run_metadata.checkpoint_manager._latest_checkpoint_result = _TrainingResult(checkpoint=handed, metrics=donor.last_result)
        self._num_perturbations += 1
        self.in_place_exploits += 1
        logger.info("[pbt] %s exploits %s (epoch %d) in place: %s", trial, trial_to_clone, donor_epoch, exploit["config"])
        return True
