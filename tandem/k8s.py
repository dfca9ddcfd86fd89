"""KubeRay manifests derived from the Tandem config: RayCluster, RayJobs, RayService, kustomization.

`render_manifests(config)` returns {filename: manifest} and `render_steps(config)` groups them by
step folder; tandem/k8s_files.py writes them as commented YAML. `tandem k8s --draft --out k8s`
renders this repo's k8s/ (the packaged example), which a test keeps equal to a fresh rendering.

One folder per step, each applied with `kubectl apply -k DIR/STEP` in the recipe's order (a
kustomization of everything at once would start three clusters, and a RayService whose model
has not been trained yet):

    train/     rayjob-train.yaml: `tandem train /config/tandem.yaml` on its own cluster, deleted afterwards
    tune/      rayjob-tune.yaml: the same for `tandem tune` (only with a tuning section), instead of train/
    serve/     rayservice.yaml: serveConfigV2 = build_serve_config(...) of serving/serve_config.py
    predict/   rayjob-predict.yaml: `tandem predict` (only when predict.input and predict.output are set)
    cluster/   raycluster.yaml: a long-running cluster, for `tandem submit` / `ray job submit`

Each folder also holds configmap.yaml (the resolved config, cluster.address: auto, mounted at
/config on heads; the same object in every folder) and its kustomization.yaml.

Choices, and why:
- Node groups are worker groups, and each worker group's `rayStartParams.resources` is the
  group's custom resource from cluster.runtime.node_group_resources: pinning places training
  workers and Serve replicas the same way on Kubernetes as on a local or simulated Ray.
- The config reaches the job driver as a ConfigMap file, not inlined into the entrypoint: it
  stays readable with kubectl, the entrypoint stays `tandem train /config/tandem.yaml` (the same
  command a user types), and the RayService embeds the same config in serveConfigV2 anyway.
- Each RayJob's cluster and the RayService's cluster carry only the node groups they use (when
  everything they run is pinned), so a training-only GPU group never idles under the service.
- Token authentication (cluster.auth: token, Ray 2.60's default): the token lives in a Secret
  the user creates once (`kubectl create secret generic NAME-ray-token --from-literal=auth_token=...`).
  `authOptions.secretName` tells KubeRay (>= 1.6) to use it for its own dashboard calls (job
  status, Serve deploys), and every Ray container, the autoscaler and the job submitter get
  RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from that Secret explicitly, so older operators work too.

Settings of the manifests themselves (head pod size, RayJob TTL, upgrade strategy, storage claim)
are the config's `cluster.kubernetes` section.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import yaml

from cluster.config import NodeGroup, TandemConfig, config_with
from cluster.runtime import node_group_resources, runtime_env
from cluster.storage import is_uri
from serving.serve_config import build_serve_config, dump_serve_config
from serving.settings import IMAGE_FRONT_BINARY

API_VERSION = "ray.io/v1"
CONFIG_MOUNT = "/config"
CONFIG_FILE = "tandem.yaml"
AUTH_TOKEN_KEY = "auth_token"  # the key KubeRay's own auth Secret uses
SERVING_TOKEN_KEY = "token"
HEADER_MARK = "# Rendered by `tandem k8s`"  # the first line of every file written here

# ---------------------------------------------------------------------------------------------
# names, versions, quantities
# ---------------------------------------------------------------------------------------------

_RAY_IMAGE = re.compile(r"(?:^|/)ray(?:-[a-z]+)?:(?P<version>\d+\.\d+\.\d+)")


def image_ray_version(image: str) -> str | None:
    """The Ray version in a rayproject/ray* image tag ('rayproject/ray:2.60.0-py311' -> '2.60.0')."""
    match = _RAY_IMAGE.search(image)
    return match.group("version") if match else None


def installed_ray_version() -> str:
    import ray

    return ray.__version__


def cluster_ray_version(config: TandemConfig) -> str:
    """spec.rayVersion: declared, else from the image tag, else the Ray installed here."""
    return config.cluster.kubernetes.ray_version or image_ray_version(config.cluster.image) or installed_ray_version()


def resource_names(config: TandemConfig) -> dict[str, str]:
    name = config.name
    return {
        "cluster": name,
        "train": f"{name}-train",
        "tune": f"{name}-tune",
        "serve": f"{name}-serve",
        "predict": f"{name}-predict",
        "configmap": f"{name}-config",
        "auth_secret": config.cluster.kubernetes.auth_secret or f"{name}-ray-token",
        "serving_secret": f"{name}-serving-token",
        "mlflow_secret": f"{name}-mlflow",
        "store_secret": f"{name}-store",
    }


def worker_group_name(group: str) -> str:
    """Node group name as a Kubernetes DNS label (pod names and labels use it)."""
    return group.lower().replace("_", "-")


def cpu_quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{math.ceil(cpus * 1000)}m"


def labels(config: TandemConfig, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "tandem",
        "app.kubernetes.io/instance": config.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "tandem",
    }


def metadata(config: TandemConfig, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": labels(config, component)}


def kubernetes_config(config: TandemConfig) -> TandemConfig:
    """The config as pods see it: join the cluster they run in, serve on every interface.

    A Serve proxy on 127.0.0.1 is unreachable from the RayService's Kubernetes Service.
    """
    return config_with(config, {"cluster.address": "auto", "serving.host": "0.0.0.0"})


# ---------------------------------------------------------------------------------------------
# pods
# ---------------------------------------------------------------------------------------------


def auth_env(config: TandemConfig) -> list[dict[str, Any]]:
    """RAY_AUTH_MODE, and RAY_AUTH_TOKEN from the auth Secret when token auth is on."""
    if config.cluster.auth != "token":
        return [{"name": "RAY_AUTH_MODE", "value": "disabled"}]
    secret = resource_names(config)["auth_secret"]
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": AUTH_TOKEN_KEY}}},
    ]


def serving_token_env(config: TandemConfig) -> list[dict[str, Any]]:
    """The endpoint's bearer token (serving.auth.token_env) from its own Secret, for Serve pods."""
    token_env = config.serving.auth.token_env
    if not token_env:
        return []
    secret = resource_names(config)["serving_secret"]
    return [{"name": token_env, "valueFrom": {"secretKeyRef": {"name": secret, "key": SERVING_TOKEN_KEY}}}]


