"""Overload and soak over real HTTP, single-deployment shape behind HAProxy (the default app).

- Overload: for OVERLOAD_S seconds, 128 clients (8 keep the replica busy) each send as soon as
  their last answer came, and wait Retry-After after a 503, as well-behaved clients do. Two copies
  of the model are deployed together and loaded one after the other: one with admission on arrival (serving/admission.py, the
  default), one with queue limits only. Nothing fails; every 503 has Retry-After; the batcher
  queues only what Tandem's admission gate let in (its high-water mark, from /v1/stats, is within
  the gate's max_in_flight, itself within max_ongoing_requests). The depth against
  serving.settings.batcher_queue_limit (32 here) is recorded, not asserted: that limit is where the
  batcher may start to shed, and it sheds only requests predicted late (serving/batching.py, 5.),
  and the gate admits while its per-request cost, which batching lowers, fits the budget; so a
  queue that drains in time passes it (measured: 39 and 59 queued, none shed by the batcher).
  Asserted as ratios of the two arms, measured back to back (medians): the gate's accepted requests are faster than the
  queue-only arm's, and its refusals come sooner than the queue-only arm's answers. The accepted p99 against
  batching.target_p99_ms is recorded for RELIABILITY.md, not asserted.
- Soak: SOAK_S seconds of moderate load; the replica's RSS (psutil, pid from /v1/stats) grows by
  less than RSS_BYTES_PER_REQUEST per request served from the start (measured after warm-up) to the end.

Not covered (measured while building this, on 2 shared cores): an open-loop load at 2.5x the
replica's capacity overloads the HTTP front itself. Refusing a request in Python (uvicorn, FastAPI)
costs about half of serving it, so the replica cannot even refuse that many, and the wait grows
outside any replica-side policy (accepted p99 over 10 s, connections timing out). That needs
shedding in front of the replica (a per-server connection limit in HAProxy, which Ray's generated
HAProxy config does not expose).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import numpy as np
import psutil
import pytest

from serving.loadgen import RawConnection
from serving.settings import batcher_queue_limit
from tests.integration.test_serving import digits_inputs, make_artifact, serving_config
from tests.reliability import figures

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

NAME = "overload-one"
OVERLOAD_S = 20.0
OVERLOAD_CLIENTS = 128
WARMUP_S = 2.0
CAPACITY_CLIENTS = 8
SOAK_S = 30.0  # about 30,000 requests here: above the 10,000 a 256 B/request bound needs over 2 MiB of RSS noise
SOAK_CLIENTS = 4
MAX_ONGOING = 64
TARGET_P99_MS = 50.0
# Allowed RSS growth of a replica over the soak, per request served. Measured noise: about 2 MiB
# over 28,848 requests (76 B/request); a leak of one response per request (about 1 KB) is 4x over.
RSS_BYTES_PER_REQUEST = 256


def timed_load(url: str, bodies: list[bytes], clients: int, seconds: float, honor_retry_after: bool = False) -> tuple[list[dict], float]:
    """`clients` keep-alive connections (the lean client of serving.loadgen) sending bodies in turn
    until `seconds` have passed; with honor_retry_after, a client that gets a 503 waits the
    Retry-After seconds before its next request, as a well-behaved client does. One record per
    request: status, seconds, retry_after."""

    async def run() -> list[dict]:
        records: list[dict] = []
        begin = time.monotonic()
        deadline = begin + seconds
        turn = iter(range(10**9))

        async def client() -> None:
            connection = RawConnection(url)
            try:
                while time.monotonic() < deadline:
                    body = bodies[next(turn) % len(bodies)]
                    start = time.perf_counter()
                    try:
                        status, headers, _ = await asyncio.wait_for(connection.post("/v1/predict", body), 30)
                    except (OSError, EOFError, asyncio.TimeoutError, ValueError):
                        status, headers = -1, {}
                        await connection.close()
                    records.append(
                        {
                            "status": status,
                            "seconds": time.perf_counter() - start,
                            "retry_after": headers.get("retry-after"),
                            "done_s": time.monotonic() - begin,
                        }
                    )
                    if status == 503 and honor_retry_after:
                        await asyncio.sleep(float(headers.get("retry-after") or 1))
            finally:
                await connection.close()

        await asyncio.gather(*(client() for _ in range(clients)))
        return records

    start = time.perf_counter()
    records = asyncio.run(run())
    return records, time.perf_counter() - start


class StatsPoller:
    """Reads /v1/stats every `every_s` in a thread (answers refused under overload are skipped)."""

    def __init__(self, url: str, every_s: float = 0.5):
        self.url, self.every_s = url, every_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(self.every_s):
                try:
                    reply = client.get(f"{self.url}/v1/stats")
                    if reply.status_code == 200:
                        self.samples.append(reply.json())
                except httpx.HTTPError:
                    pass

    def __enter__(self) -> StatsPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def replica_pids(url: str, expected: int = 1) -> set[int]:
    pids: set[int] = set()
    with httpx.Client(timeout=10) as client:
        for _ in range(40):
            pids.add(client.get(f"{url}/v1/stats").json()["pid"])
            if len(pids) == expected:
                break
    return pids


def rss(pids: set[int]) -> dict[int, int]:
    return {pid: psutil.Process(pid).memory_info().rss for pid in pids}


def overload_config(storage, name: str, admission: str, route_prefix: str = "/"):
    return serving_config(
        storage,
        name,
        {
            "route_prefix": route_prefix,
            "deployments": [{"name": "cpu", "engine": "onnxruntime", "cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 1}, "max_ongoing_requests": MAX_ONGOING}],
            "batching": {"max_batch_size": 32, "target_p99_ms": TARGET_P99_MS, "admission": admission},
            "limits": {"max_queued_requests": 32},
        },
    )


@pytest.fixture(scope="module")
def apps(ray_session, tmp_path_factory):
    """Two copies of the same model side by side: admission on arrival (the default) and queue
    limits only, so the overload test compares them under the same load on the same machine."""
    from ray import serve

    from serving.deploy import serve as deploy

    storage = tmp_path_factory.mktemp("overload")
    artifact = make_artifact(storage, NAME, seed=8, run="run-1")
    gated = overload_config(storage, NAME, "latency")
    queued = overload_config(storage, NAME + "-queue", "queue", route_prefix="/queue")
    urls = {"latency": deploy(gated, artifact=str(artifact)), "queue": deploy(queued, artifact=str(artifact))}
    yield gated, urls
    serve.delete(gated.name)
    serve.delete(queued.name)


@pytest.fixture(scope="module")
def app(apps):
    config, urls = apps
    return config, urls["latency"]


def encoded(count: int, seed: int, per_request: int = 1) -> list[bytes]:
    x = digits_inputs(count * per_request, seed).reshape(count, per_request, 64)
    return [json.dumps({"inputs": batch.tolist()}).encode() for batch in x]


def percentile_ms(records: list[dict], status: int, q: float) -> float | None:
    values = [r["seconds"] * 1000 for r in records if r["status"] == status]
    return round(float(np.percentile(values, q)), 1) if values else None


def overload_figures(records: list[dict], wall: float) -> dict:
    """Counts over the whole run; latencies over the steady overload after WARMUP_S (the first
    second is 128 clients opening connections at once, which no replica-side policy sees)."""
    statuses = [r["status"] for r in records]
    ok, shed = statuses.count(200), statuses.count(503)
    steady = [r for r in records if r["done_s"] >= WARMUP_S]
    return dict(
        offered_rps=round(len(records) / wall),
        requests_sent=len(records),
        ok=ok,
        shed_503=shed,
        failed=len(statuses) - ok - shed,
        accepted_p50_ms=percentile_ms(steady, 200, 50),
        accepted_p99_ms=percentile_ms(steady, 200, 99),
        accepted_p99_ms_with_start=percentile_ms(records, 200, 99),
        shed_p50_ms=percentile_ms(steady, 503, 50),
        shed_p99_ms=percentile_ms(steady, 503, 99),
    )


def test_overload_sheds_fast_with_retry_after_and_a_bounded_queue(apps):
    config, urls = apps
    url = urls["latency"]
    target = config.serving.batching.target_p99_ms
    # Capacity first: what the replica serves with enough clients to keep it busy, none refused.
    capacity, capacity_wall = timed_load(url, encoded(512, seed=30), clients=CAPACITY_CLIENTS, seconds=5.0)
    capacity_rps = sum(r["status"] == 200 for r in capacity) / capacity_wall
    bodies = encoded(4096, seed=31)
    with StatsPoller(url) as poller:
        records, wall = timed_load(url, bodies, OVERLOAD_CLIENTS, OVERLOAD_S, honor_retry_after=True)
    after = httpx.get(f"{url}/v1/stats", timeout=10).json()
    # The same load against the same model with queue limits only (Serve's max_ongoing_requests and
    # max_queued_requests, the batcher's queue): the arm the admission gate is measured against.
    queue_records, queue_wall = timed_load(urls["queue"], bodies, OVERLOAD_CLIENTS, OVERLOAD_S, honor_retry_after=True)
    gated, queued = overload_figures(records, wall), overload_figures(queue_records, queue_wall)
    polled_depth = max((s["batcher"]["queue_depth"] for s in poller.samples), default=-1)
    max_depth = after["batcher"]["max_queue_depth"]
    queue_limit = batcher_queue_limit(config.serving)  # where the replica's batcher may start to shed
    result = dict(
        load=f"{OVERLOAD_CLIENTS} closed-loop clients honouring Retry-After ({CAPACITY_CLIENTS} keep the replica busy) for "
        f"{OVERLOAD_S:.0f} s",
        capacity_rps=round(capacity_rps),
        **gated,
        target_p99_ms=target,
        accepted_p99_within_target=bool(gated["accepted_p99_ms"] is not None and gated["accepted_p99_ms"] < target),
        queue_only=queued,
        accepted_p99_vs_queue_only=round(gated["accepted_p99_ms"] / queued["accepted_p99_ms"], 2) if gated["ok"] and queued["ok"] else None,
        admission=after["admission"],
        max_queue_depth=max_depth,
        max_polled_queue_depth=polled_depth,
        batcher_queue_limit=queue_limit,
        over_batcher_queue_limit=max_depth > queue_limit,
        queue_bound=f"max_queue_depth <= admission max_in_flight <= max_ongoing_requests ({MAX_ONGOING})",
        batcher_shed=after["batcher"]["shed"],
    )
    figures.record("serving_overload", **result)
    print(f"overload: {result}")
    assert gated["failed"] == 0, result
    assert gated["ok"] > 0 and gated["shed_503"] > 0, result
    assert after["admission"]["refused"] > 0, result  # the gate itself refused (not only Serve's queue limit)
    # Accepted p99 against batching.target_p99_ms is a performance figure, recorded for
    # RELIABILITY.md rather than asserted (timed assertions flake with the machine's load). What
    # is asserted are ratios of the two arms run back to back, at the median (the p99 of either
    # arm moves with whatever else the 2 shared cores run): with the gate, accepted requests are
    # faster than with queue limits alone, and a refusal comes sooner than a queued answer.
    assert gated["accepted_p50_ms"] < queued["accepted_p50_ms"], result
    assert gated["shed_p50_ms"] < queued["accepted_p50_ms"], result
    assert all(r["retry_after"] and int(r["retry_after"]) >= 1 for r in records if r["status"] == 503)
    # The batcher queues only requests Tandem's gate admitted, within Serve's max_ongoing_requests.
    # Not asserted against batcher_queue_limit: see the module docstring.
    assert 0 < max_depth and polled_depth <= max_depth <= after["admission"]["max_in_flight"] <= MAX_ONGOING, result


def test_soak_memory_stays_bounded(app):
    _, url = app
    pids = replica_pids(url)
    bodies = encoded(2048, seed=32)
    timed_load(url, bodies, clients=SOAK_CLIENTS, seconds=5.0)  # warm-up: allocators and arenas settle
    start = rss(pids)
    samples = [start]
    records: list[dict] = []
    deadline = time.monotonic() + SOAK_S
    while time.monotonic() < deadline:
        chunk, _ = timed_load(url, bodies, clients=SOAK_CLIENTS, seconds=min(10.0, deadline - time.monotonic()))
        records += chunk
        samples.append(rss(pids))
    end = samples[-1]
    assert replica_pids(url) == pids  # the same processes throughout: nothing restarted
    statuses = [r["status"] for r in records]
    served = statuses.count(200)
    mib = 2**20
    result = dict(
        seconds=SOAK_S,
        clients=SOAK_CLIENTS,
        requests_sent=len(records),
        ok=statuses.count(200),
        shed_503=statuses.count(503),
        failed=len(statuses) - statuses.count(200) - statuses.count(503),
        accepted_p99_ms=percentile_ms(records, 200, 99),
        rss_start_mib={str(p): round(start[p] / mib, 1) for p in pids},
        rss_end_mib={str(p): round(end[p] / mib, 1) for p in pids},
        rss_max_mib={str(p): round(max(s[p] for s in samples) / mib, 1) for p in pids},
        rss_growth_bytes_per_request={str(p): round((end[p] - start[p]) / max(1, served), 1) for p in pids},
        rss_bound=f"(end - start) / requests served < {RSS_BYTES_PER_REQUEST} B",
    )
    figures.record("serving_soak", **result)
    print(f"soak: {result}")
    # Moderate load: no failure; a few 503s are the batcher keeping its target on a busy machine.
    assert result["failed"] == 0 and result["ok"] > 0.9 * len(statuses), {s: statuses.count(s) for s in set(statuses)}
    # Enough requests that a 1 KB-per-request leak (several MiB) stands well clear of the noise.
    assert served >= 10_000, result
    for pid in pids:
        assert (end[pid] - start[pid]) / served < RSS_BYTES_PER_REQUEST, result
