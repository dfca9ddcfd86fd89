"""The Ray Serve application: one HTTP endpoint in front of one or more model deployments.

`build_app({"config": <config dict>, "artifact": "latest" | path})` is the importable builder
(`serving.app:build_app`) that `serve run`, `serve deploy`, a KubeRay RayService and
serving/deploy.py's `serve()` use. The wire protocol is serving/protocol.py, the router's failover
serving/failover.py, the deploy-time settings serving/settings.py; this module wires them to Ray
Serve and FastAPI.

Shape of the application
------------------------
- One deployment (the common case): the model deployment *is* the FastAPI ingress. It decodes and
  validates the request, looks in the cache, queues the examples in its adaptive batcher
  (serving/batching.py) and answers. There is no router hop, and a router with one choice
  decides nothing (the hop's cost is measured by the serving benchmark's router-hop arm, in
  docs/benchmarks.md).
- Several deployments: an "Ingress" deployment (FastAPI) validates, looks in the cache and routes
  each request through a DeploymentHandle to a model deployment chosen by serving/router.py
  (spillover, round_robin, least_loaded); a deployment that refuses (queue full, batcher shedding)
  spills to the next one. Model deployments are named after `serving.deployments[i].name`; they
  are `ModelReplica`s without HTTP (Serve allows one FastAPI deployment per application).
  Bad input is refused in the ingress, so it never reaches a model replica.

The HTTP path (`serving.http_path`, default "haproxy")
------------------------------------------------------
Ray Serve's default path (HTTP proxy actor -> router -> replica) costs several times the server
CPU per request of a plain FastAPI server (figures in docs/benchmarks.md). Ray 2.60's throughput-optimized mode
(`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: direct ingress, user code and router on the main loop, gRPC
between deployments) lets the ingress replica serve HTTP on its own port, skipping the proxy.
- "haproxy": direct ingress with Ray's HAProxy mode (`RAY_SERVE_ENABLE_HA_PROXY=1`) in front:
  HAProxy listens on serving.host:port and balances over the ingress replicas' own ports, so the
  URL is stable across autoscaling and rollouts (HAProxy retries a refused connection while a
  replica drains). HAProxy in front costs some throughput and latency against a client on the
  replica's own port (docs/benchmarks.md's serving benchmark has the figures); the stable URL is worth
  that by default, and "direct" is there when one replica is enough.
- "direct": direct ingress without HAProxy; Serve's proxy stays on serving.port, and `serve()`
  returns the one ingress replica's own port. Fastest, for one replica (benchmarks, sidecars).
- "proxy": Ray Serve's defaults.
The settings (serving/settings.py) are environment variables that Serve reads at import, so they go
to the controller (`controller_options`, only when Serve starts) and to every replica
(`runtime_env.env_vars`); any `RAY_SERVE_*` variable set where `serve()` runs is passed along the
same way.

Errors
------
Every refusal is JSON in the body serving/protocol.py describes. 503 with Retry-After when
overloaded: on arrival, when the request is predicted to spend more
than its share of batching.target_p99_ms in the replica (serving/admission.py); in the batcher,
when it predicts a missed deadline with its queue over the limit; or when every deployment
refused. When more requests wait for a replica slot than
max_queued_requests, Serve itself answers 503 with Retry-After before Tandem's code runs (its body
is the plain text "Request dropped due to backpressure").
"""

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve as ray_serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.artifacts import local_artifact, model_version, read_manifest, resolve_artifact
from cluster.config import TandemConfig, validate_config
from cluster.runtime import storage_root
from serving.admission import Admission
from serving.asgi import V2_ERRORS, V2_INFER_BODY, HotPath, error_response, json_response, register_replica, v2_error_response
from serving.batching import Overloaded
from serving.cache import ResultCache
from serving.coalesce import Coalescer
from serving.failover import Failover, empty_retries, last_line, retry_after
from serving.model_replica import LocalModel, ModelReplica, tandem_metrics
from serving.oip import (
    HEADER_LENGTH,
    InferRequest,
    check_model,
    infer_response,
    model_metadata,
    output_arrays,
    parse_infer,
    server_metadata,
)
from serving.protocol import (
    DTYPE,
    ERROR_RESPONSES,
    PREDICT_BODY,
    ModelsResponse,
    PredictResponse,
    RequestError,
    check_bearer,
    parse_json,
    parse_predict,
    read_body,
    retry_after_header,
    softmax,
    token_digest,
)
from serving.router import Router
from serving.settings import (
    INGRESS,
    TOKEN_DIGEST_ENV,
    Hardware,
    admission_floor,
    deployment_options,
    has_router,
    replica_bounds,
    serve_env,
)

