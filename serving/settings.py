"""Serving's deploy-time settings, derived from the config: one source for the app, `serve()`, the
Serve config file and the RayService.

- The Serve environment of the config's HTTP path (`serving.http_path`, see serving/app.py): the
  variables Serve reads at import, for the controller and every replica.
- The Serve options of every deployment: replicas or autoscaling, request limits, resources and
  node-group pinning, back-pressure answers.
- Limits derived from the config: max_ongoing_requests, the batcher's queue, the admission floor.

Pure functions of the config (and, where named, of the caller's environment as an argument): no
Ray Serve, no FastAPI, no `os.environ`. Imports the foundation (`cluster.*`) and
serving/admission.py only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cluster.config import AUTO, Deployment, ServingConfig, TandemConfig
from cluster.runtime import pin_to_group, replica_slots
from serving.admission import ADMIT_FRACTION, MIN_IN_FLIGHT
from serving.haproxy_front import QUEUE_MS_ENV, SERVER_MAXCONN_ENV

APP_BUILDER = "serving.app:build_app"  # the import path Serve config files and RayServices name
INGRESS = "Ingress"  # the router deployment's name, only with several model deployments
# The ingress parses JSON and forwards to a model deployment: a quarter CPU is a scheduling
# reservation (not a limit) that still fits beside the model replicas on a 2-core node.
INGRESS_NUM_CPUS = 0.25
# What `serve()` hands replicas that cannot see the token's own variable: its SHA-256, never the
# token. Ray writes every runtime_env verbatim to runtime_env_agent.log, so a token passed there
# would sit in the cluster's logs.
TOKEN_DIGEST_ENV = "TANDEM_AUTH_TOKEN_SHA256"
# A replica that dies (killed, out of memory, node lost) closes the connections of the requests
# it held without an answer. HAProxy's default retries only connections that failed to open; a
# prediction is a pure function of its input, so resending one that got no answer (on another
# replica: `option redispatch`) is safe. HAProxy can resend only a request that fits its buffer
# (tune.bufsize, 16 KiB in Ray: about a dozen 64-float examples); a larger one still fails with
# its replica. Measured in RELIABILITY.md (tests/reliability/test_serving_faults.py).
HAPROXY_RETRY_ON = "conn-failure empty-response junk-response"
# Serve gives the HAProxy manager actor 5 s to report ready and kills it after three misses; a
# head that is busy starting (a pod on a loaded node; here, 2 shared cores) misses that, and
# `serve deploy` then fails with "HAProxyManager ... killed by ray.kill".
HAPROXY_READY_TIMEOUT_S = "30"
# Where Tandem's image (Dockerfile) installs the `tandem-haproxy` console script: the base image's
# Python. The KubeRay manifests name it; a Serve config file for any cluster does not.
IMAGE_FRONT_BINARY = "/home/ray/anaconda3/bin/tandem-haproxy"


def has_router(config: TandemConfig) -> bool:
    """Whether the app has a separate "Ingress" deployment (only with several model deployments)."""
    return len(config.serving.deployments) > 1


def ingress_deployment_name(config: TandemConfig) -> str:
    return INGRESS if has_router(config) else config.serving.deployments[0].name


def serve_env(serving: ServingConfig, caller_env: Mapping[str, str] | None = None, front_binary: str | None = None) -> dict[str, str]:
    """Environment variables for the Serve controller and every replica.

    caller_env: the environment of the process that deploys; its RAY_SERVE_* variables win over
    ours and travel to the replicas too. A config file (Serve config, RayService) passes none, so
    that it follows from the config alone.
    front_binary: where `tandem-haproxy` (serving/haproxy_front.py) is on the nodes; None (where
    that is not known) leaves HAProxy as Ray configures it, without Tandem's shedding.
    """
    env: dict[str, str] = {}
    if serving.http_path in ("haproxy", "direct"):
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if serving.http_path == "haproxy":
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        env["RAY_SERVE_HAPROXY_RETRY_ON"] = HAPROXY_RETRY_ON
        if front_binary:
            env.update(shedding_env(serving, front_binary))
    env.update({k: v for k, v in (caller_env or {}).items() if k.startswith("RAY_SERVE_")})
    return env


def shedding_env(serving: ServingConfig, front_binary: str) -> dict[str, str]:
    """HAProxy's shedding in front of the replicas (serving/haproxy_front.py).

    Each replica holds at most one full batch from HAProxy (with a router, the ingress replica
    one per deployment behind it). Measured with an open loop at 2.5x capacity
    (tests/reliability/test_serving_overload.py): one batch served as many requests as two, with
    accepted p50 40 ms against 63 and every refusal made by HAProxy, none by the replica. A request
    finding every slot taken waits in HAProxy's queue at most the share of the latency target the
    admission gate leaves a replica (0.3 x target_p99_ms), then gets a 503 with Retry-After from
    HAProxy, without costing the replicas anything.
    """
    slots = serving.batching.max_batch_size * len(serving.deployments)
    queue_ms = max(1, round(ADMIT_FRACTION * serving.batching.target_p99_ms))
    return {
        "RAY_SERVE_HAPROXY_BINARY_PATH": front_binary,
        SERVER_MAXCONN_ENV: str(slots),
        QUEUE_MS_ENV: str(queue_ms),
    }


def controller_env(settings: Mapping[str, str]) -> dict[str, str]:
    """The Serve controller's environment: the app's settings, plus HAProxy's readiness window."""
    env = dict(settings)
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        env.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", HAPROXY_READY_TIMEOUT_S)
    return env


