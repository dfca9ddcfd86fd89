"""`tune(config) -> TuneResult`: Ray Tune around the same Ray Train + DeepSpeed trainer.

Parse, check, plan, run, report:
1. Before Ray: the search space (tuning/space.py), the scheduler/searcher combination
   (tuning/schedulers.py) and a preflight of the data and model for every model/data value the
   space can produce. Every problem comes back in one ConfigError.
2. On the cluster: the trial resource plan (tuning/resources.py); a config whose trials cannot
   be placed is a ConfigError before any trial starts, never a hang.
3. Tuner.fit() with one function trainable per trial (tuning/trial.py), or Tuner.restore() for
   `resume`: finished trials keep their results and are not run again.
4. The table, results.csv/json, the plot, and the best trial's model consolidated into
   `<run>/artifacts/` by training.trainer.consolidate, exactly like a training run's, linked
   from tuning_manifest.json (tuning/results.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from cluster.artifacts import ArtifactError, model_version, new_run_dir
from cluster.config import ConfigError, Problem, TandemConfig, config_with
from cluster.config.checks import REPORTED_METRICS
from cluster.console import move_log
from cluster.runtime import connect, require_reachable_storage, require_shared_storage, storage_root
from cluster.storage import Location, location, native
from tuning.resources import TRIAL_FUNCTION_CPU, TrialPlan, plan_trials
from tuning.results import (
    RESULTS_CSV,
    RESULTS_JSON,
    RESULTS_PNG,
    TUNING_MANIFEST,
    TrialSummary,
    pick_best,
    plot_trials,
    print_table,
    summarize_result,
    write_csv,
    write_json,
    write_tuning_manifest,
)
from tuning.schedulers import build_search, build_trial_scheduler, plan_problems
from tuning.space import SearchSpace, count_trials, param_space, parse_space, probe_values, trial_config

TUNE_PREFIX = "tune-"
EXPERIMENT = "trials"
PEAK_FILE = ".peak_running_trials.json"
SCHEDULER_FILE = "scheduler.json"  # the scheduler's final state: each ASHA rung's results, PBT's counts
# Written when a tuning run starts: its scheduler's state goes into Tune's snapshots (SchedulerState),
# so a resume restores it. A run without it was started by a Tandem that did not save it.
RUN_RECORD = "tuning_run.json"
# Tune snapshots its experiment state every >= 10 s by default; an interrupted tune then forgets
# trials that finished in the last 10 s and runs them again. The state of a Tandem tune is small.
EXPERIMENT_SNAPSHOT_S = "2"
SEARCHED_SECTIONS = ("model", "data", "training", "tuning")


@dataclass
class TuneResult:
    """run_dir and artifact_dir: Paths for local storage, Locations (URIs) in an object store."""

    run_dir: Path | Location
    artifact_dir: Path | Location
    best: TrialSummary
    trials: list[TrialSummary]
    plan: TrialPlan
    total_epochs: int
    wall_s: float
    peak_running_trials: int
    best_metrics: dict[str, Any] = field(default_factory=dict)  # the artifact's: the best trial's last checkpoint
    files: dict[str, Path | Location] = field(default_factory=dict)

    @property
    def best_config_path(self) -> Path | Location:
        return self.run_dir / "best_config.yaml"


# ---------------------------------------------------------------------------------------------
# checks before Ray
# ---------------------------------------------------------------------------------------------


def check_tuning(config: TandemConfig) -> SearchSpace:
    """The parsed space, after every check that needs no cluster; raises one ConfigError."""
    space = parse_space(config)
    problems = plan_problems(config, space)
    if problems:
        raise ConfigError(problems)
    preflight_values(config, space)
    return space


def preflight_values(config: TandemConfig, space: SearchSpace) -> None:
    """training's preflight (data, model forward, DeepSpeed JSON) on the trial config and on every
    value of a model/data/DeepSpeed entry, so a width the model rejects fails here, not in a trial."""
    from training.trainer import preflight

    base = config_with(config, {"training.workers": config.tuning.workers_per_trial})
    preflight(base)
    problems: list[Problem] = []
    for entry in space.entries:
        if not entry.path.startswith(("model.", "data.", "training.deepspeed.")):
            continue
        for value in probe_values(entry):
            try:
                preflight(config_with(base, {entry.path: value}))
            except ConfigError as exc:
                reasons = "; ".join(f"{p.path}: {p.message}" for p in exc.problems)
                problems.append(
                    Problem(path=f"tuning.space['{entry.path}']", value=value, message=f"a trial with this value would fail: {reasons}")
                )
                break
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------------------------------
# run folders
# ---------------------------------------------------------------------------------------------


def find_tuning_run(config: TandemConfig, resume: bool | str | Path) -> Location:
    """The tuning run to resume: the newest `tune-*` folder under <storage>/<name> (by its start
    time, which names it), or the one named (a path or a URI)."""
    from ray.tune import Tuner

    if resume is True or resume == "latest":
        base = storage_root(config) / config.name
        runs = [p for p in base.children() if p.name.startswith(TUNE_PREFIX) and (p / EXPERIMENT).is_dir()]
        if not runs:
            raise ArtifactError(f"no tuning run under {base} to resume; run `tandem tune` without --resume first")
        run_dir = max(runs, key=lambda p: p.name)
    else:
        run_dir = location(resume)
    if not Tuner.can_restore(str(run_dir / EXPERIMENT)):
        raise ArtifactError(f"{run_dir} holds no Tune experiment state ({EXPERIMENT}/tuner.pkl); pass a tuning run folder (tune-*)")
    return run_dir


def check_restorable(config: TandemConfig, run_dir: Location) -> None:
    """Refuse a resume whose scheduler state would be lost: Tune would go on as if the scheduler had
    seen nothing (an ASHA with empty rungs judges the rest against nothing), which is not the search
    that was started."""
    name = config.tuning.scheduler.name
    if name == "median":
        reason = "median stopping keeps its trials' results by Tune's trial objects, which a resume creates anew"
    elif name in ("asha", "pbt") and not (run_dir / RUN_RECORD).is_file():
        reason = f"{run_dir} was started by a Tandem that did not save the {name} scheduler's state"
    else:
        return
    raise ConfigError(
        [
            Problem(
                path="tuning.scheduler.name",
                value=name,
                message=f"--resume cannot restore this search's scheduler ({reason}) and would continue it as if nothing had been "
                "decided; start a new tune without --resume",
            )
        ]
    )


def check_same_search(config: TandemConfig, run_dir: Location) -> None:
    """A resumed tune must search what it started with; where it runs (cluster, storage) may change."""
    stored = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    now = config.to_dict()
    changed = [k for k in SEARCHED_SECTIONS if stored.get(k) != now[k]]
    if changed:
        raise ConfigError(
            [
                Problem(
                    path=", ".join(changed),
                    message=(
                        f"--resume continues {run_dir}, which was started with different {', '.join(changed)}; "
                        "resume with the config it was started with, or start a new tune without --resume"
                    ),
                )
            ]
        )


# ---------------------------------------------------------------------------------------------
# the Tuner
# ---------------------------------------------------------------------------------------------


def trial_name(trial: Any) -> str:
    return trial.trial_id


def make_trainable(config: TandemConfig, space: SearchSpace, plan: TrialPlan, run_dir: Location) -> Any:
    """The trial function with its fixed arguments and its own (tiny) resource request."""
    from ray import tune

    from tuning.trial import run_trial

    trainable = tune.with_parameters(
        run_trial,
        base=config.to_dict(),
        space=space,
        updates=plan.trial_updates(),
        use_gpu=plan.use_gpu,
        experiment_dir=str(run_dir / EXPERIMENT),
    )
    # The trial function only waits on its Train run; the workers ask for the real resources.
    return tune.with_resources(trainable, {"CPU": TRIAL_FUNCTION_CPU})


def checkpoints_to_keep(config: TandemConfig) -> int:
    """Tune's retention per trial. PBT refers to the checkpoint of a donor's last perturbation,
    which must still exist when an exploit is decided up to one interval later; and Tune registers
    that checkpoint twice (the report, then PBT's save, which for a function trainable returns the
    same folder), so each one takes two places in the count."""
    scheduler = config.tuning.scheduler
    return 2 * (scheduler.perturbation_interval + 1) if scheduler.name == "pbt" else 2


def make_tuner(config: TandemConfig, space: SearchSpace, plan: TrialPlan, run_dir: Location, callbacks: list) -> Any:
    from ray import tune

    from tuning.housekeeping import SchedulerState

    tuning = config.tuning
    scheduler = build_trial_scheduler(config, space, plan.max_concurrent)
    tune_config = tune.TuneConfig(
        metric=tuning.metric,
        mode=tuning.mode,
        num_samples=1 if tuning.search.name == "grid" else tuning.samples,
        search_alg=build_search(config, plan.max_concurrent),
        scheduler=scheduler,
        # The searchers enforce plan.max_concurrent themselves (BasicVariantGenerator(max_concurrent),
        # ConcurrencyLimiter); Tune ignores max_concurrent_trials for a basic generator, with a warning.
        max_concurrent_trials=None,
        time_budget_s=tuning.time_budget_s,
        reuse_actors=False,  # one trial per actor: a stop aborts exactly that trial's Train run
        trial_name_creator=trial_name,
        trial_dirname_creator=trial_name,
    )
    run_config = tune.RunConfig(
        name=EXPERIMENT,
        storage_path=str(run_dir),  # a folder or a URI: Tune keeps its experiment state and checkpoints there
        # Tune's copies of each trial's checkpoints: the last for the artifact and a restore. A PBT
        # donor's checkpoint is copied for its exploiter when the exploit is decided (tuning/pbt.py),
        # so retention never races a restart.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=checkpoints_to_keep(config)),
        # Worker failures are retried inside the Train run (training.max_failures).
        failure_config=tune.FailureConfig(max_failures=0),
        callbacks=[*callbacks, SchedulerState(scheduler, run_dir / SCHEDULER_FILE)],
        verbose=1,
    )
    return tune.Tuner(
        make_trainable(config, space, plan, run_dir),
        param_space=param_space(space, tuning.search.name),
        tune_config=tune_config,
        run_config=run_config,
    )


def restore_tuner(config: TandemConfig, space: SearchSpace, plan: TrialPlan, run_dir: Location) -> Any:
    from ray.tune import Tuner

    # Finished trials are kept as they are; unfinished and errored ones continue from their last
    # Tune checkpoint. Tune restores the searcher and the callbacks from its last snapshot, and the
    # scheduler's state through the SchedulerState callback (tuning/housekeeping.py).
    return Tuner.restore(
        str(run_dir / EXPERIMENT), trainable=make_trainable(config, space, plan, run_dir), resume_unfinished=True, resume_errored=True
    )


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment defaults for the duration of the tune (a user's own setting wins)."""
    added = [k for k in values if k not in os.environ]
    for k in added:
        os.environ[k] = values[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


# ---------------------------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------------------------


def tune(config: TandemConfig, resume: bool | str | Path = False, callbacks: list | None = None) -> TuneResult:
    """Search `config.tuning.space`; every trial is a Ray Train + DeepSpeed run of the same trainer.

    resume: True (or "latest") continues the newest tuning run of this config, a path continues that
    run; finished trials are not run again, unfinished ones continue from their last checkpoint.
    callbacks: extra ray.tune Callbacks (on resume, Tune restores the callbacks the run started
    with instead).
    """
    import ray

    from cluster.tracking import open_tracker, record_run, reopen_tracker
    from training.trainer import resolve_use_gpu
    from tuning.housekeeping import ReleaseOrphanedPlacementGroups, TrackConcurrency, TrackTrials, TrialProgress, read_peak
    from tuning.pbt import remove_handoffs

    space = check_tuning(config)
    require_reachable_storage(config)  # before Ray starts
    with connect(config):
        require_shared_storage(config)
        use_gpu = resolve_use_gpu(config)
        n_trials = count_trials(space, config.tuning.samples, config.tuning.search.name)
        plan = plan_trials(config, ray.nodes(), use_gpu, n_trials)
        if resume:
            run_dir = find_tuning_run(config, resume)
            check_same_search(config, run_dir)
            check_restorable(config, run_dir)
        else:
            run_dir = new_run_dir(storage_root(config), config.name, prefix=TUNE_PREFIX)
            (run_dir / "config.yaml").put_text(config.to_yaml())
            (run_dir / RUN_RECORD).put_json({"scheduler_state_saved": True})
        print(
            f"[tandem] tuning run {run_dir}: {n_trials} trial(s), {config.tuning.scheduler.name} + {config.tuning.search.name}; "
            f"{plan.describe()}",
            flush=True,
        )
        if not run_dir.remote:  # on an object store the console log stays where it started (logs are not run state)
            move_log(run_dir.path)
        tracker = reopen_tracker(config, run_dir) if resume else open_tracker(config, run_dir, run_dir.name, tensorboard=False)
        record_run(run_dir, tracker, config)
        try:
            with _env(TUNE_GLOBAL_CHECKPOINT_S=EXPERIMENT_SNAPSHOT_S):
                if resume:
                    tuner = restore_tuner(config, space, plan, run_dir)
                else:
                    housekeeping = [
                        ReleaseOrphanedPlacementGroups(),
                        TrackConcurrency(run_dir / PEAK_FILE),
                        TrialProgress(n_trials, config.tuning.metric),
                    ]
                    if tracker.active or config.tracking.tensorboard:
                        housekeeping.append(TrackTrials(config.to_dict(), space, tracker.run_id, run_dir / EXPERIMENT))
                    tuner = make_tuner(config, space, plan, run_dir, housekeeping + list(callbacks or []))
                started = time.perf_counter()
                with warnings.catch_warnings():
                    # Ray suggests reuse_actors for PBT; Tandem's exploits happen in place instead (tuning/pbt.py).
                    warnings.filterwarnings("ignore", message="Consider boosting PBT performance", category=UserWarning)
                    grid = tuner.fit()
                wall_s = time.perf_counter() - started
            remove_handoffs(run_dir / EXPERIMENT)
            result = report(config, space, plan, run_dir, grid, wall_s, read_peak(run_dir / PEAK_FILE))
        except BaseException:
            tracker.finish("FAILED")
            raise
        track_best(config, tracker, result)
        return result


def track_best(config: TandemConfig, tracker: Any, result: TuneResult) -> None:
    """The tuning run's MLflow record: the best trial (tagged on its own run too), the artifact's
    version, the best metric, and the result files."""
    from cluster.tracking import reopen_tracker

    if not tracker.active:
        return
    version = model_version(result.artifact_dir)
    tracker.set_tags({"tandem.best_trial": result.best.trial_id, "tandem.model_version": version, "tandem.run_dir": str(result.run_dir)})
    tracker.log_epoch({"epoch": result.best.last_epoch, f"best_{config.tuning.metric}": result.best.metric})
    tracker.log_files([result.run_dir / name for name in (RESULTS_CSV, RESULTS_JSON, RESULTS_PNG, TUNING_MANIFEST, "best_config.yaml")])
    tracker.log_files([result.artifact_dir / "manifest.json"], "artifacts")
    tracker.finish()
    reopen_tracker(config, result.run_dir / EXPERIMENT / result.best.trial_id).set_tags({"tandem.best": "true"})


def report(config: TandemConfig, space: SearchSpace, plan: TrialPlan, run_dir: Location, grid: Any, wall_s: float, peak: int) -> TuneResult:
    """Summaries, table, result files, the best trial's artifact and the tuning manifest."""
    tuning = config.tuning
    keep = ("epoch", "step", *REPORTED_METRICS, "world_size")
    trials = [summarize_result(r, space, tuning.metric, tuning.mode, config.training.epochs, keep) for r in grid]
    best = pick_best(trials, tuning.mode)
    total_epochs = sum(t.epochs_trained for t in trials)
    summary = {
        "name": config.name,
        "metric": tuning.metric,
        "mode": tuning.mode,
        "scheduler": tuning.scheduler.name,
        "search": tuning.search.name,
        "total_epochs": total_epochs,
        "wall_s": round(wall_s, 2),
        "peak_running_trials": peak,
        "plan": plan.__dict__,
    }
    files = write_results(config, run_dir, trials, best, summary)
    if best is None:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error) or "no trial reported a checkpoint"
        raise ArtifactError(
            f"no trial of {run_dir} finished with a checkpoint, so there is no best model ({errors}); see {files['results_csv']}"
        )

    best_trial_config = trial_config(config, space, best.sampled, plan.trial_updates())
    # To retrain the winner at full size: the user's config with the best values, not the trial's worker plan.
    (run_dir / "best_config.yaml").put_text(config_with(config, best.params).to_yaml())
    artifact_dir, best_metrics = consolidate_best(best_trial_config, run_dir, best)
    files["manifest"] = run_dir / TUNING_MANIFEST
    write_tuning_manifest(
        run_dir,
        {
            **summary,
            "best": {
                "trial_id": best.trial_id,
                "params": best.params,
                "metric": best.metric,
                "epochs": best.last_epoch,
                "checkpoint": best.checkpoint,
                "trial_config_hash": best_trial_config.config_hash(),
            },
            "artifact": {"path": "artifacts", "version": model_version(artifact_dir)},
            "config_hash": config.config_hash(),
            "trials": {t.trial_id: {"status": t.status, "epochs_trained": t.epochs_trained, "metric": t.metric} for t in trials},
        },
        ["config.yaml", "best_config.yaml", "metrics.jsonl", RESULTS_CSV, RESULTS_JSON, RESULTS_PNG, SCHEDULER_FILE],
    )
    print(f"[tandem] best trial {best.trial_id}: {tuning.metric} {best.metric:.4f} with {best.params}; results in {run_dir}", flush=True)
    return TuneResult(
        run_dir=native(run_dir),
        artifact_dir=native(artifact_dir),
        best=best,
        trials=trials,
        plan=plan,
        total_epochs=total_epochs,
        wall_s=wall_s,
        peak_running_trials=peak,
        best_metrics=best_metrics,
        files=files,
    )