def container_resources(cpus: float, memory: str, gpus: int = 0) -> dict[str, Any]:
    """Requests equal to limits: Ray sizes its logical resources from the limits (KubeRay)."""
    amounts: dict[str, Any] = {"cpu": cpu_quantity(cpus), "memory": memory}
    if gpus:
        amounts["nvidia.com/gpu"] = gpus
    return {"requests": dict(amounts), "limits": dict(amounts)}


def storage_mount(config: TandemConfig) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(volume, volumeMount) of cluster.kubernetes.storage_claim at cluster.storage, if set."""
    claim = config.cluster.kubernetes.storage_claim
    if not claim:
        return None
    if not config.cluster.storage.startswith("/"):
        raise ValueError(
            f"cluster.storage: {config.cluster.storage!r} must be an absolute path to mount "
            f"cluster.kubernetes.storage_claim ({claim!r}) there; e.g. /mnt/tandem"
        )
    volume = {"name": "storage", "persistentVolumeClaim": {"claimName": claim}}
    return volume, {"name": "storage", "mountPath": config.cluster.storage}


def secret_env(config: TandemConfig, head: bool) -> list[dict[str, Any]]:
    """envFrom of the optional Secrets a pod reads credentials from, never the config in the ConfigMap:
    MLflow's on the head (job drivers log from there), the object store's on every pod (workers
    write checkpoints, replicas read artifacts) when cluster.storage is a URI."""
    names = resource_names(config)
    refs = []
    if head and config.tracking.mlflow is not None:
        refs.append({"secretRef": {"name": names["mlflow_secret"], "optional": True}})
    if is_uri(config.cluster.storage):
        refs.append({"secretRef": {"name": names["store_secret"], "optional": True}})
    return refs


def pod_template(container: dict[str, Any], volumes: list[dict[str, Any]], group: NodeGroup | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [container]}
    if volumes:
        spec["volumes"] = volumes
    if group is not None and group.node_selector:
        spec["nodeSelector"] = dict(group.node_selector)
    if group is not None and group.tolerations:
        spec["tolerations"] = [dict(t) for t in group.tolerations]
    return {"spec": spec}


def ray_container(
    config: TandemConfig, role: str, resources: dict[str, Any], env: list[dict[str, Any]], mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    ports = [{"name": "serve", "containerPort": config.serving.port}]
    if role == "head":
        ports = [
            {"name": "gcs-server", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
        ] + ports
    container: dict[str, Any] = {"name": f"ray-{role}", "image": config.cluster.image, "env": env, "ports": ports, "resources": resources}
    if mounts:
        container["volumeMounts"] = mounts
    return container


def head_group_spec(config: TandemConfig, extra_env: list[dict[str, Any]]) -> dict[str, Any]:
    names = resource_names(config)
    volumes = [{"name": "tandem-config", "configMap": {"name": names["configmap"]}}]
    mounts = [{"name": "tandem-config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    shared = storage_mount(config)
    if shared:
        volumes.append(shared[0])
        mounts.append(shared[1])
    resources = container_resources(config.cluster.kubernetes.head_cpus, config.cluster.kubernetes.head_memory)
    container = ray_container(config, "head", resources, auth_env(config) + extra_env, mounts)
    secrets = secret_env(config, head=True)
    if secrets:
        container["envFrom"] = secrets
    return {
        # The head runs the GCS, the dashboard, job drivers and Serve's controller; no tasks or
        # replicas on it keeps those responsive (KubeRay's production advice). It is in no node group.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": pod_template(container, volumes),
    }


def ray_start_resources(group: str) -> str:
    """The group's custom resource for `ray start --resources`, quoted for a shell.

    KubeRay joins rayStartParams into one shell command (`--resources=VALUE`): compact JSON in
    single quotes survives it, and KubeRay's autoscaler strips the quotes before parsing it.
    """
    return "'" + json.dumps(node_group_resources(group), separators=(",", ":")) + "'"


def worker_group_spec(config: TandemConfig, name: str, group: NodeGroup, extra_env: list[dict[str, Any]]) -> dict[str, Any]:
    shared = storage_mount(config)
    volumes, mounts = ([shared[0]], [shared[1]]) if shared else ([], [])
    resources = container_resources(group.cpus, group.memory, group.gpus)
    container = ray_container(config, "worker", resources, auth_env(config) + extra_env, mounts)
    secrets = secret_env(config, head=False)
    if secrets:
        container["envFrom"] = secrets
    return {
        "groupName": worker_group_name(name),
        "replicas": group.replicas if group.replicas is not None else group.min_replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {"resources": ray_start_resources(name)},
        "template": pod_template(container, volumes, group),
    }


# ---------------------------------------------------------------------------------------------
# clusters
# ---------------------------------------------------------------------------------------------


def groups_for(config: TandemConfig, purpose: str) -> dict[str, NodeGroup]:
    """The node groups a cluster for `purpose` (cluster | train | tune | serve | predict) needs.

    Everything when some work is unpinned (it may land on any group), else only the pinned groups.
    """
    groups = config.cluster.node_groups
    wanted: set[str] | None = None
    if purpose in ("train", "tune") and config.training.node_group:
        wanted = {config.training.node_group}
    elif purpose == "serve" and all(d.node_group for d in config.serving.deployments):
        wanted = {d.node_group for d in config.serving.deployments if d.node_group}
    elif purpose == "predict":
        used = [d for d in config.serving.deployments if not config.predict.deployments or d.name in config.predict.deployments]
        wanted = {d.node_group for d in used} if all(d.node_group for d in used) else None
    return {n: g for n, g in groups.items() if wanted is None or n in wanted}


def needs_autoscaling(groups: dict[str, NodeGroup]) -> bool:
    return any(g.min_replicas != g.max_replicas for g in groups.values())


def cluster_spec(config: TandemConfig, purpose: str, extra_env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A RayCluster spec (also a RayJob's rayClusterSpec and a RayService's rayClusterConfig)."""
    extra_env = extra_env or []
    groups = groups_for(config, purpose)
    spec: dict[str, Any] = {"rayVersion": cluster_ray_version(config), "enableInTreeAutoscaling": needs_autoscaling(groups)}
    if spec["enableInTreeAutoscaling"]:
        spec["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": config.cluster.kubernetes.autoscaler_idle_timeout_s,
            "env": auth_env(config),
        }
    if config.cluster.auth == "token":
        spec["authOptions"] = {"mode": "token", "secretName": resource_names(config)["auth_secret"]}
    spec["headGroupSpec"] = head_group_spec(config, extra_env)
    spec["workerGroupSpecs"] = [worker_group_spec(config, name, group, extra_env) for name, group in groups.items()]
    return spec


