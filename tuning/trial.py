"""One Tune trial: the same Ray Train + DeepSpeed run `tandem train` makes, reporting every epoch to Tune.

Ray 2.60 runs Ray Train V2, where `Tuner(TorchTrainer)` is gone: a trial is a function trainable
that builds a TorchTrainer (training.trainer.build_trainer) and fits it. Five things here go
beyond Ray's `TuneReportCallback`:

1. **Checkpoints reach Tune.** TuneReportCallback forwards only metrics and the checkpoint's
   *path*, so Tune never registers a checkpoint: PBT has nothing to exploit and a restored tune
   restarts unfinished trials from scratch. Here `ForwardReports` (in the Train controller) sends
   each report to the trial through a `TrialChannel` actor, and the trial calls
   `tune.report(metrics, checkpoint=...)` itself with the Train run's checkpoint folder (every
   rank's DeepSpeed shards, the `latest` tag file, rank 0's model_fp32.pt).
2. **Tune decides before the next epoch starts.** Train's workers do not wait for anyone after a
   report, so by the time ASHA stops a trial its workers have trained on (with 5-step epochs, to
   the end). `WaitForTune` runs inside every worker's `ray.train.report` and holds the worker
   until Tune has taken that report and let the trial continue: a stopped trial trains exactly
   the epochs Tune saw, and a checkpoint is never replaced while Tune copies it. The wait costs one
   Tune round trip per epoch.
3. **A trial starts from the checkpoint Tune gives it** (`tune.get_checkpoint()`: a PBT donor's,
   or its own after a restore) by passing it to the trainer as `resume_from`; every start is a
   fresh Train run ("segment", `train-N/`) in the trial folder, so Train never silently prefers an
   older checkpoint of its own.
4. **A stopped trial releases its workers.** When a scheduler or the time budget ends a trial,
   Tune ends the trial's actor, and with it the Train controller; the worker group's placement
   group belongs to the job, not the controller, so it outlives both. Ray Train's detached
   PlacementGroupCleaner would remove it, but it asks the State API, which needs the dashboard;
   without one (Tandem's default, and the tests') the CPUs stay reserved and the next wave of
   trials waits for ever ("worker group startup timed out"). `StopTrainRunOnCleanup` aborts the
   Train run (controller.abort(): workers stopped, placement group removed, cleaner stopped) in
   the trainable's cleanup, which Tune runs before it ends the actor; tuning/housekeeping.py
   sweeps what an ungraceful end still leaves.

5. **A PBT exploit can happen in place.** The scheduler decides it while the trial waits for Tune
   to take a report (tuning/pbt.py) and leaves the donor's checkpoint in the trial's channel; the
   trial logs it and hands it to the workers with their permit, and each worker loads it into its
   live DeepSpeed engine before the next epoch (training/resume.py): the trial's Train run goes on.

The Train callbacks other than ForwardReports use Ray Train's internal callback interfaces
(ControllerCallback, TrainContextCallback); RunConfig passes such callbacks through unchanged.
Each trial folder holds `segments.jsonl` (tuning/segments.py): one line per start and per end.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import ray
from ray.train import UserCallback
from ray.train.v2._internal.execution.callback import ControllerCallback, TrainContextCallback

from cluster.config import validate_config
from cluster.storage import Location, location, location_of
from cluster.tracking import scalar_metrics
from training.resume import HANDOFFS
from tuning.pbt import channel_name, checkpoint_at, read_handoff
from tuning.segments import donor_trial, log_segment, read_segments
from tuning.space import SearchSpace, trial_config

SEGMENT_PREFIX = "train-"
ABORT_TIMEOUT_S = 30.0
POLL_S = 1.0


# ---------------------------------------------------------------------------------------------
# the channel between a trial and its Train run
# ---------------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class TrialChannel:
    """Reports flow from the Train controller to the trial; permits flow from the trial to the workers,
    each with the handoff of a PBT exploit in place when the scheduler decided one on that report.

    An async actor owned by the trial, named after it so that the scheduler in the driver can find
    it (tuning/pbt.py): it ends with the trial, and so do the waits on it.
    """

    def __init__(self) -> None:
        self.messages: asyncio.Queue = asyncio.Queue()
        self.permitted = 0
        self.changed = asyncio.Condition()
        self.exploit: dict[str, Any] | None = None  # from the scheduler, for the trial
        self.handoffs: dict[int, dict[str, Any]] = {}  # report index -> handoff, for every rank

    async def put(self, message: tuple) -> None:
        self.messages.put_nowait(message)

    async def get(self, timeout_s: float) -> tuple | None:
        try:
            return await asyncio.wait_for(self.messages.get(), timeout_s)
        except asyncio.TimeoutError:
            return None

    async def decide_exploit(self, exploit: dict[str, Any]) -> None:
        self.exploit = exploit

    async def take_exploit(self) -> dict[str, Any] | None:
        exploit, self.exploit = self.exploit, None
        return exploit

    async def permit(self, reports: int, handoff: dict[str, Any] | None = None) -> None:
        async with self.changed:
            if handoff is not None:
                self.handoffs[reports] = handoff
            self.permitted = max(self.permitted, reports)
            self.changed.notify_all()

    async def wait_for_permit(self, reports: int) -> dict[str, Any] | None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.permitted >= reports)
            return self.handoffs.get(reports)


def open_channel(trial_id: str, attempts: int = 20) -> Any:
    """The trial's channel, named after it. A restarted trial's new actor can start before Ray has
    ended its old one (and with it the old channel, which it owns): that name is taken over."""
    for _ in range(attempts):
        try:
            return TrialChannel.options(name=channel_name(trial_id)).remote()
        except ValueError:  # the name is still held by the previous start's channel
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(channel_name(trial_id)))
            time.sleep(0.1)
    raise RuntimeError(f"the channel name {channel_name(trial_id)} stayed taken; is another tune running the same trial ids?")


class ForwardReports(UserCallback):
    """Controller side: sends rank 0's metrics and the registered checkpoint folder of every report."""

    def __init__(self, channel: Any):
        self.channel = channel
        self.reports = 0

    def after_report(self, run_context, metrics, checkpoint):
        self.reports += 1
        # Fire and forget: the controller's event loop must never wait on the trial. The checkpoint
        # goes as a path or URI (its filesystem stays behind), so an object store's folder keeps its scheme.
        where = location_of(checkpoint.filesystem, checkpoint.path).uri if checkpoint is not None else None
        self.channel.put.remote(("report", self.reports, scalar_metrics(metrics[0]), where))


