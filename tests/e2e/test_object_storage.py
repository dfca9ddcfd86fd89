"""Run state in object storage: the packaged example with `cluster.storage: s3://...` against a
real S3-compatible server (moto's, started by tests/conftest.py `s3_store` on loopback) and a real
`ray start --head` whose node has the store's variables and an artifact cache of its own.

One run, in the order a user goes: `tandem train` loses a worker mid-run and fails, `tandem train
--resume latest` continues from the checkpoints in the bucket and ends with a servable artifact
(exported on need, under the parity gate); `tandem serve` runs two replicas that fetched each file
once between them; `serve deploy` of `serve-config --for cluster` (the RayService's file) serves the
same model without fetching again; `tandem predict` reads Parquet from the bucket and writes its
predictions there. Each `tandem` runs in a working folder and a TMPDIR of its own, and neither
holds any run state afterwards: the bucket is the only place nodes share.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cluster.artifacts import model_version
from cluster.config import load_config
from tests.e2e.conftest import VENV_BIN, free_ports
from tests.e2e.test_console import start_in_terminal
from tests.e2e.test_serve_deploy import CLI_TIMEOUT_S, READY_TIMEOUT_S, wait_for_predictions
from training.data import digits, split

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

EPOCHS = 4
WORKERS = 2
TRAIN_TIMEOUT_S = 600
# Files that are run state; anything else a run leaves in its working folder or TMPDIR is a log,
# a lock or Ray's session (sockets, logs).
RUN_STATE = {"manifest.json", "model.pt", "model.onnx", "model.int8.onnx", "metrics.jsonl", "deepspeed.json", "config.yaml", "parity.json"}


def steps_per_epoch(config) -> int:
    train_split, _ = split(digits(), config.data.val_fraction, config.data.seed)
    return math.ceil(len(train_split.y) / WORKERS / config.data.batch_size)


def run_state_left(*folders: Path) -> list[str]:
    """Run-state files, and checkpoint folders, found under `folders`."""
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.name in RUN_STATE or path.name.startswith("checkpoint_"):
                found.append(str(path))
    return found


class Shell:
    """A user's shell on a machine of the cluster: `tandem` joins the head (RAY_ADDRESS), has the
    store's variables, and its own working folder, TMPDIR and artifact cache."""

    def __init__(self, ray_head, root: Path):
        self.cwd, self.tmp, self.cache = root / "work", root / "tmp", root / "cache"
        for folder in (self.cwd, self.tmp, self.cache):
            folder.mkdir(parents=True)
        self.env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs, "TMPDIR": str(self.tmp), "TANDEM_CACHE_DIR": str(self.cache)}

    def tandem(self, *args: str, timeout: float = TRAIN_TIMEOUT_S, **env: str):
        import subprocess

        return subprocess.run(
            [str(VENV_BIN / "tandem"), *args],
            cwd=self.cwd,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )


def read_object(s3_store, key: str) -> bytes:
    return s3_store.client().get_object(Bucket=s3_store.bucket, Key=key)["Body"].read()