def config_map(kcfg: TandemConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(kcfg, resource_names(kcfg)["configmap"], "config"),
        "data": {CONFIG_FILE: kcfg.to_yaml()},
    }


def ray_cluster(kcfg: TandemConfig) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": metadata(kcfg, kcfg.name, "cluster"),
        "spec": cluster_spec(kcfg, "cluster"),
    }


# ---------------------------------------------------------------------------------------------
# jobs and the service
# ---------------------------------------------------------------------------------------------


def submitter_pod_template(config: TandemConfig) -> dict[str, Any]:
    """The pod that runs `ray job submit`: the cluster's image, and the token to submit with.

    No command: KubeRay fills in `ray job submit ... -- ENTRYPOINT` when it is empty.
    """
    container = {
        "name": "ray-job-submitter",
        "image": config.cluster.image,
        "env": auth_env(config),
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
    }
    return {"spec": {"restartPolicy": "Never", "containers": [container]}}


def ray_job(kcfg: TandemConfig, stage: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "entrypoint": f"tandem {stage} {CONFIG_MOUNT}/{CONFIG_FILE}",
        # A RayJob's code is in the image: only a remote working_dir URI passes (see runtime_env).
        # PYTHONUNBUFFERED: the driver's logs stream as they are written.
        "runtimeEnvYAML": dump_yaml(runtime_env(kcfg.cluster.runtime_env, env_vars={"PYTHONUNBUFFERED": "1"})),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": kcfg.cluster.kubernetes.job_ttl_s,
        "backoffLimit": kcfg.cluster.kubernetes.job_backoff_limit,
    }
    deadline = kcfg.cluster.kubernetes.job_deadline_s
    if deadline:
        spec["activeDeadlineSeconds"] = deadline
    # K8sJobMode: a Kubernetes Job runs `ray job submit` and follows the logs, so `kubectl logs
    # job/NAME` shows the driver's output and the Job's status is the Ray job's.
    spec["submissionMode"] = "K8sJobMode"
    spec["submitterPodTemplate"] = submitter_pod_template(kcfg)
    spec["rayClusterSpec"] = cluster_spec(kcfg, stage)
    return {"apiVersion": API_VERSION, "kind": "RayJob", "metadata": metadata(kcfg, resource_names(kcfg)[stage], stage), "spec": spec}