# ---------------------------------------------------------------------------------------------
# limits derived from the config
# ---------------------------------------------------------------------------------------------


def derived_max_ongoing_requests(serving: ServingConfig, deployment: Deployment) -> int:
    """Per-replica max_ongoing_requests: explicit, or enough for 4 full batches in flight.

    Ray's default (5) is far below a batch; the router then retries with backoff and bursts stall
    for seconds while the replica idles (see docs/benchmarks.md). Four batches keep one running, one
    filling and two queued.
    """
    return deployment.max_ongoing_requests or max(4 * serving.batching.max_batch_size, 64)


def batcher_queue_limit(serving: ServingConfig) -> int:
    """Requests a replica's batcher queues before it may shed: two full batches (or the configured
    queue limit when lower). Beyond them a request waits at least two forward passes, which is
    when a missed target becomes likely; it is still served unless the predicted finish is late."""
    return max(1, min(serving.limits.max_queued_requests, 2 * serving.batching.max_batch_size))


def admission_floor(serving: ServingConfig) -> int:
    """Requests a replica always admits: one full batch. Batching needs requests together, and a
    closed-loop client pool up to that size is never refused (refusing it would only slow it)."""
    return max(MIN_IN_FLIGHT, serving.batching.max_batch_size)


# ---------------------------------------------------------------------------------------------
# deployment options
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """What the replicas of a deployment that is not pinned to a node group can run on: the cluster
    as Ray reports it when the app is built (serving/app.py `cluster_hardware`)."""

    cores: int
    gpus: int = 0


def replica_bounds(config: TandemConfig, hardware: Hardware | None) -> dict[str, tuple[int, int] | None]:
    """(min, max) replicas of every model deployment, by name; None where a bound is 'auto' and the
    hardware is not known (a Serve config file: build_app resolves it on the cluster)."""
    bounds: dict[str, tuple[int, int] | None] = {}
    for deployment in config.serving.deployments:
        scaling = deployment.autoscaling
        if AUTO in (scaling.min_replicas, scaling.max_replicas) and hardware is None:
            bounds[deployment.name] = None
        else:
            known = hardware or Hardware(cores=1)
            bounds[deployment.name] = scaling.bounds(replica_slots(config, deployment, known.cores, known.gpus))
    return bounds


