"""Deploying the Serve application from Python, on the driver: `serve`, `shutdown`, `status`, URLs.

    url = serving.deploy.serve(config, artifact="latest")   # deploy (or roll out) and wait until ready
    serving.client.predict(url, [[0.0] * 64])
    serving.deploy.shutdown()

`tandem serve` and `tandem run` call these. A cluster that deploys from a file instead (`serve
deploy`, a RayService) uses serving/serve_config.py; both take their settings from
serving/settings.py, and both build the same `serving.app:build_app`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import serve as ray_serve

from cluster.artifacts import model_version, resolve_artifact
from cluster.config import TandemConfig
from cluster.errors import DeploymentFailedError
from cluster.runtime import storage_root
from serving.app import build_app
from serving.protocol import token_digest
from serving.settings import HAPROXY_READY_TIMEOUT_S, TOKEN_DIGEST_ENV, serve_env

logger = logging.getLogger("tandem.serving")

READY_TIMEOUT_S = 120.0


_local_haproxy_env: dict[str, str] = {}


def local_haproxy_env() -> dict[str, str]:
    """Extra controller settings for a Serve that Tandem starts on this machine (one set per process).

    HAProxy's files go to a private temp folder and its stats and metrics ports to free ports, so
    that several local clusters (tests, developers) do not collide on /tmp/haproxy-serve, 8404
    and 9101 (which HAProxy binds on every interface). The HAProxy manager is the controller's
    child actor and inherits these; replicas do not need them.
    """
    if not _local_haproxy_env:
        # Short: HAProxy refuses socket paths over 97 bytes and Serve adds the 56-character node id.
        state = tempfile.mkdtemp(prefix="thap-", dir="/tmp")
        _local_haproxy_env.update(
            RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=HAPROXY_READY_TIMEOUT_S,
            # HAProxy's 4 default threads compete with the replicas on a small machine; one thread
            # forwards far more requests per second than a Python replica answers.
            RAY_SERVE_HAPROXY_NBTHREAD="1",
            RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=f"{state}/haproxy.cfg",
            RAY_SERVE_HAPROXY_SOCKET_PATH=f"{state}/admin.sock",
            RAY_SERVE_HAPROXY_SERVER_STATE_BASE=state,
            RAY_SERVE_HAPROXY_SERVER_STATE_FILE=f"{state}/server-state",
            RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH=f"{state}/metrics.sock",
            RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
            RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
        )
    return dict(_local_haproxy_env)


_ray_context: Any = None
_started_serve = False  # whether serve() started Serve (shutdown() then stops it; else only the app goes)


# Ports handed out below the kernel's ephemeral range (32768-60999 on Linux), above Ray's worker
# ports (10002-19999) and Serve's direct-ingress range (30000-31000): a port from the ephemeral
# range was once taken by an outgoing connection between being chosen and HAProxy binding it.
FREE_PORT_RANGE = (20000, 29999)


def free_port() -> int:
    """A TCP port free on this machine now, for a listener that binds it soon after."""
    for port in random.sample(range(*FREE_PORT_RANGE), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the range is crowded: fall back to any port the kernel picks
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_front_binary() -> str | None:
    """This installation's `tandem-haproxy` (serving/haproxy_front.py), None when it has none (a
    checkout never installed): HAProxy then runs as Ray configures it, without Tandem's shedding."""
    beside_python = Path(sys.executable).with_name("tandem-haproxy")
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which("tandem-haproxy")
    if found is None:
        logger.warning("tandem-haproxy is not installed (pip install -e .): HAProxy runs without Tandem's shedding")
    return found


def _ensure_ray(config: TandemConfig) -> bool:
    """Start or join Ray for config.cluster unless this process is connected; True if Ray is local."""
    global _ray_context
    import ray

    from cluster.runtime import connect

    if not ray.is_initialized():
        _ray_context = connect(config)
        _ray_context.__enter__()
    return config.cluster.address == "local"


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def base_url(config: TandemConfig) -> str:
    """The stable URL of the app: HAProxy or Serve's proxy plus the route prefix.

    The port is the running Serve's (a Serve started earlier with other http_options keeps them)."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    return f"http://{_client_host(http.host)}:{http.port}{config.serving.route_prefix.rstrip('/')}"


def configured_url(config: TandemConfig) -> str:
    """The app's URL as the config gives it (serving.host, port and route prefix), for a client in
    another process than the one that deployed it."""
    return f"http://{_client_host(config.serving.host)}:{config.serving.port}{config.serving.route_prefix.rstrip('/')}"


def replica_urls(config: TandemConfig) -> list[str]:
    """The ingress replicas' own direct-ingress URLs (empty when direct ingress is off).

    Reads the controller's target groups (a private Serve API: the list HAProxy is fed)."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    groups = ray.get(client._controller.get_target_groups.remote(config.name, from_proxy_manager=True))
    prefix = config.serving.route_prefix.rstrip("/")
    host = _client_host(client.http_config.host)
    urls = []
    for group in groups:
        if group.app_name == config.name and getattr(group.protocol, "value", group.protocol) == "HTTP":
            urls += [f"http://{host}:{t.port}{prefix}" for t in group.targets if t.port != client.http_config.port]
    return urls


