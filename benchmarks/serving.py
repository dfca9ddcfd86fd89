"""Serving benchmark: Tandem's Serve app against Ray Serve's own settings and a plain FastAPI server.

Closed-loop load from a separate client process (keep-alive connections, one example per
request, fixed request counts, concurrency 1, 8 and 32, loopback only), arms side by side in one
run, on two models served by the same onnxruntime fp32 engine with one thread:
- wide:   an MLP 64 -> 2048 -> 2048 -> 10 (about a millisecond or more per single example here);
- digits: the packaged example's MLP 64 -> 128 -> 128 -> 10 (the HTTP path is the cost).

Arms
- plain:           FastAPI + uvicorn in one process, the engine called inline, unbatched
- serve_default:   Ray Serve defaults (proxy actor -> replica), unbatched
- fast:            Ray's throughput-optimized mode (direct ingress), client on the replica's port, unbatched
- fast_batch_10_10ms: the same with `@serve.batch` at Ray's defaults (10 examples, 10 ms)
- fast_batch_B_Wms:   `@serve.batch` over a small grid (B examples, W ms); the best is named per row
- tandem:          Tandem's app (adaptive batcher, the model deployment is the ingress), client on
                   HAProxy's port (Ray's HAProxy mode in front of the direct-ingress replicas)
- tandem_direct:   the same replica, client on its own port (what HAProxy costs)
- tandem_router_hop: Tandem with two deployments, all traffic to the first: HAProxy -> "Ingress"
                   -> handle -> model replica (what the router hop costs; one deployment has none)

Reported per arm and concurrency: requests/s, p50, p99, mean batch size, and the CPU time of the
server processes per request (every process Ray or uvicorn started, HAProxy included; not the
client), each also as a ratio against the plain arm. Writes benchmarks/results/serving.{json,md,png}.

The machine this runs on may be shared: every fast-path arm and the plain server are deployed at
once and measured interleaved, arm after arm at each concurrency, in two rounds (the second in
reverse order); per arm the round with the higher throughput is kept, and each row records the
load average it saw. Ray Serve's default path needs its own Serve (a controller setting), so it
runs first, alone, in one round.

Run: `python -m benchmarks serving [--quick]` (about 20-30 minutes on a 2-core machine; --quick
is one round with fewer requests and only the wide model).
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class of the
# routes defined inside functions below, not a string it cannot resolve.
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results")
MODELS = {"wide": [2048, 2048], "digits": [128, 128]}
CONCURRENCY = (1, 8, 32)
REQUESTS = {1: 300, 8: 1000, 32: 2000}
QUICK_REQUESTS = {1: 150, 8: 400, 32: 800}
WARMUP = 100
ROUNDS = 2  # interleaved rounds; the best round per arm is kept (see measure_interleaved)
GRID = [(32, 1.0), (32, 5.0), (16, 2.0)]  # @serve.batch (max_batch_size, batch_wait_timeout ms)
RAY_DEFAULT_BATCH = (10, 10.0)
TARGET_P99_MS = 50.0


# ---------------------------------------------------------------------------------------------
# models and artifacts
# ---------------------------------------------------------------------------------------------


def make_artifact(storage: Path, name: str, hidden: list[int]) -> Path:
    """A randomly initialised MLP on the digits' 64 features, saved and exported to ONNX fp32."""
    import torch

    from cluster.artifacts import save_model_artifact
    from serving.optimize.export import export
    from training.models import mlp

    torch.manual_seed(0)
    model = mlp((64,), 10, hidden=hidden)
    folder = storage / name / "bench" / "artifacts"
    spec = {"builder": "training.models:mlp", "args": {"hidden": hidden}, "input_shape": [64], "num_classes": 10}
    save_model_artifact(folder, model.state_dict(), spec, {"metrics": {}})
    export(tandem_config(storage, name, hidden, port=8000), source=folder, latency_budget_s=0.05)
    return folder


