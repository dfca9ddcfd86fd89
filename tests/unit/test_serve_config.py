"""The Serve config file: Ray's own schema accepts it, and it says what the Tandem config says.

ServeDeploySchema allows unknown keys (forward compatibility), so a misspelled option would pass
it and be ignored; `unknown_keys` checks every level against the schema models' fields.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from cluster.config import load_config
from cluster.runtime import pin_to_group
from serving.serve_config import build_serve_config, write_serve_config
from serving.settings import INGRESS, derived_max_ongoing_requests, serve_env

TWO_DEPLOYMENTS = [
    "cluster.node_groups={gpu: {cpus: 8, gpus: 1, memory: 32Gi, min_replicas: 0, max_replicas: 4},"
    " cpu: {cpus: 4, memory: 8Gi, max_replicas: 8}}",
    "serving.deployments=[{name: gpu, engine: torch, precision: bf16, node_group: gpu, gpus: 1,"
    " autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}},"
    " {name: cpu, engine: onnxruntime, quantize: int8, node_group: cpu, cpus: 1, max_queued_requests: 50,"
    " autoscaling: {min_replicas: 2, max_replicas: 2}}]",
    "serving.route_prefix=/digits",
    "serving.port=8123",
    "cluster.runtime_env={env_vars: {OMP_NUM_THREADS: '1'}, pip: [rich], working_dir: .}",
]


def unknown_keys(value: dict[str, Any], model: Any, where: str = "") -> list[str]:
    from ray.serve.config import AutoscalingConfig, ControllerOptions
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    nested = {
        (ServeDeploySchema, "http_options"): HTTPOptionsSchema,
        (ServeDeploySchema, "applications"): ServeApplicationSchema,
        (ServeDeploySchema, "controller_options"): ControllerOptions,
        (ServeApplicationSchema, "deployments"): DeploymentSchema,
        (DeploymentSchema, "autoscaling_config"): AutoscalingConfig,
        (DeploymentSchema, "ray_actor_options"): RayActorOptionsSchema,
    }
    found = [f"{where}{k}" for k in value if k not in model.model_fields]
    for key, inner in value.items():
        child = nested.get((model, key))
        if child is None:
            continue
        for i, item in enumerate(inner if isinstance(inner, list) else [inner]):
            found += unknown_keys(item, child, f"{where}{key}[{i}].")
    return found


@pytest.mark.parametrize("overrides", [[], TWO_DEPLOYMENTS], ids=["packaged", "two_deployments"])
def test_rays_schema_accepts_it_with_no_ignored_keys(overrides):
    from ray.serve.schema import ServeDeploySchema

    serve_config = build_serve_config(load_config(None, overrides))
    ServeDeploySchema.model_validate(serve_config)
    assert unknown_keys(serve_config, ServeDeploySchema) == []


def test_it_mirrors_the_serving_section():
    cfg = load_config(None, TWO_DEPLOYMENTS)
    serve_config = build_serve_config(cfg, artifact="/runs/digits/run-1")
    assert serve_config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    (app,) = serve_config["applications"]
    assert app["name"] == cfg.name and app["route_prefix"] == "/digits"
    assert app["import_path"] == "serving.app:build_app"
    assert app["args"] == {"config": cfg.to_dict(), "artifact": "/runs/digits/run-1"}
    # A local working_dir cannot go into a Serve config file (the image carries the code). The
    # HTTP-path settings reach the controller and, with the user's env_vars, every replica.
    settings = serve_env(cfg.serving)
    assert app["runtime_env"] == {"env_vars": {**settings, "OMP_NUM_THREADS": "1"}, "pip": ["rich"]}
    # The controller also gets a longer HAProxy readiness window (a busy head misses Serve's 5 s).
    assert serve_config["controller_options"] == {"runtime_env": {"env_vars": {**settings, "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}}}
    deployments = {d["name"]: d for d in app["deployments"]}
    assert list(deployments) == [INGRESS, "gpu", "cpu"]

    gpu, cpu = deployments["gpu"], deployments["cpu"]
    assert gpu["autoscaling_config"]["min_replicas"] == 1 and gpu["autoscaling_config"]["max_replicas"] == 4
    assert "num_replicas" not in gpu
    assert cpu["num_replicas"] == 2 and "autoscaling_config" not in cpu  # min == max: a fixed count
    assert gpu["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": pin_to_group("gpu")}
    assert cpu["ray_actor_options"]["resources"] == pin_to_group("cpu")
    assert gpu["max_ongoing_requests"] == derived_max_ongoing_requests(cfg.serving, cfg.serving.deployments[0])
    assert gpu["max_queued_requests"] == cfg.serving.limits.max_queued_requests
    assert cpu["max_queued_requests"] == 50

    ingress = deployments[INGRESS]
    assert ingress["autoscaling_config"]["min_replicas"] == 1  # the HTTP entry never scales to zero
    assert ingress["max_ongoing_requests"] >= gpu["max_ongoing_requests"] * 4 + cpu["max_ongoing_requests"] * 2
    assert "resources" not in ingress["ray_actor_options"]


def test_one_deployment_is_its_own_ingress_and_unpinned_asks_for_no_group():
    (app,) = build_serve_config(load_config(None))["applications"]
    (model,) = app["deployments"]  # serving.app: no router hop with one deployment
    assert model["name"] == "cpu"
    assert "resources" not in model["ray_actor_options"]


def test_serve_settings_follow_the_config_not_the_shell(monkeypatch):
    cfg = load_config(None)
    before = build_serve_config(cfg)
    monkeypatch.setenv("RAY_SERVE_SOMETHING_LOCAL", "1")
    assert build_serve_config(cfg) == before


def test_write_serve_config_round_trips(tmp_path):
    cfg = load_config(None, TWO_DEPLOYMENTS)
    path = write_serve_config(cfg, tmp_path / "serve" / "digits.yaml")
    assert yaml.safe_load(path.read_text()) == build_serve_config(cfg)
