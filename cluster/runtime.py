"""Connecting to Ray: local single-node, simulated multi-node, or an existing cluster.

`connect(config)` is a context manager: it starts (or joins) Ray for the configured address and
shuts down only what it started, so a test session that already has Ray keeps it.

Node groups become Ray custom resources the same way everywhere, through `node_group_resource`:
each node of a group offers `NODE_GROUP_CAPACITY` units of its group's resource and every worker
or replica pinned to the group asks for one unit, so pinning never limits packing (CPUs and GPUs
do that). KubeRay's `rayStartParams` uses the same two functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, Deployment, Problem, RuntimeEnv, TandemConfig
from cluster.storage import CACHE_ENV, Location, StorageError, atomic_write_bytes, cache_dir, location, reachable_problem

logger = logging.getLogger("tandem.cluster")
NODE_GROUP_CAPACITY = 1000


def node_group_resource(group: str) -> str:
    """The Ray custom resource that marks a node as a member of a node group."""
    return f"group_{group}"


def node_group_resources(group: str) -> dict[str, float]:
    """Resources one node of the group offers for pinning."""
    return {node_group_resource(group): NODE_GROUP_CAPACITY}


def pin_to_group(group: str | None) -> dict[str, float]:
    """Resources a task or actor asks for to land on a node of the group (empty when unpinned)."""
    return {node_group_resource(group): 1} if group else {}


# Never uploaded with a working_dir: a virtual environment alone is about 1.8 GB, over Ray's
# 500 MiB package limit. Ray also skips what .gitignore and .rayignore list.
UPLOAD_EXCLUDES = [".venv", ".git", ".cache", "__pycache__", "*.egg-info", ".pytest_cache"]


def runtime_env(runtime: RuntimeEnv, env_vars: dict[str, str] | None = None, upload: Path | None = None) -> dict[str, Any]:
    """The Ray runtime_env of `cluster.runtime_env`, for jobs, RayJobs and Serve applications.

    env_vars: Tandem's own variables; the config's `cluster.runtime_env.env_vars` win over them.
    upload: a local folder to upload as the working_dir (`tandem submit`). Without it only a
    remote working_dir URI passes: a Serve config file refuses a local folder, and in a RayJob it
    would be the submitter pod's folder, not the user's checkout (the code is in the image).
    """
    env: dict[str, Any] = {}
    if upload is not None:
        env["working_dir"] = str(upload)
        env["excludes"] = list(UPLOAD_EXCLUDES)
    elif runtime.working_dir and "://" in runtime.working_dir:
        env["working_dir"] = runtime.working_dir
    merged = {**(env_vars or {}), **runtime.env_vars}
    if merged:
        env["env_vars"] = merged
    if runtime.pip:
        env["pip"] = list(runtime.pip)
    return env


DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"


def apply_auth_mode(config: TandemConfig) -> None:
    """Set RAY_AUTH_MODE from the config unless the user already set it.

    Ray 2.60 enables token auth for clusters it starts locally; a client of a head started with
    `ray start` must send the token too (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token),
    which it only does with RAY_AUTH_MODE=token. We keep it on by default: it is what protects a
    real cluster's job API. For a cluster Tandem starts itself we create the token file when there
    is none (as `ray get-auth-token --generate` does); for a remote cluster the user brings theirs.
    """
    mode = os.environ.setdefault("RAY_AUTH_MODE", config.cluster.auth)
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_PATH.exists()
    if mode == "token" and config.cluster.address == "local" and not has_token:
        DEFAULT_TOKEN_PATH.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(DEFAULT_TOKEN_PATH, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    # Ray caches its config (the auth mode among it) at import; refresh it so this process sees the mode.
    from ray._raylet import Config

    Config.initialize("")


def local_num_cpus(config: TandemConfig) -> float:
    """Logical CPUs for a single-node local Ray: training workers plus serving replicas, at least 4.

    Logical CPUs may exceed the physical cores; Ray only uses them for scheduling.
    """
    if config.cluster.local.num_cpus:
        return config.cluster.local.num_cpus
    training = config.training.workers * config.training.cpus_per_worker + 1
    # 'auto' replica counts resolve against this machine's cores, as build_app will resolve them.
    cores = len(os.sched_getaffinity(0))
    serving = sum(d.cpus * d.autoscaling.bounds(replica_slots(config, d, cores))[1] for d in config.serving.deployments) + 1
    return max(4.0, training, serving)


def replica_slots(config: TandemConfig, deployment: Deployment, cores: int, gpus: int = 0) -> int:
    """Replicas the serving hardware holds: one per `threads` cores, or per `gpus` GPUs.

    A deployment pinned to a node group counts that group's nodes at their most (the config says
    what they hold); any other counts `cores` and `gpus` (the cluster's, or this machine's).
    """
    group = config.cluster.node_groups.get(deployment.node_group or "")
    if group is not None:
        cores, gpus = int(group.cpus * group.max_replicas), group.gpus * group.max_replicas
    if deployment.gpus > 0:
        return int(gpus // deployment.gpus)
    return cores // deployment.threads


@dataclass
class RayHandle:
    """What `connect` started; `nodes` lists the simulated nodes' ids per group when simulating."""

    address: str
    started: bool
    simulated_cluster: Any = None
    nodes: dict[str, list[str]] = field(default_factory=dict)


