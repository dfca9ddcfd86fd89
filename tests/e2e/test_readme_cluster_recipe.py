"""README.md's "Running on a Ray cluster" recipe, run as written against a token-auth head (the ray_head fixture).

The test reads the section's `bash` blocks from README.md at run time, so it runs whatever the
README says today: change the text and this test runs the new text. It replaces only `HEAD` (the
head's address: the fixture's dashboard for `HEAD:8265`, its host elsewhere) and the value of the
one `STORAGE=` line (a pytest tmp folder, which the fixture's single-node cluster shares).

Every block starts with `# on the head` or `# where you submit from`. The head's blocks run in the
head's shell, less their `ray start` (the fixture started the head); what they print is the
token, which is pasted into the submitting shell where the README says to paste it. That shell
has no token of its own (no RAY_AUTH_* variables, a HOME without ~/.ray): the token comes the way
the README says or not at all. The submitting blocks then run in order in one bash, in an empty
project folder: `ray job submit ... -- tandem train`, `tandem serve-config --for cluster`,
`serve deploy`, `curl`.

What it proves: those commands, as a reader copies them, train on the cluster, serve the model
that job trained with no manual export step, and the final request answers a prediction from it
(the served model_version is the one of the only artifact in STORAGE, which the job wrote).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from cluster.artifacts import model_version, verify_artifact
from tests.e2e.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

SECTION = "## Running on a Ray cluster"
HEAD_MARK = "# on the head"
CLIENT_MARK = "# where you submit from"
SERVE_PORT = 8000  # the packaged config's serving.port, which the README's curl names
HEAD_TIMEOUT_S = 120
RECIPE_TIMEOUT_S = 2000  # a training job, its export, and Serve starting an ONNX replica, on 2 shared cores
CLEANUP_TIMEOUT_S = 180


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    assert f"\n{title}\n" in text, f"README.md has no section {title!r}"
    after = text.split(f"\n{title}\n", 1)[1]
    return re.split(r"^## ", after, maxsplit=1, flags=re.MULTILINE)[0]


def bash_blocks(section: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)


def blocks_by_kind(section: str) -> tuple[list[str], list[str]]:
    """(head blocks, client blocks) in README order; an unmarked block fails: the test would not know where it runs."""
    blocks = bash_blocks(section)
    assert blocks, f"README.md's {SECTION!r} has no ```bash blocks to run"
    head, client = [], []
    for block in blocks:
        first = block.splitlines()[0]
        if first.startswith(HEAD_MARK):
            head.append(block)
        elif first.startswith(CLIENT_MARK):
            client.append(block)
        else:
            raise AssertionError(f"a ```bash block of {SECTION!r} starts with neither {HEAD_MARK!r} nor {CLIENT_MARK!r}:\n{block}")
    return head, client


def logical_lines(block: str) -> list[str]:
    """Shell lines with their backslash continuations joined."""
    return block.replace("\\\n", " ").splitlines()


def without_ray_start(block: str) -> str:
    """The head's block less the lines that start Ray: the ray_head fixture has started the head."""
    return "\n".join(line for line in logical_lines(block) if not re.search(r"\bray start\b", line))


def at_head(script: str, dashboard: str) -> str:
    """HEAD replaced by the fixture head's address: its dashboard port where the README names 8265, its host elsewhere."""
    host, port = dashboard.removeprefix("http://").rsplit(":", 1)
    return re.sub(r"\bHEAD\b", host, script.replace("HEAD:8265", f"{host}:{port}"))


def with_storage(script: str, storage: Path) -> str:
    """The one marked `STORAGE=` line pointed at `storage`; the rest of the text untouched."""
    assignment = re.compile(r"^STORAGE=\S+", flags=re.MULTILINE)
    assert len(assignment.findall(script)) == 1, f"expected one `STORAGE=` line in the submitting blocks:\n{script}"
    return assignment.sub(f"STORAGE={storage}", script)