def tandem_config(
    storage: Path, name: str, hidden: list[int], port: int, router: bool = False, engine: str = "onnxruntime", replicas: int = 1
) -> Any:
    """Tandem's config for an arm; router=True adds a second (idle) deployment, so requests go
    ingress -> handle -> model replica: what the router hop costs."""
    from cluster.config import validate_config

    scaling = {"min_replicas": replicas, "max_replicas": replicas}
    model = {"name": "model", "engine": engine, "cpus": 1, "max_ongoing_requests": 256, "autoscaling": scaling}
    deployments = [model, {**model, "name": "spare"}] if router else [model]
    return validate_config(
        {
            "name": name,
            "cluster": {"storage": str(storage)},
            "model": {"builder": "training.models:mlp", "args": {"hidden": hidden}},
            "export": {"quantize": "none", "latency_batch_sizes": [1, 32]},
            "serving": {
                "port": port,
                "route_prefix": f"/{name}",
                # One replica with a whole CPU: the arms differ in the path, not in resources.
                "deployments": deployments,
                # Queue limits only: the benchmark compares batching policies at a fixed concurrency,
                # where refusing closed-loop clients would only change what is measured.
                "batching": {"max_batch_size": 32, "target_p99_ms": TARGET_P99_MS, "admission": "queue"},
                "router": {"policy": "spillover", "spill_threshold": 100000},
                "limits": {"max_queued_requests": 1024},
            },
        }
    )


def engine_latency_ms(artifact: Path, engine_name: str = "onnxruntime", sizes: tuple[int, ...] = (1, 8, 32)) -> dict[str, float]:
    """Median time of one forward pass per batch size, one thread, in this process."""
    from serving.engines import load_engine, torch_threads

    engine = load_engine(artifact, engine=engine_name, threads=1, device="cpu")
    out = {}
    for size in sizes:
        x = np.random.default_rng(0).random((size, 64), dtype=np.float32)
        with torch_threads(1):
            for _ in range(5):
                engine.predict(x)
            times = []
            for _ in range(50):
                start = time.perf_counter()
                engine.predict(x)
                times.append(time.perf_counter() - start)
        out[f"batch_{size}_ms"] = float(np.median(times) * 1000)
    return out


# ---------------------------------------------------------------------------------------------
# baseline servers: plain FastAPI, and Ray Serve deployments with and without @serve.batch
# ---------------------------------------------------------------------------------------------


def plain_app(artifact: str) -> Any:
    """FastAPI calling the engine inline: the same decoding as Tandem, no batching, no Ray."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from serving.engines import load_engine
    from serving.protocol import parse_predict

    engine = load_engine(Path(artifact), engine="onnxruntime", threads=1)
    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        x, _ = parse_predict(json.loads(await request.body()), engine.input_shape, 256)
        logits = engine.predict(x)
        return JSONResponse({"predictions": logits.argmax(axis=1).tolist()})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def run_plain_server(artifact: str, port: int) -> None:
    import uvicorn

    uvicorn.run(plain_app(artifact), host="127.0.0.1", port=port, access_log=False, log_level="warning")


def baseline_deployment() -> Any:
    """A Serve deployment like the README's: FastAPI ingress, the engine inline or under @serve.batch."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    from serving.engines import load_engine
    from serving.protocol import parse_predict

    api = FastAPI()

    @serve.deployment
    @serve.ingress(api)
    class Baseline:
        def __init__(self, artifact: str, batch: list[float] | None):
            self.engine = load_engine(Path(artifact), engine="onnxruntime", threads=1)
            self.batched = batch is not None
            self.batches = self.examples = 0
            if batch is not None:
                self.run_batch.set_max_batch_size(int(batch[0]))
                self.run_batch.set_batch_wait_timeout_s(batch[1] / 1000)

        @serve.batch(max_batch_size=RAY_DEFAULT_BATCH[0], batch_wait_timeout_s=RAY_DEFAULT_BATCH[1] / 1000)
        async def run_batch(self, rows: list[np.ndarray]) -> list[np.ndarray]:
            self.batches += 1
            self.examples += len(rows)
            return list(self.engine.predict(np.stack(rows)))

        @api.post("/v1/predict")
        async def predict(self, request: Request) -> JSONResponse:
            x, _ = parse_predict(json.loads(await request.body()), self.engine.input_shape, 256)
            if self.batched:
                logits = (await self.run_batch(x[0]))[None]
            else:
                self.batches += 1
                self.examples += len(x)
                logits = self.engine.predict(x)
            return JSONResponse({"predictions": logits.argmax(axis=1).tolist()})

        @api.get("/v1/stats")
        async def stats(self) -> dict[str, Any]:
            return {"batcher": {"batches": self.batches, "examples": self.examples}}

        @api.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

    return Baseline


