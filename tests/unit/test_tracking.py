"""Tracking without Ray: the config's rules, what a submitted job carries, and a run logged and
read back through MLflow's own client and TensorBoard's reader (the integration tests do the same
for real training and tuning runs)."""

from __future__ import annotations

import json
import logging
import time

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster.config import ConfigError, load_config
from cluster.tracking import TENSORBOARD_DIR, _new_lines, follow_metrics, job_env, mlflow_uri, open_tracker


def test_a_tracking_uri_with_credentials_is_refused_naming_the_environment_variables():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["tracking={mlflow: {tracking_uri: 'https://alice:s3cret@mlflow.example.com'}}"])
    (problem,) = info.value.problems
    assert problem.path == "tracking.mlflow.tracking_uri"
    assert "MLFLOW_TRACKING_USERNAME" in problem.message and "s3cret" not in problem.message


def test_tracking_is_off_by_default_and_the_default_store_lives_in_the_storage(tmp_path):
    config = load_config(None, [f"cluster.storage={tmp_path}"])
    assert config.tracking.mlflow is None and config.tracking.tensorboard is False
    assert not open_tracker(config, tmp_path, "run").active
    on = load_config(None, [f"cluster.storage={tmp_path}", "tracking={mlflow: {}}"])
    assert mlflow_uri(on) == f"sqlite:///{tmp_path}/mlflow.db"


def test_a_submitted_job_carries_the_mlflow_credentials_of_the_shell_only_when_tracking(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    assert job_env(load_config(None)) == {}
    assert job_env(load_config(None, ["tracking={mlflow: {tracking_uri: 'http://mlflow:5000'}}"])) == {"MLFLOW_TRACKING_TOKEN": "t0ken"}


def test_a_refused_tracking_server_is_one_warning_and_nothing_else(tmp_path, caplog):
    config = load_config(
        None, [f"cluster.storage={tmp_path}", "tracking={mlflow: {tracking_uri: 'http://127.0.0.1:9'}, tensorboard: true}"]
    )
    with caplog.at_level(logging.DEBUG, logger="tandem.tracking"):
        tracker = open_tracker(config, tmp_path, "run")
        assert tracker.client is None and tracker.writer is not None  # TensorBoard goes on
        tracker.log_epoch({"epoch": 1, "val_loss": 0.5})
        tracker.finish()
    # One warning when the server refused, and nothing from logging an epoch or finishing.
    assert [r.levelname for r in caplog.records if r.name.startswith("tandem")] == ["WARNING"], caplog.records
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert [s.step for s in events.Scalars("val_loss")] == [1]


def test_a_half_written_line_is_read_only_once_it_is_complete(tmp_path):
    metrics, offset = tmp_path / "metrics.jsonl", [0]
    rows = [json.dumps({"epoch": e}) for e in (1, 2, 3)]
    metrics.write_text(rows[0] + "\n" + rows[1] + "\n" + rows[2][:5])
    assert _new_lines(metrics, offset) == rows[:2]
    assert _new_lines(metrics, offset) == []  # the third line is still being written
    with open(metrics, "a") as handle:
        handle.write(rows[2][5:] + "\n")
    assert _new_lines(metrics, offset) == [rows[2]]


def test_followed_metrics_are_logged_once_per_epoch_as_the_file_grows(tmp_path):
    config = load_config(None, [f"cluster.storage={tmp_path}", "tracking={mlflow: {}, tensorboard: true}"])
    metrics = tmp_path / "metrics.jsonl"
    tracker = open_tracker(config, tmp_path, "run", params={"a": 1})
    rows = [{"epoch": e, "step": 3 * e, "val_loss": 1.0 / e, "node_ids": ["n"], "param_bytes_per_rank": [1, 2]} for e in (1, 2, 3)]
    with follow_metrics(metrics, tracker):
        with open(metrics, "a") as handle:
            handle.write(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2])[:10])  # the third half written
        # The follower logs the two complete epochs while the block still runs (its poll, not the
        # final drain), and nothing of the half-written third. The deadline only bounds a hang.
        reader = MlflowClient(mlflow_uri(config))
        deadline = time.monotonic() + 60
        while len(reader.get_metric_history(tracker.run_id, "val_loss")) < 2:
            assert time.monotonic() < deadline, "the follower logged nothing while the file grew"
            time.sleep(0.1)
        assert [p.step for p in reader.get_metric_history(tracker.run_id, "val_loss")] == [1, 2]
        with open(metrics, "a") as handle:
            handle.write(json.dumps(rows[2])[10:] + "\n")
    tracker.finish()
    client = MlflowClient(mlflow_uri(config))
    points = client.get_metric_history(tracker.run_id, "val_loss")
    assert [(p.step, p.value) for p in points] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert client.get_run(tracker.run_id).data.params == {"a": "1"}
    assert "node_ids" not in client.get_run(tracker.run_id).data.metrics
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert [s.step for s in events.Scalars("val_loss")] == [1, 2, 3]