def _start_simulated_cluster(config: TandemConfig) -> tuple[Any, dict[str, list[str]]]:
    from ray.cluster_utils import Cluster

    # Cluster writes its address file under RAY_TMPDIR and ignores temp_dir (stack notes).
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="tandem-ray-"))
    # The head runs the drivers' and controllers' actors; it belongs to no node group.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": config.cluster.local.include_dashboard})
    nodes: dict[str, list[str]] = {}
    for name, group in config.cluster.node_groups.items():
        count = max(1, group.replicas if group.replicas is not None else group.min_replicas)
        for _ in range(count):
            # Each node its own artifact cache, as separate machines have (cluster/storage.py):
            # what one node downloaded, another must download again.
            cache = {CACHE_ENV: str(cache_dir() / "simulated-nodes" / f"{name}-{len(nodes.get(name, []))}")}
            node = cluster.add_node(num_cpus=group.cpus, resources=node_group_resources(name), env_vars=cache)
            nodes.setdefault(name, []).append(node.node_id)
    cluster.wait_for_nodes()
    return cluster, nodes


@contextlib.contextmanager
def connect(config: TandemConfig) -> Iterator[RayHandle]:
    """Start or join Ray for `config.cluster.address`; shut down on exit only what was started here."""
    import ray

    apply_auth_mode(config)
    if ray.is_initialized():
        yield RayHandle(address="existing", started=False)
        return
    address = config.cluster.address
    if address == "local" and os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` (or with RAY_ADDRESS set) a local config joins that cluster
        # instead of starting a second Ray: the plain `ray job submit -- tandem train x.yaml` form.
        address = "auto"
    handle: RayHandle
    if address == "local" and config.cluster.local.simulate_nodes:
        cluster, nodes = _start_simulated_cluster(config)
        ray.init(address=cluster.address, log_to_driver=True)
        handle = RayHandle(address=cluster.address, started=True, simulated_cluster=cluster, nodes=nodes)
    elif address == "local":
        resources: dict[str, float] = {}
        # A single node plays every node group, so pinned workers and replicas still place.
        for name in config.cluster.node_groups:
            resources.update(node_group_resources(name))
        start_local_ray(
            num_cpus=local_num_cpus(config),
            resources=resources,
            include_dashboard=config.cluster.local.include_dashboard,
            log_to_driver=True,
        )
        handle = RayHandle(address="local", started=True)
    else:
        # 'auto' joins RAY_ADDRESS or a running local head; 'ray://' uses Ray Client.
        ray.init(address=address, log_to_driver=True)
        handle = RayHandle(address=address, started=True)
    try:
        yield handle
    finally:
        if handle.started:
            ray.shutdown()
            if handle.simulated_cluster is not None:
                handle.simulated_cluster.shutdown()


LOCAL_START_ATTEMPTS = 3


def start_local_ray(**init_kwargs: Any) -> None:
    """ray.init of a new local Ray, tried again when the node misses Ray's start-up deadline.

    Ray gives a new raylet a fixed 30 s to register; on a loaded machine (a laptop compiling, a CI
    runner running other jobs) it sometimes misses it and ray.init raises "The current node timed
    out during startup". A second try almost always starts; any other error is raised at once.
    """
    import ray

    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(**init_kwargs)
            return
        except Exception as exc:
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == LOCAL_START_ATTEMPTS:
                raise
            logger.warning(
                "the local Ray missed its start-up deadline (attempt %d of %d); starting it again", attempt, LOCAL_START_ATTEMPTS
            )


def storage_root(config: TandemConfig) -> Location:
    """Where the config's run state lives: an absolute local folder (Ray Train needs absolute
    paths) or an object-store URI (cluster/storage.py)."""
    return location(config.cluster.storage)


def require_reachable_storage(config: TandemConfig) -> None:
    """Refuse, naming cluster.storage, an object store whose bucket is missing or that refuses or
    does not answer; checked once per verb before Ray starts (a folder needs no request)."""
    problem = reachable_problem(storage_root(config))
    if problem:
        raise ConfigError([Problem(path="cluster.storage", value=config.cluster.storage, message=problem)])


def nodes_missing_storage(root: Location) -> list[str]:
    """The alive Ray nodes that do not see the local `root` folder as this driver does (each one's
    IP), found by a marker file this driver writes and a zero-CPU task on each node reads.

    A local cluster.storage on a cluster of more than one node must be one shared mount at the same
    path everywhere: Ray Train's workers write checkpoints there and replicas read artifacts there.
    An object-store URI, or a single node, needs no check.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if root.remote:
        return []
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return []
    token = secrets.token_hex(8)
    marker = root.path / f".tandem-shared-{token}"
    atomic_write_bytes(marker, token.encode())

    @ray.remote(num_cpus=0, max_retries=0)
    def reads_marker(path: str) -> bool:
        try:
            return Path(path).read_text() == token
        except OSError:
            return False

    try:
        seen = ray.get(
            [
                reads_marker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
                for n in nodes
            ],
            timeout=120,
        )
    finally:
        marker.unlink(missing_ok=True)
    return [n.get("NodeManagerAddress", n["NodeID"]) for n, ok in zip(nodes, seen, strict=True) if not ok]


def require_shared_storage(config: TandemConfig) -> None:
    """Refuse a run whose local cluster.storage some of the cluster's nodes do not see."""
    missing = nodes_missing_storage(storage_root(config))
    if missing:
        raise StorageError(
            f"cluster.storage: {config.cluster.storage} is not visible at the same path on node(s) {', '.join(missing)}; "
            "on a cluster of more than one node use a folder every node mounts (NFS, a ReadWriteMany claim) or an "
            "object-store URI such as s3://bucket/runs"
        )
