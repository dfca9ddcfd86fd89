"""`serve deploy` of the file `tandem serve-config` writes, against a real `ray start --head`.

The same file is the RayService's serveConfigV2 (tandem/k8s.py), so this is the closest a test
here gets to what KubeRay runs: Ray's own CLI applies it through the head's dashboard (with the
head's auth token), Serve builds the app from `serving.app:build_app` in the cluster's processes,
and the model answers over HTTP on the config's port with the artifact's version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from cluster.artifacts import model_version
from cluster.config import load_config
from tests.e2e.conftest import free_ports
from tests.e2e.test_console import start_in_terminal
from tests.unit.artifact_helpers import MLP_ARGS, copy_artifact, digits_val, exported_mlp, flip_byte, train_artifact

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

CLI_TIMEOUT_S = 180
READY_TIMEOUT_S = 420  # the head starts Serve, the controller, HAProxy and an ONNX replica on 2 shared cores


def post_json(url: str, body: dict, timeout: float = 10.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"raw": exc.read()[:500].decode(errors="replace")}


def wait_for_predictions(url: str, inputs: list, deadline_s: float) -> dict:
    deadline = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = post_json(url, {"inputs": inputs})
            if status == 200:
                return body
            last = (status, body)
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(2)
    raise AssertionError(f"{url} did not serve within {deadline_s} s; last answer: {last}")


def test_serve_deploy_of_the_generated_config_serves_the_model_and_tandem_serve_stops_only_its_app(ray_head, tmp_path):
    storage = tmp_path / "runs"
    artifact = copy_artifact(exported_mlp(), storage)  # model.pt + model.onnx (+ int8) with a manifest
    (port,) = free_ports(1)
    config = load_config(None, [f"cluster.storage={storage}", "cluster.address=auto", f"serving.port={port}"])
    config_file = tmp_path / "tandem.yaml"
    config_file.write_text(config.to_yaml())
    serve_file = tmp_path / "serve_config.yaml"

    written = ray_head.run(
        ["tandem", "serve-config", str(config_file), "--for", "cluster", "--out", str(serve_file), "--from", str(artifact)],
        timeout=CLI_TIMEOUT_S,
    )
    assert written.returncode == 0, (written.stdout + written.stderr)[-4000:]

    deployed = ray_head.run(["serve", "deploy", str(serve_file), "--address", ray_head.address], timeout=CLI_TIMEOUT_S)
    assert deployed.returncode == 0, (deployed.stdout + deployed.stderr)[-4000:]
    try:
        x, y = digits_val()
        # --for cluster: Serve listens on every interface, so the head answers on its LAN address too.
        lan = next(a for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split() if not a.startswith("127."))
        body = wait_for_predictions(f"http://{lan}:{port}/v1/predict", x[:64].tolist(), READY_TIMEOUT_S)
        assert body["model_version"] == model_version(artifact)
        assert body["deployment"] == config.serving.deployments[0].name
        accuracy = float(np.mean(np.asarray(body["predictions"]) == y[:64]))
        assert accuracy >= 0.9, f"served accuracy {accuracy:.3f} on 64 validation digits"

        status = ray_head.run(["serve", "status", "--address", ray_head.address], timeout=CLI_TIMEOUT_S)
        assert status.returncode == 0 and "RUNNING" in status.stdout, status.stdout + status.stderr

        # `tandem serve` of a second app joins the same cluster (address: auto) beside that one;
        # Ctrl-C (SIGINT to its process group, as a terminal sends it) removes its app, and only its app.
        second = tmp_path / "second.yaml"
        second.write_text(load_config(config_file, ["name=digits-b", "serving.route_prefix=/b"]).to_yaml())
        log = open(tmp_path / "tandem-serve.log", "w")  # noqa: SIM115 - closed below
        serving = start_in_terminal(
            ["tandem", "serve", str(second), "--from", str(artifact)], log, {**ray_head.env, "RAY_ADDRESS": ray_head.gcs}
        )
        try:
            # Ready when it says so (a request to /b could be answered by the "/" app before /b exists).
            deadline = time.monotonic() + READY_TIMEOUT_S
            while "serving digits-b" not in (tmp_path / "tandem-serve.log").read_text() and time.monotonic() < deadline:
                assert serving.poll() is None, (tmp_path / "tandem-serve.log").read_text()[-3000:]
                time.sleep(1)
            answer = post_json(f"http://127.0.0.1:{port}/b/v1/predict", {"inputs": x[:4].tolist()})
            assert answer[0] == 200, answer
            os.killpg(serving.pid, signal.SIGINT)
            assert serving.wait(timeout=CLI_TIMEOUT_S) == 0, (tmp_path / "tandem-serve.log").read_text()[-3000:]
            assert "stopping digits-b" in (tmp_path / "tandem-serve.log").read_text()
        finally:
            serving.kill()
            log.close()
        apps = ray_head.run(["serve", "status", "--address", ray_head.address], timeout=CLI_TIMEOUT_S).stdout
        assert "digits-b" not in apps, apps
        status, body = post_json(f"http://127.0.0.1:{port}/v1/predict", {"inputs": x[:4].tolist()})
        assert status == 200 and body["model_version"] == model_version(artifact), (status, body)
    finally:
        ray_head.run(["serve", "shutdown", "-y", "--address", ray_head.address], timeout=CLI_TIMEOUT_S)


def test_tandem_serve_says_why_a_replica_cannot_start_and_exports_an_unexported_artifact_first(ray_head, tmp_path):
    storage = tmp_path / "runs"
    (port,) = free_ports(1)
    config = load_config(
        None,
        [f"cluster.storage={storage}", "cluster.address=auto", f"serving.port={port}", f"model.args.hidden={MLP_ARGS['hidden']}"],
    )
    config_file = tmp_path / "tandem.yaml"
    config_file.write_text(config.to_yaml())
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs}
    try:
        # The int8 model altered after export: the driver finds every file listed, the replica's
        # checksum refuses it, and its reason (not only "Deploying application failed") reaches
        # the console that deployed it.
        broken = copy_artifact(exported_mlp(), storage, run="run-broken")
        flip_byte(broken / "model.int8.onnx")
        done = ray_head.run(["tandem", "serve", str(config_file), "--from", str(broken)], timeout=READY_TIMEOUT_S, env=env)
        assert done.returncode == 1, (done.stdout + done.stderr)[-4000:]
        assert "could not start its replicas" in done.stderr and "cpu:" in done.stderr, done.stderr[-4000:]
        assert "model.int8.onnx" in done.stderr and "sha256" in done.stderr, done.stderr[-4000:]

        # Trained weights with no ONNX yet (what `tandem train` of an older Tandem left): `tandem
        # serve` exports them under the parity gate first, then serves the int8 model.
        fresh = train_artifact(storage / "digits" / "run-fresh" / "artifacts", args=MLP_ARGS, epochs=20)
        log_path = tmp_path / "tandem-serve.log"
        with open(log_path, "w") as log:
            serving = start_in_terminal(["tandem", "serve", str(config_file), "--from", str(fresh)], log, env)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while "serving digits" not in log_path.read_text() and time.monotonic() < deadline:
                assert serving.poll() is None, log_path.read_text()[-4000:]
                time.sleep(1)
            assert "exporting" in log_path.read_text(), log_path.read_text()[-4000:]
            assert "model.int8.onnx" in json.loads((fresh / "manifest.json").read_text())["files"]
            x, _ = digits_val()
            status, body = post_json(f"http://127.0.0.1:{port}/v1/predict", {"inputs": x[:4].tolist()})
            assert status == 200 and body["model_version"] == model_version(fresh), (status, body)
            os.killpg(serving.pid, signal.SIGINT)
            assert serving.wait(timeout=CLI_TIMEOUT_S) == 0, log_path.read_text()[-3000:]
        finally:
            serving.kill()
    finally:
        ray_head.run(["serve", "shutdown", "-y", "--address", ray_head.address], timeout=CLI_TIMEOUT_S)
