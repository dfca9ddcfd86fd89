"""One Tune trial: the same Ray Train + DeepSpeed run `tandem train` makes, reporting every epoch to Tune.

Ray 2.60 runs Ray Train V2, where `Tuner(TorchTrainer)` is gone: a trial is a function trainable
that builds a TorchTrainer (training.trainer.build_trainer) and fits it. Three things here go
beyond Ray's `TuneReportCallback`:

1. **Checkpoints reach Tune.** TuneReportCallback forwards only metrics and the checkpoint's
   *path*, so Tune never registers a checkpoint: PBT has nothing to exploit and a restored tune
   restarts unfinished trials from scratch. `ForwardReports` sends each report (metrics and
   checkpoint folder) from the Train controller to the trial through a Ray queue, and the trial
   calls `tune.report(metrics, checkpoint=...)` itself. The checkpoint folder is the Train run's
   own: DeepSpeed shards of every rank, a `latest` tag file and rank 0's model_fp32.pt.
2. **A trial starts from the checkpoint Tune gives it** (`tune.get_checkpoint()`: a PBT donor's
   or its own after a restore) by passing it to the trainer as `resume_from`; each start is a
   fresh Train run ("segment") in the trial folder, so Train never silently prefers an older
   checkpoint of its own.
3. **A stopped trial releases its workers.** When ASHA, PBT or the time budget ends a trial, Tune
   kills the trial's actor, and with it the Train controller; the worker group's placement group
   is owned by the job, not the controller, so it outlives both. Ray Train's detached
   PlacementGroupCleaner would remove it, but it asks the State API, which needs the dashboard;
   without it (Tandem's default, and the tests'), the CPUs stay reserved and the next wave of
   trials waits for ever ("worker group startup timed out"). `StopTrainRunOnCleanup` aborts the
   Train run gracefully (controller.abort(): workers stopped, placement group removed, cleaner
   stopped) inside the trainable's cleanup, which Tune runs before it ends the actor.
   tuning/housekeeping.py sweeps whatever an ungraceful end still leaves.

Each trial folder holds `segments.jsonl` (tuning/segments.py): one line per start and per end.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ray.train import UserCallback
from ray.train.v2._internal.execution.callback import ControllerCallback

from cluster.config import validate_config
from tuning.segments import donor_trial, log_segment
from tuning.space import SearchSpace, trial_config

SEGMENT_PREFIX = "train-"
ABORT_TIMEOUT_S = 30.0
POLL_S = 1.0


# ---------------------------------------------------------------------------------------------
# Train -> trial: callbacks that run inside the Train controller
# ---------------------------------------------------------------------------------------------


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of a report (per-rank lists and node ids stay in metrics.jsonl)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class ForwardReports(UserCallback):
    """Sends rank 0's metrics and the registered checkpoint folder of every report to the trial."""

    def __init__(self, reports: Any):
        self.reports = reports

    def after_report(self, run_context, metrics, checkpoint):
        self.reports.put(("report", numeric_metrics(metrics[0]), checkpoint.path if checkpoint is not None else None))


class AnnounceController(ControllerCallback):
    """Sends the controller's handle to the trial as soon as it starts, so a stop can abort it.

    A ControllerCallback is Ray Train's internal interface; RunConfig passes non-UserCallback
    callbacks through unchanged for exactly this kind of extension.
    """

    def __init__(self, reports: Any):
        self.reports = reports

    def after_controller_start(self, train_run_context):
        import ray

        self.reports.put(("controller", ray.get_runtime_context().current_actor))


# ---------------------------------------------------------------------------------------------
# stopping: the Train run of the trial that this process hosts
# ---------------------------------------------------------------------------------------------


class _ActiveRun:
    """The Train run the trial in this process drives (Tune hosts one trial per actor: reuse_actors=False)."""

    def __init__(self) -> None:
        self.controller: Any = None
        self.reports: Any = None
        self.trial_dir: Path | None = None
        self.stopping = False

    def reset(self, reports: Any, trial_dir: Path) -> None:
        self.controller, self.reports, self.trial_dir, self.stopping = None, reports, trial_dir, False


ACTIVE = _ActiveRun()


