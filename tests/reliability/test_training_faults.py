"""Training survives SIGKILLs from outside: a worker mid-epoch (Ray Train restarts the group from the
last checkpoint) and the `tandem train` driver (`--resume latest` continues from the last checkpoint).

Real Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers, no mocks. The loop's test-only progress files
(TANDEM_PROGRESS_DIR: each rank's pid and global step after every step) say which process to kill,
when it is mid-epoch, and how many steps the restart re-did.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from cluster.artifacts import load_model, verify_artifact
from cluster.config import load_config
from tests.e2e.test_console import assert_no_chatter
from tests.reliability.figures import record
from training.data import digits, split
from training.trainer import read_history

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]
ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
EPOCHS = 4
DRIVER_KILL_EPOCHS = 20
STEPS_PER_EPOCH = 22  # 1437 training examples / 2 ranks / batch 32, drop_last
TIMEOUT_S = 300
# Every process a `tandem train` subprocess starts (its local Ray included) inherits this variable,
# so the leak check finds exactly those processes and never the shared test session's Ray.
TAG_ENV = "TANDEM_FAULT_TEST_TAG"


def small(storage: Path, *overrides: str):
    """The packaged example, short: 2 workers, ZeRO-2, a narrow MLP, a checkpoint every epoch."""
    return load_config(
        None,
        [
            f"cluster.storage={storage}",
            f"training.epochs={EPOCHS}",
            "model.args.hidden=[64]",
            "data.augment=[]",
            "training.deepspeed.zero_stage=2",
            "training.workers=2",
            "training.checkpoint.every_epochs=1",
            *overrides,
        ],
    )


def read_progress(folder: Path) -> dict[int, dict]:
    """{rank: {"pid", "step"}} from the loop's progress files (absent until a rank's first step)."""
    progress = {}
    for path in folder.glob("rank-*.json"):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        progress[entry["rank"]] = entry
    return progress


class Epochs:
    """Count of epochs in the one run's metrics.jsonl under `storage` (found once: polled often)."""

    def __init__(self, storage: Path):
        self.storage, self.path = storage, None

    def reported(self) -> int:
        if self.path is None:
            self.path = next(self.storage.rglob("metrics.jsonl"), None)
        return len(read_history(self.path.parent)) if self.path else 0


def mid_epoch_after_checkpoint(step: int, checkpointed_epochs: int) -> bool:
    """True inside the middle half of the epoch right after the last registered checkpoint.

    metrics.jsonl gets an epoch's line only after Ray Train registered its checkpoint (the
    checkpoint manager's report callback runs before ours), so that checkpoint is restorable.
    """
    start = checkpointed_epochs * STEPS_PER_EPOCH
    return checkpointed_epochs >= 1 and start + STEPS_PER_EPOCH // 4 <= step <= start + 3 * STEPS_PER_EPOCH // 4


def wait_until_dead(pid: int, hang_s: float = 60) -> None:
    """Until `pid` is gone or a zombie (SIGKILLed, not yet reaped); `hang_s` bounds a hang only."""
    deadline = time.monotonic() + hang_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} still runs {hang_s} s after SIGKILL")


def artifact_accuracy(artifact_dir: Path, config) -> float:
    model, _ = load_model(artifact_dir)  # checksum-verified, weights_only=True, no DeepSpeed
    _, val = split(digits(), config.data.val_fraction, config.data.seed)
    with torch.no_grad():
        predictions = model(torch.from_numpy(val.x)).argmax(1).numpy()
    return float((predictions == val.y).mean())


