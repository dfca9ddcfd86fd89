"""KubeRay rendering: every manifest validates against KubeRay's CRD schema, k8s/ is current.

The CRD schemas (../shared/kuberay-crds/) are validated strictly: an object with declared
properties refuses unknown keys, as `kubectl apply` (strict field validation) does; a typo such
as `rayStartParam` would otherwise pass a plain openAPIV3Schema check and be pruned silently.
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.config import TandemConfig, load_config
from cluster.runtime import node_group_resources
from serving.serve_config import build_serve_config, dump_serve_config
from serving.settings import IMAGE_FRONT_BINARY
from tandem.k8s import (
    AUTH_TOKEN_KEY,
    CONFIG_FILE,
    CONFIG_MOUNT,
    image_ray_version,
    kubernetes_config,
    ray_start_resources,
    render_manifests,
    render_steps,
    serve_config_yaml,
)
from tandem.k8s_files import render_files, write_manifests

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}

IN_CI = os.environ.get("CI") == "true"
# A checkout without the shared folder skips the CRD checks; CI must have them: there a missing
# folder fails the run (crd_validator) instead of skipping what the checks are for.
needs_crds = pytest.mark.skipif(
    not CRDS.is_dir() and not IN_CI, reason=f"KubeRay CRDs not found at {CRDS} (the shared folder beside the repo)"
)

GPU_CPU_GROUPS = [
    "cluster.node_groups={gpu: {cpus: 8, gpus: 1, memory: 32Gi, min_replicas: 0, max_replicas: 4,"
    " node_selector: {cloud.google.com/gke-accelerator: nvidia-l4},"
    " tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]},"
    " cpu_small: {cpus: 4, memory: 8Gi, min_replicas: 1, max_replicas: 8}}",
    "training.node_group=gpu",
    "training.use_gpu=true",
    "training.precision=bf16",
    "serving.deployments=[{name: gpu, engine: torch, precision: bf16, node_group: gpu, gpus: 1,"
    " autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}},"
    " {name: cpu, engine: onnxruntime, quantize: int8, node_group: cpu_small, cpus: 1,"
    " autoscaling: {min_replicas: 2, max_replicas: 2}}]",
    "serving.auth.token_env=TANDEM_TOKEN",
    "tuning={metric: val_loss, mode: min, samples: 4, space: {training.optimizer.lr: {loguniform: [0.0001, 0.01]}}}",
    "cluster.runtime_env={env_vars: {OMP_NUM_THREADS: '1'}, pip: [rich]}",
    "tracking={mlflow: {tracking_uri: 'http://mlflow.ml.svc:5000'}, tensorboard: true}",
    "predict={input: /mnt/tandem/rows.parquet, output: /mnt/tandem/predictions, deployments: [cpu]}",
]


def packaged() -> TandemConfig:
    return load_config(None)


def gpu_and_cpu() -> TandemConfig:
    return load_config(None, GPU_CPU_GROUPS)


def object_store() -> TandemConfig:
    return load_config(None, ["cluster.storage=s3://tandem-runs/runs"])


CONFIGS = {"packaged": packaged, "gpu_and_cpu": gpu_and_cpu, "object_store": object_store}


# ---------------------------------------------------------------------------------------------
# CRD schema validation
# ---------------------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """The schema with additionalProperties: false wherever properties are declared and unknown
    fields are not explicitly preserved."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str):
    import jsonschema

    if not (CRDS / CRD_FILES[kind]).is_file():
        pytest.fail(f"KubeRay CRD {CRD_FILES[kind]} not found in {CRDS}: CI must provide the shared folder beside the repo")
    # libyaml's loader: the CRDs are 1-1.4 MB each, about 25 s apiece with the pure-Python one.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def crd_errors(manifest: dict[str, Any]) -> list[str]:
    validator = crd_validator(manifest["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


@needs_crds
@pytest.mark.parametrize("which", CONFIGS)
def test_every_ray_manifest_validates_against_its_crd(which):
    manifests = render_manifests(CONFIGS[which]())
    ray_kinds = [m for m in manifests.values() if m["apiVersion"] == "ray.io/v1"]
    assert {m["kind"] for m in ray_kinds} == {"RayCluster", "RayJob", "RayService"}
    if which == "gpu_and_cpu":  # predict.input and output set: a predict RayJob on the cpu group only
        job = manifests["rayjob-predict.yaml"]["spec"]
        assert job["entrypoint"] == "tandem predict /config/tandem.yaml"
        assert [g["groupName"] for g in job["rayClusterSpec"]["workerGroupSpecs"]] == ["cpu-small"]
    for manifest in ray_kinds:
        assert crd_errors(manifest) == [], manifest["kind"]


@needs_crds
def test_strict_validation_catches_a_misspelled_field():
    cluster = render_manifests(packaged())["raycluster.yaml"]
    cluster["spec"]["workerGroupSpecs"][0]["rayStartParam"] = cluster["spec"]["workerGroupSpecs"][0].pop("rayStartParams")
    assert any("rayStartParam" in e for e in crd_errors(cluster))


def test_names_are_dns_labels_within_kuberay_limits():
    # KubeRay appends 6 characters to RayJob/RayService names for their clusters (limit 47).
    for manifest in render_manifests(gpu_and_cpu()).values():
        name = manifest.get("metadata", {}).get("name")
        if name:
            assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47, name


# ---------------------------------------------------------------------------------------------
# what the manifests say
# ---------------------------------------------------------------------------------------------


def worker_groups(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def test_worker_groups_mirror_node_groups():
    cfg = gpu_and_cpu()
    spec = render_manifests(cfg)["raycluster.yaml"]["spec"]
    groups = worker_groups(spec)
    assert set(groups) == {"gpu", "cpu-small"}
    gpu, cpu = groups["gpu"], groups["cpu-small"]
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (0, 0, 4)
    assert (cpu["replicas"], cpu["minReplicas"], cpu["maxReplicas"]) == (1, 1, 8)
    gpu_container = gpu["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1}
    assert gpu_container["resources"]["requests"] == gpu_container["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeSelector" not in cpu["template"]["spec"] and "tolerations" not in cpu["template"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == image_ray_version(cfg.cluster.image)


def test_ray_start_resources_are_the_runtime_pinning_resources():
    spec = render_manifests(gpu_and_cpu())["raycluster.yaml"]["spec"]
    for node_group, worker_group in (("gpu", "gpu"), ("cpu_small", "cpu-small")):
        value = worker_groups(spec)[worker_group]["rayStartParams"]["resources"]
        assert value == ray_start_resources(node_group)
        # KubeRay pastes it into a shell command; its autoscaler strips the quotes and parses JSON.
        assert json.loads(value.strip("'\"` ")) == node_group_resources(node_group)
        assert " " not in value


def test_autoscaling_only_when_some_group_can_change_size():
    fixed = load_config(None, ["cluster.node_groups={cpu: {cpus: 2, min_replicas: 2, max_replicas: 2}}"])
    spec = render_manifests(fixed)["raycluster.yaml"]["spec"]
    assert spec["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in spec


def test_token_auth_reaches_every_ray_container_from_one_secret():
    manifests = render_manifests(packaged())
    secret = "digits-ray-token"
    for name in ("raycluster.yaml", "rayjob-train.yaml", "rayservice.yaml"):
        spec = manifests[name]["spec"]
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        assert cluster["authOptions"] == {"mode": "token", "secretName": secret}
        pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        if "submitterPodTemplate" in spec:
            pods.append(spec["submitterPodTemplate"])
        for pod in pods:
            env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": AUTH_TOKEN_KEY}


def test_mlflow_credentials_reach_the_head_from_an_optional_secret_and_never_the_config():
    manifests = render_manifests(gpu_and_cpu())
    for name in ("raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml"):
        spec = manifests[name]["spec"]
        cluster = spec.get("rayClusterSpec") or spec
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["envFrom"] == [{"secretRef": {"name": "digits-mlflow", "optional": True}}], name
    assert "MLFLOW_TRACKING_PASSWORD" not in json.dumps(manifests)
    # Without tracking, no secret is asked for.
    assert "digits-mlflow" not in json.dumps(render_manifests(packaged()))


def test_object_store_credentials_reach_every_ray_pod_from_an_optional_secret():
    manifests = render_manifests(object_store())
    store = {"secretRef": {"name": "digits-store", "optional": True}}
    for name in ("raycluster.yaml", "rayjob-train.yaml", "rayservice.yaml"):
        spec = manifests[name]["spec"]
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for pod in pods:
            assert store in pod["template"]["spec"]["containers"][0]["envFrom"], name
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(manifests)
    # A shared mount needs no store credentials.
    assert "digits-store" not in json.dumps(render_manifests(packaged()))


def test_auth_disabled_renders_no_secret_reference():
    manifests = render_manifests(load_config(None, ["cluster.auth=disabled"]))
    text = json.dumps(manifests)
    assert "secretKeyRef" not in text and "authOptions" not in text
    assert '"RAY_AUTH_MODE", "value": "disabled"' in text


def test_jobs_run_the_cli_on_the_mounted_config():
    cfg = gpu_and_cpu()
    manifests = render_manifests(cfg)
    config_map = manifests["configmap.yaml"]
    mounted = yaml.safe_load(config_map["data"][CONFIG_FILE])
    assert mounted["cluster"]["address"] == "auto"
    assert load_config(None).model_validate(mounted).training.node_group == "gpu"
    for stage in ("train", "tune"):
        job = manifests[f"rayjob-{stage}.yaml"]["spec"]
        assert job["entrypoint"] == f"tandem {stage} {CONFIG_MOUNT}/{CONFIG_FILE}"
        assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"
        assert job["ttlSecondsAfterFinished"] > 0 and job["backoffLimit"] >= 0
        assert "activeDeadlineSeconds" not in job  # not configured
        runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
        assert runtime_env["env_vars"]["OMP_NUM_THREADS"] == "1" and runtime_env["pip"] == ["rich"]
        assert "working_dir" not in runtime_env  # the code is in the image
        # Training is pinned to the gpu group: its cluster has no idle CPU group.
        assert set(worker_groups(job["rayClusterSpec"])) == {"gpu"}
        head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert head["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
        assert head["containers"][0]["volumeMounts"][0]["mountPath"] == CONFIG_MOUNT


def test_tune_job_only_when_the_config_has_tuning():
    assert "rayjob-tune.yaml" not in render_manifests(packaged())
    assert "rayjob-tune.yaml" in render_manifests(gpu_and_cpu())


def test_rayservice_embeds_exactly_the_serve_config():
    cfg = gpu_and_cpu()
    service = render_manifests(cfg)["rayservice.yaml"]["spec"]
    kcfg = kubernetes_config(cfg)
    image_serve_config = build_serve_config(kcfg, kcfg.serving.artifact, front_binary=IMAGE_FRONT_BINARY)
    assert service["serveConfigV2"] == dump_serve_config(image_serve_config) == serve_config_yaml(kcfg)
    serve = yaml.safe_load(service["serveConfigV2"])
    # The image's tandem-haproxy sheds in front of the replicas; a Serve config file for any cluster
    # (`tandem serve-config`) cannot know where that script is, so it leaves HAProxy as Ray sets it up.
    controller = serve["controller_options"]["runtime_env"]["env_vars"]
    assert controller["RAY_SERVE_HAPROXY_BINARY_PATH"] == IMAGE_FRONT_BINARY
    anywhere = build_serve_config(kcfg, kcfg.serving.artifact)["controller_options"]["runtime_env"]["env_vars"]
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in anywhere
    assert serve["http_options"]["host"] == "0.0.0.0"  # reachable from the serve Service
    assert service["upgradeStrategy"] == {"type": "NewCluster"}
    cluster = service["rayClusterConfig"]
    assert set(worker_groups(cluster)) == {"gpu", "cpu-small"}
    env = {e["name"] for g in cluster["workerGroupSpecs"] for e in g["template"]["spec"]["containers"][0]["env"]}
    assert "TANDEM_TOKEN" in env


def test_rayservice_note_names_what_serve_config_v2_adds_to_the_cluster_file():
    service = render_files(packaged())["serve/rayservice.yaml"]
    header = service.split("apiVersion:", 1)[0]
    kcfg = kubernetes_config(packaged())
    file_settings = build_serve_config(kcfg, kcfg.serving.artifact)["controller_options"]["runtime_env"]["env_vars"]
    service_settings = yaml.safe_load(serve_config_yaml(kcfg))["controller_options"]["runtime_env"]["env_vars"]
    added = [name for name in service_settings if name not in file_settings]
    assert added == ["RAY_SERVE_HAPROXY_BINARY_PATH", "TANDEM_HAPROXY_SERVER_MAXCONN", "TANDEM_HAPROXY_QUEUE_MS"]
    assert ", ".join(added) in header.replace("\n# ", " ")
    proxy = render_files(load_config(None, ["serving.http_path=proxy"]))["serve/rayservice.yaml"]  # Ray's own proxy
    assert "writes for this config.\n" in proxy and "HAPROXY" not in proxy.split("apiVersion:", 1)[0]


def test_image_comes_from_the_config():
    manifests = render_manifests(load_config(None, ["cluster.image=registry.example.com/tandem:0.1.0"]))
    images = re.findall(r'"image": "([^"]+)"', json.dumps(manifests))
    assert images and set(images) == {"registry.example.com/tandem:0.1.0"}


def test_each_step_folder_applies_its_own_manifest_and_the_config_in_the_recipes_order():
    steps = render_steps(gpu_and_cpu())
    assert list(steps) == ["train", "tune", "serve", "predict", "cluster"]
    expected = {"train": "rayjob-train.yaml", "tune": "rayjob-tune.yaml", "serve": "rayservice.yaml", "predict": "rayjob-predict.yaml"}
    for step, files in steps.items():
        kinds = [m["kind"] for name, m in files.items() if name != "kustomization.yaml"]
        assert files["kustomization.yaml"]["resources"] == [n for n in files if n != "kustomization.yaml"]
        assert kinds[0] == "ConfigMap" and len(kinds) == 2, (step, kinds)  # one Ray object per step, never three clusters
        assert expected.get(step, "raycluster.yaml") in files


def test_image_ray_version_reads_only_ray_images():
    assert image_ray_version("rayproject/ray:2.60.0-py311-cpu") == "2.60.0"
    assert image_ray_version("docker.io/rayproject/ray-ml:2.9.3-gpu") == "2.9.3"
    assert image_ray_version("registry.example.com/tandem:0.1.0") is None


# ---------------------------------------------------------------------------------------------
# the committed k8s/ and the Dockerfile
# ---------------------------------------------------------------------------------------------


def test_committed_k8s_folder_equals_a_fresh_rendering():
    fresh = render_files(packaged())
    committed = {str(p.relative_to(ROOT / "k8s")): p.read_text() for p in sorted((ROOT / "k8s").rglob("*.yaml"))}
    assert sorted(committed) == sorted(fresh), "k8s/ has other files than the renderer writes; run `tandem k8s --draft --out k8s`"
    for name, text in fresh.items():
        assert committed[name] == text, f"k8s/{name} is stale; run `tandem k8s --draft --out k8s`"


def test_write_manifests_removes_files_of_an_earlier_rendering(tmp_path):
    write_manifests(gpu_and_cpu(), tmp_path)
    assert (tmp_path / "tune" / "rayjob-tune.yaml").exists()
    (tmp_path / "notes.yaml").write_text("mine: true\n")
    (tmp_path / "rayservice.yaml").write_text("# Rendered by `tandem k8s` before steps had folders\n")
    written = write_manifests(packaged(), tmp_path)
    assert not (tmp_path / "tune").exists() and not (tmp_path / "rayservice.yaml").exists()
    assert (tmp_path / "notes.yaml").exists()  # not ours: left alone
    assert sorted(str(p.relative_to(tmp_path)) for p in written) == sorted(render_files(packaged()))


def test_dockerfile_builds_on_the_pinned_ray():
    import ray

    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1)
    pinned = re.search(r"^ray==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert image_ray_version(base) == pinned == ray.__version__
    assert "-c constraints.txt" in dockerfile