class AnnounceController(ControllerCallback):
    """Controller side: sends the controller's handle as soon as it starts, so a stop can abort it."""

    def __init__(self, channel: Any):
        self.channel = channel

    def after_controller_start(self, train_run_context):
        self.channel.put.remote(("controller", ray.get_runtime_context().current_actor))


class WaitForTune(TrainContextCallback):
    """Worker side: after each `ray.train.report`, wait until Tune took the report and let the trial go on.

    Every rank waits for the same permit, so no rank starts the next epoch early. After a worker
    group restart (training.max_failures) the counts start again at 1 and the first reports pass
    at once: the run is then a few epochs ahead of Tune, as without this gate, never stuck.
    """

    def __init__(self, channel: Any):
        self.channel = channel
        self.reports = 0

    @contextlib.contextmanager
    def on_report(self):
        yield
        self.reports += 1
        handoff = ray.get(self.channel.wait_for_permit.remote(self.reports))
        if handoff is not None:
            HANDOFFS.put(handoff)  # the loop takes it over after this report (training/resume.py)


# ---------------------------------------------------------------------------------------------
# stopping: the Train run of the trial that this process hosts
# ---------------------------------------------------------------------------------------------


class _ActiveRun:
    """The Train run the trial in this process drives (Tune hosts one trial per actor: reuse_actors=False)."""

    def __init__(self) -> None:
        self.controller: Any = None
        self.channel: Any = None
        self.trial_dir: Location | None = None
        self.stopping = False
        self.reports = 0  # reports handed to Tune by this run

    def reset(self, channel: Any, trial_dir: Location) -> None:
        self.controller, self.channel, self.trial_dir, self.stopping, self.reports = None, channel, trial_dir, False, 0


ACTIVE = _ActiveRun()


def _controller_from_channel() -> Any:
    """The controller handle if it is still waiting in the channel (a stop right after the start)."""
    if ACTIVE.channel is None:
        return None
    with contextlib.suppress(Exception):  # the channel may be gone already; nothing left to find
        while (message := ray.get(ACTIVE.channel.get.remote(0.0), timeout=5)) is not None:
            if message[0] == "controller":
                return message[1]
    return None


def stop_active_train_run(timeout_s: float = ABORT_TIMEOUT_S) -> None:
    """Abort this process's Train run: workers stop and their placement group is removed."""
    ACTIVE.stopping = True
    controller = ACTIVE.controller or _controller_from_channel()
    if controller is None:
        return
    if ACTIVE.trial_dir is not None:
        log_segment(ACTIVE.trial_dir, {"event": "end", "outcome": "stopped", "reports": ACTIVE.reports})
    # abort() ends the controller actor, so the call itself "fails" by design.
    with contextlib.suppress(Exception):
        ray.get(controller.abort.remote(), timeout=timeout_s)
    ACTIVE.controller = None


class StopTrainRunOnCleanup:
    """Mixin for Tune's function trainable: Tune calls cleanup() before it ends a trial's actor."""

    def cleanup(self) -> None:
        stop_active_train_run()
        super().cleanup()  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# the trial function
# ---------------------------------------------------------------------------------------------


def next_segment_dir(trial_dir: Location) -> Location:
    """A fresh folder for this start's Train run: train-0, train-1, ... An object store shows a
    folder only once a file is in it, so the names segments.jsonl recorded count as taken too."""
    names = [p.name for p in trial_dir.children()] + [s.get("segment") or "" for s in read_segments(trial_dir)]
    taken = [int(n[len(SEGMENT_PREFIX) :]) for n in names if n.startswith(SEGMENT_PREFIX) and n[len(SEGMENT_PREFIX) :].isdigit()]
    folder = trial_dir / f"{SEGMENT_PREFIX}{max(taken, default=-1) + 1}"
    folder.make_dirs()
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


