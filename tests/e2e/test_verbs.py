"""The verbs that start no Ray, through the installed `tandem` command as a user types them: exit
codes, output and files, and for a refusal Tandem's one-line error without a traceback.

import, export, profile and serve-config work on a model trained for a second in plain torch and
brought in with `tandem import`; check and predict's refusal need no model.

The other verbs' console tests: validate, show-config, k8s, bench and the `jobs` usage error in
tests/unit/test_cli.py; run, `run --keep-serving` with Ctrl-C, `train --resume RUN_FOLDER` and
`-v` in test_run.py; serve (Ctrl-C) and serve-config --for cluster in test_serve_deploy.py;
submit (following, --no-follow, Ctrl-C), jobs and `submit CONFIG predict` (`tandem predict` in a
job) in test_submit.py; train's quiet console in test_console.py; tune, `tune --resume` and
TANDEM_VERBOSE in tests/integration/test_tuning.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from cluster.artifacts import verify_artifact
from cluster.config import load_config
from tests.e2e.test_console import assert_refused, tandem
from tests.integration.test_serving import HIDDEN, save_trained_weights

READY_FOR_KUBERNETES = [
    "cluster.image=registry.example.com/tandem:0.1.0-ray2.60.0",
    "cluster.storage=/mnt/tandem",
    "cluster.kubernetes.storage_claim=tandem-runs",
    "cluster.kubernetes.ray_version=2.60.0",
]


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# no Ray: import, export, profile, serve-config, check, predict's refusal
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(folder, config file, `tandem import` result, artifact folder): trained weights brought in."""
    folder = tmp_path_factory.mktemp("verbs")
    config = folder / "tandem.yaml"
    config.write_text(load_config(None, [f"cluster.storage={folder / 'runs'}", f"model.args.hidden={HIDDEN}"]).to_yaml())
    save_trained_weights(folder / "weights.pt", HIDDEN, seed=3)
    done = tandem(["import", str(config), "--weights", str(folder / "weights.pt")], folder, timeout=120)
    found = re.search(r"^artifact: (\S+) \(version (\w+)\)$", done.stdout, flags=re.MULTILINE)
    return folder, config, done, Path(found.group(1)) if found else None


@pytest.fixture(scope="module")
def exported(imported):
    """`tandem export` of the imported artifact (ONNX fp32 and int8), timing batch 1 only."""
    folder, config, _, artifact = imported
    return tandem(["export", str(config), "--from", str(artifact), "--set", "export.latency_batch_sizes=[1]"], folder, timeout=300)


def test_import_makes_an_artifact_and_refuses_weights_of_another_shape(imported):
    folder, config, done, artifact = imported
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "imported" in done.stdout and "val_accuracy 0.9" in done.stdout, done.stdout
    manifest = verify_artifact(artifact)
    assert manifest["model"]["args"] == {"hidden": HIDDEN}

    save_trained_weights(folder / "wider.pt", [h * 2 for h in HIDDEN], seed=3)
    wider = tandem(["import", str(config), "--weights", str(folder / "wider.pt")], folder, timeout=120)
    assert_refused(wider, f"--weights {folder / 'wider.pt'} does not fit training.models:mlp")
    assert "key '1.weight' has shape" in wider.stderr


def test_export_writes_onnx_and_int8_with_the_parity_report(imported, exported):
    artifact = imported[3]
    assert exported.returncode == 0, (exported.stdout + exported.stderr)[-3000:]
    assert "parity against model.pt" in exported.stdout and f"artifacts: {artifact}" in exported.stdout
    assert {"model.onnx", "model.int8.onnx"} <= set(verify_artifact(artifact)["files"])


def test_export_that_crosses_the_parity_gate_exits_1_and_writes_nothing(imported):
    folder, config, _, artifact = imported
    before = digests(artifact)
    # 95% of the weights pruned: far past the default gate's 1-point accuracy drop.
    crossing = ["export.onnx=false", "export.quantize=none", "export.prune={sparsity: 0.95}", "export.latency_batch_sizes=[1]"]
    done = tandem(["export", str(config), "--from", str(artifact), *sets(crossing)], folder, timeout=300)
    assert_refused(done, f"export gate failed for {artifact}")
    assert "model.pruned.pt" in done.stderr and "export.gate.max_accuracy_drop" in done.stderr
    assert digests(artifact) == before


def test_profile_writes_its_report_for_the_exported_artifact(imported, exported, tmp_path):
    folder, config, _, artifact = imported
    assert exported.returncode == 0
    done = tandem(["profile", str(config), "--from", str(artifact), "--quick", "--out", str(tmp_path / "profile")], folder, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count(f"report: {tmp_path / 'profile' / 'profile.html'}") == 1, done.stdout[-2000:]
    report = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert report["source"]["artifact_dir"] == str(artifact) and report["source"]["trained"] is True
    assert {"torch-fp32", "onnx-fp32", "onnx-int8"} <= {e["engine"] for e in report["inference"]["engines"]}


def test_serve_config_for_local_keeps_the_host_and_refuses_another_target(imported, tmp_path):
    folder, config, _, artifact = imported
    out = tmp_path / "serve.yaml"
    done = tandem(["serve-config", str(config), "--for", "local", "--out", str(out), "--from", str(artifact)], folder, timeout=120)
    assert done.returncode == 0 and f"wrote {out}" in done.stdout, done.stdout + done.stderr
    written = yaml.safe_load(out.read_text())
    assert written["http_options"]["host"] == "127.0.0.1"
    (app,) = written["applications"]
    assert app["name"] == "digits" and app["args"]["artifact"] == str(artifact)

    refused = tandem(["serve-config", str(config), "--for", "kubernetes", "--out", str(tmp_path / "no.yaml")], folder, timeout=120)
    assert_refused(refused, "--for 'kubernetes': use local")
    assert not (tmp_path / "no.yaml").exists()


def test_check_exits_0_on_a_ready_config_and_1_on_an_error(tmp_path):
    ready = tandem(["check", *sets(READY_FOR_KUBERNETES)], tmp_path, timeout=120)
    assert ready.returncode == 0 and "pre-deploy checks: nothing to report" in ready.stdout, ready.stdout + ready.stderr
    stock = tandem(["check"], tmp_path, timeout=120)  # the packaged example: Ray's stock image, pod-local storage
    assert stock.returncode == 1, stock.stdout + stock.stderr
    assert "error: cluster.image:" in stock.stdout and "Traceback" not in stock.stdout + stock.stderr


def test_predict_without_input_or_output_says_so_before_starting_ray(tmp_path):
    # Verbose, so a Ray started before the refusal would say so here.
    done = tandem(["predict", "--input", str(tmp_path / "rows.npy")], tmp_path, timeout=120, TANDEM_VERBOSE="1")
    assert_refused(done, "tandem predict needs --input and --output")
    assert "Started a local Ray instance" not in done.stdout + done.stderr