def serve_status(ray_head) -> dict:
    done = ray_head.run(["serve", "status", "--address", ray_head.address], timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    return yaml.safe_load(done.stdout) or {}


def running_replicas(ray_head, app: str, deployment: str) -> int:
    apps = serve_status(ray_head).get("applications") or {}
    states = ((apps.get(app) or {}).get("deployments") or {}).get(deployment, {}).get("replica_states") or {}
    return int(states.get("RUNNING", 0))


def artifact_downloads(ray_head, prefix: str) -> dict[str, int]:
    """How many times the head node's cache downloaded each file of the store under `prefix`."""
    log = ray_head.cache / "downloads.jsonl"
    counts: dict[str, int] = {}
    for line in log.read_text().splitlines() if log.is_file() else []:
        uri = json.loads(line)["uri"]
        if uri.startswith(prefix):
            counts[uri] = counts.get(uri, 0) + 1
    return counts


@pytest.fixture(scope="module")
def bucket_run(ray_head, s3_store, tmp_path_factory):
    """The packaged example trained into the bucket: a worker dies mid-run (no retries left), then
    `--resume latest` finishes from the bucket's checkpoints. Returns what the tests below need."""
    root = tmp_path_factory.mktemp("s3-run")
    prefix = f"runs-{uuid.uuid4().hex[:8]}"
    storage = f"s3://{s3_store.bucket}/{prefix}"
    (port,) = free_ports(1)
    config = load_config(
        None,
        [
            f"cluster.storage={storage}",
            f"training.epochs={EPOCHS}",
            "training.checkpoint.every_epochs=1",
            "training.max_failures=0",
            "model.args.hidden=[64]",
            "data.augment=[]",
            f"serving.port={port}",
            "serving.deployments[0].autoscaling.min_replicas=2",
        ],
    )
    config_file = root / "tandem.yaml"
    config_file.write_text(config.to_yaml())
    shell = Shell(ray_head, root / "trainer")

    # A worker dies in epoch 3 (training/loop.py's fault hook, SIGKILL-like os._exit) with no
    # retries left: the run fails after the checkpoints of epochs 1-2 reached the bucket.
    fault_step = 2 * steps_per_epoch(config) + steps_per_epoch(config) // 2
    first = shell.tandem(
        "train",
        str(config_file),
        TANDEM_FAULT_AT_STEP=str(fault_step),
        TANDEM_FAULT_MARKER=str(root / "fault-marker"),
        TANDEM_FAULT_RANK="1",
    )
    assert first.returncode != 0, (first.stdout + first.stderr)[-4000:]
    assert (root / "fault-marker").exists(), "the fault hook never fired"
    keys = s3_store.keys(f"{prefix}/")
    assert any("/checkpoints/" in k for k in keys), keys
    assert not any(k.endswith("artifacts/manifest.json") for k in keys), "the failed run published an artifact"
    (metrics_key,) = [k for k in keys if k.endswith("/metrics.jsonl")]
    before = [json.loads(line) for line in read_object(s3_store, metrics_key).decode().splitlines()]

    resumed = shell.tandem("train", str(config_file), "--resume", "latest")
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-5000:]
    after = [json.loads(line) for line in read_object(s3_store, metrics_key).decode().splitlines()]
    (manifest_key,) = [k for k in s3_store.keys(f"{prefix}/") if k.endswith("artifacts/manifest.json")]
    manifest = json.loads(read_object(s3_store, manifest_key))
    return {
        "config": config,
        "config_file": config_file,
        "storage": storage,
        "prefix": prefix,
        "shells": [shell],
        "before": before,
        "after": after,
        "output": output,
        "manifest": manifest,
        "artifact_uri": f"s3://{s3_store.bucket}/{manifest_key.rsplit('/', 1)[0]}",
        "root": root,
    }


def test_a_run_killed_mid_training_resumes_from_the_bucket_and_ends_servable(bucket_run):
    before, after = bucket_run["before"], bucket_run["after"]
    last = len(before)  # the epochs whose checkpoints Ray Train registered before the worker died
    assert 1 <= last < EPOCHS and [h["epoch"] for h in before] == list(range(1, last + 1)), before
    # The resume went on from the last checkpoint in the bucket: the epochs after it, once each.
    assert [h["epoch"] for h in after] == list(range(1, EPOCHS + 1)), after
    assert after[last]["step"] == before[-1]["step"] + after[0]["step"], after
    # Training alone writes model.pt; the packaged example serves ONNX Runtime int8, so the run
    # ended by exporting under the parity gate, into the bucket.
    assert "exporting" in bucket_run["output"] and "export.gate" in bucket_run["output"], bucket_run["output"][-3000:]
    files = bucket_run["manifest"]["files"]
    assert {"model.pt", "model.onnx", "model.int8.onnx"} <= set(files), files
    shell = bucket_run["shells"][0]
    assert run_state_left(shell.cwd, shell.tmp) == []


