"""Pre-deploy checks: each one fires on a config made to trip it, naming the fields and numbers."""

from __future__ import annotations

from cluster.config import load_config
from tandem.checks import Finding, format_findings, has_errors, predeploy_checks

GPU_SERVING = [
    "cluster.node_groups={gpu: {cpus: 8, gpus: 2, memory: 32Gi, min_replicas: 1, max_replicas: 3}, cpu: {cpus: 4, memory: 8Gi}}",
    "serving.deployments=[{name: gpu, engine: torch, node_group: gpu, gpus: 1, autoscaling: {min_replicas: 1, max_replicas: 6}}]",
]


def findings_at(overrides: list[str], path: str, target: str = "all") -> list[Finding]:
    return [f for f in predeploy_checks(load_config(None, overrides), target) if f.path == path]


def test_newcluster_upgrade_warns_with_twice_the_serving_gpus():
    (finding,) = findings_at(GPU_SERVING, "cluster.kubernetes.upgrade_strategy")
    assert finding.level == "warning"
    # 2 GPUs per node x 3 nodes = 6 in steady state, 12 while two clusters run.
    assert "up to 12 GPUs during an upgrade instead of 6" in finding.message
    assert "cluster.node_groups.gpu.gpus (2) x max_replicas (3)" in finding.message


def test_no_upgrade_warning_without_serving_gpus():
    assert findings_at([], "cluster.kubernetes.upgrade_strategy") == []


def test_upgrade_strategy_none_has_no_upgrade_warning():
    assert findings_at(GPU_SERVING + ["cluster.kubernetes.upgrade_strategy=None"], "cluster.kubernetes.upgrade_strategy") == []


def test_serving_min_replicas_zero_warns_with_the_expected_delay():
    overrides = GPU_SERVING[:1] + [
        "serving.deployments=[{name: gpu, engine: torch, node_group: gpu, gpus: 1,"
        " autoscaling: {min_replicas: 0, max_replicas: 2, upscale_delay_s: 3}}]"
    ]
    (finding,) = findings_at(overrides, "serving.deployments[0].autoscaling.min_replicas")
    assert finding.level == "warning"
    assert "about 8-18 s" in finding.message and "upscale_delay_s (3 s)" in finding.message
    assert "downscale_delay_s (30 s)" in finding.message


def test_node_group_min_replicas_zero_warns_with_the_node_start_delay():
    overrides = ["cluster.node_groups={cpu: {cpus: 2, min_replicas: 0, max_replicas: 2}}"]
    (finding,) = findings_at(overrides, "cluster.node_groups.cpu.min_replicas")
    assert finding.level == "warning" and "1-5 min" in finding.message
    assert "training job" in finding.message and "serving" in finding.message


def test_cold_start_on_both_adds_the_node_delay():
    overrides = [
        "cluster.node_groups={gpu: {cpus: 8, gpus: 1, min_replicas: 0, max_replicas: 2}, cpu: {cpus: 2}}",
        "serving.deployments=[{name: gpu, engine: torch, node_group: gpu, gpus: 1, autoscaling: {min_replicas: 0, max_replicas: 2}}]",
    ]
    (finding,) = findings_at(overrides, "serving.deployments[0].autoscaling.min_replicas")
    assert "cluster.node_groups.gpu (min_replicas: 0)" in finding.message


def test_deployment_with_more_gpus_than_any_node_is_an_error():
    overrides = [
        "cluster.node_groups={gpu: {cpus: 8, gpus: 1, max_replicas: 4}, cpu: {cpus: 4}}",
        "serving.deployments=[{name: big, engine: torch, gpus: 2}]",  # unpinned: the config cannot tell
    ]
    (finding,) = findings_at(overrides, "serving.deployments[0].gpus")
    assert finding.level == "error"
    assert "2 GPUs per replica" in finding.message and "no node group has more than 1 per node" in finding.message


