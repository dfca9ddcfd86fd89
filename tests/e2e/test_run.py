"""`tandem run` end to end on the packaged example (shortened for CI): train -> export -> serve -> load -> summary."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster.artifacts import verify_artifact
from cluster.tracking import TENSORBOARD_DIR
from tests.e2e.test_console import assert_no_chatter

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_tandem_run_on_the_packaged_default(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "tandem.cli",
        "run",
        "--requests",
        "120",
        "--set",
        f"cluster.storage={tmp_path}",
        "--set",
        "training.epochs=2",
        "--set",
        "export.latency_batch_sizes=[1, 32]",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    (artifact,) = [p.parent for p in tmp_path.rglob("artifacts/manifest.json")]
    manifest = verify_artifact(artifact)
    assert {"model.pt", "model.onnx", "model.int8.onnx"} <= set(manifest["files"])
    # The summary says the served predictions equal the artifact's engine, and no request failed.
    assert "served == artifact │ 100.0% of held-out examples" in out or "100.0% of held-out examples" in out
    assert " 0 failed at concurrency" in out
    assert "run folder:" in out
    # A console for people: Tandem's progress, not Ray's and DeepSpeed's; theirs is in the run's log.
    for epoch in (1, 2):
        assert f"[tandem] epoch   {epoch}/2" in out
    assert_no_chatter(out)
    logged = (artifact.parent / "console.log").read_text()
    assert "(RayTrainWorker pid=" in logged and "[tandem] epoch   2/2" in logged


def test_tandem_run_tune_serves_the_best_trials_artifact_and_tracks_the_search(tmp_path):
    # A tiny Optuna search (2 trials at once) through the whole lifecycle: the model served is
    # the best trial's, consolidated into the tuning run's artifact. The search also shows Optuna
    # respecting max_concurrent_trials (reached, never exceeded) and sampling inside its space,
    # and its MLflow record: a parent run, a child per trial, the best one tagged, the export's
    # parity report and models on the parent; TensorBoard event files per trial.
    tuning = (
        "{samples: 2, max_concurrent_trials: 2, search: {name: optuna, seed: 1},"
        " space: {training.optimizer.lr: {loguniform: [1.0e-4, 5.0e-2]}, model.args.hidden: {choice: [[16], [32]]}}}"
    )
    sets = [
        f"cluster.storage={tmp_path}",
        "data.batch_size=64",
        "data.augment=[]",
        "training.max_steps_per_epoch=5",
        "training.epochs=1",
        "export.latency_batch_sizes=[1]",
        f"tuning={tuning}",
        "tracking={mlflow: {}, tensorboard: true}",
    ]
    cmd = [sys.executable, "-m", "tandem.cli", "run", "--tune", "--requests", "60"] + [arg for s in sets for arg in ("--set", s)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    (run_dir,) = tmp_path.rglob("tune-*")
    results = json.loads((run_dir / "results.json").read_text())
    tuning_manifest = json.loads((run_dir / "tuning_manifest.json").read_text())
    assert len(results["trials"]) == 2 and all(t["status"] == "completed" for t in results["trials"]), results["trials"]
    assert results["peak_running_trials"] == 2 and results["plan"]["max_concurrent"] == 2
    assert {json.dumps(t["params"]["model.args.hidden"]) for t in results["trials"]} <= {"[16]", "[32]"}
    assert len({t["params"]["training.optimizer.lr"] for t in results["trials"]}) == 2

    artifact = verify_artifact(run_dir / "artifacts")
    assert artifact["lineage"]["trial_id"] == results["best_trial"] == tuning_manifest["best"]["trial_id"]
    version = tuning_manifest["artifact"]["version"]
    assert f"artifact │ {run_dir / 'artifacts'}" in out or str(run_dir / "artifacts") in out
    assert re.search(rf"served version\s+│\s+{version}", out), out[-3000:]
    assert "100.0% of held-out examples" in out and " 0 failed at concurrency" in out
    assert_no_chatter(out)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["tandem.trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {t["trial_id"] for t in results["trials"]} and len(runs) == 3
    assert parent.info.status == "FINISHED" and parent.data.tags["tandem.best_trial"] == results["best_trial"]
    assert parent.data.tags["tandem.model_version"] == version
    assert [t for t, r in children.items() if r.data.tags.get("tandem.best") == "true"] == [results["best_trial"]]
    for trial_id, child in children.items():
        assert child.info.status == "FINISHED"
        assert [p.step for p in client.get_metric_history(child.info.run_id, "val_loss")] == [1]
        events = EventAccumulator(str(run_dir / "trials" / trial_id / TENSORBOARD_DIR))
        events.Reload()
        assert [s.step for s in events.Scalars("val_loss")] == [1]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "export")
    }
    assert {"results.csv", "tuning_manifest.json", "export/parity_report.json", "export/model.onnx"} <= logged, logged
