"""The servers of the serving benchmark (benchmarks/serving.py), one context manager per arm: each
deploys its server, waits until it answers, yields a `Server` (its URL, the processes whose CPU is
the server's, its batch counters) and tears the server down on exit, so that one runs at a time.

Every arm runs the same engine: ONNX Runtime with one intra-op thread on the artifact's
model.onnx (serving.engines.load_engine), and decodes the same /v1 JSON body with
serving.protocol.parse_predict. Every arm counts its batches and times its forward, so that the
CPU spent outside the forward is measured, not estimated.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class of the
# routes defined inside functions below, not a string it cannot resolve.
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The batching every batching peer gets (LitServe, @serve.batch): Tandem's max_batch_size, and a
# 5 ms wait, the setting that did best for @serve.batch on the wide model in earlier runs.
MAX_BATCH = 32
BATCH_WAIT_S = 0.005
MAX_INPUTS = 256  # Tandem's default serving.limits.max_inputs, for parse_predict


class Counters(NamedTuple):
    """A server's batch counters since it started (subtract two readings for one load)."""

    batches: float
    examples: float
    forward_s: float  # time inside the engine's forward; nan where the server cannot time it

    def minus(self, earlier: "Counters") -> "Counters":
        return Counters(*(now - then for now, then in zip(self, earlier, strict=True)))


@dataclass
class Server:
    """One deployed arm, answering."""

    url: str  # the base URL: requests go to {url}/v1/predict (or /v2/models/{model_name}/infer)
    processes: Callable[[], list[int]]  # pids whose CPU, with their descendants', is the server's
    counters: Callable[[], Counters | None]
    model_name: str | None = None  # the name in /v2/models/{name}; None: the arm has no /v2
    replicas: Callable[[], int] = lambda: 1  # model replicas (inference workers) serving


# ---------------------------------------------------------------------------------------------
# servers in their own process: plain FastAPI, LitServe
# ---------------------------------------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    # benchmarks/ is not installed: the server processes import it from the checkout.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def wait_http(url: str, path: str = "/healthz", timeout_s: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll GET {url}{path} until it answers 200; fail at once if `process` (the server) exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with code {process.returncode} before answering")
        try:
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url}{path} did not answer within {timeout_s:.0f} s")


@contextmanager
def subprocess_server(code: str, url: str, health_path: str) -> Iterator[subprocess.Popen]:
    """`python -c code` in its own session (so its workers are stopped with it), once it answers."""
    server = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), start_new_session=True)
    try:
        wait_http(url, health_path, process=server)
        yield server
    finally:
        stop_session(server)


def stop_session(server: subprocess.Popen) -> None:
    """SIGTERM to the server's session (LitServe's workers too), SIGKILL to what is left after 30 s."""
    with suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    with suppress(ProcessLookupError):  # stragglers: a worker that outlived its parent
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def plain_app(artifact: str) -> Any:
    """FastAPI calling the engine inline: the same decoding as Tandem, no batching, no Ray."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from serving.engines import load_engine
    from serving.protocol import parse_predict

    engine = load_engine(Path(artifact), engine="onnxruntime", threads=1, device="cpu")
    counters = {"batches": 0, "examples": 0, "forward_s_total": 0.0}
    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        x, _ = parse_predict(json.loads(await request.body()), engine.input_shape, MAX_INPUTS)
        start = time.perf_counter()
        logits = engine.predict(x)
        counters["forward_s_total"] += time.perf_counter() - start
        counters["batches"] += 1
        counters["examples"] += len(x)
        return JSONResponse({"predictions": logits.argmax(axis=1).tolist()})

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return {"batcher": counters}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def run_plain_server(artifact: str, port: int) -> None:
    import uvicorn

    uvicorn.run(plain_app(artifact), host="127.0.0.1", port=port, access_log=False, log_level="warning")


def stats_counters(url: str) -> Counters | None:
    """The batcher counters of GET {url}/v1/stats (plain and serve_batch), None when it fails."""
    import httpx

    try:
        batcher = httpx.get(f"{url}/v1/stats", timeout=10).json()["batcher"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return Counters(batcher["batches"], batcher["examples"], batcher["forward_s_total"])


@contextmanager
def plain_server(artifact: Path) -> Iterator[Server]:
    from serving.deploy import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    code = f"from benchmarks._serving_arms import run_plain_server; run_plain_server({str(artifact)!r}, {port})"
    with subprocess_server(code, url, "/healthz") as process:
        yield Server(url, lambda: [process.pid], lambda: stats_counters(url))


@contextmanager
def litserve_server(artifact: Path, scratch: Path) -> Iterator[Server]:
    """LitServe (benchmarks/_litserve_api.py): its API server, inference worker and their parent,
    all in the started process's tree. Its counters live in a small file the worker maps (the
    worker is a process of LitServe's own; this file is how its counts get out)."""
    from serving.deploy import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    counters_file = scratch / f"litserve-{port}.counters"
    np.zeros(3).tofile(counters_file)
    code = f"from benchmarks._litserve_api import run; run({str(artifact)!r}, {port}, {str(counters_file)!r})"
    with subprocess_server(code, url, "/health") as process:
        yield Server(url, lambda: [process.pid], lambda: Counters(*map(float, np.fromfile(counters_file, dtype=np.float64))))


# ---------------------------------------------------------------------------------------------
# Ray Serve: @serve.batch on Serve's defaults, and Tandem
# ---------------------------------------------------------------------------------------------