def wait_until_ready(url: str, version: str | None = None, timeout_s: float = READY_TIMEOUT_S, token: str | None = None) -> None:
    """Poll GET {url}/healthz until it answers 200 (with `version`, when given)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/healthz", timeout=5, headers=headers)
            if reply.status_code == 200 and (version is None or reply.json().get("version") == version):
                return
            last = f"{reply.status_code} {reply.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise TimeoutError(
        f"{url}/healthz did not answer 200 within {timeout_s:.0f} s (last: {last}); see the Serve logs under Ray's session folder"
    )


def serve(config: TandemConfig, artifact: str = "latest", blocking: bool = False) -> str:
    """Deploy (or roll out in place) the app for `config` serving `artifact`; return its base URL.

    A running app of the same name is updated: Serve starts replicas of the new version and drains
    the old ones, so requests in flight during the rollout are answered.
    """
    local = _ensure_ray(config)
    # Shedding in HAProxy needs tandem-haproxy where HAProxy runs: known here only for a local Ray.
    replica_env = serve_env(config.serving, os.environ, local_front_binary() if local else None)
    controller_env = {**local_haproxy_env(), **replica_env} if local and config.serving.http_path == "haproxy" else dict(replica_env)
    token_env = config.serving.auth.token_env
    if token_env and os.environ.get(token_env):
        # Local convenience: the replicas of an already running Ray do not see this process's env.
        # They get the token's digest, never the token (see TOKEN_DIGEST_ENV).
        replica_env[TOKEN_DIGEST_ENV] = token_digest(os.environ[token_env])
    serving = config.serving
    global _started_serve
    _started_serve = _started_serve or not serve_running()
    ray_serve.start(
        http_options={"host": serving.host, "port": serving.port, "location": "EveryNode"},
        controller_options={"runtime_env": {"env_vars": controller_env}},
    )
    path = resolve_artifact(artifact, storage_root(config), config.name)
    version = model_version(path)
    app = build_app({"config": config.to_dict(), "artifact": str(path), "replica_env": replica_env})
    try:
        ray_serve.run(app, name=config.name, route_prefix=serving.route_prefix, blocking=False)
    except RuntimeError as exc:
        raise deployment_failure(config, exc) from None
    url = base_url(config)
    if config.serving.http_path == "direct":
        url = next(iter(replica_urls(config)), url)
    wait_until_ready(url, version, token=os.environ.get(token_env) if token_env else None)
    logger.info("serving %s (model %s) at %s", config.name, version, url)
    if blocking:
        print(f"serving {config.name} (model {version}) at {url}; Ctrl-C or SIGTERM stops it", flush=True)
        serve_until_stopped(config)
    return url


def deployment_failure(config: TandemConfig, exc: BaseException) -> DeploymentFailedError:
    """Serve's "Deploying application X failed", with each failed deployment's own reason (the
    replica constructor's exception, which Serve keeps in the deployment's status message)."""
    reasons = []
    with contextlib.suppress(Exception):
        app = ray_serve.status().applications.get(config.name)
        for name, deployment in (app.deployments if app else {}).items():
            if deployment.message and str(getattr(deployment.status, "value", deployment.status)) != "HEALTHY":
                reasons.append(f"  {name}: {replica_reason(deployment.message)}")
        if app is not None and not reasons and app.message:
            reasons.append(f"  {replica_reason(app.message)}")
    why = "\n".join(reasons) or f"  {exc}"
    return DeploymentFailedError(f"{config.name} could not start its replicas:\n{why}")


def replica_reason(message: str) -> str:
    """The line of a Serve status message that says why: the replica's exception, not the traceback."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b:", line):
            return re.sub(r"^[\w.]*?(\w+(Error|Exception)):", r"\1:", line)
    return lines[-1] if lines else message


def serve_until_stopped(config: TandemConfig) -> None:
    """Block until Ctrl-C or SIGTERM (`tandem jobs stop`, `ray job stop`, a pod's end), then remove
    this app and only this app: other applications on a shared cluster keep serving."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a process a non-interactive shell starts in the background inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt on Ctrl-C.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print(f"stopping {config.name}", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutdown(config)


def serve_running() -> bool:
    """Whether Serve's controller is running on the connected cluster (started by anyone)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def shutdown(config: TandemConfig | None = None) -> None:
    """Remove this config's application; stop Serve only if serve() started it, and Ray only if
    serve() started that (on a shared cluster, other applications and Serve itself stay)."""
    global _ray_context, _started_serve
    import ray

    if ray.is_initialized():
        if config is not None:
            with contextlib.suppress(Exception):  # already gone is the goal
                ray_serve.delete(config.name)
        if _started_serve:
            ray_serve.shutdown()
            _started_serve = False
    if _ray_context is not None:
        context, _ray_context = _ray_context, None
        context.__exit__(None, None, None)


def status(config: TandemConfig) -> dict[str, Any]:
    """Replica counts per deployment of the running app (for tests and `tandem serve --status`)."""
    app = ray_serve.status().applications.get(config.name)
    if app is None:
        return {}
    return {
        name: {getattr(state, "value", str(state)): count for state, count in d.replica_states.items()}
        for name, d in app.deployments.items()
    }