def test_tandem_serve_runs_two_replicas_that_fetched_each_file_once_then_serve_deploy_fetches_nothing(bucket_run, ray_head, s3_store):
    config, storage = bucket_run["config"], bucket_run["storage"]
    port = config.serving.port
    version = model_version(bucket_run["manifest"])
    x, y = digits_val(config)
    shell = Shell(ray_head, bucket_run["root"] / "server")
    log_path = shell.cwd / "tandem-serve.log"
    try:
        with open(log_path, "w") as log:
            serving = start_in_terminal([str(VENV_BIN / "tandem"), "serve", str(bucket_run["config_file"])], log, shell.env, cwd=shell.cwd)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while running_replicas(ray_head, config.name, "cpu") < 2 and time.monotonic() < deadline:
                assert serving.poll() is None, log_path.read_text()[-4000:]
                time.sleep(2)
            assert running_replicas(ray_head, config.name, "cpu") == 2, serve_status(ray_head)
            body = wait_for_predictions(f"http://127.0.0.1:{port}/v1/predict", x[:64].tolist(), READY_TIMEOUT_S)
            assert body["model_version"] == version
            assert float(np.mean(np.asarray(body["predictions"]) == y[:64])) >= 0.8, body["predictions"]
            # Two replicas on one node: each file of the artifact came from the bucket once.
            fetched = artifact_downloads(ray_head, bucket_run["artifact_uri"])
            assert fetched and set(fetched.values()) == {1}, fetched
            assert f"{bucket_run['artifact_uri']}/model.int8.onnx" in fetched, fetched
            os.killpg(serving.pid, signal.SIGINT)
            assert serving.wait(timeout=CLI_TIMEOUT_S) == 0, log_path.read_text()[-3000:]
        finally:
            serving.kill()

        # The RayService's file, applied with Ray's own CLI: new replicas on the same node find
        # every file in the node's cache.
        serve_file = shell.cwd / "serve.yaml"
        written = shell.tandem(
            "serve-config", str(bucket_run["config_file"]), "--for", "cluster", "--out", str(serve_file), timeout=CLI_TIMEOUT_S
        )
        assert written.returncode == 0, written.stdout + written.stderr
        assert "AWS_SECRET_ACCESS_KEY" not in serve_file.read_text() and s3_store.env["AWS_SECRET_ACCESS_KEY"] not in serve_file.read_text()
        deployed = ray_head.run(["serve", "deploy", str(serve_file), "--address", ray_head.address], timeout=CLI_TIMEOUT_S)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        body = wait_for_predictions(f"http://127.0.0.1:{port}/v1/predict", x[:8].tolist(), READY_TIMEOUT_S)
        assert body["model_version"] == version
        assert set(artifact_downloads(ray_head, bucket_run["artifact_uri"]).values()) == {1}
    finally:
        ray_head.run(["serve", "shutdown", "-y", "--address", ray_head.address], timeout=CLI_TIMEOUT_S)
    assert run_state_left(shell.cwd, shell.tmp) == []
    assert storage.startswith("s3://")


def test_tandem_predict_reads_parquet_from_the_bucket_and_writes_its_predictions_there(bucket_run, ray_head, s3_store):
    config, prefix = bucket_run["config"], bucket_run["prefix"]
    x, y = digits_val(config)
    rows = 200
    table = pa.table({f"f{i}": x[:rows, i] for i in range(x.shape[1])})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    s3_store.client().put_object(Bucket=s3_store.bucket, Key=f"{prefix}-input/part-0.parquet", Body=buffer.getvalue())
    shell = Shell(ray_head, bucket_run["root"] / "predictor")
    source, target = f"s3://{s3_store.bucket}/{prefix}-input/", f"s3://{s3_store.bucket}/{prefix}-output"
    done = shell.tandem("predict", str(bucket_run["config_file"]), "--input", source, "--output", target)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    written = s3_store.keys(f"{prefix}-output/")
    summary = json.loads(read_object(s3_store, f"{prefix}-output/summary.json"))
    assert summary["rows"] == rows and summary["errors"] == 0, summary
    assert summary["model_version"] == model_version(bucket_run["manifest"])
    parts = [k for k in written if "/predictions/" in k and k.endswith(".parquet")]
    assert parts, written
    predicted = pa.concat_tables([pq.read_table(io.BytesIO(read_object(s3_store, k))) for k in parts]).sort_by("id").to_pydict()
    assert predicted["id"] == list(range(rows))
    assert float(np.mean(np.asarray(predicted["prediction"]) == y[:rows])) >= 0.8
    assert run_state_left(shell.cwd, shell.tmp) == []


def digits_val(config) -> tuple[np.ndarray, np.ndarray]:
    _, val = split(digits(), config.data.val_fraction, config.data.seed)
    return val.x.reshape(len(val.y), -1), val.y