def _messages(channel: Any, fit_thread: threading.Thread) -> Iterator[tuple]:
    """Messages from the Train controller until the run ends and the channel is drained."""
    while True:
        message = ray.get(channel.get.remote(POLL_S))
        if message is not None:
            yield message
        elif not fit_thread.is_alive():
            # Every report happens before fit() returns, so what is left is already in the channel.
            while (message := ray.get(channel.get.remote(0.0))) is not None:
                yield message
            return


def run_trial(
    sampled: dict[str, Any], *, base: dict[str, Any], space: SearchSpace, updates: dict[str, Any], use_gpu: bool, experiment_dir: str
) -> None:
    """Tune's function trainable: train one sampled configuration, reporting each epoch to Tune."""
    from ray import tune

    from training.trainer import build_trainer

    config = trial_config(validate_config(base), space, sampled, updates)
    # The trial's folder in the run's storage (not Tune's scratch working directory): Train runs,
    # their checkpoints and segments.jsonl stay beside Tune's own checkpoint copies.
    trial_dir = location(experiment_dir) / tune.get_context().get_trial_id()
    trial_dir.make_dirs()
    start = tune.get_checkpoint()
    start_uri = location_of(start.filesystem, start.path).uri if start is not None else None
    with ExitStack() as stack:
        # Local storage: the persisted folder itself; remote storage: a local copy for this start.
        resume_from = stack.enter_context(start.as_directory()) if start is not None else None
        segment = next_segment_dir(trial_dir)
        log_segment(
            trial_dir,
            {
                "event": "start",
                "segment": segment.name,
                "params": space.decode(sampled),
                "resume_from": start_uri,
                "from_trial": donor_trial(start_uri),
                # A PBT exploit's copy of the donor checkpoint names the donor's epoch.
                "from_epoch": (read_handoff(resume_from) or {}).get("epoch"),
            },
        )
        channel = open_channel(trial_dir.name)
        # Only PBT in place puts exploits in the channel: other schedulers skip the round trip per report.
        scheduler = config.tuning.scheduler
        exploits_in_place = scheduler.name == "pbt" and scheduler.exploit == "in_place"
        ACTIVE.reset(channel, trial_dir)
        callbacks = [ForwardReports(channel), AnnounceController(channel), WaitForTune(channel)]
        trainer = build_trainer(config, segment, use_gpu, resume_from, callbacks=callbacks, hparams_from_config=True, echo_epochs=False)
        fit_thread, outcome = _fit_in_background(trainer)
        for message in _messages(channel, fit_thread):
            if message[0] == "controller":
                ACTIVE.controller = message[1]
                continue
            _, index, metrics, checkpoint_path = message
            checkpoint = checkpoint_at(location(checkpoint_path)) if checkpoint_path else None
            # Wall-clock time of the report: time-to-target across trials needs one clock.
            ACTIVE.reports = index
            tune.report({**metrics, "reported_at": time.time()}, checkpoint=checkpoint)
            # Tune has taken the report and let this trial continue: the workers may go on, with the
            # donor's checkpoint to load when PBT decided an exploit in place on this report.
            exploit = ray.get(channel.take_exploit.remote()) if exploits_in_place else None
            handoff = accept_exploit(exploit, space, trial_dir, segment, index) if exploit else None
            channel.permit.remote(index, handoff)
        fit_thread.join()
        ACTIVE.controller = None  # the run is over; holding its handle would keep the controller alive
    if ACTIVE.stopping:
        return
    if "error" in outcome:
        log_segment(trial_dir, {"event": "end", "outcome": "error", "error": repr(outcome["error"])})
        raise outcome["error"]
    log_segment(trial_dir, {"event": "end", "outcome": "completed"})


def accept_exploit(exploit: dict[str, Any], space: SearchSpace, trial_dir: Location, segment: Location, report: int) -> dict[str, Any]:
    """The workers' handoff for an exploit PBT decided in place (tuning/pbt.py), logged as a segment event.

    exploit: {"checkpoint": the exploiter's handoff copy, "config": the new sampled values,
    "changed": the paths whose values change, "donor", "epoch"}."""
    params = space.decode(exploit["config"])
    log_segment(
        trial_dir,
        {
            "event": "exploit",
            "in_place": True,
            "segment": segment.name,
            "after_report": report,  # the segment's reports before the donor's weights were loaded
            "params": params,
            "sampled": exploit["config"],  # Tune's values: the trial's config from here on (Tune's Result keeps the first)
            "resume_from": exploit["checkpoint"],
            "from_trial": exploit["donor"],
            "from_epoch": exploit["epoch"],
        },
    )
    return {"checkpoint": exploit["checkpoint"], "updates": {path: params[path] for path in exploit["changed"]}}


# Tune builds the trial's actor class from the function plus these mixins.
run_trial.__mixins__ = (StopTrainRunOnCleanup,)  # type: ignore[attr-defined]