def test_worker_sigkilled_mid_epoch_resumes_from_the_last_checkpoint(tmp_path, ray_tmp):
    storage, progress = tmp_path / "runs", tmp_path / "progress"
    progress.mkdir()
    config_path = tmp_path / "tandem.yaml"
    # ZeRO-1 here (the driver test runs ZeRO-2, the shared session runs ZeRO-2 and ZeRO-3): this
    # run is also the suite's proof that ZeRO-1 trains, so no separate ZeRO-1 run is needed.
    config = small(storage, "training.max_failures=2", "training.deepspeed.zero_stage=1")
    config_path.write_text(config.to_yaml())
    interval_steps = config.training.checkpoint.every_epochs * STEPS_PER_EPOCH
    rank, tag, log = 1, uuid.uuid4().hex, tmp_path / "train.log"

    started = time.monotonic()
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [str(VENV_BIN / "tandem"), "train", str(config_path)],
            cwd=tmp_path,
            env=tandem_env(tag, progress, ray_tmp),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline, epochs = time.monotonic() + TIMEOUT_S, Epochs(storage)
        killed = None
        while killed is None and driver.poll() is None and time.monotonic() < deadline:
            mine = read_progress(progress).get(rank)
            checkpointed = epochs.reported()
            if mine and mid_epoch_after_checkpoint(mine["step"], checkpointed):
                os.kill(mine["pid"], signal.SIGKILL)
                killed = {"pid": mine["pid"], "at": time.monotonic(), "checkpointed_epochs": checkpointed}
            time.sleep(0.005)
        assert killed is not None, f"the run ended before a mid-epoch moment after a checkpoint:\n{log.read_text()[-3000:]}"
        wait_until_dead(killed["pid"])  # it writes nothing more: its file holds the last step it finished
        mine = read_progress(progress)[rank]
        # Read as soon as the rank died, so before any replacement could write: Ray Train must first
        # see the death, start a worker, initialise DeepSpeed and restore the checkpoint.
        assert mine["pid"] == killed["pid"], "a replacement worker wrote before the dead rank's last step was read"
        killed["step"] = mine["step"]
        while driver.poll() is None and time.monotonic() < deadline:  # recovery: a new rank-0 process finished a step
            mine = read_progress(progress)[rank]
            if mine["pid"] != killed["pid"]:
                killed["recovered_after_s"] = time.monotonic() - killed["at"]
                break
            time.sleep(0.05)
        returncode = driver.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert returncode == 0, log.read_text()[-5000:]
        leaked = wait_for_no_tagged_processes(tag, timeout_s=60)
        assert not leaked, f"processes of the finished run still alive: {leaked}"
    finally:
        stop_tagged(driver, tag)
    duration = time.monotonic() - started

    (run_dir,) = {p.parent for p in storage.rglob("metrics.jsonl")}
    history = read_history(run_dir)
    epochs_seen = [h["epoch"] for h in history]
    # Epochs before the kill were reported once; the first one after it continues from the last checkpoint.
    first_after = history[killed["checkpointed_epochs"]]
    restored_step = (first_after["epoch"] - 1) * STEPS_PER_EPOCH
    assert first_after["epoch"] == killed["checkpointed_epochs"] + 1, epochs_seen
    assert epochs_seen == list(range(1, EPOCHS + 1)), epochs_seen
    assert "recovered_after_s" in killed, "no new rank-0 worker ever trained after the kill"
    lost_steps = killed["step"] - restored_step
    assert 0 < lost_steps <= interval_steps, (killed["step"], restored_step)
    assert history[-1]["step"] == EPOCHS * STEPS_PER_EPOCH

    manifest = verify_artifact(run_dir / "artifacts")
    assert manifest["config_hash"] == config.config_hash() and manifest["deepspeed"]["zero_stage"] == 1
    assert json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 1
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    accuracy = artifact_accuracy(run_dir / "artifacts", config)
    assert accuracy == pytest.approx(history[-1]["val_accuracy"], abs=1e-6)  # the artifact is the final model

    record(
        "training_worker_sigkill",
        faults_injected=1,
        survived=True,
        killed_rank=rank,
        killed_at_step=killed["step"],
        restored_from_step=restored_step,
        lost_steps=lost_steps,
        checkpoint_interval_steps=interval_steps,
        recovered_after_s=round(killed["recovered_after_s"], 2),
        final_step=history[-1]["step"],
        leaked_processes=0,
        artifact_verified=True,
        artifact_val_accuracy=round(accuracy, 4),
        run_s=round(duration, 1),
    )


