"""Driver-side Tune callbacks: release what ended trials leave behind, record how many ran at once,
print one progress line per finished trial (the terminal's view of a search), and track each
trial in MLflow (a child of the tuning run) and TensorBoard (`TrackTrials`, cluster/tracking.py).

`ReleaseOrphanedPlacementGroups` is the safety net behind tuning/trial.py's graceful stop. A
Train worker group's placement group belongs to the job, not to the Train controller that created
it, so a controller that dies without cleaning up (its trial's actor killed, a crash) leaves the
group's CPUs reserved for the rest of the job. Ray Train's own PlacementGroupCleaner notices the
dead controller only through the State API, which needs the dashboard; with the dashboard off the
next wave of trials waits for those CPUs for ever.

Here the same condition is read from the GCS directly (Ray's placement-group table carries
`creator_actor_id` and `creator_actor_dead`): a placement group created by an actor of this job
whose creator is dead is an orphan and is removed. Groups created by the driver itself (Tune's
own trial groups) have no creator actor and are never touched; other jobs' groups neither.
This reads Ray's private GCS accessor, so every failure is logged once and otherwise ignored: the
sweep must never break a tuning run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from cluster.storage import Location, location

logger = logging.getLogger("tandem.tuning")
SWEEP_EVERY_S = 5.0
NIL_ACTOR = "ff" * 16


def orphaned_placement_groups(job_id_hex: str) -> list[bytes]:
    """Ids of live placement groups created by now-dead actors of this job."""
    import ray
    from ray.core.generated import gcs_pb2

    removed = gcs_pb2.PlacementGroupTableData.REMOVED
    accessor = ray._private.state.state._connect_and_get_accessor()
    orphans = []
    for raw in accessor.get_placement_group_table():
        row = gcs_pb2.PlacementGroupTableData.FromString(raw)
        created_by_actor = row.creator_actor_id and row.creator_actor_id.hex() != NIL_ACTOR
        if row.state != removed and created_by_actor and row.creator_actor_dead and row.creator_job_id.hex() == job_id_hex:
            orphans.append(row.placement_group_id)
    return orphans


def release_orphaned_placement_groups() -> int:
    """Remove this job's orphaned placement groups; returns how many."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    count = 0
    for pg_id in orphaned_placement_groups(job):
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg_id)))
        count += 1
    return count


class ReleaseOrphanedPlacementGroups(Callback):
    """Sweeps orphaned Train placement groups after every trial end and every few seconds."""

    def __init__(self, every_s: float = SWEEP_EVERY_S):
        self.every_s = every_s
        self.last = 0.0
        self.released = 0
        self.failed = False

    def sweep(self) -> None:
        self.last = time.monotonic()
        if self.failed:
            return
        try:
            freed = release_orphaned_placement_groups()
        except Exception as exc:  # noqa: BLE001 - a private API may change; never break the run
            self.failed = True
            logger.warning("tandem: cannot sweep orphaned placement groups (%s); a stopped trial's workers may stay reserved", exc)
            return
        if freed:
            self.released += freed
            print(f"[tandem] released {freed} placement group(s) left by stopped trials", flush=True)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.sweep()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.sweep()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.sweep()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.sweep()


class TrackConcurrency(Callback):
    """Records the most trials RUNNING at once into a small JSON file (it survives a restore)."""

    def __init__(self, path: Location | Path):
        self.path = location(path)
        self._peak: int | None = None  # read lazily: a restored tune continues the earlier peak

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self._peak is None:
            self._peak = read_peak(self.path)
        running = sum(1 for t in trials if t.status == "RUNNING")
        if running > self._peak:
            self._peak = running
            # Whole or not at all: a crash mid-write must not leave JSON that breaks the restored run's read_peak.
            self.path.put_json({"peak_running_trials": running})


def read_peak(path: Location | Path) -> int:
    try:
        return json.loads(location(path).read_text())["peak_running_trials"]
    except FileNotFoundError:
        return 0


