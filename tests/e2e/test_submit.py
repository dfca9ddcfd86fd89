"""Job submission against a real `ray start --head` with token auth (the ray_head fixture).

The plain `ray job submit --working-dir DIR -- tandem train CONFIG` trains and leaves a verified
artifact in the configured storage, and `tandem submit CONFIG predict` scores a file with it; a
`tandem submit CONFIG train` broken by an override exits non-zero and says why; `tandem jobs`
sees the jobs; a client without the token is refused. `tandem submit --no-follow`, `tandem jobs
status|logs|stop` and Ctrl-C while following run on a cheap job: `tandem validate` whose data
source waits for a file the test creates. Storage is an absolute tmp path: the cluster shares this machine's disk.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from cluster.artifacts import verify_artifact
from cluster.config import load_config
from tests.e2e.test_console import ctrl_c_reaches
from training.data import digits

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

JOB_TIMEOUT_S = 900  # one small training job on 2 shared cores: Ray Train start-up dominates
CLIENT_TIMEOUT_S = 120
TINY = [
    "training.epochs=1",
    "training.workers=1",
    "training.max_steps_per_epoch=5",
    "model.args.hidden=[32]",
    "training.checkpoint.every_epochs=1",
]
BROKEN = "model.args={hidden: [32], bogus: 1}"  # valid config, but the model builder refuses it in the job


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def tandem_submit(ray_head, overrides: list[str], stage: str = "train"):
    result = ray_head.run(
        ["tandem", "submit", "cluster/example.yaml", stage, "--address", ray_head.address, *sets(overrides)], timeout=JOB_TIMEOUT_S
    )
    return result


def python(ray_head, code: str, env: dict[str, str] | None = None):
    return ray_head.run([sys.executable, "-c", textwrap.dedent(code)], timeout=CLIENT_TIMEOUT_S, env=env)


def the_artifact(storage):
    manifests = list(storage.glob("digits/*/artifacts/manifest.json"))
    assert len(manifests) == 1, f"expected one artifact under {storage}, found {manifests}"
    folder = manifests[0].parent
    manifest = verify_artifact(folder)  # every file against its sha256
    assert "model.pt" in manifest["files"]
    return folder


@pytest.fixture(scope="module")
def broken_submission(ray_head):
    """One job that fails in the cluster (shared by the tests that look at a failed job)."""
    return tandem_submit(ray_head, TINY + [BROKEN])


def test_plain_ray_job_submit_trains_then_tandem_submit_predict_scores_a_file_with_its_artifact(ray_head, tmp_path):
    # One training job for both forms of submission: Ray's own CLI runs `tandem train` (the
    # config joins the job's cluster), then `tandem submit CONFIG predict` uses its artifact.
    # `tandem submit CONFIG train` builds its entrypoint the same way; the broken job's tests
    # check that entrypoint and the failure path.
    storage = tmp_path / "runs"
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    config = load_config(None, TINY + ["cluster.address=auto", f"cluster.storage={storage}"])
    (job_dir / "tandem.yaml").write_text(config.to_yaml())
    command = ["ray", "job", "submit", "--address", ray_head.address, "--working-dir", str(job_dir), "--", "tandem", "train", "tandem.yaml"]
    result = ray_head.run(command, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    the_artifact(storage)

    # The same storage, as a batch job: the trained model (torch engine: nothing exported) scores
    # a file on the shared disk and writes its predictions beside it.
    rows = digits().x[:300]
    np.save(tmp_path / "rows.npy", rows)
    predict_sets = [
        f"cluster.storage={storage}",
        "serving.deployments=[{name: model, engine: torch, cpus: 0.5}]",
        f"predict.input={tmp_path / 'rows.npy'}",
        f"predict.output={tmp_path / 'scored'}",
    ]
    result = tandem_submit(ray_head, TINY + predict_sets, stage="predict")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "tandem predict cluster/example.yaml --set cluster.address=auto" in output
    assert re.search(r"job \S+ SUCCEEDED", output)
    summary = json.loads((tmp_path / "scored" / "summary.json").read_text())
    assert summary["rows"] == 300 and summary["errors"] == 0
    table = pq.read_table(tmp_path / "scored" / "predictions").sort_by("id").to_pydict()
    assert table["id"] == list(range(300)) and set(table["deployment"]) == {"model"}


def test_a_job_broken_by_an_override_exits_non_zero_with_its_error(broken_submission):
    output = broken_submission.stdout + broken_submission.stderr
    assert broken_submission.returncode == 1, output[-6000:]
    assert "tandem train cluster/example.yaml --set cluster.address=auto" in output  # the entrypoint submitted
    assert "bogus" in output  # the job's own error, streamed from the cluster
    assert re.search(r"job \S+ FAILED", broken_submission.stderr)
    assert "Traceback" not in broken_submission.stderr  # the client's own output stays clean


def tandem_jobs(ray_head, *args: str):
    """`tandem jobs ARGS --address HEAD` as a user runs it (a wide terminal: table rows stay whole)."""
    return ray_head.run(
        ["tandem", "jobs", *args, "--address", ray_head.address], timeout=CLIENT_TIMEOUT_S, env={**ray_head.env, "COLUMNS": "400"}
    )


def poll(read, wanted, what: str, deadline_s: float = JOB_TIMEOUT_S):
    """read() until wanted(value) holds; the deadline only bounds a hang."""
    deadline = time.monotonic() + deadline_s
    while not wanted(value := read()):
        assert time.monotonic() < deadline, f"{what} within {deadline_s} s; last: {value}"
        time.sleep(1)
    return value


def job_id_of(output: str) -> str:
    return re.search(r"submitted (\S+) to", output).group(1)


def test_tandem_jobs_list_status_and_logs_show_the_failed_job(ray_head, broken_submission):
    job_id = job_id_of(broken_submission.stdout)
    listed = tandem_jobs(ray_head, "list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert re.search(rf"^{re.escape(job_id)}\s+FAILED\s+train\s", listed.stdout, flags=re.MULTILINE), listed.stdout
    status = tandem_jobs(ray_head, "status", job_id)
    assert status.returncode == 0 and status.stdout.strip() == "FAILED", status.stdout + status.stderr
    logs = tandem_jobs(ray_head, "logs", job_id)
    assert logs.returncode == 0 and "bogus" in logs.stdout, logs.stdout[-3000:] + logs.stderr
    missing = tandem_jobs(ray_head, "status", "no-such-job")
    assert missing.returncode == 1 and "error no job 'no-such-job' on this cluster" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr


GATED_SOURCE = '''
import time
from pathlib import Path

from training.data import digits


def digits_when(gate):
    """The digits once the file `gate` exists: a job that runs until its test lets it finish."""
    print(f"waiting for {gate}", flush=True)
    while not Path(gate).exists():
        time.sleep(0.1)
    return digits()
'''


def submit_gated_validate(ray_head, folder, *flags: str, **popen):
    """`tandem submit tandem.yaml validate` from `folder` (the job's working_dir): a cheap job whose
    data source waits for `folder/gate`. With popen arguments, started in the background."""
    folder.mkdir(exist_ok=True)
    (folder / "gated.py").write_text(GATED_SOURCE)
    (folder / "tandem.yaml").write_text(load_config(None, [f"cluster.storage={folder / 'runs'}"]).to_yaml())
    gated = ["data.source=gated:digits_when", f"data.args={{gate: {folder / 'gate'}}}"]
    command = ["tandem", "submit", "tandem.yaml", "validate", "--address", ray_head.address, *flags, *sets(gated)]
    if popen:
        return subprocess.Popen(command, cwd=folder, env=ray_head.env, **popen)
    return ray_head.run(command, timeout=CLIENT_TIMEOUT_S, cwd=folder)


def test_submit_no_follow_returns_and_tandem_jobs_stop_stops_the_running_job(ray_head, tmp_path):
    submitted = submit_gated_validate(ray_head, tmp_path / "job", "--no-follow")
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-3000:]
    job_id = job_id_of(submitted.stdout)
    assert f"tandem jobs logs {job_id}" in submitted.stdout
    # The client returned while the job runs: its data source says it waits for the gate.
    poll(lambda: tandem_jobs(ray_head, "logs", job_id).stdout, lambda logs: "waiting for" in logs, "the job's own line in its logs")
    assert tandem_jobs(ray_head, "status", job_id).stdout.strip() == "RUNNING"
    stopped = tandem_jobs(ray_head, "stop", job_id)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped", stopped.stdout + stopped.stderr
    poll(lambda: tandem_jobs(ray_head, "status", job_id).stdout.strip(), lambda s: s == "STOPPED", "the job STOPPED")
    assert tandem_jobs(ray_head, "stop", job_id).stdout.strip() == "not running"


def test_ctrl_c_while_following_exits_130_and_leaves_the_job_running(ray_head, tmp_path):
    log = tmp_path / "submit.log"
    with open(log, "w") as out:
        follower = submit_gated_validate(
            ray_head,
            tmp_path / "job",
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own, as a terminal's foreground job has
            preexec_fn=ctrl_c_reaches,
        )
    try:
        # Following: the job's own line has come through the log stream.
        poll(lambda: log.read_text(), lambda text: "waiting for" in text or follower.poll() is not None, "the job's logs streamed")
        assert follower.poll() is None, log.read_text()[-3000:]
        os.killpg(follower.pid, signal.SIGINT)  # what Ctrl-C sends: the foreground process group
        assert follower.wait(timeout=CLIENT_TIMEOUT_S) == 130, log.read_text()[-3000:]
    finally:
        if follower.poll() is None:
            follower.kill()
    output = log.read_text()
    assert "stopped following; the job keeps running" in output and "Traceback" not in output, output[-3000:]
    job_id = job_id_of(output)
    assert tandem_jobs(ray_head, "status", job_id).stdout.strip() == "RUNNING"
    (tmp_path / "job" / "gate").touch()  # the job goes on to its end
    poll(lambda: tandem_jobs(ray_head, "status", job_id).stdout.strip(), lambda s: s == "SUCCEEDED", "the job SUCCEEDED")


def test_stopped_job_is_reported_non_zero(ray_head):
    result = python(
        ray_head,
        f"""
        import sys
        from tandem.submit import follow_job, job_client, job_status, stop_job
        client = job_client({ray_head.address!r})
        job_id = client.submit_job(entrypoint="sleep 300")
        assert stop_job({ray_head.address!r}, job_id) is True
        code = follow_job(client, job_id)
        print("STATUS", job_status({ray_head.address!r}, job_id), "EXIT", code)
    """,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "STATUS STOPPED EXIT 1" in result.stdout


def test_client_without_the_token_is_refused_with_the_fix(ray_head, tmp_path):
    env = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    result = python(
        ray_head,
        f"""
        from tandem.submit import SubmitError, list_jobs
        try:
            list_jobs({ray_head.address!r})
        except SubmitError as exc:
            print("REFUSED", exc)
    """,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "REFUSED" in result.stdout and "RAY_AUTH_TOKEN" in result.stdout


def test_config_outside_the_working_dir_is_refused_before_submitting(tmp_path):
    from tandem.submit import SubmitError, config_path_in_job

    outside = tmp_path / "elsewhere.yaml"
    outside.write_text(yaml.safe_dump({"name": "x"}))
    with pytest.raises(SubmitError, match="outside the working_dir"):
        config_path_in_job(outside, tmp_path / "project")