def ray_processes(*markers: str) -> list[int]:
    """Pids of this driver's local Ray processes whose title holds one of `markers` (Ray titles
    its actors' processes "ray::<class>", replicas "ray::ServeReplica:<app>:<deployment>")."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        with suppress(psutil.Error):
            if any(marker in " ".join(process.cmdline()) for marker in markers):
                found.append(process.pid)
    if not found:
        raise RuntimeError(f"no Ray process titled with any of {markers}: is the app deployed on this driver's local Ray?")
    return found


def serve_batch_deployment() -> Any:
    """A Serve deployment as Ray's docs write one: FastAPI ingress, the engine under @serve.batch;
    Serve's defaults otherwise (max_ongoing_requests 5 caps a batch at 5 requests here)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    from serving.engines import load_engine
    from serving.protocol import parse_predict

    api = FastAPI()

    @serve.deployment
    @serve.ingress(api)
    class ServeBatch:
        def __init__(self, artifact: str):
            self.engine = load_engine(Path(artifact), engine="onnxruntime", threads=1, device="cpu")
            self.counters = {"batches": 0, "examples": 0, "forward_s_total": 0.0}

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
        async def run_batch(self, rows: list[np.ndarray]) -> list[np.ndarray]:
            start = time.perf_counter()
            logits = self.engine.predict(np.stack(rows))
            self.counters["forward_s_total"] += time.perf_counter() - start
            self.counters["batches"] += 1
            self.counters["examples"] += len(rows)
            return list(logits)

        @api.post("/v1/predict")
        async def predict(self, request: Request) -> JSONResponse:
            x, _ = parse_predict(json.loads(await request.body()), self.engine.input_shape, MAX_INPUTS)
            logits = await self.run_batch(x[0])  # one example per request, as the benchmark sends
            return JSONResponse({"predictions": [int(logits.argmax())]})

        @api.get("/v1/stats")
        async def stats(self) -> dict[str, Any]:
            return {"batcher": self.counters}

        @api.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

    return ServeBatch


@contextmanager
def default_serve() -> Iterator[int]:
    """Ray Serve started with its defaults (its proxy actor on a free port); shut down on exit,
    since Tandem's arms need a Serve started with their own controller settings."""
    from ray import serve

    from serving.deploy import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()


@contextmanager
def serve_batch_server(name: str, artifact: Path, port: int) -> Iterator[Server]:
    from ray import serve

    # Replicas unpickle the deployment defined in this module: put the checkout on their path. One
    # CPU, as every arm's replica gets.
    env = {"PYTHONPATH": subprocess_env()["PYTHONPATH"]}
    deployment = serve_batch_deployment().options(name=name, ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": env}})
    url = f"http://127.0.0.1:{port}/{name}"
    try:
        serve.run(deployment.bind(str(artifact)), name=name, route_prefix=f"/{name}")
        wait_http(url)
        yield Server(url, lambda: ray_processes(f"ServeReplica:{name}:", "ProxyActor"), lambda: stats_counters(url))
    finally:
        serve.delete(name)


def tandem_counters(url: str, app: str) -> Counters | None:
    """The batcher counters summed over every replica of a Tandem app (each asked through HAProxy
    until all have answered, as benchmarks/serving_hotpath.py does)."""
    from benchmarks.serving_hotpath import replica_stats

    try:
        stats = replica_stats(url, len(ray_processes(f"ServeReplica:{app}:")))
    except Exception:  # a replica being replaced: no counters for this level rather than a failed run
        return None
    batchers = [s["batcher"] for s in stats.values()]
    return Counters(*(sum(b[key] for b in batchers) for key in ("batches", "examples", "forward_s_total")))


@contextmanager
def tandem_server(config: Any, artifact: Path) -> Iterator[Server]:
    """Tandem's app deployed with serving.deploy.serve (HAProxy in front of the replicas)."""
    from ray import serve

    from serving.deploy import serve as deploy

    name = config.name
    try:
        url = deploy(config, artifact=str(artifact))
        processes = (f"ServeReplica:{name}:", "HAProxyManager", "ProxyActor")  # HAProxy itself is the manager's child

        def replicas() -> int:
            return len(ray_processes(f"ServeReplica:{name}:"))

        yield Server(url, lambda: ray_processes(*processes), lambda: tandem_counters(url, name), name, replicas)
    finally:
        serve.delete(name)


def check_v2_answer(server: Server) -> int:
    """One binary /v2 request: raise unless it is answered 200 with one INT64 prediction in the
    binary part; return that prediction."""
    import httpx

    from serving.loadgen import encode_requests, wire_for
    from serving.oip import HEADER_LENGTH, split_body

    wire = wire_for("v2", server.model_name)
    body = encode_requests(np.full((1, 64), 0.5, dtype=np.float32), protocol="v2")[0]
    reply = httpx.post(
        f"{server.url}{wire.path}", content=body, headers={"Content-Type": wire.content_type, **dict(wire.headers)}, timeout=30
    )
    if reply.status_code != 200:
        raise RuntimeError(f"/v2 infer answered {reply.status_code}: {reply.text[:500]}")
    head, binary = split_body(reply.content, reply.headers.get(HEADER_LENGTH))
    (output,) = json.loads(head)["outputs"]
    if output["name"] != "predictions" or output["datatype"] != "INT64" or output["shape"] != [1] or len(binary) != 8:
        raise RuntimeError(f"/v2 infer answered an unexpected output: {output} with {len(binary)} binary bytes")
    return int(np.frombuffer(binary, dtype="<i8")[0])