def stop_tagged(driver: subprocess.Popen, tag: str) -> None:
    """Cleanup after a failure: the driver's process group, then anything else carrying this test's tag."""
    if driver.poll() is None:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    for pid in tagged_processes(tag):  # only processes this test started (they carry its tag)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tagged_processes(tag: str) -> list[int]:
    """Live processes (zombies have no environ) that inherited TAG_ENV=tag."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def wait_for_no_tagged_processes(tag: str, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def tandem_env(tag: str, progress: Path, ray_tmp: Path) -> dict[str, str]:
    """A user's shell, with a Ray of the subprocess's own: no RAY_ADDRESS, and a RAY_TMPDIR of its own
    so no cluster address file there (`ray start` leaves one) sends it to another Ray."""
    ray_tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        {
            TAG_ENV: tag,
            "RAY_TMPDIR": str(ray_tmp),
            "TANDEM_PROGRESS_DIR": str(progress),
            "RAY_USAGE_STATS_ENABLED": "0",
            "DS_ACCELERATOR": "cpu",
            # The Train controller registers a reported checkpoint only when it next polls the workers
            # (every 2 s by default, longer than one of these epochs); polling often keeps a checkpoint
            # from being reported but not yet registered when the kill lands. Well under an epoch
            # (about 0.22 s on a quiet machine): at 0.25 s the polls locked in phase with the epochs,
            # metrics.jsonl lagged the workers by a whole epoch and no mid-epoch window ever came.
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.05",
        }
    )
    return env


def test_killed_driver_resumes_from_the_last_checkpoint(tmp_path, ray_tmp):
    storage, progress = tmp_path / "runs", tmp_path / "progress"
    progress.mkdir()
    config_path = tmp_path / "tandem.yaml"
    # Five times the epochs of the worker test: killed in epoch 2, the orphaned workers must not be
    # able to finish the run (else the resume would have nothing to do and the test would prove
    # nothing). They stop at their next step (the loop's orphan check); before that check they
    # trained on for seconds and once finished all 12 epochs of an earlier version of this test.
    config_path.write_text(small(storage, f"training.epochs={DRIVER_KILL_EPOCHS}").to_yaml())
    tag = uuid.uuid4().hex
    leaked: list[int] = []
    log = tmp_path / "first.log"

    started = time.monotonic()
    with open(log, "w") as out:
        # Its own session: the SIGKILL goes to the driver and everything in its process group.
        driver = subprocess.Popen(
            [str(VENV_BIN / "tandem"), "train", str(config_path)],
            cwd=tmp_path,
            env=tandem_env(tag, progress, ray_tmp / "first"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline, epochs = time.monotonic() + TIMEOUT_S, Epochs(storage)
        while time.monotonic() < deadline and driver.poll() is None:
            steps = [e["step"] for e in read_progress(progress).values()]
            if steps and mid_epoch_after_checkpoint(max(steps), epochs.reported()):
                break
            time.sleep(0.005)
        assert driver.poll() is None, f"the driver ended before a mid-epoch moment after a checkpoint:\n{log.read_text()[-3000:]}"
        step_at_kill = max(e["step"] for e in read_progress(progress).values())
        os.killpg(driver.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        driver.wait(timeout=30)
        # Ray's own processes fate-share with the driver or notice its raylet is gone; none may stay.
        leaked = wait_for_no_tagged_processes(tag, timeout_s=60)
        cleanup_s = time.monotonic() - killed_at
        assert not leaked, f"processes of the killed driver still alive after 60 s: {leaked}"
    finally:
        stop_tagged(driver, tag)

    before = read_history(next(storage.rglob("metrics.jsonl")).parent)
    last_checkpointed_epoch = before[-1]["epoch"] if before else 0
    # The last step any worker reached: workers outlive the killed driver by a few seconds.
    last_step_reached = max(e["step"] for e in read_progress(progress).values())
    assert last_checkpointed_epoch >= 1
    assert last_step_reached < DRIVER_KILL_EPOCHS * STEPS_PER_EPOCH, "the run finished despite the kill: nothing left to resume"
    # Orphaned workers stop by themselves once their raylet is gone (the loop's orphan check: the
    # run did not finish above, and no process is left); how many steps they took after the kill
    # depends on the machine and is recorded (steps_after_kill).
    assert not list(storage.rglob("artifacts/manifest.json")), "the killed run wrote its final artifact"

    resumed_started = time.monotonic()
    resumed = subprocess.run(
        [str(VENV_BIN / "tandem"), "train", str(config_path), "--resume", "latest"],
        cwd=tmp_path,
        env=tandem_env(tag, progress, ray_tmp / "resumed"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        start_new_session=True,
    )
    resume_s = time.monotonic() - resumed_started
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-5000:]
    leaked_after_resume = wait_for_no_tagged_processes(tag, timeout_s=60)
    assert not leaked_after_resume, f"processes of the resumed run still alive after it exited: {leaked_after_resume}"

    (run_dir,) = {p.parent for p in storage.rglob("metrics.jsonl")}
    history = read_history(run_dir)
    epochs = [h["epoch"] for h in history]
    # The console of `tandem train` is Tandem's: a line per epoch it trained, no Ray or DeepSpeed
    # chatter; that went to the run folder's console.log.
    assert f"[tandem] epoch  {DRIVER_KILL_EPOCHS}/{DRIVER_KILL_EPOCHS}" in output, output[-3000:]
    assert_no_chatter(output)
    # The killed run's log stays; the resumed run's is the next one.
    assert "(RayTrainWorker pid=" in (run_dir / "console.log").read_text()
    assert "[tandem] resumed from" in (run_dir / "console-2.log").read_text()
    restored = re.search(r"\[tandem\] resumed from .* step (\d+)\)", output)
    assert restored, f"the resumed workers did not say they loaded a checkpoint:\n{output[-3000:]}"
    restored_step = int(restored.group(1))
    # The newest checkpoint can be one epoch ahead of metrics.jsonl: Ray Train registers it before
    # the controller callback appends the epoch's line, and the SIGKILL may land between the two.
    assert restored_step in (last_checkpointed_epoch * STEPS_PER_EPOCH, (last_checkpointed_epoch + 1) * STEPS_PER_EPOCH), (
        restored_step,
        epochs,
    )
    first_resumed_epoch = restored_step // STEPS_PER_EPOCH + 1
    # At most one checkpoint interval of the work done when the driver died is lost. Of the steps
    # the orphaned workers ran after it, those past the last checkpoint their dying controller
    # still registered are redone.
    assert step_at_kill - restored_step <= STEPS_PER_EPOCH, (step_at_kill, restored_step, last_step_reached)
    assert epochs[len(before) :] == list(range(first_resumed_epoch, DRIVER_KILL_EPOCHS + 1)), epochs
    assert history[-1]["step"] == DRIVER_KILL_EPOCHS * STEPS_PER_EPOCH
    manifest = verify_artifact(run_dir / "artifacts")
    assert manifest["epochs"] == DRIVER_KILL_EPOCHS and Path(manifest["run_dir"]).resolve() == run_dir.resolve()
    config = small(storage, f"training.epochs={DRIVER_KILL_EPOCHS}")
    accuracy = artifact_accuracy(run_dir / "artifacts", config)
    assert accuracy == pytest.approx(history[-1]["val_accuracy"], abs=1e-6)

    record(
        "training_driver_kill",
        faults_injected=1,
        survived=True,
        killed_at_step=step_at_kill,
        last_step_reached=last_step_reached,
        steps_after_kill=last_step_reached - step_at_kill,
        total_steps=DRIVER_KILL_EPOCHS * STEPS_PER_EPOCH,
        last_checkpointed_epoch=last_checkpointed_epoch,
        first_resumed_epoch=first_resumed_epoch,
        lost_steps=max(0, step_at_kill - restored_step),
        redone_steps=last_step_reached - restored_step,
        checkpoint_interval_steps=config.training.checkpoint.every_epochs * STEPS_PER_EPOCH,
        leaked_processes=len(leaked) + len(leaked_after_resume),
        ray_processes_gone_after_s=round(cleanup_s, 1),
        resume_run_s=round(resume_s, 1),
        final_step=history[-1]["step"],
        artifact_verified=True,
        artifact_val_accuracy=round(accuracy, 4),
        run_s=round(time.monotonic() - started, 1),
    )
