"""What a person sees when `tandem train` runs: Tandem's lines, not Ray's and DeepSpeed's chatter,
which goes to the run folder's console.log; and a worker's real error still reaches the terminal.

`tandem run`'s console is checked in tests/e2e/test_run.py; the lines per epoch of a resumed
`tandem train` in tests/reliability/test_training_faults.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
VENV_BIN = Path(sys.executable).parent
# Lines the default console showed before it was quiet (quoted in the issue that asked for it).
CHATTER = (
    "Reporting training result",
    "Checkpoint successfully created",
    "FutureWarning",
    "PreemptionWatcher",
    "Failed to query Ray Train Controller actor state",
    "(RayTrainWorker pid=",
    "(TrainController pid=",
    "Started a local Ray instance",
)
BROKEN_BUILDER = '''
import ray

from training.models import mlp


def build(input_shape, num_classes, **args):
    """Builds on the driver (the pre-flight check passes) and raises inside a Ray Train worker."""
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id():
        raise RuntimeError("the model builder failed inside the worker: layer sizes 7 and 9 disagree")
    return mlp(input_shape, num_classes, **args)
'''


def assert_no_chatter(text: str) -> None:
    shown = [line for line in text.splitlines() if any(c in line for c in CHATTER)]
    assert not shown, "library chatter on the console:\n" + "\n".join(shown[:10])


def tandem(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TANDEM_VERBOSE")}
    env.update(PYTHONPATH=str(cwd), RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu")
    return subprocess.run([str(VENV_BIN / "tandem"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_worker_error_reaches_the_quiet_console_and_the_chatter_goes_to_the_log(tmp_path):
    (tmp_path / "broken_model.py").write_text(BROKEN_BUILDER)
    done = tandem(
        [
            "train",
            "--set",
            f"cluster.storage={tmp_path / 'runs'}",
            "--set",
            "model.builder=broken_model:build",
            "--set",
            "training.max_failures=0",
            "--set",
            "training.epochs=1",
        ],
        tmp_path,
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "layer sizes 7 and 9 disagree" in out, out[-3000:]
    assert "[tandem] run folder" in out
    (log,) = tmp_path.glob("runs/digits/*/console.log")
    assert f"[tandem] log of Ray, DeepSpeed and the workers: {log}" in out
    # What the console left out is in the log: the workers' own output, the error's traceback.
    logged = log.read_text()
    assert "(RayTrainWorker pid=" in logged and "layer sizes 7 and 9 disagree" in logged
    # The traceback's frames of Ray's internals are not what a person needs; the console shows the
    # error and where the log is, not Ray's start-up and worker lines.
    assert_no_chatter("\n".join(line for line in out.splitlines() if "layer sizes" not in line))
