"""Request decoding, auth, routing and the derived Serve options, without Ray or HTTP.

serving/protocol.py and serving/settings.py are pure; only the last test imports the app itself
(Ray Serve and FastAPI, but no cluster)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cluster.config import validate_config
from serving.protocol import RequestError, check_bearer, parse_json, parse_predict, token_digest
from serving.router import Router
from serving.settings import (
    INGRESS,
    Hardware,
    admission_floor,
    batcher_queue_limit,
    deployment_options,
    has_router,
    ingress_deployment_name,
    serve_env,
)

SHAPE = (64,)


def refused(payload, shape=SHAPE, max_inputs=8) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_predict(payload, shape, max_inputs)
    return caught.value


def test_one_example_or_a_list():
    x, probabilities = parse_predict({"inputs": [0.5] * 64}, SHAPE, 8)
    assert x.shape == (1, 64) and x.dtype == np.float32 and probabilities is False
    x, probabilities = parse_predict({"inputs": [[1] * 64, [0] * 64], "probabilities": True}, SHAPE, 8)
    assert x.shape == (2, 64) and probabilities is True
    image, _ = parse_predict({"inputs": [[[0.0] * 8] * 8]}, (1, 8, 8), 8)
    assert image.shape == (1, 1, 8, 8)


@pytest.mark.parametrize(
    "payload, status, code, names",
    [
        # names: what the message must say (the request part and the fix)
        ({"inputs": []}, 422, "empty_inputs", ['"inputs" is empty', "send one example of shape [64]"]),
        ({"inputs": [[0.5] * 63]}, 422, "wrong_shape", ["shape [1, 63]", "shape [N, 64]"]),
        ({"inputs": [[0.5] * 64, [0.5]]}, 422, "wrong_shape", ["ragged", "shape [64]"]),
        ({"inputs": 3}, 422, "wrong_shape", ['"inputs" must be a list', "shape [64]"]),
        ({"inputs": [["x"] * 64]}, 422, "wrong_dtype", ["numbers (float32)", "strings"]),
        ({"inputs": [[True] * 64]}, 422, "wrong_dtype", ["numbers (float32)", "booleans"]),
        ({"inputs": [[None] * 64]}, 422, "wrong_dtype", ["numbers (float32)", "non-numeric"]),
        ({"inputs": [[float("nan")] + [0.0] * 63]}, 422, "not_finite", ["example 0", "send finite numbers"]),
        ({"inputs": [[1e39] + [0.0] * 63]}, 422, "not_finite", ["example 0", "beyond float32"]),
        ({"inputs": [[0.5] * 64] * 9}, 413, "too_many_inputs", ["9 examples", "serving.limits.max_inputs", "split the request"]),
        ({"input": [0.5] * 64}, 422, "unknown_keys", ["['input']", "valid keys: ['inputs', 'probabilities']"]),
        ({}, 422, "missing_inputs", ['no "inputs"', "shape [64]"]),
        ([1, 2], 422, "wrong_body", ["JSON object", '{"inputs": [...]}']),
        ({"inputs": [0.5] * 64, "probabilities": 1}, 422, "wrong_type", ['"probabilities" must be true or false', "got 1"]),
    ],
)
def test_bad_payloads_are_refused_with_a_message_naming_the_fix(payload, status, code, names):
    error = refused(payload)
    assert (error.status, error.code) == (status, code)
    assert all(name in error.message for name in names), error.message


def test_shape_errors_name_the_expected_shape():
    error = refused({"inputs": [[0.5] * 10]})
    assert "[64]" in error.message and "[1, 10]" in error.message
    assert "not_finite" == refused({"inputs": [[0.0] * 64, [float("inf")] * 64]}).code
    assert "example 1" in refused({"inputs": [[0.0] * 64, [float("inf")] * 64]}).message


def test_json_errors():
    assert parse_json(b'{"inputs": [1]}') == {"inputs": [1]}
    for raw in (b"", b"{nope", b"\xff\xfe"):
        with pytest.raises(RequestError) as caught:
            parse_json(raw)
        assert caught.value.status == 400 and caught.value.code == "not_json"


def test_json_the_decoder_cannot_take_is_a_400_not_a_crash():
    deep = b'{"inputs": ' + b"[" * 5000 + b"[0.5]" + b"]" * 5000 + b"}"
    huge_integer = b'{"inputs": [' + b"1" * 5000 + b"]}"
    for raw in (deep, huge_integer):
        with pytest.raises(RequestError) as caught:
            parse_json(raw)
        assert caught.value.status == 400 and caught.value.code == "not_json"


def test_bearer_token_is_compared_and_required():
    check_bearer(None, None)  # auth off
    check_bearer("Bearer s3cret", token_digest("s3cret"))
    check_bearer("bearer s3cret", token_digest("s3cret"))
    for header in (None, "", "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(RequestError) as caught:
            check_bearer(header, token_digest("s3cret"))
        assert caught.value.status == 401 and caught.value.headers == {"WWW-Authenticate": "Bearer"}


def test_router_policies():
    spill = Router(["gpu", "cpu"], "spillover", spill_threshold=2)
    assert spill.order() == ["gpu", "cpu"]
    spill.started("gpu")
    spill.started("gpu")
    assert spill.order() == ["cpu", "gpu"]
    spill.finished("gpu", served=True)
    assert spill.order() == ["gpu", "cpu"]
    spill.started("cpu")
    spill.finished("cpu", served=True)
    assert spill.stats()["spilled"] == 1 and spill.stats()["served"] == {"gpu": 1, "cpu": 1}

    robin = Router(["a", "b", "c"], "round_robin")
    assert [robin.order()[0] for _ in range(4)] == ["a", "b", "c", "a"]

    least = Router(["a", "b"], "least_loaded")
    least.started("a")
    assert least.order() == ["b", "a"]
    with pytest.raises(ValueError, match="not one of"):
        Router(["a"], "random")


def one_deployment():
    return validate_config(
        {
            "serving": {
                "deployments": [{"name": "cpu", "cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1}}]
            }
        }
    )


def two_deployments():
    return validate_config(
        {
            "cluster": {"node_groups": {"cpu": {"cpus": 2}, "gpu": {"cpus": 2}}},
            "serving": {
                "deployments": [
                    {"name": "gpu", "engine": "torch", "node_group": "gpu"},
                    {"name": "cpu", "engine": "onnxruntime", "quantize": "int8", "node_group": "cpu"},
                ]
            },
        }
    )


def test_one_deployment_is_its_own_ingress_several_get_a_router():
    assert not has_router(one_deployment()) and ingress_deployment_name(one_deployment()) == "cpu"
    assert has_router(two_deployments()) and ingress_deployment_name(two_deployments()) == "Ingress"
    assert list(deployment_options(one_deployment())) == ["cpu"]
    assert list(deployment_options(two_deployments())) == ["Ingress", "gpu", "cpu"]


def test_deployment_options_carry_limits_resources_and_the_fast_path_env():
    config = one_deployment()
    options = deployment_options(config, {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"})["cpu"]
    assert options["max_ongoing_requests"] == 4 * config.serving.batching.max_batch_size
    assert options["max_queued_requests"] == config.serving.limits.max_queued_requests
    assert options["autoscaling_config"]["upscale_delay_s"] == 1
    assert options["ray_actor_options"]["num_cpus"] == 0.5
    assert options["ray_actor_options"]["runtime_env"] == {"env_vars": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}
    pinned = deployment_options(two_deployments())["gpu"]["ray_actor_options"]
    assert pinned["resources"] == {"group_gpu": 1}


def test_auto_replicas_fill_the_cores_the_replicas_run_on():
    default = validate_config({})
    # The default: a fixed count, one replica per core of the cluster the app is built on.
    assert deployment_options(default, hardware=Hardware(cores=2))["cpu"]["num_replicas"] == 2
    assert deployment_options(default, hardware=Hardware(cores=1))["cpu"]["num_replicas"] == 1
    threads = validate_config({"serving": {"deployments": [{"name": "cpu", "threads": 2}]}})
    assert deployment_options(threads, hardware=Hardware(cores=5))["cpu"]["num_replicas"] == 2
    gpu = validate_config(
        {
            "cluster": {"node_groups": {"gpu": {"cpus": 16, "gpus": 2}}},
            "serving": {"deployments": [{"name": "gpu", "engine": "torch", "gpus": 0.5}]},
        }
    )
    assert deployment_options(gpu, hardware=Hardware(cores=16, gpus=2))["gpu"]["num_replicas"] == 4
    # Pinned: the node group's nodes at their most, whatever the building node has.
    assert deployment_options(two_deployments(), hardware=Hardware(cores=64))["cpu"]["num_replicas"] == 2
    # An explicit bound wins; 'auto' beside it is clamped to it.
    scaled = validate_config({"serving": {"deployments": [{"name": "cpu", "autoscaling": {"min_replicas": 1}}]}})
    config = deployment_options(scaled, hardware=Hardware(cores=4))["cpu"]["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"]) == (1, 4)
    capped = validate_config({"serving": {"deployments": [{"name": "cpu", "autoscaling": {"max_replicas": 3}}]}})
    assert deployment_options(capped, hardware=Hardware(cores=8))["cpu"]["num_replicas"] == 3
    # Unknown hardware (a Serve config file): the counts are left to build_app on the cluster.
    unresolved = deployment_options(default)["cpu"]
    assert "num_replicas" not in unresolved and "autoscaling_config" not in unresolved
    router = deployment_options(two_deployments())[INGRESS]
    assert "num_replicas" not in router and "max_ongoing_requests" not in router


def test_serve_env_turns_on_the_fast_path_and_keeps_local_haproxy_files_private(monkeypatch):
    from serving.deploy import local_haproxy_env

    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)
    env = serve_env(one_deployment().serving, os.environ)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # HAProxy resends a request a dying replica closed without an answer (predictions are idempotent).
    assert set(env["RAY_SERVE_HAPROXY_RETRY_ON"].split()) == {"conn-failure", "empty-response", "junk-response"}
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in env  # replicas get no per-machine settings
    # Shedding in HAProxy only where tandem-haproxy's path is known: one batch per replica, 0.3 x the target in its queue.
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in env
    shedding = serve_env(one_deployment().serving, front_binary="/opt/tandem-haproxy")
    assert shedding["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/opt/tandem-haproxy"
    assert shedding["TANDEM_HAPROXY_SERVER_MAXCONN"] == "32" and shedding["TANDEM_HAPROXY_QUEUE_MS"] == "15"
    local = local_haproxy_env()
    assert len(local["RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"]) + 57 < 97  # HAProxy's limit, node id included
    assert local["RAY_SERVE_HAPROXY_STATS_PORT"] != "8404"
    assert local_haproxy_env() == local  # stable within a process: a second serve() changes nothing
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "3")
    # The deploying process's own Serve settings win and travel along; a config file takes none.
    assert serve_env(one_deployment().serving, os.environ)["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "3"
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in serve_env(one_deployment().serving)


def test_the_admission_gate_always_takes_one_full_batch():
    config = one_deployment()
    assert admission_floor(config.serving) == config.serving.batching.max_batch_size


def test_batcher_queue_limit_is_two_batches_or_the_configured_limit():
    config = one_deployment()
    assert batcher_queue_limit(config.serving) == 2 * config.serving.batching.max_batch_size
    small = validate_config({"serving": {"limits": {"max_queued_requests": 5}}})
    assert batcher_queue_limit(small.serving) == 5


def test_build_app_refuses_a_missing_artifact_with_the_fix(tmp_path):
    from cluster.artifacts import ArtifactError
    from serving.app import build_app

    config = validate_config({"cluster": {"storage": str(tmp_path)}})
    with pytest.raises(ArtifactError, match="tandem train"):
        build_app({"config": config.to_dict(), "artifact": "latest"})
