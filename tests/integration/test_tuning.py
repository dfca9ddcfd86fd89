"""Ray Tune around the real trainer, for real: every trial is a Ray Train + DeepSpeed run on CPU.

Trials are tiny (1 worker, hidden [16], batch 64, 5 steps per epoch) and few, because each one
starts a Train run (controller, worker, DeepSpeed) and the CI machine has two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from cluster.artifacts import load_model, verify_artifact
from cluster.config import ConfigError, config_with, load_config
from tests.e2e.test_console import assert_no_chatter
from tests.reliability.test_training_faults import VENV_BIN, stop_tagged, tandem_env, wait_for_no_tagged_processes
from training.data import digits, split
from training.ds_config import lr_factor
from training.trainer import read_history
from tuning import tune
from tuning.results import RESULTS_CSV, RESULTS_JSON, RESULTS_PNG, TUNING_MANIFEST
from tuning.segments import read_segments
from tuning.tuner import SCHEDULER_FILE, TUNE_PREFIX

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# Every trial starts a Train run (a controller, a worker, DeepSpeed): minutes each on a loaded 2-core machine.
SLOW_TUNE_TIMEOUT_S = 3600
TUNE_RUN_TIMEOUT_S = 900  # bounds a hang of one `tandem tune` subprocess

# Shuffled, as a random search would meet them; a constant schedule keeps the ranking by lr the
# same at every epoch, so the best configuration is not a coin toss between close values.
LR_GRID = "[1.0e-3, 1.0e-4, 3.0e-2, 3.0e-3]"


def tiny(tmp_path: Path, tuning: str, *overrides: str):
    return load_config(
        None,
        [
            f"cluster.storage={tmp_path}",
            "model.args.hidden=[16]",
            "data.batch_size=64",
            "data.augment=[]",
            "training.max_steps_per_epoch=5",
            "training.epochs=4",
            "training.checkpoint.every_epochs=1",
            "training.schedule.name=constant",
            "training.schedule.warmup_steps=0",
            f"tuning={tuning}",
            *overrides,
        ],
    )


def artifact_accuracy(artifact_dir: Path, config) -> float:
    model, _ = load_model(artifact_dir)  # verified sha256, torch.load(weights_only=True)
    _, val = split(digits(), config.data.val_fraction, config.data.seed)
    with torch.no_grad():
        return float((model(torch.from_numpy(val.x)).argmax(1).numpy() == val.y).mean())


def test_a_config_whose_trials_cannot_fit_fails_before_any_trial(ray_session, tmp_path):
    space = "space: {training.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}}"
    with pytest.raises(ConfigError, match=r"tuning.workers_per_trial.*one trial needs 3 worker\(s\) of 3 CPU"):
        tune(tiny(tmp_path, f"{{workers_per_trial: 3, cpus_per_worker: 3, {space}}}"))
    with pytest.raises(ConfigError, match=r"tuning.max_concurrent_trials.*lower max_concurrent_trials to 2"):
        tune(tiny(tmp_path, f"{{max_concurrent_trials: 3, cpus_per_worker: 3, {space}}}"))
    with pytest.raises(ConfigError, match=r"tuning.space\['model.args.widths'\].*unexpected keyword"):
        tune(tiny(tmp_path, "{space: {model.args.widths: {choice: [1, 2]}}}"))
    assert not list(tmp_path.rglob("tune-*")), "a tuning run was started for a config that cannot run"


def test_placement_groups_left_by_dead_actors_are_released_and_no_others(ray_session):
    # What a trial's Train controller leaves when it is killed: a placement group whose creator
    # actor is dead. Ray keeps it until the job ends; the sweep removes it, and only it.
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from tuning.housekeeping import release_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self):
            group = placement_group([{"CPU": 0.5}])
            ray.get(group.ready())
            return group.id.hex()

    own = placement_group([{"CPU": 0.5}])  # the driver's, like Tune's own trial groups
    ray.get(own.ready())
    creator = Creator.remote()
    orphan = ray.get(creator.make.remote())
    ray.kill(creator)
    deadline = time.monotonic() + 60
    while placement_group_table()[orphan]["state"] != "REMOVED" and time.monotonic() < deadline:
        release_orphaned_placement_groups()
        time.sleep(0.5)
    assert placement_group_table()[orphan]["state"] == "REMOVED"
    assert placement_group_table(own)["state"] == "CREATED"
    remove_placement_group(own)


def fifo_reference(config, lrs: list[float], tmp_path: Path) -> dict[float, float]:
    """{lr: final metric} of every configuration trained to the end: what a FIFO search over the
    grid would find (tests/integration/reference_trials.py; seconds instead of a search)."""
    config_path, updates_path, out_path = tmp_path / "reference.yaml", tmp_path / "updates.json", tmp_path / "reference.json"
    config_path.write_text(config.to_yaml())
    updates_path.write_text(json.dumps([{"training.optimizer.lr": lr} for lr in lrs]))
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.reference_trials", str(config_path), str(updates_path), str(out_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return {row["updates"]["training.optimizer.lr"]: row["final"][config.tuning.metric] for row in json.loads(out_path.read_text())}


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TUNE_TIMEOUT_S)
def test_asha_stops_poor_trials_early_and_finds_fifos_best(ray_session, tmp_path):
    space = f"space: {{training.optimizer.lr: {{grid: {LR_GRID}}}}}"
    # Two at once: each rung waits for 2 results before it promotes (tuning/asha.py), so the first
    # trial to reach a rung pauses until a second one is there to compare with.
    config = tiny(
        tmp_path / "asha",
        f"{{scheduler: {{name: asha, grace_period: 1, reduction_factor: 2}}, search: {{name: grid}}, max_concurrent_trials: 2, {space}}}",
    )
    asha = tune(config)
    # The first two trials to finish epoch 1 were judged together: exactly one went on (Ray's own
    # ASHA promotes the first arrival unjudged, and the second too if it beats the first).
    first_two = sorted(asha.trials, key=lambda t: t.history[0]["time"])[:2]
    assert sorted(t.epochs_trained > 1 for t in first_two) == [False, True], [(t.params, t.epochs_trained) for t in first_two]
    lrs = json.loads(LR_GRID)
    fifo = fifo_reference(config, lrs, tmp_path)
    pick = min if config.tuning.mode == "min" else max
    fifo_best = pick(fifo, key=fifo.get)
    fifo_epochs = len(lrs) * config.training.epochs  # FIFO trains every configuration to the end

    assert len(asha.trials) == 4
    stopped = [t for t in asha.trials if t.status == "stopped"]
    assert len(stopped) >= 2, [(t.params, t.status, t.epochs_trained) for t in asha.trials]
    assert asha.total_epochs <= 0.75 * fifo_epochs, (asha.total_epochs, fifo_epochs)
    assert asha.best.params["training.optimizer.lr"] == fifo_best, (asha.best.params, fifo)
    assert asha.best.status == "completed"
    # The reference is the trials' own training: a trial ASHA let finish ends where it does.
    for trial in asha.trials:
        if trial.status == "completed":
            assert trial.metric == pytest.approx(fifo[trial.params["training.optimizer.lr"]], rel=1e-4), (trial.params, fifo)

    # Results on disk: table rows, CSV, JSON, plot, and a manifest linking the artifact.
    run = asha.run_dir
    rows = (run / RESULTS_CSV).read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("trial_id,status,epochs_trained")
    table = json.loads((run / RESULTS_JSON).read_text())
    assert table["best_trial"] == asha.best.trial_id and len(table["trials"]) == 4
    assert (run / RESULTS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((run / TUNING_MANIFEST).read_text())
    assert manifest["artifact"]["path"] == "artifacts" and manifest["best"]["trial_id"] == asha.best.trial_id
    assert set(manifest["files"]) >= {RESULTS_CSV, RESULTS_JSON, RESULTS_PNG, "config.yaml", "best_config.yaml"}

    # The best trial's artifact: consolidated like a training run's, loads with weights_only, predicts.
    artifact = verify_artifact(asha.artifact_dir)
    assert artifact["lineage"]["trial_id"] == asha.best.trial_id and artifact["epochs"] == 4
    history = read_history(run)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    config = load_config(run / "best_config.yaml")
    assert config.training.optimizer.lr == asha.best.params["training.optimizer.lr"]
    accuracy = artifact_accuracy(asha.artifact_dir, config)
    assert accuracy > 0.5 and abs(accuracy - history[-1]["val_accuracy"]) < 1e-6


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TUNE_TIMEOUT_S)
def test_pbt_exploits_in_place_keep_each_trials_train_run_and_train_on_from_the_donors_epoch(ray_session, tmp_path):
    # Two trials far apart, perturbing every other epoch while Train checkpoints every epoch and
    # keeps one (Tune its fewest): the settings under which an exploiter used to lose the donor's
    # checkpoint to the donor's retention, or be handed the donor's last epoch with nothing left
    # to train. With two trials the worse one exploits the better at every perturbation. The search
    # mutates the learning rate only, so every exploit happens in place: the exploiter's Train run
    # (its worker and DeepSpeed engine) loads the donor's handoff copy and trains on.
    # The good trial is first in the grid, so it starts first: when the poor one reaches its first
    # perturbation the good one has a score to be exploited. Trials start a few seconds apart (two
    # Train start-ups on two cores) and an epoch here is about a second, so 8 epochs keep the good
    # one training when the poor one gets there (an exploit of a finished donor's last epoch is
    # skipped, by design).
    config = tiny(
        tmp_path,
        "{samples: 1, max_concurrent_trials: 2, scheduler: {name: pbt, perturbation_interval: 2},"
        " space: {training.optimizer.lr: {grid: [3.0e-2, 1.0e-4]}}}",
        "training.checkpoint.keep=1",
        "training.epochs=8",
        "training.max_steps_per_epoch=10",
    )
    result = tune(config)
    final = config.training.epochs
    assert len(result.trials) == 2
    assert all(t.status == "completed" and t.last_epoch == final for t in result.trials), [
        (t.trial_id, t.status, t.last_epoch, t.error) for t in result.trials
    ]
    exploits = 0
    for trial in result.trials:
        segments = read_segments(Path(trial.path))
        (start,) = [s for s in segments if s["event"] == "start"]  # one Train run per trial: no exploit restarted one
        log = Path(trial.path) / start["segment"] / "metrics.jsonl"
        metrics = [json.loads(line) for line in log.read_text().splitlines()]
        # Each phase of the run trains with its own learning rate: the sampled one, then each exploit's mutated one.
        phases = [(0, start["params"])]
        for exploit in [s for s in segments if s["event"] == "exploit"]:
            exploits += 1
            assert exploit["in_place"] and exploit["segment"] == start["segment"], exploit
            donor, epoch, after = exploit["from_trial"], exploit["from_epoch"], exploit["after_report"]
            assert donor != trial.trial_id and epoch is not None and 1 <= epoch < final, exploit
            # The report after the exploit is the donor's next epoch: the live engine loaded its checkpoint.
            assert len(metrics) > after and metrics[after]["epoch"] == epoch + 1, (metrics[after - 1 : after + 1], exploit)
            phases.append((after, exploit["params"]))
        # The results (and best_config.yaml) name the values the trial trained last, not those it started with.
        assert trial.params == phases[-1][1], (trial.params, phases)
        for i, m in enumerate(metrics):
            params = [p for at, p in phases if at <= i][-1]
            own = config_with(config, {"training.optimizer.lr": params["training.optimizer.lr"]})
            total = (m["step"] // m["epoch"]) * own.training.epochs
            expected = own.training.optimizer.lr * lr_factor(own, m["step"], total)
            assert m["lr"] == pytest.approx(expected, rel=1e-6, abs=1e-12), (i, m["lr"], expected, phases)
    assert exploits >= 1, [(t.trial_id, t.params, t.metric, read_segments(Path(t.path))) for t in result.trials]
    summary = json.loads((result.run_dir / SCHEDULER_FILE).read_text())
    assert summary["in_place_exploits"] == exploits == summary["perturbations"], summary
    assert not list(result.run_dir.rglob("pbt-handoff-*")), "handoff copies outlived the tune"
    verify_artifact(result.artifact_dir)


def test_resume_refuses_a_scheduler_whose_state_it_cannot_restore_naming_the_field(tmp_path):
    """Rather than go on as if nothing had been decided: median stopping (Ray keeps its results by
    trial objects), and an ASHA run started without the record that its state is saved."""
    from cluster.storage import location
    from tuning.tuner import RUN_RECORD, check_restorable

    run = location(tmp_path / "tune-20261207-000000")
    run.make_dirs()
    space = "space: {training.optimizer.lr: {grid: [1.0e-3, 1.0e-2]}}, search: {name: grid}"
    for name in ("median", "asha"):
        with pytest.raises(ConfigError) as refused:
            check_restorable(tiny(tmp_path, f"{{scheduler: {{name: {name}}}, {space}}}"), run)
        (problem,) = refused.value.problems
        assert problem.path == "tuning.scheduler.name" and "start a new tune" in problem.message, problem
    (run / RUN_RECORD).put_json({"scheduler_state_saved": True})
    for name in ("asha", "fifo"):
        check_restorable(tiny(tmp_path, f"{{scheduler: {{name: {name}}}, {space}}}"), run)


def finished_trials_in_bucket(s3_store, experiment_prefix: str) -> list[str]:
    """Trials that Tune's newest experiment state file in the bucket (what a resume reads) records as TERMINATED."""
    states = sorted(k for k in s3_store.keys(experiment_prefix) if k.rsplit("/", 1)[-1].startswith("experiment_state-"))
    if not states:
        return []
    try:
        body = s3_store.client().get_object(Bucket=s3_store.bucket, Key=states[-1])["Body"].read()
        trials = json.loads(body)["trial_data"]
    except ValueError:  # being rewritten
        return []
    return [state["trial_id"] for state in (json.loads(trial) for trial, _ in trials) if state["status"] == "TERMINATED"]


