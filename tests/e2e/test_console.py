"""What a person sees when `tandem train` runs: Tandem's lines, not Ray's and DeepSpeed's chatter,
which goes to the run folder's console.log; and a worker's real error still reaches the terminal.

`tandem run`'s console is checked in tests/e2e/test_run.py; the lines per epoch of a resumed
`tandem train` in tests/reliability/test_training_faults.py.
"""

from __future__ import annotations

import os
import signal
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


def tandem_env(cwd: Path, **extra: str) -> dict[str, str]:
    """A user's shell in `cwd` (their modules importable), quiet unless `extra` says otherwise. A wide
    terminal: Rich folds lines at its width, and a test's long tmp paths would break across lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TANDEM_VERBOSE")}
    env.update(PYTHONPATH=str(cwd), RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu", COLUMNS="400")
    env.update(extra)
    return env


def ctrl_c_reaches() -> None:
    """preexec_fn of a child that must take Ctrl-C as at a terminal: SIGINT's default action, also
    where the tests run with SIGINT ignored (a background job of a non-interactive shell)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_in_terminal(args: list[str], out, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """`args` started as a terminal's foreground job: a process group of its own (what Ctrl-C
    signals), SIGINT's default action, stdout and stderr into `out`."""
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=ctrl_c_reaches)


def tandem(args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """The installed `tandem` command, as a user runs it in `cwd`; `env` adds to their shell."""
    return subprocess.run(
        [str(VENV_BIN / "tandem"), *args], cwd=cwd, env=tandem_env(cwd, **env), capture_output=True, text=True, timeout=timeout
    )


def assert_refused(done: subprocess.CompletedProcess, message: str) -> None:
    """Exit 1 with Tandem's one-line error (`error MESSAGE` on stderr) and no Python traceback."""
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert f"error {message}" in done.stderr, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


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
    # Tandem's error line, then the worker's own error (its traceback snippet, from Ray) inside that
    # message; no traceback of the `tandem` command itself, which a crash of the CLI would print.
    assert done.returncode == 1 and "error training failed (run folder " in done.stderr, out[-3000:]
    before, error = done.stderr.split("error training failed (run folder ", 1)
    assert "Traceback" not in before + done.stdout and "tandem/cli.py" not in done.stderr, out[-3000:]
    assert "layer sizes 7 and 9 disagree" in error, out[-3000:]
    assert "[tandem] run folder" in out
    (log,) = tmp_path.glob("runs/digits/*/console.log")
    assert f"[tandem] log of Ray, DeepSpeed and the workers: {log}" in out
    # What the console left out is in the log: the workers' own output, the error's traceback.
    logged = log.read_text()
    assert "(RayTrainWorker pid=" in logged and "layer sizes 7 and 9 disagree" in logged
    # The traceback's frames of Ray's internals are not what a person needs; the console shows the
    # error and where the log is, not Ray's start-up and worker lines.
    assert_no_chatter("\n".join(line for line in out.splitlines() if "layer sizes" not in line))