logger = logging.getLogger("tandem.serving")

# Everything TandemServer uses is defined above it, and this module does not use
# `from __future__ import annotations`: Serve's ingress wrapper resolves the methods' globals and
# FastAPI their annotations as the module is at decoration time (a later function was a NameError,
# a string annotation `Request` became a query parameter).

api = FastAPI(
    title="Tandem",
    description="Predictions from a Tandem model artifact. POST one example or a list to /v1/predict.",
    version="1",
)
ROUTES = "POST /v1/predict, GET /v1/models, GET /v1/stats, GET /healthz, and the Open Inference Protocol under /v2"


@api.exception_handler(StarletteHTTPException)
async def http_error_as_json(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (unknown path, wrong method) in Tandem's error body, not {"detail": ...}."""
    path = request.url.path
    if exc.status_code == 404:
        code, message = "not_found", f"no route {request.method} {path}; the API is {ROUTES}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("allow", (exc.headers or {}).get("Allow", "another method"))
        code, message = "method_not_allowed", f"{request.method} is not allowed on {path}; use {allowed} ({ROUTES})"
    else:
        code, message = "http_error", f"{exc.detail} ({request.method} {path})"
    return JSONResponse({"error": code, "message": message}, status_code=exc.status_code, headers=exc.headers)


def bearer_digest(token_env: str | None) -> str | None:
    """SHA-256 of the endpoint's token: from token_env (a Kubernetes Secret), else from serve()'s digest."""
    if not token_env:
        return None
    token, digest = os.environ.get(token_env), os.environ.get(TOKEN_DIGEST_ENV)
    if token:
        return token_digest(token)
    if not digest:
        # Fail closed: an endpoint configured for auth must never come up open.
        raise RuntimeError(
            f"serving.auth.token_env is '{token_env}' but that environment variable is empty in the replica; "
            "set it where the replica runs (a Kubernetes Secret, or export it before `tandem serve`) or remove serving.auth.token_env"
        )
    return digest


def model_card(config: TandemConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """What GET /v1/models says of the served model."""
    return {
        "name": config.name,
        "version": model_version(manifest),
        "input_shape": [int(s) for s in manifest["model"]["input_shape"]],
        "dtype": DTYPE,
        "num_classes": int(manifest["model"]["num_classes"]),
        "metrics": manifest.get("metrics", {}),
        "deployments": [
            {"name": d.name, "engine": d.engine, "precision": d.precision, "quantize": d.quantize} for d in config.serving.deployments
        ],
    }


api.add_middleware(HotPath)


@ray_serve.deployment
@ray_serve.ingress(api)
class TandemServer:
    """A model deployment (role "model") or the router ingress (role "router"); both serve HTTP
    when they are the application's ingress. `spec` is plain data made by `build_app`."""

    def __init__(self, spec: dict[str, Any]):
        self.config = validate_config(spec["config"])
        self.role = spec["role"]
        self.name = spec["name"]
        # A path or a URI: from the store through this node's cache (one download per node and file).
        self.artifact = local_artifact(spec["artifact"])
        manifest = read_manifest(self.artifact)
        self.card = model_card(self.config, manifest)
        self.version = self.card["version"]
        self.input_shape = tuple(self.card["input_shape"])
        serving = self.config.serving
        self.limits = serving.limits
        self.token_digest = bearer_digest(serving.auth.token_env)
        self.cache = ResultCache(serving.cache.max_entries, serving.cache.ttl_s) if serving.cache.enabled else None
        if self.cache is not None:
            self.cache.set_version(self.version)
        self.metrics = tandem_metrics()
        # The gate sits on a model replica that is the HTTP ingress. The router ingress has none:
        # its in-flight count spans every deployment, and the requests past the first deployment's
        # share are exactly the ones it spills to the next (their batchers shed when late).
        gated = serving.batching.admission == "latency" and self.role == "model"
        self.admission = Admission(serving.batching.target_p99_ms, min_in_flight=admission_floor(serving)) if gated else None
        register_replica(self)  # the hot routes reach this replica through HotPath
        self.model: LocalModel | None = None
        self.router: Router | None = None
        self.failover: Failover | None = None
        self.coalescer: Coalescer | None = None
        if self.role == "model":
            self.model = LocalModel(self.config, self.artifact, spec["deployment"], self.input_shape, self.metrics)
        else:
            self.handles = spec["handles"]
            self.router = Router([d.name for d in serving.deployments], serving.router.policy, serving.router.spill_threshold)
            # One call in flight per model replica; the requests arriving meanwhile go together in the next
            # (measured: 830 req/s and 1.38 ms of CPU per request against 795 and 1.56 with two per replica).
            self.coalescer = Coalescer(self._call, serving.batching.max_batch_size, per_target=spec.get("replicas"))
            self.failover = Failover(self.coalescer, self._probe, self.metrics)

    # ---------------------------------------------------------------- HTTP routes

    @api.post("/v1/predict", response_model=PredictResponse, responses=ERROR_RESPONSES, openapi_extra=PREDICT_BODY)
    async def predict(self, request: Request) -> Response:
        return await self.predict_v1(request)

    async def predict_v1(self, request: Request) -> Response:
        """POST /v1/predict (FastAPI's route above, or HotPath straight from the socket)."""

        def decode(raw: bytes) -> tuple[np.ndarray, bool]:
            return parse_predict(parse_json(raw), self.input_shape, self.limits.max_inputs)

        def encode(probabilities: bool, logits: np.ndarray, served_by: str, cached: int) -> Response:
            body: dict[str, Any] = {
                "predictions": logits.argmax(axis=1),
                "model_version": self.version,
                "deployment": served_by,
                "cached": cached,
            }
            if probabilities:
                body["probabilities"] = softmax(logits)
            return json_response(body)

        return await self._answer(request, decode, encode, lambda exc: error_response(exc, self.input_shape))

    # ---------------------------------------------------------------- the Open Inference Protocol (serving/oip.py)

    @api.get("/v2/health/live")
    async def v2_live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def v2_ready(self) -> dict[str, bool]:
        return {"ready": True}

    @api.get("/v2", responses=V2_ERRORS)
    async def v2_server(self, request: Request) -> Response:
        return self._v2_metadata(request, lambda: server_metadata(self.version))

    @api.get("/v2/models/{model_name}", responses=V2_ERRORS)
    async def v2_model(self, model_name: str, request: Request) -> Response:
        return self._v2_metadata(request, lambda: self._v2_model_metadata(model_name, None))

    @api.get("/v2/models/{model_name}/versions/{model_version}", responses=V2_ERRORS)
    async def v2_model_version(self, model_name: str, model_version: str, request: Request) -> Response:
        return self._v2_metadata(request, lambda: self._v2_model_metadata(model_name, model_version))

    @api.get("/v2/models/{model_name}/ready", responses=V2_ERRORS)
    async def v2_model_ready(self, model_name: str, request: Request) -> Response:
        return self._v2_metadata(request, lambda: self._v2_model_ready(model_name, None))

    @api.get("/v2/models/{model_name}/versions/{model_version}/ready", responses=V2_ERRORS)
    async def v2_model_version_ready(self, model_name: str, model_version: str, request: Request) -> Response:
        return self._v2_metadata(request, lambda: self._v2_model_ready(model_name, model_version))

    @api.post("/v2/models/{model_name}/infer", responses=V2_ERRORS, openapi_extra=V2_INFER_BODY)
    async def v2_infer(self, model_name: str, request: Request) -> Response:
        return await self.infer_v2(request, model_name, None)

    @api.post("/v2/models/{model_name}/versions/{model_version}/infer", responses=V2_ERRORS, openapi_extra=V2_INFER_BODY)
    async def v2_infer_version(self, model_name: str, model_version: str, request: Request) -> Response:
        return await self.infer_v2(request, model_name, model_version)

    @api.get("/v1/models", response_model=ModelsResponse, responses={401: ERROR_RESPONSES[401]})
    async def models(self, request: Request) -> Any:
        try:
            check_bearer(request.headers.get("authorization"), self.token_digest)
        except RequestError as exc:
            return error_response(exc, None)
        return {"models": [self.card]}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "version": self.version, "deployment": self.name}

    @api.get("/v1/stats", responses={401: ERROR_RESPONSES[401]})
    async def stats(self, request: Request) -> Any:
        """This replica's batcher, cache and router counters (one replica of possibly several)."""
        try:
            check_bearer(request.headers.get("authorization"), self.token_digest)
        except RequestError as exc:
            return error_response(exc, None)
        stats = self.local_stats()
        if self.router is not None:
            stats["deployments"] = await self._deployment_stats()
        return stats

    # ---------------------------------------------------------------- handle methods and internals

    async def _answer(
        self,
        request: Request,
        decode: Callable[[bytes], tuple[np.ndarray, Any]],
        encode: Callable[[Any, np.ndarray, str, int], Response],
        refuse: Callable[[RequestError], Response],
    ) -> Response:
        """One prediction request of either protocol: auth, the admission gate, the body within its
        limit, decode, cache and batcher (or the router), encode; a refusal in the protocol's body."""
        ticket = None
        answered = False
        try:
            check_bearer(request.headers.get("authorization"), self.token_digest)
            ticket = self._admit()
            x, context = decode(await read_body(request, self.limits.max_body_bytes))
            logits, served_by, cached = await self._cached_logits(x)
            answered = cached < len(x)  # an answer wholly from the cache says nothing of the model's cost
        except RequestError as exc:
            return refuse(exc)
        except Exception as exc:
            retry = retry_after(exc)
            if retry is None:
                raise
            return refuse(
                RequestError(503, "overloaded", last_line(exc) if str(exc) else "overloaded; retry later", retry_after_header(retry))
            )
        finally:
            if ticket is not None:
                self.admission.leave(ticket, answered)
        return encode(context, logits, served_by, cached)

    async def infer_v2(self, request: Request, model_name: str, model_version: str | None) -> Response:
        """POST /v2/models/{name}[/versions/{v}]/infer (FastAPI's routes above, or HotPath)."""
        try:
            check_model(model_name, model_version, self.config.name, self.version)
        except RequestError as exc:
            return v2_error_response(exc)

        def decode(raw: bytes) -> tuple[np.ndarray, InferRequest]:
            parsed = parse_infer(raw, request.headers.get(HEADER_LENGTH), self.input_shape, self.limits.max_inputs)
            return parsed.x, parsed

        def encode(parsed: InferRequest, logits: np.ndarray, served_by: str, cached: int) -> Response:
            probabilities = softmax(logits) if "probabilities" in parsed.outputs else None
            body, header_length = infer_response(self.config.name, self.version, parsed, output_arrays(logits, probabilities))
            if header_length is None:
                return Response(body, media_type="application/json")
            return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

        return await self._answer(request, decode, encode, v2_error_response)

    def _v2_metadata(self, request: Request, build: Callable[[], dict[str, Any]]) -> Response:
        try:
            check_bearer(request.headers.get("authorization"), self.token_digest)
            return JSONResponse(build())
        except RequestError as exc:
            return v2_error_response(exc)

    def _v2_model_metadata(self, model_name: str, model_version: str | None) -> dict[str, Any]:
        check_model(model_name, model_version, self.config.name, self.version)
        return model_metadata(self.config.name, self.version, self.input_shape, self.card["num_classes"])

    def _v2_model_ready(self, model_name: str, model_version: str | None) -> dict[str, Any]:
        check_model(model_name, model_version, self.config.name, self.version)
        return {"name": model_name, "ready": True}

    def _admit(self) -> tuple[float, int] | None:
        """A ticket from the admission gate (None when it is off); Overloaded when the request would be late."""
        if self.admission is None:
            return None
        try:
            return self.admission.enter()
        except Overloaded:
            if self.metrics is not None:
                self.metrics.admission_shed.inc()
            raise

    def local_stats(self) -> dict[str, Any]:
        return {
            "deployment": self.name,
            "role": self.role,
            "version": self.version,
            "pid": os.getpid(),
            "batcher": self.model.batcher.stats() if self.model else None,
            "admission": self.admission.stats() if self.admission else None,
            "cache": self.cache.stats() if self.cache else None,
            "router": self.router.stats() if self.router else None,
            "coalescing": self.coalescer.stats() if self.coalescer else None,
            "retries": self.failover.retries if self.failover else empty_retries(),
        }

    async def _deployment_stats(self) -> dict[str, Any]:
        """Each model deployment's stats (pid, batcher) from one of its replicas, for /v1/stats."""
        import asyncio

        async def one(name: str) -> dict[str, Any]:
            try:
                return await asyncio.wait_for(self._probe(name), timeout=5.0)
            except Exception as exc:  # a replica being replaced: say so instead of failing /v1/stats
                return {"deployment": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}

        names = list(self.handles)
        return dict(zip(names, await asyncio.gather(*(one(n) for n in names)), strict=True))

    async def _cached_logits(self, x: np.ndarray) -> tuple[np.ndarray, str, int]:
        if self.cache is None:
            logits, served_by = await self._logits(x)
            return logits, served_by, 0
        keys = self.cache.keys(self.version, x)
        found = self.cache.get_many(keys)
        missing = [i for i, row in enumerate(found) if row is None]
        hits = len(keys) - len(missing)
        if self.metrics is not None:
            self.metrics.cache_result(hits, len(missing), self.cache.stats()["hit_rate"])
        if not missing:
            return np.stack(found), "cache", hits
        fresh, served_by = await self._logits(x[missing] if hits else x)
        self.cache.put_many([keys[i] for i in missing], fresh)
        if not hits:
            return fresh, served_by, 0
        for row, i in zip(fresh, missing, strict=True):
            found[i] = row
        return np.stack(found), served_by, hits

    async def _logits(self, x: np.ndarray) -> tuple[np.ndarray, str]:
        if self.model is not None:
            return await self.model.logits(x), self.name
        return await self.failover.send(x, self.router)

    async def _call(self, target: str, x: np.ndarray) -> np.ndarray:
        return await self.handles[target].predict_array.remote(x)

    async def _probe(self, target: str) -> dict[str, Any]:
        return await self.handles[target].stats.remote()


# ---------------------------------------------------------------------------------------------
# building the application
# ---------------------------------------------------------------------------------------------


def cluster_hardware() -> Hardware:
    """Cores and GPUs of the cluster the app is built on, for 'auto' replica counts.

    Ray's CPU count is logical: a single-node Ray may declare more than the machine has (Tandem
    starts a local Ray with at least 4), so on one node it is capped at the cores this process may
    run on. A cluster of several nodes is taken at its word.
    """
    import ray

    resources = ray.cluster_resources()
    cores, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if sum(1 for node in ray.nodes() if node.get("Alive")) == 1:
        cores = min(cores, len(os.sched_getaffinity(0)))
    return Hardware(cores=max(1, cores), gpus=gpus)


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application for {"config": <TandemConfig as dict>, "artifact": "latest" | path}."""
    config = validate_config(args["config"])
    artifact = resolve_artifact(args.get("artifact") or config.serving.artifact, storage_root(config), config.name)
    # A missing or damaged artifact fails here, in the caller, not in every replica.
    read_manifest(local_artifact(artifact))
    # The RAY_SERVE_* variables of the process that builds the app win over ours (serve_env).
    replica_env = {**serve_env(config.serving, os.environ), **dict(args.get("replica_env") or {})}
    hardware = cluster_hardware()
    options = deployment_options(config, replica_env, hardware)
    base = {"config": config.to_dict(), "artifact": str(artifact)}

    def model_spec(index: int) -> dict[str, Any]:
        deployment = config.serving.deployments[index]
        return {**base, "role": "model", "name": deployment.name, "deployment": deployment.model_dump(mode="json")}

    if not has_router(config):
        return TandemServer.options(**options[config.serving.deployments[0].name]).bind(model_spec(0))
    handles = {d.name: ModelReplica.options(**options[d.name]).bind(model_spec(i)) for i, d in enumerate(config.serving.deployments)}
    replicas = {name: bounds[1] for name, bounds in replica_bounds(config, hardware).items() if bounds}
    router_spec = {**base, "role": "router", "name": INGRESS, "handles": handles, "replicas": replicas}
    return TandemServer.options(**options[INGRESS]).bind(router_spec)
