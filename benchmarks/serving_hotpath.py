"""Where one Tandem replica's time goes under load: the forward inside the replica against the
same forward alone, server CPU per request, and what each hot-path setting buys.

One wide MLP (64 -> 2048 -> 2048 -> 2048 -> 10), replicas of one CPU behind Ray's HAProxy
(Tandem's default path; one replica, or two to use both cores), closed-loop load from a separate process (serving.loadgen) at
concurrency 32, one example per JSON request. Arms are deployed one at a time, each measured
after a warm-up, in the order given; the machine's load average is recorded at start and end.

Per arm: requests/s, p50/p99, mean batch size, the replica's mean forward time per batch (timed
in the forward thread: GIL waits included, the thread hand-off not) against the same batch size
timed alone in this process, the batcher's fitted slope and intercept, and the replica processes'
CPU per request. Writes benchmarks/results/serving_hotpath.{json,md}.

Run: `python -m benchmarks serving_hotpath [--requests N] [--arms a,b]` (a few minutes per arm
on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).with_name("results")
HIDDEN = [2048, 2048, 2048]
CONCURRENCY = 32
# name -> (engine, replicas, router); replicas share the machine's 2 cores with HAProxy and the
# client. The router arm puts the Ingress deployment in front of one model replica (a second,
# idle deployment makes the app a router): what the extra hop costs per request.
ARMS: dict[str, tuple[str, int, bool]] = {
    "torch": ("torch", 1, False),
    "onnxruntime": ("onnxruntime", 1, False),
    "onnxruntime_2_replicas": ("onnxruntime", 2, False),
    "onnxruntime_router": ("onnxruntime", 1, True),
}


def process_cpu_s(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def measure_arm(
    storage: Path, artifact: Path, name: str, engine: str, replicas: int, requests: int, router: bool = False
) -> dict[str, Any]:
    from ray import serve

    from benchmarks.serving import engine_latency_ms, tandem_config
    from serving.deploy import free_port
    from serving.deploy import serve as deploy
    from serving.loadgen import load_from_process

    config = tandem_config(storage, "hot-" + name.replace("_", "-"), HIDDEN, free_port(), engine=engine, replicas=replicas, router=router)
    url = deploy(config, artifact=str(artifact))
    try:
        examples = np.random.default_rng(1).random((256, 64), dtype=np.float32)
        load_from_process(url, examples, 400, CONCURRENCY)  # warm-up: connections, allocations, the fit
        before = replica_stats(url, replicas)
        cpu0 = {pid: process_cpu_s(pid) for pid in before}
        result = load_from_process(url, examples, requests, CONCURRENCY, max_seconds=300)
        cpu = sum(process_cpu_s(pid) - cpu0[pid] for pid in before)
        after = replica_stats(url, replicas)
    finally:
        serve.delete(config.name)
    delta = {
        key: sum(after[pid]["batcher"][key] - before[pid]["batcher"][key] for pid in before if before[pid]["batcher"])
        for key in ("batches", "examples", "forward_s_total")
    }
    batches = delta["batches"]
    mean_batch = delta["examples"] / batches if batches else 0.0
    forward_ms = 1000 * delta["forward_s_total"] / batches if batches else float("nan")
    size = max(1, round(mean_batch))
    alone_ms = engine_latency_ms(artifact, engine, (size,))[f"batch_{size}_ms"]
    fit = next(stats["batcher"] for stats in after.values() if stats["batcher"])
    return {
        "arm": name,
        "engine": engine,
        "replicas": replicas,
        "router": router,
        **{k: getattr(result, k) for k in ("requests", "ok", "refused", "failed", "requests_per_s", "p50_ms", "p99_ms")},
        "mean_batch_size": mean_batch,
        "forward_in_replica_ms": forward_ms,
        "forward_alone_ms": alone_ms,
        "forward_ratio": forward_ms / alone_ms if alone_ms else float("nan"),
        "fit_slope_ms": fit["slope_ms"],
        "fit_intercept_ms": fit["intercept_ms"],
        "replica_cpu_ms_per_request": 1000 * cpu / max(1, result.ok),
        "replica_cpu_outside_forward_ms_per_request": (1000 * cpu - forward_ms * batches) / max(1, result.ok),
    }


def replica_stats(url: str, replicas: int) -> dict[int, dict[str, Any]]:
    """/v1/stats of every replica, by pid: asked until each has answered (HAProxy balances the
    asks). Behind a router the ingress answers for itself (no batcher) and for the model
    deployment's replica it reached (with its batcher)."""
    import httpx

    seen: dict[int, dict[str, Any]] = {}
    with httpx.Client(timeout=10) as client:
        for _ in range(100):
            stats = client.get(f"{url}/v1/stats").json()
            if stats.get("role") == "router":
                model = stats["deployments"]["model"]
                return {stats["pid"]: {**stats, "batcher": None}, model["pid"]: model}
            seen[stats["pid"]] = stats
            if len(seen) == replicas:
                return seen
    raise RuntimeError(f"only {len(seen)} of {replicas} replicas answered /v1/stats")


def markdown(rows: list[dict[str, Any]], load: tuple[float, float]) -> str:
    lines = [
        f"Wide MLP {HIDDEN}, c={CONCURRENCY}, load average {load[0]:.2f} at start, {load[1]:.2f} at end.",
        "",
        "| arm | req/s | p50 ms | p99 ms | mean batch | forward in replica / alone (ms) | fit slope, intercept (ms) "
        "| replica CPU ms/req (outside forward) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch_size']:.1f} | "
            f"{r['forward_in_replica_ms']:.2f} / {r['forward_alone_ms']:.2f} ({r['forward_ratio']:.2f}x) | "
            f"{r['fit_slope_ms']:.3f}, {r['fit_intercept_ms']:.2f} | {r['replica_cpu_ms_per_request']:.2f} "
            f"({r['replica_cpu_outside_forward_ms_per_request']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from benchmarks.serving import make_artifact, start_ray

    parser = argparse.ArgumentParser(prog="python -m benchmarks serving_hotpath", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {list(ARMS)}")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    load_start = os.getloadavg()[0]
    print(f"load average at start: {load_start:.2f}", flush=True)
    start_ray()
    storage = Path(tempfile.mkdtemp(prefix="tandem-hotpath-"))
    artifact = make_artifact(storage, "hot", HIDDEN)
    rows = []
    for name in args.arms.split(","):
        engine, replicas, router = ARMS[name]
        row = measure_arm(storage, artifact, name, engine, replicas, args.requests, router)
        print(json.dumps(row), flush=True)
        rows.append(row)
    load_end = os.getloadavg()[0]
    print(f"load average at end: {load_end:.2f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving_hotpath.json").write_text(json.dumps({"load_average": [load_start, load_end], "rows": rows}, indent=2))
    (RESULTS / "serving_hotpath.md").write_text(markdown(rows, (load_start, load_end)))
    print(markdown(rows, (load_start, load_end)))
    return rows


if __name__ == "__main__":
    main()
