"""Two model deployments behind the router ingress: torch ("gpu" group) and ONNX int8 ("cpu" group).

On this machine the "gpu" deployment runs torch on CPU; what is tested is routing, placement by
node-group resources, spillover, bearer-token auth at the ingress, and that each deployment's
answers equal its own engine's.
"""

from __future__ import annotations

import os
import re

import httpx
import numpy as np
import pytest

from tests.integration.test_serving import digits_inputs, load, replica_stats, serving_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # every test but one uses the served app

NAME = "digits-two"
TOKEN_ENV = "TANDEM_TEST_SERVING_TOKEN"
TOKEN = "test-token-5b0c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def artifact(shared_artifact):
    return shared_artifact


@pytest.fixture(scope="module")
def config(artifact):
    storage, _ = artifact
    return serving_config(
        storage,
        NAME,
        {
            "deployments": [
                {"name": "gpu", "engine": "torch", "node_group": "gpu", "cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                {
                    "name": "cpu",
                    "engine": "onnxruntime",
                    "quantize": "int8",
                    "node_group": "cpu",
                    "cpus": 0.5,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                },
            ],
            "batching": {"max_batch_size": 16, "target_p99_ms": 100},
            "router": {"policy": "spillover", "spill_threshold": 2},
            "auth": {"token_env": TOKEN_ENV},
        },
    )


@pytest.fixture(scope="module")
def url(ray_session, config, artifact):
    from ray import serve

    from serving.deploy import serve as deploy

    os.environ[TOKEN_ENV] = TOKEN
    try:
        base = deploy(config, artifact=str(artifact[1]))
        yield base
        serve.delete(config.name)
    finally:
        os.environ.pop(TOKEN_ENV, None)


@pytest.fixture(scope="module")
def engines(artifact):
    from serving.engines import load_engine

    _, folder = artifact
    return {
        "gpu": load_engine(folder, engine="torch", threads=1),
        "cpu": load_engine(folder, engine="onnxruntime", quantize="int8", threads=1),
    }


def test_replicas_are_placed_on_their_node_groups(url, config):
    from ray import serve

    for name, group in (("gpu", "group_gpu"), ("cpu", "group_cpu")):
        stats = serve.get_deployment_handle(name, app_name=NAME).stats.remote().result(timeout_s=60)
        assert stats["resources"].get(group) == 1, stats["resources"]
        assert stats["resources"].get("CPU") == 0.5


def test_auth_is_required_at_the_ingress(url):
    x = [0.5] * 64
    assert httpx.post(f"{url}/v1/predict", json={"inputs": x}, timeout=30).status_code == 401
    wrong = httpx.post(f"{url}/v1/predict", json={"inputs": x}, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer" and wrong.json()["error"] == "unauthorized"
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    assert httpx.post(f"{url}/v1/predict", json={"inputs": x}, headers=AUTH, timeout=30).status_code == 200


def test_the_token_check_compares_in_constant_time():
    """No Ray: the bearer check (serving.protocol.check_bearer, which every authenticated route of
    serving/app.py calls) compares digests with hmac.compare_digest and never with == or !=."""
    import ast
    import inspect

    from serving import app, protocol

    check = ast.parse(inspect.getsource(protocol.check_bearer))
    calls = {ast.unparse(node.func) for node in ast.walk(check) if isinstance(node, ast.Call)}
    assert "hmac.compare_digest" in calls, calls
    compared = [
        ast.unparse(node)
        for node in ast.walk(check)
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops)
    ]
    assert all("digest" not in text and "given" not in text for text in compared), compared  # only the scheme is compared plainly
    # The app checks tokens through it, and no code of the app compares the token's digest itself.
    source = inspect.getsource(app)
    assert any(isinstance(n, ast.Call) and ast.unparse(n.func) == "check_bearer" for n in ast.walk(ast.parse(source)))
    assert not re.search(r"token_digest\s*[!=]=|[!=]=\s*self\.token_digest", source)
    with pytest.raises(protocol.RequestError):
        protocol.check_bearer(f"Bearer {TOKEN}x", protocol.token_digest(TOKEN))
    protocol.check_bearer(f"Bearer {TOKEN}", protocol.token_digest(TOKEN))


def test_idle_traffic_stays_on_the_first_deployment_and_equals_torch(url, engines):
    x = digits_inputs(12, seed=21)
    served = []
    with httpx.Client(headers=AUTH, timeout=30) as client:
        for row in x:
            body = client.post(f"{url}/v1/predict", json={"inputs": row.tolist()}).json()
            served.append(body["deployment"])
            assert body["predictions"] == engines["gpu"].predict(row[None]).argmax(axis=1).tolist()
    assert set(served) == {"gpu"}


def test_a_saturated_first_deployment_spills_to_the_second_and_each_answers_like_its_engine(url, engines):
    before = replica_stats(url, AUTH)["router"]
    records = load(url, clients=16, requests_each=6, seed=22, token=TOKEN)
    after = replica_stats(url, AUTH)["router"]
    assert {r["status"] for r in records} == {200}
    by = {name: [r for r in records if r["body"]["deployment"] == name] for name in ("gpu", "cpu")}
    assert by["cpu"], "nothing spilled to the cpu deployment under load"
    assert after["spilled"] - before["spilled"] == len(by["cpu"])
    inputs = digits_inputs(16 * 6, seed=22)
    for name, rows in by.items():
        if not rows:
            continue
        x = inputs[[r["index"] for r in rows]]
        expected = engines[name].predict(x).argmax(axis=1)
        got = np.array([r["body"]["predictions"][0] for r in rows])
        assert (got == expected).mean() == 1.0, name


def test_bad_input_is_refused_at_the_ingress_and_serving_goes_on(url):
    bad = httpx.post(f"{url}/v1/predict", json={"inputs": [[0.5] * 10]}, headers=AUTH, timeout=30)
    assert bad.status_code == 422 and bad.json()["expected_shape"] == [64]
    assert httpx.post(f"{url}/v1/predict", json={"inputs": [0.5] * 64}, headers=AUTH, timeout=30).status_code == 200
