"""Overload and soak over real HTTP, single-deployment shape behind HAProxy (the default app).

- Overload: for OVERLOAD_S seconds, far more clients than the replica can serve, each sending as
  soon as its last answer came. Nothing fails: requests are answered or get 503s with Retry-After
  that come faster than the accepted answers (the accepted p99 against batching.target_p99_ms is
  recorded for RELIABILITY.md, not asserted), and the batcher's queue stays
  bounded (its high-water mark, from /v1/stats, never passes max_ongoing_requests: Serve admits
  no more than that into the replica, and the batcher sheds beyond its own limit).
- Soak: SOAK_S seconds of moderate load; the replica's RSS (psutil, pid from /v1/stats) at the end
  is within RSS_GROWTH_BOUND of the RSS at the start (measured after warm-up).
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

from serving.client import RawConnection
from tests.integration.test_serving import digits_inputs, make_artifact, serving_config
from tests.reliability import figures

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

NAME = "overload-one"
OVERLOAD_S = 20.0
OVERLOAD_CLIENTS = 128
SOAK_S = 60.0
SOAK_CLIENTS = 4
MAX_ONGOING = 64
TARGET_P99_MS = 50.0
# Allowed RSS growth of a replica over the soak: 10% or 32 MiB, whichever is larger. A leak of one
# response per request (about 1 KB) over the soak's tens of thousands of requests passes that.
RSS_GROWTH_BOUND = (0.10, 32 * 2**20)


def timed_load(url: str, bodies: list[bytes], clients: int, seconds: float, pause_after_503_s: float = 0.0) -> tuple[list[dict], float]:
    """`clients` keep-alive connections (the lean client of serving.client) sending bodies in turn
    until `seconds` have passed. One record per request: status, seconds, retry_after."""

    async def run() -> list[dict]:
        records: list[dict] = []
        deadline = time.monotonic() + seconds
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
                    records.append({"status": status, "seconds": time.perf_counter() - start, "retry_after": headers.get("retry-after")})
                    if status == 503 and pause_after_503_s:
                        await asyncio.sleep(pause_after_503_s)
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


def p99_ms(records: list[dict]) -> float:
    ok = [r["seconds"] * 1000 for r in records if r["status"] == 200]
    return float(np.percentile(ok, 99)) if ok else float("nan")


@pytest.fixture(scope="module")
def app(ray_session, tmp_path_factory):
    from ray import serve

    from serving.app import serve as deploy

    storage = tmp_path_factory.mktemp("overload")
    artifact = make_artifact(storage, NAME, seed=8, run="run-1")
    config = serving_config(
        storage,
        NAME,
        {
            "deployments": [{"name": "cpu", "engine": "onnxruntime", "cpus": 0.5, "max_ongoing_requests": MAX_ONGOING}],
            "batching": {"max_batch_size": 32, "target_p99_ms": TARGET_P99_MS},
            "limits": {"max_queued_requests": 32},
        },
    )
    url = deploy(config, artifact=str(artifact))
    yield config, url
    serve.delete(config.name)


def encoded(count: int, seed: int, per_request: int = 1) -> list[bytes]:
    x = digits_inputs(count * per_request, seed).reshape(count, per_request, 64)
    return [json.dumps({"inputs": batch.tolist()}).encode() for batch in x]


def test_overload_sheds_fast_with_retry_after_and_a_bounded_queue(app):
    config, url = app
    target = config.serving.batching.target_p99_ms
    # Capacity first: what the replica serves with enough clients to keep it busy, none refused.
    capacity, capacity_wall = timed_load(url, encoded(512, seed=30), clients=8, seconds=5.0)
    capacity_rps = sum(r["status"] == 200 for r in capacity) / capacity_wall
    with StatsPoller(url) as poller:
        records, wall = timed_load(url, encoded(4096, seed=31), clients=OVERLOAD_CLIENTS, seconds=OVERLOAD_S)
    after = httpx.get(f"{url}/v1/stats", timeout=10).json()
    statuses = [r["status"] for r in records]
    ok, shed = statuses.count(200), statuses.count(503)
    failed = len(statuses) - ok - shed
    shed_ms = [r["seconds"] * 1000 for r in records if r["status"] == 503]
    shed_p99 = float(np.percentile(shed_ms, 99)) if shed_ms else float("nan")
    accepted_p99 = p99_ms(records)
    polled_depth = max((s["batcher"]["queue_depth"] for s in poller.samples), default=-1)
    max_depth = after["batcher"]["max_queue_depth"]
    result = dict(
        clients=OVERLOAD_CLIENTS,
        seconds=round(wall, 1),
        capacity_rps=round(capacity_rps),
        offered_rps=round(len(records) / wall),
        requests_sent=len(records),
        ok=ok,
        shed_503=shed,
        failed=failed,
        accepted_p50_ms=round(float(np.percentile([r["seconds"] * 1000 for r in records if r["status"] == 200], 50)), 1) if ok else None,
        accepted_p99_ms=round(accepted_p99, 1),
        target_p99_ms=target,
        shed_p99_ms=round(shed_p99, 1),
        max_queue_depth=max_depth,
        max_polled_queue_depth=polled_depth,
        queue_bound=MAX_ONGOING,
        batcher_shed=after["batcher"]["shed"],
        accepted_p99_within_target=bool(accepted_p99 < target),
    )
    figures.record("serving_overload", **result)
    print(f"overload: {result}")
    assert failed == 0, {s: statuses.count(s) for s in set(statuses)}
    assert ok > 0 and shed > 0, result
    assert len(records) / wall > 1.5 * capacity_rps, result  # the load really was above capacity
    # Accepted p99 against batching.target_p99_ms is a performance figure, recorded for
    # RELIABILITY.md rather than asserted (timed assertions flake with the machine's load). Known
    # gap: requests admitted into the replica (up to max_ongoing_requests) wait in its HTTP path
    # before the batcher sees them, so under this overload the accepted p99 is over the target.
    assert shed_p99 < accepted_p99, result  # refusals are fast: not queued behind the accepted ones first
    assert all(r["retry_after"] and int(r["retry_after"]) >= 1 for r in records if r["status"] == 503)
    assert max_depth <= MAX_ONGOING, result


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
    mib = 2**20
    result = dict(
        seconds=SOAK_S,
        clients=SOAK_CLIENTS,
        requests_sent=len(records),
        ok=statuses.count(200),
        shed_503=statuses.count(503),
        failed=len(statuses) - statuses.count(200) - statuses.count(503),
        accepted_p99_ms=round(p99_ms(records), 1),
        rss_start_mib={str(p): round(start[p] / mib, 1) for p in pids},
        rss_end_mib={str(p): round(end[p] / mib, 1) for p in pids},
        rss_max_mib={str(p): round(max(s[p] for s in samples) / mib, 1) for p in pids},
        rss_bound=f"end <= start + max({RSS_GROWTH_BOUND[0]:.0%}, {RSS_GROWTH_BOUND[1] // mib} MiB)",
    )
    figures.record("serving_soak", **result)
    print(f"soak: {result}")
    # Moderate load: no failure; a few 503s are the batcher keeping its target on a busy machine.
    assert result["failed"] == 0 and result["ok"] > 0.9 * len(statuses), {s: statuses.count(s) for s in set(statuses)}
    for pid in pids:
        assert end[pid] <= start[pid] + max(RSS_GROWTH_BOUND[0] * start[pid], RSS_GROWTH_BOUND[1]), result
