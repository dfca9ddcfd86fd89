"""Cross-section checks: one small function per trap, run even when a section has field errors.

Each takes the validated sections by name (a section that failed validation is absent or trimmed
to its valid fields) and returns Problems that name the fields and the fix.
"""

from __future__ import annotations

import difflib
from typing import Any

from cluster.config.problems import Problem
from cluster.config.schema import TandemConfig


def _check_node_group_refs(sections: dict[str, Any]) -> list[Problem]:
    cluster, training, serving = sections.get("cluster"), sections.get("training"), sections.get("serving")
    if cluster is None:
        return []
    groups = sorted(cluster.node_groups)
    problems = []
    refs = []
    if training is not None and training.node_group is not None:
        refs.append(("training.node_group", training.node_group))
    if serving is not None:
        refs += [(f"serving.deployments[{i}].node_group", d.node_group) for i, d in enumerate(serving.deployments) if d.node_group]
    for path, group in refs:
        if group not in cluster.node_groups:
            close = difflib.get_close_matches(group, groups, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(
                Problem(
                    path=path,
                    value=group,
                    message=f"no such node group; {hint}cluster.node_groups has {groups}; add it there or pick one of those",
                )
            )
    return problems


def _check_gpus_on_groups(sections: dict[str, Any]) -> list[Problem]:
    cluster, training, serving = sections.get("cluster"), sections.get("training"), sections.get("serving")
    if cluster is None:
        return []
    problems = []
    if training is not None and training.use_gpu == "true":
        group = cluster.node_groups.get(training.node_group or "")
        if training.node_group and group is not None and group.gpus == 0:
            problems.append(
                Problem(
                    path="training.use_gpu",
                    value="true",
                    message=f"node group '{training.node_group}' has gpus: 0; set cluster.node_groups.{training.node_group}.gpus or "
                    "use_gpu: auto",
                )
            )
        if not training.node_group and not any(g.gpus for g in cluster.node_groups.values()) and cluster.address == "local":
            problems.append(
                Problem(
                    path="training.use_gpu", value="true", message="no node group has GPUs; add gpus to a node group or set use_gpu: auto"
                )
            )
    if serving is not None:
        for i, dep in enumerate(serving.deployments):
            if dep.gpus > 0 and not dep.node_group and cluster.address == "local" and not any(g.gpus for g in cluster.node_groups.values()):
                problems.append(
                    Problem(
                        path=f"serving.deployments[{i}].gpus",
                        value=dep.gpus,
                        message="no node group has GPUs, so this replica could never be placed; add gpus to a node group (and set "
                        "node_group), or use gpus: 0",
                    )
                )
            group = cluster.node_groups.get(dep.node_group or "")
            if dep.gpus > 0 and group is not None:
                if group.gpus == 0:
                    problems.append(
                        Problem(
                            path=f"serving.deployments[{i}].gpus",
                            value=dep.gpus,
                            message=f"node group '{dep.node_group}' has gpus: 0; set cluster.node_groups.{dep.node_group}.gpus or use "
                            "gpus: 0",
                        )
                    )
                elif dep.gpus > group.gpus:
                    problems.append(
                        Problem(
                            path=f"serving.deployments[{i}].gpus",
                            value=dep.gpus,
                            message=f"more than the {group.gpus} GPU(s) of a '{dep.node_group}' node; the replica could never be placed; "
                            "lower gpus",
                        )
                    )
    return problems


def _check_fp16_needs_gpu(sections: dict[str, Any]) -> list[Problem]:
    cluster, training, serving = sections.get("cluster"), sections.get("training"), sections.get("serving")
    problems = []
    if training is not None and training.precision == "fp16":
        group_gpus = 0
        if cluster is not None:
            group = cluster.node_groups.get(training.node_group or "")
            group_gpus = group.gpus if group else max((g.gpus for g in cluster.node_groups.values()), default=0)
        if training.use_gpu == "false" or group_gpus == 0:
            problems.append(
                Problem(
                    path="training.precision",
                    value="fp16",
                    message="fp16 with loss scaling needs a GPU; use bf16 or fp32 on CPU, or give the node group gpus",
                )
            )
    if serving is not None:
        for i, dep in enumerate(serving.deployments):
            if dep.precision == "fp16" and dep.gpus == 0:
                problems.append(
                    Problem(
                        path=f"serving.deployments[{i}].precision",
                        value="fp16",
                        message="fp16 inference needs gpus > 0; use bf16 or fp32 on CPU",
                    )
                )
    return problems


def _check_batches_can_fill(sections: dict[str, Any]) -> list[Problem]:
    serving = sections.get("serving")
    if serving is None:
        return []
    problems = []
    for i, dep in enumerate(serving.deployments):
        if dep.max_ongoing_requests is not None and serving.batching.max_batch_size > dep.max_ongoing_requests:
            problems.append(
                Problem(
                    path="serving.batching.max_batch_size",
                    value=serving.batching.max_batch_size,
                    message=(
                        f"larger than serving.deployments[{i}].max_ongoing_requests ({dep.max_ongoing_requests}); batches would never "
                        "fill. "
                        "Raise max_ongoing_requests or lower max_batch_size"
                    ),
                )
            )
    return problems


def _check_tuning_paths(sections: dict[str, Any]) -> list[Problem]:
    tuning = sections.get("tuning")
    if tuning is None:
        return []
    problems = []
    for path in tuning.space:
        head = path.split(".")[0]
        if head not in TandemConfig.model_fields or head in ("version", "name", "tuning"):
            problems.append(
                Problem(
                    path=f"tuning.space['{path}']",
                    message=f"'{head}' is not a config section that can be searched; use a path like training.optimizer.lr",
                )
            )
    return problems


def _check_direct_is_one_replica(sections: dict[str, Any]) -> list[Problem]:
    serving = sections.get("serving")
    if serving is None or serving.http_path != "direct":
        return []
    return [
        Problem(
            path=f"serving.deployments[{i}].autoscaling.max_replicas",
            value=dep.autoscaling.max_replicas,
            message="http_path: direct serves on the one replica's own port; set min_replicas and max_replicas to 1, or use "
            "http_path: haproxy for several replicas behind one URL",
        )
        for i, dep in enumerate(serving.deployments)
        if dep.autoscaling.max_replicas != 1
    ]


def _check_predict_deployments(sections: dict[str, Any]) -> list[Problem]:
    predict, serving = sections.get("predict"), sections.get("serving")
    if predict is None or serving is None or not predict.deployments:
        return []
    names = [d.name for d in serving.deployments]
    return [
        Problem(
            path=f"predict.deployments[{i}]",
            value=name,
            message=f"no serving deployment has this name; serving.deployments has {names}: pick from those",
        )
        for i, name in enumerate(predict.deployments)
        if name not in names
    ]


# What the training loop (training/loop.py, _epoch_metrics) reports each epoch: what checkpoints
# and trials can be ranked by.
REPORTED_METRICS = ("val_loss", "val_accuracy", "train_loss", "samples_per_s", "step_time_s", "peak_memory_mb", "lr")


def ranking_problems(metric_path: str, metric: str, mode_path: str, mode: str, ranks: str) -> list[Problem]:
    """A ranking metric the loop never reports (Ray would rank everything as -inf), or a mode that
    would pick the worst of `ranks` (checkpoints, trials)."""
    if metric not in REPORTED_METRICS:
        close = difflib.get_close_matches(metric, REPORTED_METRICS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        message = f"the training loop does not report it; {hint}reported: {', '.join(REPORTED_METRICS)}"
        return [Problem(path=metric_path, value=metric, message=message)]
    better = {"val_accuracy": "max", "samples_per_s": "max"}.get(metric, "min" if metric.endswith("loss") else None)
    if better is None or better == mode:
        return []
    direction = "higher" if better == "max" else "lower"
    message = f"{direction} {metric} is better, so mode {mode} would pick the worst {ranks}; set {mode_path}: {better}"
    return [Problem(path=mode_path, value=mode, message=message)]


def _check_checkpoint_metric(sections: dict[str, Any]) -> list[Problem]:
    training = sections.get("training")
    if training is None:
        return []
    checkpoint = training.checkpoint
    return ranking_problems("training.checkpoint.metric", checkpoint.metric, "training.checkpoint.mode", checkpoint.mode, "checkpoint")


def _check_tracking_on_object_storage(sections: dict[str, Any]) -> list[Problem]:
    # MLflow's default store is a sqlite file under cluster.storage and TensorBoard writes event
    # files into the run folder: both need a local disk, which an object-store URI is not.
    cluster, tracking = sections.get("cluster"), sections.get("tracking")
    # cluster/storage.py's is_uri, which this package sits below.
    if cluster is None or tracking is None or "://" not in cluster.storage or cluster.storage.startswith("file://"):
        return []
    problems = []
    if tracking.mlflow is not None and tracking.mlflow.tracking_uri is None:
        problems.append(
            Problem(
                path="tracking.mlflow.tracking_uri",
                value=None,
                message=f"defaults to sqlite:///<cluster.storage>/mlflow.db, which cannot live in an object store ({cluster.storage}); "
                "set it to your MLflow server (http://...) or a sqlite file on a local disk (the artifacts still go to the store)",
            )
        )
    if tracking.tensorboard:
        problems.append(
            Problem(
                path="tracking.tensorboard",
                value=True,
                message=f"TensorBoard writes event files into a local run folder, and cluster.storage is an object store "
                f"({cluster.storage}); set tracking.tensorboard: false and track with MLflow, or use a shared mount for cluster.storage",
            )
        )
    return problems


CROSS_FIELD_CHECKS = (
    _check_checkpoint_metric,
    _check_node_group_refs,
    _check_gpus_on_groups,
    _check_fp16_needs_gpu,
    _check_batches_can_fill,
    _check_tuning_paths,
    _check_predict_deployments,
    _check_direct_is_one_replica,
    _check_tracking_on_object_storage,
)


def cross_field_problems(sections: dict[str, Any]) -> list[Problem]:
    return [p for check in CROSS_FIELD_CHECKS for p in check(sections)]


# ---------------------------------------------------------------------------------------------
