"""The storage layer (cluster/storage.py) against a real S3-compatible server (moto's, on loopback):
the same operations on a local folder and a bucket, the per-node artifact cache keyed by sha256,
and the checks that name a store Tandem cannot use before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cluster.artifacts import read_manifest, save_model_artifact
from cluster.config import ConfigError, load_config
from cluster.storage import StorageError, downloads, fetch_folder, location, publish_folder, reachable_problem
from tests.conftest import _free_port

TANDEM = [str(Path(sys.executable).parent / "tandem")]


@pytest.fixture
def store_env(s3_store, tmp_path, monkeypatch):
    """This process as a user's shell with the store's variables and an artifact cache of its own."""
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    return s3_store


def bucket_prefix(s3_store) -> str:
    return f"s3://{s3_store.bucket}/unit-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_the_same_operations_on_a_folder_and_a_bucket(where, store_env, tmp_path):
    root = location(tmp_path / "runs" if where == "local" else bucket_prefix(store_env))
    run = root / "digits" / "run-1"
    (run / "config.yaml").put_text("name: digits\n")
    (run / "metrics.jsonl").append_line('{"epoch": 1}')
    (run / "metrics.jsonl").append_line('{"epoch": 2}')
    (run / "artifacts" / "manifest.json").put_json({"files": {}})
    assert (run / "config.yaml").read_text() == "name: digits\n"
    assert (run / "metrics.jsonl").read_text().splitlines() == ['{"epoch": 1}', '{"epoch": 2}']
    assert sorted(c.name for c in run.children()) == ["artifacts", "config.yaml", "metrics.jsonl"]
    assert (run / "artifacts").is_dir() and (run / "config.yaml").is_file() and not (run / "missing").exists()
    assert (run / "config.yaml").stat()[1] == len("name: digits\n")
    run.delete_tree()
    assert not (run / "config.yaml").exists()


def artifact_in_bucket(s3_store, tmp_path: Path, weights: bytes) -> tuple[Path, object]:
    """A small artifact published to the bucket (manifest last) from a local staging folder."""
    import torch

    local = tmp_path / f"stage-{uuid.uuid4().hex[:6]}"
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.fill_(weights[0])
    spec = {"builder": "training.models:mlp", "args": {"hidden": []}, "input_shape": [4], "num_classes": 2}
    save_model_artifact(local, model.state_dict(), spec)
    target = location(bucket_prefix(s3_store)) / "digits" / "run-1" / "artifacts"
    publish_folder(local, target)
    return local, target


def test_the_cache_downloads_each_file_once_per_node_and_a_changed_artifact_is_fetched_anew(store_env, tmp_path):
    local, target = artifact_in_bucket(store_env, tmp_path, b"\x01")
    first = fetch_folder(target)
    again = fetch_folder(target)  # a second replica, or a restarted one, on the same node
    assert first == again and read_manifest(first) == read_manifest(local)
    assert sorted(d["uri"] for d in downloads()) == sorted(str(target / name) for name in read_manifest(local)["files"])
    # The same bytes under another key (the artifact copied to another run): found by sha256.
    copy = location(bucket_prefix(store_env)) / "digits" / "run-2" / "artifacts"
    publish_folder(local, copy)
    assert fetch_folder(copy) != first and len(downloads()) == len(read_manifest(local)["files"])

    # The artifact replaced in place (a new export, a new training of the same run): a new
    # manifest is a new cache folder, never the stale one.
    changed, _ = artifact_in_bucket(store_env, tmp_path, b"\x02")
    publish_folder(changed, target)
    fresh = fetch_folder(target)
    assert fresh != first
    assert (fresh / "model.pt").read_bytes() == (changed / "model.pt").read_bytes()
    assert len(downloads()) == 2 * len(read_manifest(local)["files"])


def test_a_file_altered_in_the_bucket_is_refused_not_cached(store_env, tmp_path):
    local, target = artifact_in_bucket(store_env, tmp_path, b"\x03")
    data = bytearray((local / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (target / "model.pt").put_bytes(bytes(data))  # the manifest still records the old sha256
    with pytest.raises(StorageError, match="fails its checksum"):
        fetch_folder(target)
    assert not list((Path(os.environ["TANDEM_CACHE_DIR"]) / "blobs").glob("[0-9a-f]*"))


def test_reachable_problem_names_a_missing_bucket_and_a_store_that_does_not_answer(store_env, monkeypatch):
    assert reachable_problem(location(bucket_prefix(store_env))) is None
    assert "does not exist" in reachable_problem(location("s3://no-such-bucket-tandem/runs"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    problem = reachable_problem(location(bucket_prefix(store_env)))
    assert "cannot be reached" in problem and "AWS_ENDPOINT_URL" in problem, problem


def validate_with_storage(s3_store, storage: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **s3_store.env}
    command = [*TANDEM, "validate", "--set", f"cluster.storage={storage}"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_validate_refuses_a_missing_bucket_naming_cluster_storage(s3_store, tmp_path):
    done = validate_with_storage(s3_store, "s3://no-such-bucket-tandem/runs", tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cluster.storage" in done.stderr and "does not exist" in done.stderr, done.stderr
    ok = validate_with_storage(s3_store, f"s3://{s3_store.bucket}/runs", tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_tracking_that_needs_a_local_disk_is_refused_on_object_storage():
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["cluster.storage=s3://tandem-runs/runs", "tracking={mlflow: {}, tensorboard: true}"])
    paths = {p.path for p in refused.value.problems}
    assert paths == {"tracking.mlflow.tracking_uri", "tracking.tensorboard"}, refused.value
    # An MLflow server of its own is fine: only the default sqlite file needs a local disk.
    load_config(None, ["cluster.storage=s3://tandem-runs/runs", "tracking={mlflow: {tracking_uri: 'http://mlflow:5000'}}"])
    assert json.dumps(load_config(None, ["cluster.storage=/mnt/tandem", "tracking={mlflow: {}}"]).to_dict())


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_pbt_handoff_is_a_whole_copy_that_a_later_exploit_replaces_and_the_end_of_the_tune_removes(where, store_env, tmp_path):
    from ray.tune import Checkpoint

    from tuning.pbt import HANDOFF_RECORD, copy_for_exploiter, handoffs, read_handoff, remove_handoffs

    experiment = location(tmp_path / "trials") if where == "local" else location(bucket_prefix(store_env)) / "trials"
    donor_checkpoint = tmp_path / "donor-checkpoint"
    (donor_checkpoint / "epoch-0002").mkdir(parents=True)
    (donor_checkpoint / "latest").write_text("epoch-0002")
    (donor_checkpoint / "epoch-0002" / "shard.pt").write_bytes(os.urandom(2048))
    for donor in ("t0", "t1"):
        (experiment / donor / "segments.jsonl").put_text("{}\n")  # the trial folders exist
    checkpoint = Checkpoint.from_directory(str(donor_checkpoint))

    first = copy_for_exploiter(checkpoint, experiment / "t0", "t2", "t0", 2)
    assert [h.name for h in handoffs(experiment)] == ["pbt-handoff-t2"]
    with first.as_directory() as copy:  # what the exploiter starts from: every file, and the record naming the donor
        assert (Path(copy) / "epoch-0002" / "shard.pt").read_bytes() == (donor_checkpoint / "epoch-0002" / "shard.pt").read_bytes()
        assert read_handoff(copy)["donor"] == "t0" and (Path(copy) / HANDOFF_RECORD).is_file()
    # A later exploit of the same trial from another donor replaces the first copy.
    copy_for_exploiter(checkpoint, experiment / "t1", "t2", "t1", 3)
    assert [str(h) for h in handoffs(experiment)] == [str(experiment / "t1" / "pbt-handoff-t2")]
    remove_handoffs(experiment)
    assert handoffs(experiment) == [] and (experiment / "t0" / "segments.jsonl").is_file()


def test_check_for_submit_names_a_missing_bucket_and_warns_of_a_shell_without_credentials(store_env, monkeypatch, tmp_path):
    from tandem.checks import predeploy_checks

    def storage_findings(storage: str) -> list:
        return [f for f in predeploy_checks(load_config(None, [f"cluster.storage={storage}"]), "submit") if f.path == "cluster.storage"]

    assert storage_findings(bucket_prefix(store_env)) == []
    (missing,) = storage_findings("s3://no-such-bucket-tandem/runs")
    assert missing.level == "error" and "does not exist" in missing.message
    # The job gets this shell's variables: with none, say so (the nodes may still have an instance role).
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))
    findings = storage_findings(bucket_prefix(store_env))
    # moto answers unsigned requests, so the bucket is reachable: a warning, not an error.
    assert [f.level for f in findings] == ["warning"], findings
    assert "no AWS credentials" in findings[0].message, findings
