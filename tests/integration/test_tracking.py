"""Experiment tracking read back with the tools' own readers: MLflow's client on the store Tandem
wrote, TensorBoard's event reader on the event files. The run is the shared default-example run
(tests/integration/conftest.py), which trains with `tracking: {mlflow: {}, tensorboard: true}`."""

from __future__ import annotations

import subprocess

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster.artifacts import model_version
from cluster.tracking import TENSORBOARD_DIR, flatten, mlflow_uri

pytestmark = pytest.mark.integration
PER_EPOCH = ("train_loss", "val_loss", "val_accuracy", "lr")


def head_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


@pytest.mark.slow
def test_a_training_run_is_tracked_once_in_mlflow_and_tensorboard(default_example_run):
    result, config = default_example_run
    epochs = [h["epoch"] for h in result.history]
    client = MlflowClient(mlflow_uri(config))
    experiment = client.get_experiment_by_name(config.name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # one run for 2 workers: the driver logs, not each rank
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == result.run_dir.name
    assert run.data.params == flatten(config.to_dict())
    tags = run.data.tags
    assert tags["tandem.config_hash"] == config.config_hash()
    assert tags["tandem.model_version"] == model_version(result.artifact_dir)
    assert tags.get("mlflow.source.git.commit") == head_commit()
    for metric in PER_EPOCH:
        points = client.get_metric_history(run.info.run_id, metric)
        assert [p.step for p in points] == epochs, (metric, [p.step for p in points])
        assert [p.value for p in points] == pytest.approx([h[metric] for h in result.history], rel=1e-6)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"manifest.json", "deepspeed.json", "config.yaml"}

    events = EventAccumulator(str(result.run_dir / TENSORBOARD_DIR))
    events.Reload()
    for metric in PER_EPOCH:
        scalars = events.Scalars(metric)
        assert [s.step for s in scalars] == epochs
        assert [s.value for s in scalars] == pytest.approx([h[metric] for h in result.history], rel=1e-5)