def read_json_object(s3_store, key: str) -> dict:
    return json.loads(s3_store.client().get_object(Bucket=s3_store.bucket, Key=key)["Body"].read())


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TUNE_TIMEOUT_S)
def test_tandem_tune_in_a_bucket_killed_mid_search_resumes_from_it_without_rerunning_finished_trials(tmp_path, ray_tmp, s3_store):
    """An ASHA + Optuna search with `cluster.storage: s3://...` (moto's server on loopback): `tandem tune`
    SIGKILLed (its whole process group) once Tune's state in the bucket records a finished trial;
    `tandem tune --resume` finds that run in the bucket, runs no finished trial again, and ends with
    the best trial's artifact and the results there; nothing of the run is left in the working folder.
    The first run has TANDEM_VERBOSE=1 and shows Ray's output; the resumed one's console is quiet."""
    progress = tmp_path / "progress"
    progress.mkdir()
    prefix = f"tune-{uuid.uuid4().hex[:8]}"
    config_path = tmp_path / "tandem.yaml"
    config = tiny(
        Path("/unused"),
        "{max_concurrent_trials: 2, samples: 3, scheduler: {name: asha, grace_period: 1, reduction_factor: 2}, "
        "search: {name: optuna, seed: 0}, space: {training.optimizer.lr: {loguniform: [1.0e-3, 3.0e-2]}}}",
        "training.epochs=2",
        f"cluster.storage=s3://{s3_store.bucket}/{prefix}",
    )
    config_path.write_text(config.to_yaml())
    tag, log = uuid.uuid4().hex, tmp_path / "first.log"
    with open(log, "w") as out:
        # Its own session: the SIGKILL goes to the driver and everything in its process group.
        driver = subprocess.Popen(
            [str(VENV_BIN / "tandem"), "tune", str(config_path)],
            cwd=tmp_path,
            env={**tandem_env(tag, progress, ray_tmp / "first"), **s3_store.env, "TANDEM_VERBOSE": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    experiment = f"{prefix}/{config.name}/"
    try:
        deadline, finished = time.monotonic() + TUNE_RUN_TIMEOUT_S, []
        while not finished and driver.poll() is None and time.monotonic() < deadline:
            finished = finished_trials_in_bucket(s3_store, experiment)
            time.sleep(0.5)
        assert finished and driver.poll() is None, f"no finished trial in the bucket while the tune ran:\n{log.read_text()[-3000:]}"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        leaked = wait_for_no_tagged_processes(tag, timeout_s=60)
        assert not leaked, f"processes of the killed tune still alive after 60 s: {leaked}"
    finally:
        stop_tagged(driver, tag)
    assert len(finished_trials_in_bucket(s3_store, experiment)) < 3, "every trial finished before the kill: nothing left to resume"
    assert "(RayTrainWorker pid=" in log.read_text(), log.read_text()[-3000:]  # TANDEM_VERBOSE=1: the workers' own lines

    resumed = subprocess.run(
        [str(VENV_BIN / "tandem"), "tune", str(config_path), "--resume"],
        cwd=tmp_path,
        # Quiet (no TANDEM_VERBOSE); a wide terminal, so Rich does not fold the long URIs it prints.
        env={
            **{k: v for k, v in tandem_env(tag, progress, ray_tmp / "resumed").items() if k != "TANDEM_VERBOSE"},
            **s3_store.env,
            "COLUMNS": "400",
        },
        capture_output=True,
        text=True,
        timeout=TUNE_RUN_TIMEOUT_S,
        start_new_session=True,
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-5000:]
    keys = s3_store.keys(experiment)
    (run,) = {k.split("/")[2] for k in keys if k.split("/")[2].startswith(TUNE_PREFIX)}  # resume continued the same run
    run_key = f"{experiment}{run}"
    assert f"results: s3://{s3_store.bucket}/{run_key}" in resumed.stdout, resumed.stdout[-3000:]
    assert_no_chatter(resumed.stdout + resumed.stderr)
    results = read_json_object(s3_store, f"{run_key}/{RESULTS_JSON}")
    trials = {t["trial_id"]: t for t in results["trials"]}
    assert len(trials) == 3 and {t["status"] for t in trials.values()} <= {"completed", "stopped"}, results["trials"]
    assert "completed" in {t["status"] for t in trials.values()}, results["trials"]
    for trial_id in finished:
        assert trials[trial_id]["starts"] == 1, f"{trial_id} finished before the kill but ran again"
    # Optuna's study came back with the search: a new one (seed 0) would suggest the first trials'
    # values again for the trials created after the resume.
    rates = [t["params"]["training.optimizer.lr"] for t in trials.values()]
    assert len(set(rates)) == len(rates), rates
    manifest = read_json_object(s3_store, f"{run_key}/artifacts/manifest.json")
    assert manifest["lineage"]["trial_id"] == results["best_trial"]
    # ASHA's rungs came back with the search: every trial reached epoch 1, so rung 1 holds all three,
    # those decided before the kill (which never report again) included.
    scheduler = read_json_object(s3_store, f"{run_key}/{SCHEDULER_FILE}")
    assert scheduler["restored"] and set(scheduler["rungs"]["1"]) == set(trials), scheduler
    tuning_manifest = read_json_object(s3_store, f"{run_key}/{TUNING_MANIFEST}")
    assert {RESULTS_CSV, RESULTS_JSON, RESULTS_PNG, "best_config.yaml"} <= set(tuning_manifest["files"]), tuning_manifest
    # The bucket holds every byte of run state: the working folder has the config and logs only.
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert all(name == "tandem.yaml" or name.endswith(".log") or name.startswith("progress/") for name in left), left
    leaked = wait_for_no_tagged_processes(tag, timeout_s=60)
    assert not leaked, f"processes of the resumed tune still alive after it exited: {leaked}"
