"""`tandem run` end to end on the packaged example (shortened for CI): train -> export -> serve -> load
-> summary, kept serving until Ctrl-C; then `tandem -v train --resume` continues its run folder."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster.artifacts import verify_artifact
from cluster.tracking import TENSORBOARD_DIR
from tests.e2e.test_console import VENV_BIN, assert_no_chatter, start_in_terminal, tandem, tandem_env
from tests.e2e.test_serve_deploy import post_json
from training.data import digits
from training.trainer import read_history

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RUN_TIMEOUT_S = 900  # bounds a hang of one `tandem run`
STOP_TIMEOUT_S = 120  # bounds a hang after Ctrl-C (Serve and Ray stop in seconds)
STEPS_PER_EPOCH = 22  # the packaged example: 1437 training examples / 2 workers / batch 32, drop_last


@dataclass
class ServedRun:
    storage: Path
    output: str  # what the terminal showed, start to exit
    answer: tuple[int, dict]  # a request to the endpoint after the summary, while it kept serving
    exit_code: int  # after Ctrl-C
    url: str


@pytest.fixture(scope="module")
def served_run(tmp_path_factory) -> ServedRun:
    """`tandem run --keep-serving` of the packaged example (2 epochs), asked for a prediction once it
    says it keeps serving, then stopped with Ctrl-C: SIGINT to its process group, as a terminal sends it."""
    storage = tmp_path_factory.mktemp("run")
    sets = [f"cluster.storage={storage}", "training.epochs=2", "export.latency_batch_sizes=[1, 32]"]
    log = storage / "run.log"
    with open(log, "w") as out:
        running = start_in_terminal(
            [str(VENV_BIN / "tandem"), "run", "--keep-serving", "--requests", "120", *[a for s in sets for a in ("--set", s)]],
            out,
            tandem_env(storage),
            cwd=storage,
        )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (ready := re.search(r"^serving at (\S+); Ctrl-C or SIGTERM stops$", log.read_text(), flags=re.MULTILINE)):
            assert running.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(1)
        url = ready.group(1)
        answer = post_json(f"{url}/v1/predict", {"inputs": digits().x[:4].tolist()})
        os.killpg(running.pid, signal.SIGINT)
        exit_code = running.wait(timeout=STOP_TIMEOUT_S)
    finally:
        if running.poll() is None:
            os.killpg(running.pid, signal.SIGKILL)
            running.wait(timeout=60)
    return ServedRun(storage=storage, output=log.read_text(), answer=answer, exit_code=exit_code, url=url)


def test_tandem_run_keeps_serving_after_the_summary_until_ctrl_c(served_run):
    status, body = served_run.answer
    assert status == 200 and len(body["predictions"]) == 4, (status, body)
    assert served_run.exit_code == 0 and "Traceback" not in served_run.output, served_run.output[-5000:]
    with pytest.raises(OSError):  # the endpoint went with it (refused, or reset while closing)
        post_json(f"{served_run.url}/v1/predict", {"inputs": digits().x[:4].tolist()}, timeout=5)


def test_tandem_run_on_the_packaged_default(served_run):
    out = served_run.output
    (artifact,) = [p.parent for p in served_run.storage.rglob("artifacts/manifest.json")]
    manifest = verify_artifact(artifact)
    assert {"model.pt", "model.onnx", "model.int8.onnx"} <= set(manifest["files"])
    # The summary says the served predictions equal the artifact's engine, and no request failed.
    assert re.search(r"│ served == artifact\s+│ 100\.0% of held-out examples", out), out[-3000:]
    assert " 0 failed at concurrency" in out
    assert f"run folder: {artifact.parent}" in out
    # A console for people: Tandem's progress, not Ray's and DeepSpeed's; theirs is in the run's log.
    for epoch in (1, 2):
        assert f"[tandem] epoch   {epoch}/2" in out
    assert_no_chatter(out)
    logged = (artifact.parent / "console.log").read_text()
    assert "(RayTrainWorker pid=" in logged and "[tandem] epoch   2/2" in logged


def test_train_resume_by_run_folder_continues_that_run_with_rays_output_under_v(served_run):
    (run,) = [p.parent.parent for p in served_run.storage.rglob("artifacts/manifest.json")]
    # A newer run folder with checkpoints: what `--resume latest` would pick, so only the folder
    # given makes the resume continue `run`.
    (run.parent / "99999999-newer" / "checkpoints").mkdir(parents=True)
    args = ["-v", "train", "--resume", str(run), "--set", f"cluster.storage={served_run.storage}", "--set", "training.epochs=3"]
    done = tandem(args, served_run.storage, timeout=RUN_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert f"[tandem] run folder {run}" in output
    assert re.search(rf"\[tandem\] resumed from .* step {2 * STEPS_PER_EPOCH}\)", output), output[-3000:]
    assert [h["epoch"] for h in read_history(run)] == [1, 2, 3]
    assert verify_artifact(run / "artifacts")["epochs"] == 3
    # -v: Ray's and the workers' own lines on the terminal, and no log to point to.
    assert "(RayTrainWorker pid=" in output and "[tandem] log of Ray" not in output, output[-3000:]


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
    done = tandem(["run", "--tune", "--requests", "60", *[arg for s in sets for arg in ("--set", s)]], tmp_path, timeout=RUN_TIMEOUT_S)
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
    assert re.search(rf"│ artifact\s+│ {re.escape(str(run_dir / 'artifacts'))}\s+│", out), out[-3000:]
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