def autoscaling_options(deployment: Deployment, bounds: tuple[int, int] | None) -> dict[str, Any]:
    """`num_replicas` for a fixed count, else Serve's `autoscaling_config` (Serve refuses both);
    nothing while the bounds are not resolved yet."""
    if bounds is None:
        return {}
    low, high = bounds
    scaling = deployment.autoscaling
    if low == high:
        return {"num_replicas": high}
    config: dict[str, Any] = {
        "min_replicas": low,
        "max_replicas": high,
        "target_ongoing_requests": scaling.target_ongoing_requests,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
        "look_back_period_s": scaling.look_back_s,
    }
    if scaling.initial_replicas is not None:
        config["initial_replicas"] = min(max(scaling.initial_replicas, low), high)
    return {"autoscaling_config": config}


def model_deployment_options(serving: ServingConfig, deployment: Deployment, bounds: tuple[int, int] | None) -> dict[str, Any]:
    """Options of one model deployment, keyed by the name the Serve app gives it."""
    actor_options: dict[str, Any] = {"num_cpus": deployment.cpus, "num_gpus": deployment.gpus}
    resources = pin_to_group(deployment.node_group)
    if resources:
        actor_options["resources"] = resources
    return {
        "name": deployment.name,
        **autoscaling_options(deployment, bounds),
        "max_ongoing_requests": derived_max_ongoing_requests(serving, deployment),
        "max_queued_requests": deployment.max_queued_requests or serving.limits.max_queued_requests,
        "ray_actor_options": actor_options,
    }


def ingress_options(serving: ServingConfig, bounds: dict[str, tuple[int, int] | None]) -> dict[str, Any]:
    """The HTTP entry: never scaled to zero, and never the bottleneck of what sits behind it.

    One ingress replica forwards to one replica of each model deployment at their target load,
    so it scales up to the widest deployment and aims at the sum of their targets. Its
    max_ongoing_requests covers every model replica's own limit, so it only queues when they do.
    While a model deployment's bounds are not resolved (a Serve config file), its scaling and
    limit are left to build_app, which resolves them on the cluster.
    """
    deployments = serving.deployments
    resolved = {d.name: b for d in deployments if (b := bounds[d.name]) is not None}
    if len(resolved) < len(deployments):
        return {"name": INGRESS, "ray_actor_options": {"num_cpus": INGRESS_NUM_CPUS}}
    widest = max(high for _, high in resolved.values())
    capacity = sum(derived_max_ongoing_requests(serving, d) * resolved[d.name][1] for d in deployments)
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
                "look_back_period_s": min(d.autoscaling.look_back_s for d in deployments),
            }
        }
    return {
        "name": INGRESS,
        **scaling,
        "max_ongoing_requests": capacity,
        "max_queued_requests": serving.limits.max_queued_requests,
        "ray_actor_options": {"num_cpus": INGRESS_NUM_CPUS},
    }


def deployment_options(
    config: TandemConfig, replica_env: Mapping[str, str] | None = None, hardware: Hardware | None = None
) -> dict[str, dict[str, Any]]:
    """Serve options of every deployment of the app, by deployment name (the one source for
    build_app and the Serve config file); replica_env goes into each replica's runtime_env.
    hardware: what 'auto' replica counts resolve against; without it they are left out."""
    serving = config.serving
    env = dict(replica_env or {})
    options: dict[str, dict[str, Any]] = {}
    bounds = replica_bounds(config, hardware)
    entries = [model_deployment_options(serving, d, bounds[d.name]) for d in serving.deployments]
    if has_router(config):
        entries.insert(0, ingress_options(serving, bounds))
    for entry in entries:
        # Serve's own refusals (more requests waiting for a slot than max_queued_requests) say when
        # to retry too; without this they are 503s with no Retry-After.
        entry = {**entry, "backpressure_config": {"status_code": 503, "retry_after_s": 1}}
        # Serve's access log writes a line per request to a rotating file in the replica: with it off
        # one replica served 1,598 req/s instead of 1,362, the router shape 1,249 instead of 830.
        entry["logging_config"] = {"enable_access_log": serving.access_log}
        if env:
            actor = dict(entry.get("ray_actor_options", {}))
            actor["runtime_env"] = {"env_vars": env}
            entry["ray_actor_options"] = actor
        options[entry["name"]] = entry
    return options
