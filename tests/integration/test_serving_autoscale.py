"""Autoscaling through HAProxy: sustained load takes the deployment from 1 to 2 replicas, and it
scales back to 1 when the load stops (short delays in the test config)."""

from __future__ import annotations

import time

import httpx
import pytest

from serving.deploy import status
from tests.integration.test_serving import BackgroundLoad, serving_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "digits-scale"


def running(config) -> int:
    return status(config).get("cpu", {}).get("RUNNING", 0)


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_sustained_load_scales_up_to_two_replicas_and_back_down(ray_session, shared_artifact, tmp_path, monkeypatch):
    from ray import serve

    from serving.deploy import serve as deploy

    # The deploying process's RAY_SERVE_* settings travel to this app's replicas (serve_env): they
    # report their load every second instead of every 10, so the short look-back sees it.
    monkeypatch.setenv("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")

    _, artifact = shared_artifact
    config = serving_config(
        tmp_path,
        NAME,
        {
            "deployments": [
                {
                    "name": "cpu",
                    "engine": "onnxruntime",
                    "cpus": 0.25,
                    "autoscaling": {
                        "min_replicas": 1,
                        "max_replicas": 2,
                        "target_ongoing_requests": 1,
                        "upscale_delay_s": 1,
                        "downscale_delay_s": 3,
                        # Serve averages 30 s of load by default; the replicas below push every second.
                        "look_back_s": 3,
                    },
                }
            ],
        },
    )
    url = deploy(config, artifact=str(artifact))
    try:
        assert running(config) == 1
        with BackgroundLoad(url, clients=8) as load:
            assert wait_for(lambda: running(config) == 2, timeout_s=120), status(config)
            # Both replicas answer through the one URL (HAProxy balances over their ports).
            pids = set()
            with httpx.Client(timeout=10) as client:
                for _ in range(40):
                    pids.add(client.get(f"{url}/v1/stats").json()["pid"])
                    if len(pids) == 2:
                        break
            assert len(pids) == 2
        statuses = {r["status"] for r in load.records}
        assert statuses == {200}, statuses
        assert wait_for(lambda: running(config) == 1, timeout_s=120), status(config)
        assert httpx.post(f"{url}/v1/predict", json={"inputs": [0.5] * 64}, timeout=30).status_code == 200
    finally:
        serve.delete(config.name)
