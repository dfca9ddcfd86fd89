"""E2E fixtures: a real `ray start --head` on loopback, with token authentication as a user has it.

The head gets its own --temp-dir and ports, so it never meets another Ray on the same machine,
and a token of its own in RAY_AUTH_TOKEN (with RAY_AUTH_MODE=token), so a user's
~/.ray/auth_token is neither read nor written. `ray stop` would stop every Ray of this user on
the machine; the fixture ends its own head instead: SIGTERM to `ray start --block` (which then
stops the processes it started), then its process group, then `<temp-dir>/ray_current_cluster`,
which would otherwise send a later `ray.init()` to the dead cluster.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.runtime import node_group_resources

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60
GRACEFUL_STOP_S = 8
START_ATTEMPTS = 3


@dataclass
class RayHead:
    address: str  # the dashboard, where jobs are submitted: http://127.0.0.1:PORT
    temp_dir: Path
    gcs: str  # what a driver joins: RAY_ADDRESS=127.0.0.1:PORT
    env: dict[str, str]  # a user's shell for this cluster: PATH with the venv, RAY_AUTH_MODE, RAY_AUTH_TOKEN, the S3 store's variables
    cache: Path | None = None  # the head node's artifact cache (TANDEM_CACHE_DIR of its processes)

    def run(self, args: list[str], timeout: float, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a command as the user would, with `timeout` as a hard bound."""
        return subprocess.run(args, cwd=cwd, env=env or self.env, capture_output=True, text=True, timeout=timeout)


FIXED_PORTS_FROM = 30000


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to bind(0) and connect() (Linux's ip_local_port_range)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(count: int) -> list[int]:
    """Free ports below the kernel's ephemeral range (held together, so they differ).

    Not bind(0)'s own choice: a port it hands out and this function releases goes back to the
    ephemeral pool, where the Ray processes that start next (a head's workers, each binding port 0)
    can be given it before the process it was chosen for binds it. (Every job submission to one
    head failed with "No available agent" in a CI run; a port taken that way was the likeliest cause.)"""
    # Above the heads' worker port ranges (20000-29999, start_head) and below the ephemeral ones.
    low = max(ephemeral_range()[0], FIXED_PORTS_FROM + 1000)
    chosen: list[int] = []
    sockets = []
    try:
        while len(chosen) < count:
            port = random.randrange(FIXED_PORTS_FROM, low)
            candidate = socket.socket()
            try:
                candidate.bind(("127.0.0.1", port))
            except OSError:
                candidate.close()
                continue
            sockets.append(candidate)
            chosen.append(port)
        return chosen
    finally:
        for s in sockets:
            s.close()


def user_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # an activated venv: `tandem` and `ray` on PATH
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        DS_ACCELERATOR="cpu",
    )
    return env


def head_command(temp_dir: Path, ports: list[int], worker_ports: int) -> list[str]:
    gcs, dashboard, client, node_manager, object_manager, agent_listen, agent_grpc, metrics, runtime_env = ports
    return [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=4",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--min-worker-port={worker_ports}",
        f"--max-worker-port={worker_ports + 199}",
        # The packaged example's node group, as KubeRay's rayStartParams give it to worker pods.
        f"--resources={json.dumps(node_group_resources('cpu'))}",
        "--disable-usage-stats",
    ]


def wait_until_started(url: str, token: str, process: subprocess.Popen, log: Path) -> None:
    """Until `ray start` says it started and the dashboard answers an authenticated request.

    The dashboard can answer before `ray start` gives up on a slow raylet (it waits 30 s for it
    to register, then stops everything), so both must hold.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HeadDidNotStart(f"`ray start --head` exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if "Ray runtime started" in log.read_text():
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
        time.sleep(1)
    raise HeadDidNotStart(f"the Ray head at {url} was not up within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop_head(process: subprocess.Popen, temp_dir: Path) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            # `ray start --block` stops its processes one by one on SIGTERM (about 30 s here, most
            # of it waiting on the dashboard); after a short grace the group is killed outright.
            # Its workers sit in process groups of their own and exit when their raylet is gone.
            process.wait(timeout=GRACEFUL_STOP_S)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left of this head (its own session, so its own group) and nothing else.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=STOP_TIMEOUT_S)
    (temp_dir / "ray_current_cluster").unlink(missing_ok=True)
    shutil.rmtree(temp_dir, ignore_errors=True)


class HeadDidNotStart(RuntimeError):
    pass


def start_head(env: dict[str, str], token: str, log: Path) -> tuple[subprocess.Popen, RayHead]:
    # Short: Ray's socket paths under the temp dir must stay below 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="tdm-", dir="/tmp"))
    ports = free_ports(9)
    worker_ports = random.randrange(20000, 29800, 200)
    with open(log, "w") as out:
        process = subprocess.Popen(
            head_command(temp_dir, ports, worker_ports), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(address=f"http://127.0.0.1:{ports[1]}", temp_dir=temp_dir, gcs=f"127.0.0.1:{ports[0]}", env=env)
    try:
        wait_until_started(head.address, token, process, log)
    except BaseException:
        stop_head(process, temp_dir)
        raise
    return process, head


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory, s3_store) -> RayHead:
    """One Ray head for the e2e tests (`serve deploy`, job submission), stopped at the end: a head
    costs seconds to start and more to stop on this 2-core machine, and each test cleans up its
    own Serve app or job. Its node has the S3 store's variables (tests/conftest.py `s3_store`), as
    a cluster's nodes have their store's credentials, and an artifact cache of its own.

    A loaded machine can make the raylet miss `ray start`'s fixed 30 s registration window; the
    head is then started again, up to START_ATTEMPTS times, each time on fresh ports.
    """
    token = secrets.token_hex(32)
    cache = tmp_path_factory.mktemp("head-cache")
    env = {**user_env(token), **s3_store.env, "TANDEM_CACHE_DIR": str(cache)}
    logs = tmp_path_factory.mktemp("ray-head")
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            process, head = start_head(env, token, logs / f"ray-start-{attempt}.log")
            break
        except HeadDidNotStart as exc:
            if attempt == START_ATTEMPTS:
                raise
            # Said, not hidden: the retry shows in pytest's warnings summary.
            said = f"the e2e Ray head failed to start (attempt {attempt} of {START_ATTEMPTS}), starting it again: {exc}"
            warnings.warn(said, RuntimeWarning, stacklevel=1)
    head.cache = cache
    try:
        yield head
    finally:
        stop_head(process, head.temp_dir)


@pytest.fixture(scope="package", autouse=True)
def _session_ray_ended():
    """The e2e tests run last (pyproject's testpaths) and start Ray in their own processes; the
    session's local Ray (tests/conftest.py `ray_session`) and any Serve instance in it would idle on
    for their minutes at about 9% of a core (measured here), so it ends before them."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