def deploy_baseline(name: str, artifact: Path, batch: tuple[int, float] | None, env: dict[str, str]) -> None:
    from ray import serve

    # Replicas import this module: put the repository on their path (benchmarks/ is not installed).
    env = {**env, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)}
    deployment = baseline_deployment().options(
        name=name,
        max_ongoing_requests=256,
        ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": env}},
    )
    serve.run(deployment.bind(str(artifact), list(batch) if batch else None), name=name, route_prefix=f"/{name}")


# ---------------------------------------------------------------------------------------------
# measuring: a client in its own process, CPU of the server processes
# ---------------------------------------------------------------------------------------------


def client_main(url: str, concurrency: int, requests: int, seed: int) -> None:
    """Entry point of the client process: print one JSON summary of a closed-loop run."""
    from serving.loadgen import closed_loop, encode_requests, summarize

    rows = np.random.default_rng(seed).random((requests, 64), dtype=np.float32)
    bodies = encode_requests(rows)
    start = time.perf_counter()
    records = asyncio.run(closed_loop(url, bodies, concurrency))
    print(json.dumps(summarize(records, time.perf_counter() - start, concurrency).to_dict()))


def run_client(url: str, concurrency: int, requests: int, seed: int = 0) -> dict[str, Any]:
    code = f"from benchmarks.serving import client_main; client_main({url!r}, {concurrency}, {requests}, {seed})"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"client failed for {url}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def server_cpu_seconds(roots: list[int], exclude: tuple[int, ...] = ()) -> float:
    """User + system CPU of the given processes and their descendants (Ray's workers, HAProxy),
    leaving out the `exclude` processes and theirs (the plain servers when Ray's are measured)."""
    import psutil

    skipped: set[int] = set()
    for pid in exclude:
        try:
            skipped |= {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    total = 0.0
    seen: set[int] = set()
    for pid in roots:
        try:
            parent = psutil.Process(pid)
            processes = [parent] + parent.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for process in processes:
            if process.pid in seen or process.pid in skipped:
                continue
            seen.add(process.pid)
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
    return total


def batch_counts(url: str) -> tuple[int, int] | None:
    import httpx

    try:
        batcher = httpx.get(f"{url}/v1/stats", timeout=10).json()["batcher"]
        return int(batcher["batches"]), int(batcher["examples"])
    except Exception:
        return None


@dataclass
class Target:
    """One arm of one model, ready to take load."""

    model: str
    arm: str
    url: str
    cpu_roots: list[int]
    cpu_exclude: tuple[int, ...] = ()
    stats_url: str | None = None


def measure_once(target: Target, concurrency: int, requests: int, seed: int) -> dict[str, Any]:
    """One closed-loop run against one arm: a row with throughput, latency, batch size and CPU."""
    stats_url = target.stats_url or target.url
    before_cpu, before_batches = server_cpu_seconds(target.cpu_roots, target.cpu_exclude), batch_counts(stats_url)
    summary = run_client(target.url, concurrency, requests, seed=seed)
    after_cpu, after_batches = server_cpu_seconds(target.cpu_roots, target.cpu_exclude), batch_counts(stats_url)
    mean_batch = 1.0 if target.arm == "plain" else float("nan")  # nan: the arm's replica is not reachable for stats
    if before_batches and after_batches and after_batches[0] > before_batches[0]:
        mean_batch = (after_batches[1] - before_batches[1]) / (after_batches[0] - before_batches[0])
    return {
        "model": target.model,
        "arm": target.arm,
        "concurrency": concurrency,
        **summary,
        "mean_batch_size": mean_batch,
        "server_cpu_ms_per_request": 1000 * (after_cpu - before_cpu) / max(1, summary["requests"]),
        "load_average_1m": os.getloadavg()[0],
    }


def measure_interleaved(targets: list[Target], requests: dict[int, int], rounds: int) -> list[dict[str, Any]]:
    """Every arm at each concurrency, arm after arm, for `rounds` rounds (the order reversed every
    other round); per arm and concurrency the round with the highest throughput is kept.

    The machine is shared: a neighbour's burst during one arm's run would otherwise decide the
    comparison. Interleaving spreads such bursts over all arms, and the best of the rounds is the
    least disturbed one.
    """
    for target in targets:
        run_client(target.url, 8, WARMUP, seed=99)
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for round_index in range(rounds):
        order = targets if round_index % 2 == 0 else targets[::-1]
        for concurrency in CONCURRENCY:
            for target in order:
                row = measure_once(target, concurrency, requests[concurrency], seed=concurrency + 100 * round_index)
                row["round"] = round_index
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                runs.setdefault((target.model, target.arm, concurrency), []).append(row)
    return [max(rows, key=lambda r: r["requests_per_s"]) for rows in runs.values()]


def wait_http(url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url}/healthz did not answer")


# ---------------------------------------------------------------------------------------------
# the arms
# ---------------------------------------------------------------------------------------------


def start_plain_server(artifact: Path) -> tuple[subprocess.Popen, str]:
    from serving.deploy import free_port

    port = free_port()
    code = f"from benchmarks.serving import run_plain_server; run_plain_server({str(artifact)!r}, {port})"
    server = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    wait_http(url)
    return server, url


def replica_url(app_name: str, route_prefix: str) -> str:
    """The direct-ingress port of an app's (one) ingress replica."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    groups = ray.get(client._controller.get_target_groups.remote(app_name, from_proxy_manager=True))
    for group in groups:
        for target in group.targets:
            if target.port != client.http_config.port and getattr(group.protocol, "value", group.protocol) == "HTTP":
                return f"http://127.0.0.1:{target.port}{route_prefix}"
    raise RuntimeError(f"no direct-ingress replica port for {app_name}; is RAY_SERVE_THROUGHPUT_OPTIMIZED on?")


def session_serve_default(
    artifacts: dict[str, Path], requests: dict[int, int], roots: list[int], exclude: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Ray Serve with its defaults: the proxy actor in the path (5 to 30 times the others' cost
    here, so one round, on its own)."""
    from ray import serve

    from serving.deploy import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        for model, artifact in artifacts.items():
            name = f"default-{model}"
            deploy_baseline(name, artifact, None, {})
            url = f"http://127.0.0.1:{port}/{name}"
            wait_http(url)
            rows += measure_interleaved([Target(model, "serve_default", url, roots, exclude)], requests, rounds=1)
            serve.delete(name)
    finally:
        serve.shutdown()
    return rows


def session_fast_path(
    storage: Path, artifacts: dict[str, Path], requests: dict[int, int], roots: list[int], plain: list[Target], rounds: int
) -> list[dict[str, Any]]:
    """Throughput-optimized Serve with HAProxy: Tandem's apps and the static baselines, all
    deployed at once, measured interleaved with the plain servers."""
    from ray import serve

    from serving import deploy as tandem
    from serving.deploy import free_port
    from serving.settings import serve_env

    port = free_port()
    exclude = tuple(t.cpu_roots[0] for t in plain)
    static = [("fast", None), (f"fast_batch_{RAY_DEFAULT_BATCH[0]}_{RAY_DEFAULT_BATCH[1]:g}ms", RAY_DEFAULT_BATCH)]
    static += [(f"fast_batch_{size}_{wait:g}ms", (size, wait)) for size, wait in GRID]
    targets = list(plain)
    try:
        for model, artifact in artifacts.items():
            config = tandem_config(storage, f"tandem-{model}", MODELS[model], port)
            url = tandem.serve(config, artifact=str(artifact))  # starts Serve (fast path env) on first use
            targets.append(Target(model, "tandem", url, roots, exclude))
            targets.append(Target(model, "tandem_direct", replica_url(config.name, f"/tandem-{model}"), roots, exclude))
            routed = tandem_config(storage, f"routed-{model}", MODELS[model], port, router=True)
            targets.append(Target(model, "tandem_router_hop", tandem.serve(routed, artifact=str(artifact)), roots, exclude))
            env = serve_env(config.serving, os.environ)
            for arm, batch in static:
                name = f"{arm.replace('_', '-')}-{model}"
                deploy_baseline(name, artifact, batch, env)
                url = replica_url(name, f"/{name}")
                wait_http(url)
                targets.append(Target(model, arm, url, roots, exclude))
        return measure_interleaved(targets, requests, rounds)
    finally:
        serve.shutdown()


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def add_ratios(rows: list[dict[str, Any]]) -> None:
    plain = {(r["model"], r["concurrency"]): r for r in rows if r["arm"] == "plain"}
    for row in rows:
        base = plain.get((row["model"], row["concurrency"]))
        if base:
            row["throughput_vs_plain"] = row["requests_per_s"] / base["requests_per_s"]
            row["p50_vs_plain"] = row["p50_ms"] / base["p50_ms"]
            row["p99_vs_plain"] = row["p99_ms"] / base["p99_ms"]
            row["cpu_vs_plain"] = (
                row["server_cpu_ms_per_request"] / base["server_cpu_ms_per_request"] if base["server_cpu_ms_per_request"] else float("nan")
            )


def targets(rows: list[dict[str, Any]], model: str = "wide") -> dict[str, Any]:
    """The issue's targets on the wide model, for tandem (HAProxy) and tandem_direct."""
    at = {(r["arm"], r["concurrency"]): r for r in rows if r["model"] == model}
    out: dict[str, Any] = {}
    static_arms = sorted({a for a, _ in at if a.startswith("fast_batch")})
    if not static_arms or ("fast", 1) not in at:
        return out
    for arm in ("tandem", "tandem_direct"):
        if (arm, 32) not in at:
            continue
        best32 = max(static_arms, key=lambda a: at[(a, 32)]["requests_per_s"])
        best8 = max(static_arms + ["fast"], key=lambda a: at[(a, 8)]["requests_per_s"])
        out[arm] = {
            "c32_throughput_vs_best_static": at[(arm, 32)]["requests_per_s"] / at[(best32, 32)]["requests_per_s"],
            "c32_p99_vs_best_static": at[(arm, 32)]["p99_ms"] / at[(best32, 32)]["p99_ms"],
            "c32_best_static": best32,
            "c8_throughput_vs_best_of_static_and_fast": at[(arm, 8)]["requests_per_s"] / at[(best8, 8)]["requests_per_s"],
            "c8_best": best8,
            "c1_p50_vs_fast_unbatched": at[(arm, 1)]["p50_ms"] / at[("fast", 1)]["p50_ms"],
        }
        goal = out[arm]
        goal["met"] = {
            "c32": goal["c32_throughput_vs_best_static"] >= 1.0 and goal["c32_p99_vs_best_static"] <= 1.0,
            "c8": goal["c8_throughput_vs_best_of_static_and_fast"] >= 1.0,
            "c1": goal["c1_p50_vs_fast_unbatched"] <= 1.2,
        }
    return out


def markdown(rows: list[dict[str, Any]], engines: dict[str, dict[str, float]]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        timing = engines.get(model, {})
        lines.append(
            f"\n### {model} (engine: {timing.get('batch_1_ms', float('nan')):.2f} ms at batch 1, "
            f"{timing.get('batch_32_ms', float('nan')):.2f} ms at batch 32)\n"
        )
        lines.append(
            "| arm | c=1 req/s (p50 ms) | c=8 req/s (p99 ms) | c=32 req/s (p99 ms) | batch @32 | server CPU ms/req @32 | vs plain @32: "
            "req/s, p99, CPU |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        at = {(r["arm"], r["concurrency"]): r for r in rows if r["model"] == model}
        for arm in dict.fromkeys(r["arm"] for r in rows if r["model"] == model):
            c1, c8, c32 = at.get((arm, 1)), at.get((arm, 8)), at.get((arm, 32))
            if not (c1 and c8 and c32):
                continue
            ratios = ", ".join(f"{c32.get(key, float('nan')):.2f}x" for key in ("throughput_vs_plain", "p99_vs_plain", "cpu_vs_plain"))
            lines.append(
                f"| {arm} | {c1['requests_per_s']:.0f} ({c1['p50_ms']:.1f}) | {c8['requests_per_s']:.0f} ({c8['p99_ms']:.1f}) | "
                f"{c32['requests_per_s']:.0f} ({c32['p99_ms']:.1f}) | {c32['mean_batch_size']:.1f} | "
                f"{c32['server_cpu_ms_per_request']:.2f} | {ratios} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for arm in dict.fromkeys(r["arm"] for r in rows if r["model"] == model):
            points = sorted((r for r in rows if r["model"] == model and r["arm"] == arm), key=lambda r: r["concurrency"])
            style = "-o" if arm.startswith("tandem") else "--." if arm.startswith("fast_batch") else "-s"
            ax.plot([p["requests_per_s"] for p in points], [p["p99_ms"] for p in points], style, label=arm)
            for p in points:
                ax.annotate(f"c={p['concurrency']}", (p["requests_per_s"], p["p99_ms"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("requests/s")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_title(f"{model}: closed loop, concurrency 1 / 8 / 32")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def start_ray() -> None:
    """A local Ray, retried when the raylet misses Ray's fixed 30 s start window (cluster.runtime)."""
    from cluster.runtime import start_local_ray

    start_local_ray(num_cpus=32, include_dashboard=False, log_to_driver=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import ray

    argv = list(argv or [])
    quick = "--quick" in argv
    requests = QUICK_REQUESTS if quick else REQUESTS
    rounds = 1 if quick else ROUNDS
    models = {"wide": MODELS["wide"]} if quick else MODELS
    RESULTS.mkdir(exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A deleted direct-ingress app holds its replica for 30 s by default (for load balancers to
    # deregister it); between arms nothing is routing to it. Passed to Serve by serve_env().
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        storage = Path(tmp)
        artifacts = {name: make_artifact(storage, name, hidden) for name, hidden in models.items()}
        engines = {name: engine_latency_ms(path) for name, path in artifacts.items()}
        print(json.dumps({"engines": engines}), flush=True)
        servers = {model: start_plain_server(artifact) for model, artifact in artifacts.items()}
        plain = [Target(model, "plain", url, [server.pid]) for model, (server, url) in servers.items()]
        exclude = tuple(server.pid for server, _ in servers.values())
        rows: list[dict[str, Any]] = []
        try:
            start_ray()
            roots = [os.getpid()]  # the local Ray's processes are this process's descendants
            rows += session_serve_default(artifacts, requests, roots, exclude)
            rows += session_fast_path(storage, artifacts, requests, roots, plain, rounds)
        finally:
            ray.shutdown()
            for server, _ in servers.values():
                server.terminate()
                server.wait(timeout=30)
    add_ratios(rows)
    report = {
        "rows": rows,
        "engines": engines,
        "targets": targets(rows),
        "setup": {
            "models": models,
            "concurrency": CONCURRENCY,
            "requests": requests,
            "grid": GRID,
            "rounds": rounds,
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "minutes": (time.time() - started) / 60,
        },
    }
    (RESULTS / "serving.json").write_text(json.dumps(report, indent=2, default=float))
    table = markdown(rows, engines)
    (RESULTS / "serving.md").write_text(
        "## Serving benchmark\n" + table + "\n\nTargets (wide model):\n\n```\n" + json.dumps(report["targets"], indent=2) + "\n```\n"
    )
    plot(rows, RESULTS / "serving.png")
    print(table)
    print(json.dumps(report["targets"], indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
