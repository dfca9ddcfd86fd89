"""The Ray Serve config file, derived from the Tandem config (never written by hand beside it).

`build_serve_config(config)` returns the dict that `serve deploy FILE` takes and that a KubeRay
RayService embeds as `serveConfigV2` (cluster/k8s.py dumps exactly this dict). One application,
named after the config, built by `serving.app:build_app({"config": ..., "artifact": ...})`; its
deployments are one per `serving.deployments[i]` and, with several, an "Ingress" in front, each
with replicas or autoscaling, request limits and the node-group pinning of cluster/runtime.py.
`ingress_options` and `model_deployment_options` here are the one source of those options:
serving.app.deployment_options builds on them, and this file takes them back from there.

Ray validates this dict with `ray.serve.schema.ServeDeploySchema`; tests/unit/test_serve_config.py
does the same, and also refuses keys that schema would silently accept (it allows extras).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from cluster.artifacts import atomic_write_text
from cluster.config import Deployment, TandemConfig, derived_max_ongoing_requests
from cluster.runtime import pin_to_group

APP_BUILDER = "serving.app:build_app"
INGRESS = "Ingress"
# The ingress parses JSON and forwards to a model deployment: a quarter CPU is a scheduling
# reservation (not a limit) that still fits beside the model replicas on a 2-core node.
INGRESS_NUM_CPUS = 0.25


def autoscaling_options(deployment: Deployment) -> dict[str, Any]:
    """`num_replicas` for a fixed count, else Serve's `autoscaling_config` (Serve refuses both)."""
    scaling = deployment.autoscaling
    if scaling.min_replicas == scaling.max_replicas:
        return {"num_replicas": scaling.max_replicas}
    config: dict[str, Any] = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "target_ongoing_requests": scaling.target_ongoing_requests,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
    }
    if scaling.initial_replicas is not None:
        config["initial_replicas"] = scaling.initial_replicas
    return {"autoscaling_config": config}


def model_deployment_options(config: TandemConfig, deployment: Deployment) -> dict[str, Any]:
    """Options of one model deployment, keyed by the name the Serve app gives it."""
    serving = config.serving
    actor_options: dict[str, Any] = {"num_cpus": deployment.cpus, "num_gpus": deployment.gpus}
    resources = pin_to_group(deployment.node_group)
    if resources:
        actor_options["resources"] = resources
    return {
        "name": deployment.name,
        **autoscaling_options(deployment),
        "max_ongoing_requests": derived_max_ongoing_requests(serving, deployment),
        "max_queued_requests": deployment.max_queued_requests or serving.limits.max_queued_requests,
        "ray_actor_options": actor_options,
    }


def ingress_options(config: TandemConfig) -> dict[str, Any]:
    """The HTTP entry: never scaled to zero, and never the bottleneck of what sits behind it.

    One ingress replica forwards to one replica of each model deployment at their target load,
    so it scales up to the widest deployment and aims at the sum of their targets. Its
    max_ongoing_requests covers every model replica's own limit, so it only queues when they do.
    """
    deployments = config.serving.deployments
    widest = max(d.autoscaling.max_replicas for d in deployments)
    capacity = sum(derived_max_ongoing_requests(config.serving, d) * d.autoscaling.max_replicas for d in deployments)
    scaling: dict[str, Any]
    if widest == 1:
        scaling = {"num_replicas": 1}
    else:
        # Up as fast as the quickest deployment behind it, down as slowly as the slowest.
        scaling = {
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": widest,
                "target_ongoing_requests": sum(d.autoscaling.target_ongoing_requests for d in deployments),
                "upscale_delay_s": min(d.autoscaling.upscale_delay_s for d in deployments),
                "downscale_delay_s": max(d.autoscaling.downscale_delay_s for d in deployments),
            }
        }
    return {
        "name": INGRESS,
        **scaling,
        "max_ongoing_requests": capacity,
        "max_queued_requests": config.serving.limits.max_queued_requests,
        "ray_actor_options": {"num_cpus": INGRESS_NUM_CPUS},
    }


def serve_settings(config: TandemConfig) -> dict[str, str]:
    """serving.app's Serve environment for the config's HTTP path (direct ingress, HAProxy, ...).

    serve_env also passes on the RAY_SERVE_* variables of the calling process; a config file must
    follow from the config alone (a variable in the shell that renders k8s/ must not land in a
    RayService), so those are hidden while it runs.
    """
    from serving.app import serve_env

    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("RAY_SERVE_")}
    try:
        return serve_env(config)
    finally:
        os.environ.update(hidden)


def application_runtime_env(config: TandemConfig, settings: dict[str, str]) -> dict[str, Any]:
    """The Serve settings and cluster.runtime_env's env_vars and pip; a working_dir only when remote.

    Serve config files refuse local working_dirs: the code must be in the image (Dockerfile) or
    in a zip the cluster can download.
    """
    runtime = config.cluster.runtime_env
    env: dict[str, Any] = {}
    if runtime.working_dir and "://" in runtime.working_dir:
        env["working_dir"] = runtime.working_dir
    env_vars = {**settings, **runtime.env_vars}
    if env_vars:
        env["env_vars"] = env_vars
    if runtime.pip:
        env["pip"] = list(runtime.pip)
    return env


# Serve gives the HAProxy manager actor 5 s to report ready and kills it after three misses; a
# head that is busy starting (a pod on a loaded node; here, 2 shared cores) misses that, and
# `serve deploy` then fails with "HAProxyManager ... killed by ray.kill".
HAPROXY_READY_TIMEOUT_S = "30"


def controller_settings(settings: dict[str, str]) -> dict[str, str]:
    """The Serve controller's environment: the app's settings, plus HAProxy's readiness window."""
    env = dict(settings)
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        env.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", HAPROXY_READY_TIMEOUT_S)
    return env


def build_serve_config(config: TandemConfig, artifact: str = "latest") -> dict[str, Any]:
    """The Ray Serve config file (multi-application format) for `config`, serving `artifact`.

    The deployments and their options are serving.app.deployment_options, the same that
    build_app gives them in code ("Ingress" only when there are several model deployments).
    """
    from serving.app import deployment_options

    serving = config.serving
    settings = serve_settings(config)
    application = {
        "name": config.name,
        "route_prefix": serving.route_prefix,
        "import_path": APP_BUILDER,
        "args": {"config": config.to_dict(), "artifact": artifact},
        "runtime_env": application_runtime_env(config, settings),
        "deployments": list(deployment_options(config).values()),
    }
    serve_config: dict[str, Any] = {
        # A proxy on every node with a replica: KubeRay's serve Service routes to all of them.
        "proxy_location": "EveryNode",
        "http_options": {"host": serving.host, "port": serving.port},
    }
    if settings:
        # Serve reads these at import, so the controller needs them too (applied when it starts).
        serve_config["controller_options"] = {"runtime_env": {"env_vars": controller_settings(settings)}}
    serve_config["applications"] = [application]
    return serve_config


def dump_serve_config(serve_config: dict[str, Any]) -> str:
    """YAML text of a Serve config, keys in the order Ray documents them."""
    return yaml.safe_dump(serve_config, sort_keys=False, width=10**9)


def write_serve_config(config: TandemConfig, path: str | Path, artifact: str = "latest") -> Path:
    """Write the Serve config file for `serve deploy PATH`; returns the path."""
    path = Path(path)
    # Atomic: `serve deploy` or a RayService watching the file never reads half of it.
    atomic_write_text(path, dump_serve_config(build_serve_config(config, artifact)))
    return path
