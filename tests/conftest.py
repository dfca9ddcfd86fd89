"""Shared fixtures. Unit tests must never start Ray; integration tests share one local Ray."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# DeepSpeed compiles its ops on first use into the environment's extension cache
# (TORCH_EXTENSIONS_DIR, else <venv>/var/torch_extensions, training/ds_config.py): the same cache
# `tandem` uses when run by hand, so either pays once.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _unit_tests_never_start_ray(request, monkeypatch):
    """Fail any test under tests/unit that calls ray.init (Ray's serve/tests/unit does the same)."""
    if "tests/unit" not in str(request.path).replace(os.sep, "/"):
        yield
        return
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("unit tests must not start Ray; move this test to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
    yield


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole integration session (logical CPUs above the 2 physical cores)."""
    import ray

    # A loaded 2-core machine sometimes misses Ray's start-up deadlines; try again before failing
    # every integration test of the session at once.
    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(
                num_cpus=8,
                resources={"group_cpu": 1000, "group_gpu": 1000},
                include_dashboard=False,
                log_to_driver=True,
            )
        except Exception as exc:
            ray.shutdown()
            if attempt == 2:
                raise
            # Said, not hidden: the retry shows in pytest's warnings summary.
            said = f"the session's Ray failed to start (attempt {attempt + 1} of 3), starting it again: {exc!r}"
            warnings.warn(said, RuntimeWarning, stacklevel=1)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_artifact(tmp_path_factory):
    """(storage, artifacts folder) of a small MLP trained outside Tandem, brought in with `tandem
    import` and exported (ONNX fp32 and int8): the model of the serving tests that only need "a
    model" (two deployments, autoscaling, tandem predict, faults, overload). test_serving.py keeps its own two, whose
    versions a rollout tells apart."""
    from tests.integration.test_serving import make_artifact

    storage = tmp_path_factory.mktemp("shared-artifact")
    return storage, make_artifact(storage, "digits-shared", seed=3, run="run-1")


@pytest.fixture
def ray_tmp():
    """A Ray temp dir of a `tandem` subprocess's own (short: Ray's socket paths must stay below 107
    characters), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="tdm-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
