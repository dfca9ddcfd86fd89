"""Where one Tandem replica's time goes under load: the forward inside the replica against the
same forward alone, server CPU per request, and what each hot-path setting buys.

One wide MLP (64 -> 2048 -> 2048 -> 2048 -> 10), one replica of one CPU behind Ray's HAProxy
(Tandem's default path), closed-loop load from a separate process (serving.loadgen) at
concurrency 32, one example per JSON request. Arms are deployed one at a time, each measured
after a warm-up, in the order given; the machine's load average is recorded at start and end.

Per arm: requests/s, p50/p99, mean batch size, the replica's mean forward time per batch (timed
in the forward thread: GIL waits included, the thread hand-off not) against the same batch size
timed alone in this process, the batcher's fitted slope and intercept, and the replica process's
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
# name -> (engine, environment variables for the replica)
ARMS: dict[str, tuple[str, dict[str, str]]] = {
    "torch": ("torch", {}),
    "onnxruntime": ("onnxruntime", {}),
}


def config_for(storage: Path, name: str, engine: str, port: int, env: dict[str, str]) -> Any:
    from cluster.config import validate_config

    return validate_config(
        {
            "name": name,
            "cluster": {"storage": str(storage), "runtime_env": {"env_vars": env}},
            "model": {"builder": "training.models:mlp", "args": {"hidden": HIDDEN}},
            "export": {"quantize": "none", "latency_batch_sizes": [1, 32]},
            "serving": {
                "port": port,
                "route_prefix": f"/{name}",
                "deployments": [{"name": "model", "engine": engine, "cpus": 1, "threads": 1, "max_ongoing_requests": 256}],
                # Queue limits only: closed-loop clients at a fixed concurrency are never refused.
                "batching": {"max_batch_size": 32, "target_p99_ms": 50, "admission": "queue"},
                "limits": {"max_queued_requests": 1024},
            },
        }
    )


def process_cpu_s(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def measure_arm(storage: Path, artifact: Path, name: str, engine: str, env: dict[str, str], requests: int) -> dict[str, Any]:
    import httpx
    from ray import serve

    from benchmarks.serving import engine_latency_ms
    from serving.deploy import free_port
    from serving.deploy import serve as deploy
    from serving.loadgen import load_from_process

    config = config_for(storage, "hot-" + name.replace("_", "-").replace(".", "p"), engine, free_port(), env)
    url = deploy(config, artifact=str(artifact))
    try:
        examples = np.random.default_rng(1).random((256, 64), dtype=np.float32)
        load_from_process(url, examples, 400, CONCURRENCY)  # warm-up: connections, allocations, the fit
        before = httpx.get(f"{url}/v1/stats", timeout=10).json()
        pid = before["pid"]
        cpu0 = process_cpu_s(pid)
        result = load_from_process(url, examples, requests, CONCURRENCY, max_seconds=300)
        cpu = process_cpu_s(pid) - cpu0
        after = httpx.get(f"{url}/v1/stats", timeout=10).json()
    finally:
        serve.delete(config.name)
    b0, b1 = before["batcher"], after["batcher"]
    batches = b1["batches"] - b0["batches"]
    examples_n = b1["examples"] - b0["examples"]
    mean_batch = examples_n / batches if batches else 0.0
    forward_ms = 1000 * (b1["forward_s_total"] - b0["forward_s_total"]) / batches if batches else float("nan")
    size = max(1, round(mean_batch))
    alone_ms = engine_latency_ms(artifact, engine, (size,))[f"batch_{size}_ms"]
    return {
        "arm": name,
        "engine": engine,
        "env": env,
        **{k: getattr(result, k) for k in ("requests", "ok", "refused", "failed", "requests_per_s", "p50_ms", "p99_ms")},
        "mean_batch_size": mean_batch,
        "forward_in_replica_ms": forward_ms,
        "forward_alone_ms": alone_ms,
        "forward_ratio": forward_ms / alone_ms if alone_ms else float("nan"),
        "fit_slope_ms": b1["slope_ms"],
        "fit_intercept_ms": b1["intercept_ms"],
        "replica_cpu_ms_per_request": 1000 * cpu / max(1, result.ok),
        "replica_cpu_outside_forward_ms_per_request": (1000 * cpu - forward_ms * batches) / max(1, result.ok),
    }


def markdown(rows: list[dict[str, Any]], load: tuple[float, float]) -> str:
    lines = [
        f"One replica, wide MLP {HIDDEN}, c={CONCURRENCY}, load average {load[0]:.2f} at start, {load[1]:.2f} at end.",
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
        engine, env = ARMS[name]
        row = measure_arm(storage, artifact, name, engine, env, args.requests)
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
