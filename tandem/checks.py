"""Pre-deploy checks: what the config implies on a real cluster, said before anything starts.

`predeploy_checks(config, target)` returns `Finding`s: an "error" means the deployment cannot work
(a replica that can never be placed), a "warning" names a cost or a trap (twice the GPUs during a
RayService upgrade, cold starts, a Ray version mismatch). `tandem check` prints them all (or one
target's, `--for submit|kubernetes`), `tandem k8s` (target "kubernetes") and `tandem submit` (target
"submit") print theirs and stop on errors. Each check is one small function that names the config
fields and the numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cluster.config import AUTO, TandemConfig
from tandem.k8s import (
    groups_for,
    image_ray_version,
    installed_ray_version,
    resource_names,
    worker_group_name,
)

Level = Literal["error", "warning"]
# What `tandem k8s --draft` renders anyway (as warnings): manifests to review, not to apply.
DRAFT_FIELDS = ("cluster.image", "cluster.storage")
Target = Literal["all", "kubernetes", "submit"]

# Typical cold-start costs, in seconds (low, high). A Serve replica: process start plus model load,
# about 5 s for `serve.run` on a 2-core machine (stack notes), more for big models. A Kubernetes
# node: pod scheduling, pulling a multi-GB Ray image onto a fresh node and `ray start`; when the
# cluster autoscaler must first add a machine, a few minutes more, GPU machines at the top.
REPLICA_START_S = (5, 15)
NODE_START_S = (60, 300)
# KubeRay appends 6 characters to RayJob and RayService names for their clusters.
MAX_KUBERAY_NAME = 47


@dataclass(frozen=True)
class Finding:
    level: Level
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.path}: {self.message}"


def _minutes(seconds: tuple[float, float]) -> str:
    return f"{seconds[0] / 60:g}-{seconds[1] / 60:g} min"


# ---------------------------------------------------------------------------------------------
# GPUs
# ---------------------------------------------------------------------------------------------


def upgrade_needs_twice_the_gpus(config: TandemConfig) -> list[Finding]:
    """RayService NewCluster upgrades start a second cluster beside the serving one."""
    if config.cluster.kubernetes.upgrade_strategy != "NewCluster":
        return []
    gpu_groups = {n: g for n, g in groups_for(config, "serve").items() if g.gpus}
    if not gpu_groups:
        return []
    steady = sum(g.gpus * g.max_replicas for g in gpu_groups.values())
    parts = ", ".join(f"cluster.node_groups.{n}.gpus ({g.gpus}) x max_replicas ({g.max_replicas})" for n, g in gpu_groups.items())
    return [
        Finding(
            "warning",
            "cluster.kubernetes.upgrade_strategy",
            f"NewCluster: a RayService upgrade starts a second cluster beside the running one, so the serving "
            f"node groups need up to {2 * steady} GPUs during an upgrade instead of {steady} ({parts}). "
            "Make sure the GPU quota has them, or set cluster.kubernetes.upgrade_strategy: None "
            "(no second cluster; a change to the cluster itself then means downtime).",
        )
    ]


def deployments_fit_their_groups(config: TandemConfig) -> list[Finding]:
    """A replica asking for more GPUs than any node it may land on is never placed."""
    groups = config.cluster.node_groups
    findings = []
    for i, dep in enumerate(config.serving.deployments):
        if dep.gpus <= 0:
            continue
        path = f"serving.deployments[{i}].gpus"
        candidates = {dep.node_group: groups[dep.node_group]} if dep.node_group in groups else groups
        most = max((g.gpus for g in candidates.values()), default=0)
        if dep.gpus > most:
            where = (
                f"a node of cluster.node_groups.{dep.node_group} has {most}"
                if dep.node_group
                else f"no node group has more than {most} per node"
            )
            findings.append(
                Finding(
                    "error",
                    path,
                    f"{dep.gpus:g} GPUs per replica, but {where}; the replica can never be placed. Lower gpus or add GPUs to a node group.",
                )
            )
            continue
        if dep.node_group in groups:
            group = groups[dep.node_group]
            per_node = int(group.gpus // dep.gpus)
            capacity = per_node * group.max_replicas
            # 'auto' resolves to what the group holds (cluster.runtime.replica_slots).
            if dep.autoscaling.min_replicas != AUTO and dep.autoscaling.min_replicas > capacity:
                findings.append(
                    Finding(
                        "error",
                        f"serving.deployments[{i}].autoscaling.min_replicas",
                        f"{dep.autoscaling.min_replicas} replicas of {dep.gpus:g} GPUs, but cluster.node_groups.{dep.node_group} "
                        f"holds at most {capacity} ({per_node} per node x max_replicas {group.max_replicas}); raise max_replicas or lower "
                        "min_replicas.",
                    )
                )
    return findings


def training_fits_its_group(config: TandemConfig) -> list[Finding]:
    """Ray Train gives every worker one GPU; more workers than GPUs wait forever for placement."""
    training = config.training
    groups = config.cluster.node_groups
    candidates = {training.node_group: groups[training.node_group]} if training.node_group in groups else groups
    gpus = sum(g.gpus * g.max_replicas for g in candidates.values())
    uses_gpu = training.use_gpu == "true" or (training.use_gpu == "auto" and gpus > 0)
    if not uses_gpu or training.workers <= gpus:
        return []
    where = f"cluster.node_groups.{training.node_group}" if training.node_group else "the node groups"
    return [
        Finding(
            "error",
            "training.workers",
            f"{training.workers} workers need {training.workers} GPUs (one each), but {where} can have at most {gpus} "
            "(gpus x max_replicas); the job would wait for placement forever. Lower training.workers or raise max_replicas.",
        )
    ]


# ---------------------------------------------------------------------------------------------
# cold starts
# ---------------------------------------------------------------------------------------------


def deployments_scaled_to_zero(config: TandemConfig) -> list[Finding]:
    findings = []
    groups = config.cluster.node_groups
    for i, dep in enumerate(config.serving.deployments):
        scaling = dep.autoscaling
        if scaling.min_replicas != 0:
            continue
        low, high = scaling.upscale_delay_s + REPLICA_START_S[0], scaling.upscale_delay_s + REPLICA_START_S[1]
        delay = (
            f"about {low:g}-{high:g} s: upscale_delay_s ({scaling.upscale_delay_s:g} s) "
            f"+ replica start and model load ({REPLICA_START_S[0]}-{REPLICA_START_S[1]} s)"
        )
        group = groups.get(dep.node_group or "")
        if group is not None and group.min_replicas == 0:
            delay += f", plus a new node of cluster.node_groups.{dep.node_group} (min_replicas: 0) on Kubernetes, {_minutes(NODE_START_S)}"
        findings.append(
            Finding(
                "warning",
                f"serving.deployments[{i}].autoscaling.min_replicas",
                f"0: after downscale_delay_s ({scaling.downscale_delay_s:g} s) without requests the deployment has no replica, "
                f"and the next request waits for a cold start, {delay}. Set min_replicas: 1 to keep one warm.",
            )
        )
    return findings


def node_groups_scaled_to_zero(config: TandemConfig) -> list[Finding]:
    findings = []
    for name, group in config.cluster.node_groups.items():
        if group.min_replicas != 0:
            continue
        users = []
        if config.training.node_group in (None, name):
            users.append("each training job waits for its first node")
        if any(d.node_group in (None, name) for d in config.serving.deployments):
            users.append("serving waits for a node when it scales up")
        if not users:
            continue
        findings.append(
            Finding(
                "warning",
                f"cluster.node_groups.{name}.min_replicas",
                f"0: the group has no node while idle; {' and '.join(users)}: typically {_minutes(NODE_START_S)} on Kubernetes "
                f"(pod scheduling, image pull, ray start; longer when the cluster autoscaler adds a{' GPU' if group.gpus else ''} "
                "machine).",
            )
        )
    return findings


# ---------------------------------------------------------------------------------------------
# image, storage, names
# ---------------------------------------------------------------------------------------------


def image_ray_version_matches(config: TandemConfig) -> list[Finding]:
    installed = installed_ray_version()
    declared = config.cluster.kubernetes.ray_version
    image = config.cluster.image
    version = declared or image_ray_version(image)
    if version is None:
        return [
            Finding(
                "warning",
                "cluster.image",
                f"{image!r}: the Ray version cannot be read from the tag; the manifests assume the installed {installed}. "
                f"Build the image from the Dockerfile (Ray {installed}) or declare it in cluster.kubernetes.ray_version.",
            )
        ]
    if version != installed:
        source = "cluster.kubernetes.ray_version" if declared else "its tag"
        return [
            Finding(
                "warning",
                "cluster.image",
                f"{image!r} runs Ray {version} ({source}) but Ray {installed} is installed here; clients, jobs and "
                f"Serve configs built with {installed} may not work against {version}. Use an image with Ray {installed}.",
            )
        ]
    return []


def image_has_tandem(config: TandemConfig) -> list[Finding]:
    image = config.cluster.image
    repository = image.split("@")[0].rsplit(":", 1)[0]
    if repository.split("/")[-2:-1] != ["rayproject"]:
        return []
    return [
        Finding(
            "error",
            "cluster.image",
            f"{image!r} is Ray's stock image, without Tandem, torch or DeepSpeed: `tandem train` fails in its pods. "
            "Build the Dockerfile (docker build -t REGISTRY/tandem:TAG .), push it and set cluster.image "
            "(`tandem k8s --draft` renders anyway).",
        )
    ]


def storage_outlives_pods(config: TandemConfig) -> list[Finding]:
    storage = config.cluster.storage
    claim = config.cluster.kubernetes.storage_claim
    if claim and not storage.startswith("/"):
        return [
            Finding(
                "error",
                "cluster.storage",
                f"{storage!r} must be an absolute path to mount cluster.kubernetes.storage_claim ({claim!r}) there; e.g. /mnt/tandem.",
            )
        ]
    if claim or "://" in storage:
        return []
    return [
        Finding(
            "error",
            "cluster.storage",
            f"{storage!r} is a folder inside each pod: a RayJob's cluster is deleted after the job (shutdownAfterJobFinishes), "
            "taking the checkpoints and the artifact with it, and the RayService cannot find them. "
            "Set cluster.kubernetes.storage_claim to a ReadWriteMany PersistentVolumeClaim and cluster.storage to its mount path "
            "(`tandem k8s --draft` renders anyway).",
        )
    ]


def submitted_storage_is_absolute(config: TandemConfig) -> list[Finding]:
    storage = config.cluster.storage
    if storage.startswith("/") or "://" in storage:
        return []
    return [
        Finding(
            "warning",
            "cluster.storage",
            f"{storage!r} is relative: a submitted job runs in Ray's copy of the working_dir, which Ray deletes later, "
            "so the run folder would land there. Use an absolute path that the cluster's nodes share.",
        )
    ]


def storage_reachable(config: TandemConfig) -> list[Finding]:
    """An object-store URI whose bucket is missing or whose credentials this shell lacks (the job
    gets this shell's store variables: `tandem submit`)."""
    from cluster.storage import location, reachable_problem

    root = location(config.cluster.storage)
    problem = reachable_problem(root)
    if problem:
        return [Finding("error", "cluster.storage", problem)]
    if root.scheme == "s3" and not has_aws_credentials():
        return [
            Finding(
                "warning",
                "cluster.storage",
                f"{root} answered, but this shell has no AWS credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, "
                "AWS_WEB_IDENTITY_TOKEN_FILE or ~/.aws/credentials), so `tandem submit` gives the job none: the bucket must "
                "allow anonymous access or the nodes need their own (an instance role, the store's variables where `ray start` runs)",
            )
        ]
    return []


def has_aws_credentials() -> bool:
    """Whether this shell names AWS credentials the way boto3 and pyarrow look for them (an instance
    role cannot be seen from here, hence a warning, not an error)."""
    import os
    from pathlib import Path

    named = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials",)
    return any(os.environ.get(name) for name in named) or any(Path(f).is_file() for f in files)


def names_fit_kubernetes(config: TandemConfig) -> list[Finding]:
    findings = []
    names = resource_names(config)
    longest = max((names[k] for k in ("train", "tune", "serve")), key=len)
    if len(longest) > MAX_KUBERAY_NAME:
        findings.append(
            Finding(
                "error",
                "name",
                f"{config.name!r} is too long for KubeRay: {longest!r} must have at most {MAX_KUBERAY_NAME} characters; shorten name.",
            )
        )
    if not config.name[0].isalpha():
        findings.append(Finding("error", "name", f"{config.name!r} must start with a letter to name Kubernetes resources (DNS-1035)."))
    seen: dict[str, str] = {}
    for group in config.cluster.node_groups:
        other = seen.setdefault(worker_group_name(group), group)
        if other != group:
            findings.append(
                Finding(
                    "error",
                    f"cluster.node_groups.{group}",
                    f"becomes worker group {worker_group_name(group)!r} on Kubernetes, like {other!r}; rename one.",
                )
            )
    return findings


# ---------------------------------------------------------------------------------------------
# running them
# ---------------------------------------------------------------------------------------------

Check = Callable[[TandemConfig], list[Finding]]
CHECKS: list[tuple[Check, tuple[str, ...]]] = [
    (upgrade_needs_twice_the_gpus, ("kubernetes",)),
    (deployments_fit_their_groups, ("kubernetes", "submit")),
    (training_fits_its_group, ("kubernetes", "submit")),
    (deployments_scaled_to_zero, ("kubernetes", "submit")),
    (node_groups_scaled_to_zero, ("kubernetes",)),
    (image_ray_version_matches, ("kubernetes",)),
    (image_has_tandem, ("kubernetes",)),
    (storage_outlives_pods, ("kubernetes",)),
    (submitted_storage_is_absolute, ("submit",)),
    (storage_reachable, ("submit",)),
    (names_fit_kubernetes, ("kubernetes",)),
]


def predeploy_checks(config: TandemConfig, target: Target = "all") -> list[Finding]:
    """Every finding for a deployment to `target` ("all": Kubernetes and job submission), errors first."""
    findings = [f for check, targets in CHECKS if target == "all" or target in targets for f in check(config)]
    return sorted(findings, key=lambda f: f.level != "error")


def has_errors(findings: list[Finding]) -> bool:
    return any(f.level == "error" for f in findings)


def format_findings(findings: list[Finding]) -> str:
    """One finding per line, or a line saying there were none."""
    if not findings:
        return "pre-deploy checks: nothing to report"
    errors = sum(f.level == "error" for f in findings)
    head = f"pre-deploy checks: {errors} error(s), {len(findings) - errors} warning(s)"
    return "\n".join([head] + [f"  - {f}" for f in findings])