def write_results(
    config: TandemConfig, run_dir: Location, trials: list[TrialSummary], best: TrialSummary | None, summary: dict[str, Any]
) -> dict[str, Location]:
    """The table on stdout; results.csv, results.json and the plot in the run folder."""
    tuning = config.tuning
    title = (
        f"{config.name}: {len(trials)} trials, {tuning.scheduler.name} + {tuning.search.name}, "
        f"{summary['total_epochs']} epochs trained, {sum(t.status == 'stopped' for t in trials)} stopped early"
    )
    print_table(trials, best, tuning.metric, tuning.mode, title)
    files = {"results_csv": run_dir / RESULTS_CSV, "results_json": run_dir / RESULTS_JSON, "plot": run_dir / RESULTS_PNG}
    write_csv(files["results_csv"], trials, tuning.metric, tuning.mode)
    write_json(files["results_json"], trials, best, summary)
    plot_trials(files["plot"], trials, best, tuning.metric, title)
    return files


def consolidate_best(best_config: TandemConfig, run_dir: Location, best: TrialSummary) -> tuple[Location, dict[str, Any]]:
    """The best trial's last checkpoint -> <run>/artifacts, through training's own consolidate()."""
    from training.trainer import consolidate
    from tuning.pbt import checkpoint_at

    # consolidate() counts the run's epochs from metrics.jsonl: here the best trial's reports, in
    # order (after a PBT exploit they continue from the donor's epoch).
    (run_dir / "metrics.jsonl").put_text("".join(json.dumps(r) + "\n" for r in best.reports))
    lineage = {"tuning_run": str(run_dir), "trial_id": best.trial_id, "params": best.params}
    result = consolidate(best_config, run_dir, SimpleNamespace(checkpoint=checkpoint_at(location(best.checkpoint))), {"lineage": lineage})
    return location(result.artifact_dir), result.metrics