def serve_config_yaml(kcfg: TandemConfig) -> str:
    """serveConfigV2: exactly the YAML of build_serve_config for the pods' config."""
    return dump_serve_config(build_serve_config(kcfg, kcfg.serving.artifact, front_binary=IMAGE_FRONT_BINARY))


def ray_service(kcfg: TandemConfig) -> dict[str, Any]:
    spec = {
        "upgradeStrategy": {"type": kcfg.cluster.kubernetes.upgrade_strategy},
        "serveConfigV2": serve_config_yaml(kcfg),
        "rayClusterConfig": cluster_spec(kcfg, "serve", serving_token_env(kcfg)),
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": metadata(kcfg, resource_names(kcfg)["serve"], "serve"),
        "spec": spec,
    }


def kustomization(filenames: list[str]) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": filenames}


# The folder of each manifest, in the recipe's order: train (or tune), then serve or predict.
STEP_FOLDERS = {
    "rayjob-train.yaml": "train",
    "rayjob-tune.yaml": "tune",
    "rayservice.yaml": "serve",
    "rayjob-predict.yaml": "predict",
    "raycluster.yaml": "cluster",
}


def render_manifests(config: TandemConfig) -> dict[str, dict[str, Any]]:
    """Every manifest for `config`, by file name (the configmap first)."""
    kcfg = kubernetes_config(config)
    manifests: dict[str, dict[str, Any]] = {
        "configmap.yaml": config_map(kcfg),
        "raycluster.yaml": ray_cluster(kcfg),
        "rayjob-train.yaml": ray_job(kcfg, "train"),
    }
    if kcfg.tuning is not None:
        manifests["rayjob-tune.yaml"] = ray_job(kcfg, "tune")
    if kcfg.predict.input and kcfg.predict.output:
        manifests["rayjob-predict.yaml"] = ray_job(kcfg, "predict")
    manifests["rayservice.yaml"] = ray_service(kcfg)
    return manifests


def render_steps(config: TandemConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """{step folder: {file name: manifest}}: each step's manifest, the configmap and a kustomization."""
    manifests = render_manifests(config)
    steps: dict[str, dict[str, dict[str, Any]]] = {}
    for name, folder in STEP_FOLDERS.items():
        if name in manifests:
            files = {"configmap.yaml": manifests["configmap.yaml"], name: manifests[name]}
            steps[folder] = {**files, "kustomization.yaml": kustomization(list(files))}
    return steps


class _BlockStrings(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, runtimeEnvYAML, the config) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStrings.add_representer(str, _represent_str)


def dump_yaml(value: Any) -> str:
    return yaml.dump(value, Dumper=_BlockStrings, sort_keys=False, width=10**9)