def _controller_from_queue() -> Any:
    """The controller handle if it is still waiting in the queue (a stop right after the start)."""
    if ACTIVE.reports is None:
        return None
    try:
        while not ACTIVE.reports.empty():
            message = ACTIVE.reports.get_nowait()
            if message[0] == "controller":
                return message[1]
    except Exception:  # the queue actor may be gone already; nothing left to find
        return None
    return None


def stop_active_train_run(timeout_s: float = ABORT_TIMEOUT_S) -> None:
    """Abort this process's Train run: workers stop and their placement group is removed."""
    import ray

    ACTIVE.stopping = True
    controller = ACTIVE.controller or _controller_from_queue()
    if controller is None:
        return
    if ACTIVE.trial_dir is not None:
        log_segment(ACTIVE.trial_dir, {"event": "end", "outcome": "stopped"})
    try:
        ray.get(controller.abort.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - abort ends the controller actor, so its call "fails" by design
        pass
    ACTIVE.controller = None


class StopTrainRunOnCleanup:
    """Mixin for Tune's function trainable: Tune calls cleanup() before it ends a trial's actor."""

    def cleanup(self) -> None:
        stop_active_train_run()
        super().cleanup()  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# the trial function
# ---------------------------------------------------------------------------------------------


def next_segment_dir(trial_dir: Path) -> Path:
    """A fresh folder for this start's Train run: train-0, train-1, ..."""
    taken = [int(p.name[len(SEGMENT_PREFIX):]) for p in Path(trial_dir).glob(f"{SEGMENT_PREFIX}*") if p.name[len(SEGMENT_PREFIX):].isdigit()]
    folder = Path(trial_dir) / f"{SEGMENT_PREFIX}{max(taken, default=-1) + 1}"
    folder.mkdir(parents=True)
    return folder


def _fit_in_background(trainer: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the trial thread, which decides
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="tandem-train-fit", daemon=True)
    thread.start()
    return thread, outcome


def _messages(reports: Any, fit_thread: threading.Thread) -> Iterator[tuple]:
    """Messages from the Train controller until the run ends and the queue is drained."""
    from ray.util.queue import Empty

    while True:
        try:
            yield reports.get(timeout=POLL_S)
        except Empty:
            if not fit_thread.is_alive():
                # Every report happens before fit() returns, so what is left is already queued.
                while not reports.empty():
                    yield reports.get_nowait()
                return


def run_trial(sampled: dict[str, Any], *, base: dict[str, Any], space: SearchSpace, updates: dict[str, Any], use_gpu: bool) -> None:
    """Tune's function trainable: train one sampled configuration, reporting each epoch to Tune."""
    from ray import tune
    from ray.util.queue import Queue

    from training.trainer import build_trainer

    config = trial_config(validate_config(base), space, sampled, updates)
    trial_dir = Path(tune.get_context().get_trial_dir())
    start = tune.get_checkpoint()
    with ExitStack() as stack:
        # Local storage: the persisted folder itself; remote storage: a local copy for this start.
        resume_from = stack.enter_context(start.as_directory()) if start is not None else None
        segment = next_segment_dir(trial_dir)
        log_segment(trial_dir, {"event": "start", "segment": segment.name, "params": space.decode(sampled),
                                "resume_from": start.path if start else None, "from_trial": donor_trial(start.path if start else None)})
        reports = Queue(actor_options={"num_cpus": 0})
        ACTIVE.reset(reports, trial_dir)
        trainer = build_trainer(config, segment, use_gpu, resume_from, callbacks=[ForwardReports(reports), AnnounceController(reports)])
        fit_thread, outcome = _fit_in_background(trainer)
        for message in _messages(reports, fit_thread):
            if message[0] == "controller":
                ACTIVE.controller = message[1]
                continue
            _, metrics, checkpoint_path = message
            checkpoint = tune.Checkpoint.from_directory(checkpoint_path) if checkpoint_path else None
            tune.report(metrics, checkpoint=checkpoint)
        fit_thread.join()
        ACTIVE.controller = None  # the run is over; holding its handle would keep the controller alive
    if ACTIVE.stopping:
        return
    if "error" in outcome:
        log_segment(trial_dir, {"event": "end", "outcome": "error", "error": repr(outcome["error"])})
        raise outcome["error"]
    log_segment(trial_dir, {"event": "end", "outcome": "completed"})


# Tune builds the trial's actor class from the function plus these mixins.
run_trial.__mixins__ = (StopTrainRunOnCleanup,)  # type: ignore[attr-defined]
