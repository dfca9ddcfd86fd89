"""Serving faults over real HTTP: a model replica SIGKILLed under load, and the whole app killed.

- Router shape (two model deployments behind the "Ingress"): a replica killed while a bounded load
  runs. Serve replaces it, the ingress resends the requests that were on it (predictions are pure
  functions of their input), so the client sees no failed request; the retries show in the
  ingress's /v1/stats (and as tandem_replica_retries_total).
- Single-deployment shape (the model replica is the HTTP ingress, behind HAProxy), at the default
  replica count (one per core: the test asserts it): HAProxy is the only thing between the client
  and the replica. Tandem configures it to resend a request whose
  connection failed or closed without an answer (serving.settings.HAPROXY_RETRY_ON) on the other
  replica. Measured: 4 of 3,470 requests lost with Ray's default (connection failures only),
  1 of 3,890 and 3 of 7,565 with Tandem's ("Server disconnected without sending a response", all
  sent at the kill): the setting has not been shown to save the requests the dead replica held, so
  the test does not claim it. It asserts that the setting is in the HAProxy configuration the
  load ran against (so the figure is measured with it), and bounds the failures by what the kill
  can reach: each load client has one request in flight, so at most one failure per client;
  everything after the kill is served by the other replica and the replacement.
- The whole app: every replica process SIGKILLed (Serve restarts them), then Serve shut down and the
  app deployed again: the endpoint comes back serving the same model version.

The pids come from the app's own /v1/stats (the router ingress reports each model deployment's).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from serving.deploy import local_haproxy_env, status
from serving.settings import HAPROXY_RETRY_ON
from tests.integration.test_serving import BackgroundLoad, serving_config
from tests.reliability import figures

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

ROUTER_APP = "faults-router"
SINGLE_APP = "faults-single"


def wait_for(predicate, timeout_s: float, every_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except (httpx.HTTPError, KeyError, ValueError):  # an answer from a process being replaced
            pass
        time.sleep(every_s)
    return False


def stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/stats", timeout=10).json()


def running(config, deployment: str) -> int:
    return status(config).get(deployment, {}).get("RUNNING", 0)


def counts(records: list[dict]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in records:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# router shape: two model deployments behind the Ingress
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def router_app(ray_session, shared_artifact, tmp_path_factory):
    from ray import serve

    from serving.deploy import serve as deploy

    storage = tmp_path_factory.mktemp("faults-router")
    _, artifact = shared_artifact
    config = serving_config(
        storage,
        ROUTER_APP,
        {
            "deployments": [
                {"name": "a", "engine": "onnxruntime", "cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                {"name": "b", "engine": "onnxruntime", "cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
            ],
            # Both deployments take traffic all the time, so the killed one has requests on it.
            "router": {"policy": "round_robin"},
        },
    )
    url = deploy(config, artifact=str(artifact))
    yield config, artifact, url
    try:
        serve.delete(config.name)
    except Exception:
        pass


def test_a_killed_model_replica_is_replaced_and_no_request_fails(router_app):
    config, _, url = router_app
    before = stats(url)
    victim = before["deployments"]["a"]["pid"]
    ingress_pid = before["pid"]
    with BackgroundLoad(url, clients=8) as load:
        time.sleep(3)  # steady load on both deployments
        sent_before_kill = len(load.records)
        killed_at = time.monotonic()
        kill(victim)
        replaced = wait_for(
            lambda: running(config, "a") == 1 and stats(url)["deployments"]["a"].get("pid") not in (None, victim), timeout_s=180
        )
        replaced_after_s = time.monotonic() - killed_at
        # The replacement takes its share of the traffic again before the load stops.
        mark = len(load.records)
        wait_for(lambda: any(r["status"] == 200 and r["body"]["deployment"] == "a" for r in load.records[mark:]), timeout_s=20)
        time.sleep(1)
    after = stats(url)
    codes = counts(load.records)
    failed = [(r["status"], str(r["body"])[:200]) for r in load.records if r["status"] != 200]
    retries = after["retries"]
    served_by_a_after = sum(1 for r in load.records[mark:] if r["status"] == 200 and r["body"]["deployment"] == "a")
    figures.record(
        "serving_replica_kill_router",
        shape="router (Ingress -> handles -> 2 model deployments, 1 replica each)",
        requests_sent=len(load.records),
        sent_before_kill=sent_before_kill,
        failed=len(failed),
        status_counts=codes,
        retried=retries["total"],
        retried_by_error=retries["by_error"],
        gave_up=retries["gave_up"],
        replicas_killed=1,
        replicas_replaced=int(replaced),
        replaced_after_s=round(replaced_after_s, 1),
        served_by_replacement=served_by_a_after,
    )
    print(f"router shape: {len(load.records)} sent, codes {codes}, retries {retries}, replaced in {replaced_after_s:.1f} s")
    assert replaced, status(config)
    assert not failed, (codes, failed[:5])
    assert after["pid"] == ingress_pid  # the ingress itself was never touched
    assert retries["total"] >= 1 and retries["gave_up"] == 0, retries
    assert served_by_a_after > 0


def test_a_refused_input_gets_422_at_the_ingress_and_is_not_retried(router_app):
    # Bad input never reaches a model replica (refused at the ingress), and no retry is counted.
    _, _, url = router_app
    before = stats(url)["retries"]["total"]
    reply = httpx.post(f"{url}/v1/predict", json={"inputs": [[0.5] * 10]}, timeout=30)
    assert reply.status_code == 422
    assert stats(url)["retries"]["total"] == before


def test_the_whole_app_killed_comes_back_with_the_same_model_version(router_app):
    from cluster.artifacts import model_version
    from serving.deploy import serve as deploy
    from serving.deploy import shutdown

    config, artifact, url = router_app
    version = model_version(artifact)
    assert httpx.get(f"{url}/healthz", timeout=10).json()["version"] == version
    # 1. Every replica process of the app SIGKILLed at once (ingress and both model deployments).
    pids: set[int] = set()

    def every_pid() -> bool:
        current = stats(url)
        pids.update({current["pid"], *(d["pid"] for d in current["deployments"].values())})
        return True

    assert wait_for(every_pid, timeout_s=60)
    started = time.monotonic()
    for pid in pids:
        kill(pid)

    def back_with_new_processes() -> bool:
        now = stats(url)
        fresh = {now["pid"], *(d.get("pid") for d in now["deployments"].values())}
        return not (fresh & pids) and None not in fresh

    assert wait_for(back_with_new_processes, timeout_s=180), status(config)
    restarted_s = time.monotonic() - started
    reply = httpx.post(f"{url}/v1/predict", json={"inputs": [0.5] * 64}, timeout=30)
    assert reply.status_code == 200 and reply.json()["model_version"] == version

    # 2. Serve shut down (the app and its HTTP entry gone), then deployed again.
    shutdown()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2).raise_for_status()
    started = time.monotonic()
    new_url = deploy(config, artifact=str(artifact))
    redeployed_s = time.monotonic() - started
    # Serve starts again with this config's http_options; the app's first URL may have been a Serve
    # that an earlier test started on another port (a running Serve keeps its own).
    assert new_url.startswith(f"http://127.0.0.1:{config.serving.port}"), (new_url, config.serving.port)
    reply = httpx.post(f"{new_url}/v1/predict", json={"inputs": [0.5] * 64}, timeout=30)
    assert reply.status_code == 200 and reply.json()["model_version"] == version
    assert httpx.get(f"{new_url}/v1/models", timeout=10).json()["models"][0]["version"] == version
    figures.record(
        "serving_app_kill",
        replicas_killed=len(pids),
        restarted_by_serve_s=round(restarted_s, 1),
        redeployed_after_shutdown_s=round(redeployed_s, 1),
        same_version=True,
        version=version,
    )


# ---------------------------------------------------------------------------------------------
# single-deployment shape: the model replicas are the HTTP ingress, behind HAProxy
# ---------------------------------------------------------------------------------------------


def test_default_replicas_fill_the_cores_and_a_replica_kill_is_measured(ray_session, shared_artifact, tmp_path):
    from ray import serve

    from serving.deploy import serve as deploy

    _, artifact = shared_artifact
    config = serving_config(
        tmp_path,
        SINGLE_APP,
        {
            # Its own prefix: the router app of this module still holds "/".
            "route_prefix": "/single",
            # No replica count: the default fills the cores, one replica per core.
            "deployments": [{"name": "cpu", "engine": "onnxruntime", "cpus": 0.5}],
        },
    )
    cores = len(os.sched_getaffinity(0))
    assert cores >= 2, "this test kills one of several replicas: it needs a machine of 2 cores or more"
    url = deploy(config, artifact=str(artifact))
    try:
        assert running(config, "cpu") == cores, status(config)
        pids: set[int] = set()

        def every_replica_seen() -> bool:  # HAProxy may take a while to balance onto all of them
            pids.add(stats(url)["pid"])
            return len(pids) == cores

        assert wait_for(every_replica_seen, timeout_s=60, every_s=0.05), pids
        victim = min(pids)
        clients = 8
        with BackgroundLoad(url, clients=clients) as load:
            time.sleep(3)
            killed_at = time.monotonic()
            kill(victim)
            # Replaced: a process that was not there before answers /v1/stats, and Serve counts 2 again.
            replaced = wait_for(lambda: stats(url)["pid"] not in pids and running(config, "cpu") == cores, timeout_s=180, every_s=0.1)
            replaced_after_s = time.monotonic() - killed_at
            time.sleep(2)
        codes = counts(load.records)
        failed = sum(n for code, n in codes.items() if code != 200)
        figures.record(
            "serving_replica_kill_single",
            shape=f"single deployment (the default replica count: {cores}, one per core, as HTTP ingress behind HAProxy)",
            haproxy_retry_on=os.environ.get("RAY_SERVE_HAPROXY_RETRY_ON", HAPROXY_RETRY_ON),
            failures=sorted({str(r["body"])[:120] for r in load.records if r["status"] != 200})[:3],
            # When each failed request was sent, from the kill: at the kill is a request the dead
            # replica held; near replaced_after_s is HAProxy reloading its config for the new replica.
            failed_sent_after_kill_s=[round(r["sent_at"] - killed_at, 2) for r in load.records if r["status"] != 200][:10],
            requests_sent=len(load.records),
            failed=failed,
            failed_bound=f"<= {clients} (one request in flight per client)",
            status_counts=codes,
            replicas_killed=1,
            replicas_replaced=int(replaced),
            replaced_after_s=round(replaced_after_s, 1),
        )
        print(f"single shape: {len(load.records)} sent, codes {codes}, replaced in {replaced_after_s:.1f} s")
        assert replaced, status(config)
        # The figure above was measured with Tandem's retry setting in the configuration HAProxy ran
        # (tandem-haproxy's rewrite of Ray's file, which Serve writes per node).
        state = Path(local_haproxy_env()["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
        (running_config,) = state.glob("*/tandem-haproxy.cfg")
        assert f"retry-on {HAPROXY_RETRY_ON}" in running_config.read_text(), running_config.read_text()
        # Measured, not promised: the requests the killed replica held can fail (see the module
        # docstring). Everything after the kill is served by the other replica and the replacement,
        # so no more can fail than the requests in flight at the kill: one per client.
        assert failed <= clients, (codes, failed, clients)
        assert codes.get(200, 0) > 0
        assert httpx.post(f"{url}/v1/predict", json={"inputs": [0.5] * 64}, timeout=30).status_code == 200
    finally:
        serve.delete(config.name)
