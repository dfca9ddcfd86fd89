"""Shared fixtures. Unit tests must never start Ray; integration tests share one local Ray."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
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


@dataclass
class S3Store:
    """An S3-compatible server on loopback (moto's standalone server) and one bucket in it."""

    endpoint: str
    bucket: str
    env: dict[str, str]  # what a user's shell has for an S3-compatible store: keys, region, endpoint

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """moto's standalone S3 server, started here on loopback (what Ray's own storage tests use),
    with a bucket `tandem-runs`; its variables are the ones boto3, the AWS CLI and pyarrow read."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "tandem-test",
        "AWS_SECRET_ACCESS_KEY": "tandem-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    store = S3Store(endpoint=endpoint, bucket="tandem-runs", env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                store.client().create_bucket(Bucket=store.bucket)
                break
            except Exception:  # not listening yet (botocore's connection errors have no common base)
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield store
    finally:
        server.terminate()
        server.wait(timeout=30)


# Headless Chromium, for the pages people look at (the profile report, the docs site) -----------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed here only as root with apt, in CI or with TANDEM_INSTALL_CHROMIUM=1.

    Without it the test skips, except in CI (CI=true): there the HTML check is part of the run, so
    a chromium that is missing or whose install failed fails the test with apt-get's own words."""
    path = shutil.which("chromium")
    in_ci = os.environ.get("CI") == "true"
    allowed = in_ci or os.environ.get("TANDEM_INSTALL_CHROMIUM") == "1"
    why = "chromium not installed (apt-get install chromium)"
    if path is None and allowed and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        steps = []
        for command, timeout in ((["apt-get", "update", "-qq"], 600), (["apt-get", "install", "-y", "-qq", "chromium"], 1200)):
            try:
                done = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
                steps.append(f"$ {' '.join(command)} -> exit {done.returncode}\n{(done.stdout + done.stderr)[-1500:]}")
            except subprocess.TimeoutExpired:
                steps.append(f"$ {' '.join(command)} -> timed out after {timeout} s")
        path = shutil.which("chromium")
        why = "apt-get could not install chromium:\n" + "\n".join(steps)
    elif path is None and in_ci:
        why += f"; CI cannot install it (apt-get {'found' if shutil.which('apt-get') else 'missing'}, uid {os.geteuid()})"
    if path is None:
        if in_ci:
            pytest.fail(f"CI=true and {why}", pytrace=False)
        pytest.skip(why)
    return path


def run_chromium(chromium: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def screenshot(chromium: str, url: str, width: int, height: int, tmp_path: Path) -> tuple[Path, tuple[int, int], int]:
    """A headless screenshot of `url` once it has loaded: (its file, its size, how many colours it
    holds; a blank or unstyled page has few)."""
    from PIL import Image

    shot = tmp_path / "screenshot.png"
    window = [f"--window-size={width},{height}", "--hide-scrollbars", "--virtual-time-budget=10000"]
    run_chromium(chromium, [*window, f"--screenshot={shot}", url], tmp_path)
    with Image.open(shot) as image:
        return shot, image.size, len(image.convert("RGB").getcolors(maxcolors=1 << 20) or range(1 << 20))