def test_more_gpu_replicas_than_the_group_holds_is_an_error():
    overrides = [
        "cluster.node_groups={gpu: {cpus: 8, gpus: 1, max_replicas: 2}, cpu: {cpus: 4}}",
        "serving.deployments=[{name: gpu, engine: torch, node_group: gpu, gpus: 1, autoscaling: {min_replicas: 3, max_replicas: 3}}]",
    ]
    (finding,) = findings_at(overrides, "serving.deployments[0].autoscaling.min_replicas")
    assert finding.level == "error"
    assert "3 replicas of 1 GPUs" in finding.message and "at most 2 (1 per node x max_replicas 2)" in finding.message


def test_more_gpu_training_workers_than_gpus_is_an_error():
    overrides = [
        "cluster.node_groups={gpu: {cpus: 8, gpus: 1, max_replicas: 2}, cpu: {cpus: 4}}",
        "training.node_group=gpu",
        "training.use_gpu=true",
        "training.workers=4",
    ]
    (finding,) = findings_at(overrides, "training.workers")
    assert finding.level == "error"
    assert "4 workers need 4 GPUs" in finding.message and "cluster.node_groups.gpu can have at most 2" in finding.message


def test_image_with_another_ray_version_warns():
    import ray

    # The stock image also draws its own warning; pick the version one.
    (finding,) = [f for f in findings_at(["cluster.image=rayproject/ray:2.9.0-py311"], "cluster.image") if "runs Ray" in f.message]
    assert finding.level == "warning"

    assert "Ray 2.9.0" in finding.message and f"Ray {ray.__version__} is installed" in finding.message


def test_image_without_a_ray_version_in_its_tag_warns():
    (finding,) = findings_at(["cluster.image=registry.example.com/tandem:0.1.0"], "cluster.image")
    assert "cannot be read from the tag" in finding.message and "cluster.kubernetes.ray_version" in finding.message


def test_stock_ray_image_is_an_error_that_names_the_dockerfile_and_the_draft_flag():
    (finding,) = findings_at([], "cluster.image")  # the packaged default: rayproject/ray:2.60.0-py311-cpu
    assert finding.level == "error" and "stock image" in finding.message and "Dockerfile" in finding.message
    assert "tandem k8s --draft" in finding.message


def test_pod_local_storage_is_an_error_for_kubernetes_and_relative_storage_a_warning_for_submit():
    (k8s,) = findings_at([], "cluster.storage", target="kubernetes")
    assert k8s.level == "error" and "'./runs'" in k8s.message and "storage_claim" in k8s.message
    (submit,) = findings_at([], "cluster.storage", target="submit")
    assert "relative" in submit.message
    assert findings_at(["cluster.storage=/shared/runs"], "cluster.storage", target="submit") == []


def test_names_too_long_or_not_starting_with_a_letter_are_errors():
    (long,) = findings_at(["name=" + "a" * 44], "name")
    assert long.level == "error" and "at most 47" in long.message
    (digit,) = findings_at(["name=1digits"], "name")
    assert "start with a letter" in digit.message


def test_worker_group_names_that_collide_are_an_error():
    overrides = ["cluster.node_groups={gpu_a: {cpus: 1}, gpu-a: {cpus: 1}}"]
    (finding,) = findings_at(overrides, "cluster.node_groups.gpu-a")
    assert finding.level == "error" and "'gpu-a'" in finding.message


def test_targets_select_their_checks_and_errors_come_first():
    overrides = [
        "cluster.node_groups={gpu: {cpus: 8, gpus: 1, max_replicas: 4}, cpu: {cpus: 4}}",
        "serving.deployments=[{name: big, engine: torch, gpus: 2}]",
    ]
    cfg = load_config(None, overrides)
    every = predeploy_checks(cfg)
    assert every[0].level == "error" and has_errors(every)
    submit_paths = {f.path for f in predeploy_checks(cfg, "submit")}
    assert "cluster.image" not in submit_paths and "serving.deployments[0].gpus" in submit_paths
    text = format_findings(every)
    assert text.startswith("pre-deploy checks: 3 error(s)") and "error: serving.deployments[0].gpus:" in text
    assert format_findings([]) == "pre-deploy checks: nothing to report"
