"""Serving benchmark: Tandem against LitServe, Ray Serve's @serve.batch and a plain FastAPI server.

Closed-loop load (serving/loadgen.py in a separate process: keep-alive connections, one example
per request, loopback) at concurrency 1, 8, 32 and 128, on two models served by the same engine
(ONNX Runtime fp32, one intra-op thread, the artifact's model.onnx):
- wide:   an MLP 64 -> 2048 -> 2048 -> 2048 -> 10 (the forward is most of a request's cost);
- digits: the packaged example's MLP 64 -> 128 -> 128 -> 10 (the HTTP path is the cost).

Arms, one server deployed at a time (deploy, warm up, every level, tear down; benchmarks/_serving_arms.py):
- plain:          FastAPI + uvicorn in its own process, the engine inline, unbatched
- litserve:       LitServe 0.2.19, batches of up to 32 with a 5 ms wait, one CPU worker, own process
- serve_batch:    Ray Serve's defaults (its proxy actor, max_ongoing_requests 5) with
                  @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
- tandem_v1:      Tandem, one replica, /v1/predict JSON, its defaults otherwise (HAProxy, adaptive
                  batching, the latency admission gate: refusals at c=128 are reported, not hidden)
- tandem_v2:      the same deployment, requests in the Open Inference Protocol's binary form
- tandem_default: Tandem with its default replica count, /v1 JSON

Per arm and level: requests/s, p50, p99, refused and failed requests, mean batch size (every arm
counts its batches), server cores (CPU seconds of the server's processes over the load's wall
time: the whole process tree for plain and LitServe; replicas plus HAProxy or Serve's proxy for
the Ray arms, not Ray's controller, GCS or raylet; their idle rate while the load generator
starts and exits is taken out), server CPU ms per answered request, and the part of it outside
the forward (each arm times its forward; engine_latency_ms at the mean batch size is the
fallback estimate, marked in the row). Ratios of each arm against litserve and plain at each
level; the issue's targets on the wide model are computed and stored, not asserted.
Writes benchmarks/results/serving.{json,md,png} (--quick: serving_quick.*).

Run: `python -m benchmarks serving [--quick] [--arms plain,litserve,...]`: about 25 minutes on a
2-core machine (serve_batch's levels above 5 clients run into their 2-minute bound: Serve's
default max_ongoing_requests of 5 makes its router back off); --quick (digits only, c=1 and 32,
300 requests per level) about 2.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._serving_arms import (
    Counters,
    Server,
    check_v2_answer,
    default_serve,
    litserve_server,
    plain_server,
    serve_batch_server,
    tandem_server,
)
from benchmarks._serving_report import add_ratios, markdown, plot, targets

RESULTS = Path(__file__).with_name("results")
MODELS = {"wide": [2048, 2048, 2048], "digits": [128, 128]}
ARMS = ("plain", "litserve", "serve_batch", "tandem_v1", "tandem_v2", "tandem_default")
CONCURRENCY = (1, 8, 32, 128)
QUICK_CONCURRENCY = (1, 32)
QUICK_REQUESTS = 300
MAX_SECONDS = 45.0  # per level: an arm that stalls costs 45 s, not the run
WARMUP = (200, 32)  # requests, concurrency: connections opened, allocations made, Tandem's batcher fitted
TARGET_P99_MS = 50.0


def requests_at(concurrency: int, quick: bool) -> int:
    if quick:
        return QUICK_REQUESTS
    return 500 if concurrency == 1 else 1500


# ---------------------------------------------------------------------------------------------
# models, artifacts, Ray (benchmarks/serving_hotpath.py uses these too)
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
    storage: Path,
    name: str,
    hidden: list[int],
    port: int,
    router: bool = False,
    engine: str = "onnxruntime",
    replicas: int | None = 1,
    defaults: bool = False,
) -> Any:
    """Tandem's config for an arm. replicas=None leaves the replica count to Tandem's default.

    defaults=False (the hot-path benchmark): queue-only admission and wide queue limits, since it
    compares forward paths at a fixed concurrency, where refusing closed-loop clients would change
    what is measured. defaults=True (this benchmark): Tandem as a user deploys it. router=True adds
    a second (idle) deployment, so requests go ingress -> handle -> model replica."""
    from cluster.config import validate_config

    model: dict[str, Any] = {"name": "model", "engine": engine, "cpus": 1}  # one CPU per replica, as every arm
    if replicas is not None:
        model["autoscaling"] = {"min_replicas": replicas, "max_replicas": replicas}
    serving: dict[str, Any] = {"port": port, "route_prefix": f"/{name}"}
    if not defaults:
        model["max_ongoing_requests"] = 256
        serving["batching"] = {"max_batch_size": 32, "target_p99_ms": TARGET_P99_MS, "admission": "queue"}
        serving["router"] = {"policy": "spillover", "spill_threshold": 100000}
        serving["limits"] = {"max_queued_requests": 1024}
    serving["deployments"] = [model, {**model, "name": "spare"}] if router else [model]
    return validate_config(
        {
            "name": name,
            "cluster": {"storage": str(storage)},
            "model": {"builder": "training.models:mlp", "args": {"hidden": hidden}},
            "export": {"quantize": "none", "latency_batch_sizes": [1, 32]},
            "serving": serving,
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


def start_ray(num_cpus: int = 32) -> None:
    """A local Ray, retried when the raylet misses Ray's fixed 30 s start window (cluster.runtime).
    num_cpus: what Ray reports (and schedules); the default leaves room for many replicas at once."""
    from cluster.runtime import start_local_ray

    start_local_ray(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def server_cpu_seconds(roots: list[int], exclude: tuple[int, ...] = ()) -> float:
    """User + system CPU of the given processes and their descendants (Ray's workers, HAProxy),
    leaving out the `exclude` processes and theirs."""
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


def process_titles(roots: list[int]) -> list[str]:
    """The processes server_cpu_seconds counts for `roots`, by title (Ray's "ray::<actor>",
    else the executable): what a row's CPU figures cover."""
    import psutil

    titles = []
    for pid in roots:
        with suppress(psutil.Error):
            for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
                titles.append(Path((process.cmdline() or [process.name()])[0]).name)
    return sorted(titles)


class ForwardEstimate:
    """engine_latency_ms at a batch size, measured once per model and size: the forward time of an
    arm whose server cannot time its own."""

    def __init__(self, artifacts: dict[str, Path]):
        self.artifacts, self.cache = artifacts, {}

    def ms(self, model: str, mean_batch: float) -> float:
        size = max(1, round(mean_batch))
        if (model, size) not in self.cache:
            self.cache[(model, size)] = engine_latency_ms(self.artifacts[model], sizes=(size,))[f"batch_{size}_ms"]
        return self.cache[(model, size)]


def idle_cores(pids: list[int], seconds: float = 1.0) -> float:
    """The server's CPU rate with no load (Ray's replicas and proxies poll and report metrics)."""
    before = server_cpu_seconds(pids)
    time.sleep(seconds)
    return (server_cpu_seconds(pids) - before) / seconds


def level_row(model: str, arm: str, result: Any, cpu_s: float, counters: Counters | None, estimate: ForwardEstimate) -> dict[str, Any]:
    """One row of the report: the load's result and what the server spent on it."""
    batches, examples, forward_s = counters if counters else (float("nan"),) * 3
    mean_batch = examples / batches if batches and batches > 0 else float("nan")
    forward_source = "measured"
    if np.isnan(forward_s) and not np.isnan(mean_batch):
        forward_s = estimate.ms(model, mean_batch) * batches / 1000
        forward_source = "estimated: engine_latency_ms at the mean batch size x batches"
    answered = max(1, result.ok)
    return {
        "model": model,
        "arm": arm,
        **result.to_dict(),
        "mean_batch_size": mean_batch,
        "server_cores": cpu_s / result.wall_s if result.wall_s else float("nan"),
        "server_cpu_ms_per_request": 1000 * cpu_s / answered,
        "forward_ms_per_batch": 1000 * forward_s / batches if batches else float("nan"),
        "forward_source": forward_source,
        "cpu_outside_forward_ms_per_request": 1000 * (cpu_s - forward_s) / answered,
        "load_average_1m": os.getloadavg()[0],
    }


def measure_level(server: Server, model: str, arm: str, concurrency: int, requests: int, protocol: str, estimate: ForwardEstimate) -> dict:
    from serving.loadgen import load_from_process

    examples = np.random.default_rng(concurrency).random((256, 64), dtype=np.float32)
    pids = server.processes()
    idle = idle_cores(pids)
    cpu_before, counters_before, started = server_cpu_seconds(pids), server.counters(), time.perf_counter()
    result = load_from_process(
        server.url, examples, requests, concurrency, max_seconds=MAX_SECONDS, protocol=protocol, model=server.model_name
    )
    cpu_s, counters_after = server_cpu_seconds(pids) - cpu_before, server.counters()
    # The load generator's process starts (imports) before its load and exits after it; the server
    # idles meanwhile at its background rate, which is no cost of the load's requests.
    cpu_s -= idle * max(0.0, time.perf_counter() - started - result.wall_s)
    counters = counters_after.minus(counters_before) if counters_before and counters_after else None
    row = level_row(model, arm, result, cpu_s, counters, estimate)
    return {**row, "server_idle_cores": idle, "replicas": server.replicas(), "server_processes": process_titles(pids)}


def measure_arm(server: Server, model: str, arm: str, levels: tuple[int, ...], quick: bool, estimate: ForwardEstimate) -> list[dict]:
    """Warm-up, then every concurrency level, one after another, on a deployed server."""
    from serving.loadgen import load_from_process

    protocol = "v2" if arm == "tandem_v2" else "v1"
    if protocol == "v2":
        check_v2_answer(server)  # a wrong /v2 body would otherwise be measured as fast failures
    warmup = np.random.default_rng(99).random((64, 64), dtype=np.float32)
    load_from_process(server.url, warmup, WARMUP[0], WARMUP[1], max_seconds=MAX_SECONDS, protocol=protocol, model=server.model_name)
    rows = []
    for concurrency in levels:
        row = measure_level(server, model, arm, concurrency, requests_at(concurrency, quick), protocol, estimate)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# the arms, in order: the peers before Ray starts, then Serve's default path, then Tandem
# ---------------------------------------------------------------------------------------------


class Run:
    """What the arms share: the models' artifacts, the levels, where scratch files go."""

    def __init__(self, artifacts: dict[str, Path], storage: Path, quick: bool, arms: list[str]):
        self.artifacts, self.storage, self.quick, self.arms = artifacts, storage, quick, arms
        self.levels = QUICK_CONCURRENCY if quick else CONCURRENCY
        self.estimate = ForwardEstimate(artifacts)
        self.rows: list[dict[str, Any]] = []

    def measure(self, deployed: AbstractContextManager[Server], model: str, arms: list[str]) -> None:
        """Deploy one server, measure each of `arms` on it, tear it down."""
        with deployed as server:
            for arm in arms:
                print(f"== {arm} / {model}", flush=True)
                self.rows += measure_arm(server, model, arm, self.levels, self.quick, self.estimate)

    def peers(self) -> None:
        for model, artifact in self.artifacts.items():
            if "plain" in self.arms:
                self.measure(plain_server(artifact), model, ["plain"])
            if "litserve" in self.arms:
                self.measure(litserve_server(artifact, self.storage), model, ["litserve"])

    def serve_batch(self) -> None:
        with default_serve() as port:
            for model, artifact in self.artifacts.items():
                self.measure(serve_batch_server(f"serve-batch-{model}", artifact, port), model, ["serve_batch"])

    def tandem(self) -> None:
        from serving.deploy import free_port

        one_replica = [arm for arm in ("tandem_v1", "tandem_v2") if arm in self.arms]
        for model, artifact in self.artifacts.items():
            if one_replica:
                config = tandem_config(self.storage, f"tandem-{model}", MODELS[model], free_port(), defaults=True)
                self.measure(tandem_server(config, artifact), model, one_replica)
            if "tandem_default" in self.arms:
                # No autoscaling block: Tandem's default replica count for this machine.
                config = tandem_config(self.storage, f"tandem-default-{model}", MODELS[model], free_port(), replicas=None, defaults=True)
                self.measure(tandem_server(config, artifact), model, ["tandem_default"])


def run_arms(run: Run) -> None:
    import ray
    from ray import serve

    run.peers()  # before Ray starts: its idle processes would share the machine with them
    if not set(run.arms) & {"serve_batch", "tandem_v1", "tandem_v2", "tandem_default"}:
        return
    # Ray reports the machine's real cores: Tandem's default replica count fills what Ray reports,
    # and one arm runs at a time, so nothing else needs the headroom.
    start_ray(num_cpus=os.cpu_count() or 1)
    try:
        if "serve_batch" in run.arms:
            run.serve_batch()  # Serve's default proxy needs a Serve of its own, shut down after
        run.tandem()
    finally:
        serve.shutdown()
        ray.shutdown()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks serving", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: digits only, c=1 and 32, 300 requests per level")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {list(ARMS)}")
    args = parser.parse_args(argv)
    args.arms = args.arms.split(",")
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if "litserve" in args.arms:
        import importlib.util

        if importlib.util.find_spec("litserve") is None:
            parser.error('the litserve arm needs LitServe: pip install -c constraints.txt -e ".[bench]" (or leave it out with --arms)')
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    models = {"digits": MODELS["digits"]} if args.quick else MODELS
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A deleted app's direct-ingress replica drains for 30 s by default (for load balancers to
    # deregister it); between arms nothing routes to it. Passed to Serve by serve_env().
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    load_start, started = os.getloadavg()[0], time.time()
    print(f"load average at start: {load_start:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        storage = Path(tmp)
        artifacts = {name: make_artifact(storage, name, hidden) for name, hidden in models.items()}
        engines = {name: engine_latency_ms(path) for name, path in artifacts.items()}
        print(json.dumps({"engines": engines}), flush=True)
        run = Run(artifacts, storage, args.quick, args.arms)
        run_arms(run)
    rows = run.rows
    add_ratios(rows)
    setup = {
        "models": models,
        "arms": args.arms,
        "concurrency": list(run.levels),
        "requests": {c: requests_at(c, args.quick) for c in run.levels},
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "minutes": (time.time() - started) / 60,
    }
    report = {"setup": setup, "engines": engines, "targets": targets(rows), "rows": rows}
    write_results(report, "serving_quick" if args.quick else "serving")
    return report


def write_results(report: dict[str, Any], stem: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float))
    text = markdown(report)
    (RESULTS / f"{stem}.md").write_text(text)
    plot(report["rows"], RESULTS / f"{stem}.png")
    print(text)