def submitting_shell_env(ray_head, home: Path) -> dict[str, str]:
    """A user's shell on another machine: Tandem and Ray on PATH, and no token unless the README supplies it."""
    env = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(home)  # no ~/.ray/auth_token to fall back on
    return env


def bash(script: str, cwd: Path, env: dict[str, str], stdin: str, timeout: float) -> subprocess.CompletedProcess:
    """`script` in one bash, stopping at the first failing command; on a timeout its whole process group
    (the job client, curl) is killed, so nothing it started outlives the test."""
    process = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"the recipe did not finish within {timeout} s:\n{(stdout + stderr)[-6000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_port_free(port: int) -> None:
    # The README's curl names the packaged config's port; another server there would answer instead of the recipe's app.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no server
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            raise AssertionError(f"port {port}, where the README's recipe serves and curls, is taken on this machine: {exc}") from None


def the_jobs_artifact(storage: Path) -> Path:
    manifests = list(storage.glob("*/*/artifacts/manifest.json"))
    assert len(manifests) == 1, f"expected the one artifact the job wrote under {storage}, found {manifests}"
    folder = manifests[0].parent
    verify_artifact(folder)  # every file against its sha256
    return folder


def last_json_line(stdout: str) -> dict:
    """The final curl's answer: the last line of the shell's output (curl prints no newline after the body)."""
    last = stdout.rstrip("\n").rsplit("\n", 1)[-1]
    try:
        return json.loads(last)
    except json.JSONDecodeError:
        raise AssertionError(f"the recipe's last output is not the prediction's JSON:\n{stdout[-4000:]}") from None


def test_the_readme_cluster_recipe_trains_on_the_cluster_and_serves_that_model(ray_head, tmp_path):
    head_blocks, client_blocks = blocks_by_kind(readme_section(SECTION))
    assert any(re.search(r"\bray start --head\b", b) for b in head_blocks), "the section no longer says how to start the head"
    client_script = "\n".join(client_blocks)
    for step in ("ray job submit", "tandem train", "serve-config", "--for cluster", "serve deploy", "curl"):
        assert step in client_script, f"the section's submitting blocks no longer have {step!r}:\n{client_script}"
    assert "HEAD:8265" in client_script, "the submitting blocks no longer name the head HEAD:8265: the test cannot point them at its head"
    assert_port_free(SERVE_PORT)

    # On the head: what it prints is the token the user copies.
    token = bash("\n".join(without_ray_start(b) for b in head_blocks), tmp_path, ray_head.env, "", HEAD_TIMEOUT_S)
    assert token.returncode == 0, token.stdout + token.stderr
    assert token.stdout.strip() == ray_head.env["RAY_AUTH_TOKEN"], "the head's blocks should print the head's token"

    project, home, storage = tmp_path / "project", tmp_path / "home", tmp_path / "shared-runs"
    project.mkdir()
    home.mkdir()
    script = with_storage(at_head(client_script, ray_head.address), storage)
    try:
        # Pasted, then Enter, where the README says to paste it.
        recipe = bash(script, project, submitting_shell_env(ray_head, home), token.stdout.strip() + "\n", RECIPE_TIMEOUT_S)
        output = recipe.stdout + recipe.stderr
        assert recipe.returncode == 0, f"the recipe stopped with {recipe.returncode}:\n{output[-8000:]}"

        artifact = the_jobs_artifact(storage)
        answer = last_json_line(recipe.stdout)
        assert answer.get("model_version") == model_version(artifact), (answer, artifact)
        assert len(answer["predictions"]) == 1 and answer["predictions"][0] in range(10), answer
        probabilities = answer["probabilities"][0]
        assert len(probabilities) == 10 and abs(sum(probabilities) - 1) < 1e-3, answer
        assert answer["deployment"] == "cpu", answer  # the packaged example's ONNX deployment answered, not the cache
    finally:
        # The head is shared with the other e2e tests: this recipe's app goes.
        ray_head.run(["serve", "shutdown", "-y", "--address", ray_head.address], timeout=CLEANUP_TIMEOUT_S)
