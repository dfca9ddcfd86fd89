"""`tandem run` end to end on the packaged example (shortened for CI): train -> export -> serve -> load -> summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.artifacts import verify_artifact
from tests.e2e.test_console import assert_no_chatter

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_tandem_run_on_the_packaged_default(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "tandem.cli",
        "run",
        "--requests",
        "120",
        "--set",
        f"cluster.storage={tmp_path}",
        "--set",
        "training.epochs=3",
        "--set",
        "export.latency_batch_sizes=[1, 32]",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    (artifact,) = [p.parent for p in tmp_path.rglob("artifacts/manifest.json")]
    manifest = verify_artifact(artifact)
    assert {"model.pt", "model.onnx", "model.int8.onnx"} <= set(manifest["files"])
    # The summary says the served predictions equal the artifact's engine, and no request failed.
    assert "served == artifact │ 100.0% of held-out examples" in out or "100.0% of held-out examples" in out
    assert " 0 failed at concurrency" in out
    assert "run folder:" in out
    # A console for people: Tandem's progress, not Ray's and DeepSpeed's; theirs is in the run's log.
    for epoch in (1, 2, 3):
        assert f"[tandem] epoch   {epoch}/3" in out
    assert_no_chatter(out)
    logged = (artifact.parent / "console.log").read_text()
    assert "(RayTrainWorker pid=" in logged and "[tandem] epoch   3/3" in logged