class SchedulerState(Callback):
    """The trial scheduler's own state, saved with every snapshot of Tune's experiment state and
    restored with it on `--resume`; and `scheduler.json` in the run folder when the search ends.

    Tune pickles the scheduler once, as it was when the search started, and its snapshots hold the
    searcher's and the callbacks' states but not the scheduler's (ray-project/ray#30838): a restored
    ASHA would judge the rest of the search against empty rungs, a restored PBT would forget its
    population. The scheduler and this callback are pickled together (tuner.pkl), so after a
    restore this callback still holds the scheduler Tune runs. A scheduler with no state (FIFO)
    saves nothing.
    """

    def __init__(self, scheduler: Any, summary: Location | Path):
        self.scheduler, self.summary = scheduler, location(summary)
        self.restored = False

    def get_state(self) -> dict[str, Any] | None:
        saved = getattr(self.scheduler, "saved_state", None)
        return {"scheduler": type(self.scheduler).__name__, "state": saved()} if saved else None

    def set_state(self, state: dict[str, Any]) -> None:
        self.scheduler.restore_state(state["state"])
        self.restored = True
        logger.info("restored the %s state of the interrupted search", state["scheduler"])

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        rungs = getattr(self.scheduler, "rungs", None)
        self.summary.put_json(
            {
                "scheduler": type(self.scheduler).__name__,
                "restored": self.restored,
                "stopped_early": getattr(self.scheduler, "_num_stopped", None),
                "perturbations": getattr(self.scheduler, "_num_perturbations", None),
                "in_place_exploits": getattr(self.scheduler, "in_place_exploits", None),
                "rungs": rungs() if rungs else None,
            }
        )


class TrialProgress(Callback):
    """One "[tandem] trial k/N ..." line per trial that ends (the epochs go to the trial's files)."""

    def __init__(self, total: int, metric: str):
        self.total, self.metric, self.ended = total, metric, 0

    def _line(self, trial: Any, outcome: str) -> None:
        self.ended += 1
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = f"{self.metric} {value:.4f}" if isinstance(value, int | float) else f"no {self.metric}"
        print(
            f"[tandem] trial {self.ended:>3}/{self.total} {trial.trial_id} {outcome}: {shown} after {result.get('epoch', 0)} epoch(s)",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "failed")


class TrackTrials(Callback):
    """An MLflow child run per trial under the tuning run's, and TensorBoard event files in each
    trial's folder: one point per metric per reported epoch, logged here in the driver.

    Tune pickles its callbacks with the experiment state; the open runs are not pickled, and a
    restored tune opens new ones for the trials it continues.
    """

    def __init__(self, config: dict[str, Any], space: Any, parent_run_id: str | None, experiment_dir: Location | Path):
        self.config, self.space, self.parent_run_id, self.experiment_dir = config, space, parent_run_id, location(experiment_dir)
        self.trackers: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "trackers": {}}

    def _tracker(self, trial: Any) -> Any:
        from cluster.config import validate_config
        from cluster.tracking import Tracker, open_tracker, record_run

        if trial.trial_id not in self.trackers:
            config = validate_config(self.config)
            folder = self.experiment_dir / trial.trial_id
            folder.make_dirs()
            parent = Tracker(run_id=self.parent_run_id)
            params = self.space.decode(trial.config)
            self.trackers[trial.trial_id] = open_tracker(
                config, folder, trial.trial_id, params=params, parent=parent, tags={"tandem.trial_id": trial.trial_id}
            )
            record_run(folder, self.trackers[trial.trial_id], config)
        return self.trackers[trial.trial_id]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from cluster.config.checks import REPORTED_METRICS
        from tuning.schedulers import TIME_ATTR

        self._tracker(trial).log_epoch({k: result[k] for k in (TIME_ATTR, "step", *REPORTED_METRICS) if k in result})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.trackers:
            self.trackers.pop(trial.trial_id).finish("FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.trackers:
            self.trackers.pop(trial.trial_id).finish("FAILED")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for tracker in self.trackers.values():
            tracker.finish("KILLED")
        self.trackers.clear()
