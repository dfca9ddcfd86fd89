"""The Ray Serve application: one HTTP endpoint in front of one or more model deployments.

    url = serving.app.serve(config, artifact="latest")   # deploy (or roll out) and wait until ready
    serving.client.predict(url, [[0.0] * 64])
    serving.app.shutdown()

`build_app({"config": <config dict>, "artifact": "latest" | path})` is the importable builder
(`serving.app:build_app`) that `serve run`, `serve deploy` and a KubeRay RayService use.

Shape of the application
------------------------
- One deployment (the common case): the model deployment *is* the FastAPI ingress. It decodes and
  validates the request, looks in the cache, queues the examples in its adaptive batcher
  (serving/batching.py) and answers. There is no router hop, and a router with one choice
  decides nothing. Measured (benchmarks/serving.py, arm tandem_router_hop: HAProxy -> "Ingress"
  -> handle -> model replica, against the model replica as ingress): the hop cut throughput to
  0.2-0.35x and multiplied p50 by 3-6 (about 11-17 ms of server CPU per request instead of 2-3).
- Several deployments: an "Ingress" deployment (FastAPI) validates, looks in the cache and routes
  each request through a DeploymentHandle to a model deployment chosen by serving/router.py
  (spillover, round_robin, least_loaded); a deployment that refuses (queue full, batcher shedding)
  spills to the next one. Model deployments are named after `serving.deployments[i].name`; they
  are `ModelReplica`s without HTTP (Serve allows one FastAPI deployment per application).
  Bad input is refused in the ingress, so it never reaches a model replica.

The HTTP path (`serving.http_path`, default "haproxy")
------------------------------------------------------
Ray Serve's default path (HTTP proxy actor -> router -> replica) costs about 8 ms of server CPU per
request here, against 1.5 ms for a plain FastAPI server. Ray 2.60's throughput-optimized mode
(`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: direct ingress, user code and router on the main loop, gRPC
between deployments) lets the ingress replica serve HTTP on its own port, skipping the proxy.
- "haproxy": direct ingress with Ray's HAProxy mode (`RAY_SERVE_ENABLE_HA_PROXY=1`) in front:
  HAProxy listens on serving.host:port and balances over the ingress replicas' own ports, so the
  URL is stable across autoscaling and rollouts (HAProxy retries a refused connection while a
  replica drains). Measured: the fast path served 2-17x the requests/s of Serve's default proxy
  path; HAProxy in front cost 0.6-0.9x of the throughput and 1.2-1.5x the p50 of a client on the
  replica's own port (on 2 shared cores HAProxy competes with the replica for CPU). The stable URL
  is worth that by default; "direct" is there when one replica is enough.
- "direct": direct ingress without HAProxy; Serve's proxy stays on serving.port, and `serve()`
  returns the one ingress replica's own port. Fastest, for one replica (benchmarks, sidecars).
- "proxy": Ray Serve's defaults.
The settings are environment variables that Serve reads at import, so they go to the controller
(`controller_options`, only when Serve starts) and to every replica (`runtime_env.env_vars`); any
`RAY_SERVE_*` variable set where `serve()` runs is passed along the same way.

Errors
------
Every refusal is JSON `{"error": code, "message": ..., "expected_shape": [...], "dtype": "float32"}`:
400 not JSON, 401 missing or wrong bearer token, 413 body over limits.max_body_bytes or more than
limits.max_inputs examples, 422 wrong shape / dtype / NaN or infinity / empty / unknown keys,
503 with Retry-After when overloaded: on arrival, when the request is predicted to spend more
than its share of batching.target_p99_ms in the replica (serving/admission.py); in the batcher,
when it predicts a missed deadline with its queue over the limit; or when every deployment
refused. When more requests wait for a replica slot than
max_queued_requests, Serve itself answers 503 with Retry-After before Tandem's code runs (its body
is the plain text "Request dropped due to backpressure").
"""

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve as ray_serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.artifacts import read_manifest, resolve_artifact
from cluster.config import TandemConfig, validate_config
from cluster.runtime import storage_root
from serving.admission import MIN_IN_FLIGHT, Admission
from serving.batching import AdaptiveBatcher, BatcherSettings, Overloaded
from serving.cache import ResultCache
from serving.router import Router

logger = logging.getLogger("tandem.serving")

INGRESS = "Ingress"
HTTP_PATHS = ("haproxy", "direct", "proxy")
DTYPE = "float32"
READY_TIMEOUT_S = 120.0
HAPROXY_RETRY_ON = "conn-failure empty-response junk-response"


# ---------------------------------------------------------------------------------------------
# request and response schema (also the OpenAPI schema)
# ---------------------------------------------------------------------------------------------


class PredictRequest(BaseModel):
    inputs: list[Any] = Field(description="One example (nested lists of numbers in the model's input shape) or a list of examples.")
    probabilities: bool = Field(False, description="Also return the softmax class probabilities.")


class PredictResponse(BaseModel):
    predictions: list[int] = Field(description="Predicted class per example (a list even for one example).")
    probabilities: list[list[float]] | None = Field(None, description="Class probabilities per example, when asked for.")
    model_version: str = Field(description="First 12 hex digits of the served model.pt's sha256.")
    deployment: str = Field(description="The deployment whose replica computed the answer ('cache' when every example was cached).")
    cached: int = Field(0, description="How many of the examples came from the result cache.")


class ErrorResponse(BaseModel):
    error: str = Field(description="Machine-readable code: not_json, unauthorized, body_too_large, too_many_inputs, wrong_shape, ...")
    message: str = Field(description="What is wrong and how to fix it.")
    expected_shape: list[int] | None = Field(None, description="The shape of one example.")
    dtype: str | None = Field(None, description="The element type the model takes.")


class ModelCard(BaseModel):
    name: str
    version: str
    input_shape: list[int]
    dtype: str
    num_classes: int
    metrics: dict[str, Any]
    deployments: list[dict[str, Any]]


class ModelsResponse(BaseModel):
    models: list[ModelCard]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "The body is not JSON.",
        401: "Missing or wrong bearer token.",
        413: "The body or the number of examples is over the limit.",
        422: "Wrong shape, dtype, NaN/infinity, empty input or unknown keys.",
        503: "Overloaded: retry after the Retry-After header's seconds.",
    }.items()
}
PREDICT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}}


# ---------------------------------------------------------------------------------------------
# request decoding: pure functions, every refusal a RequestError that names the fix
# ---------------------------------------------------------------------------------------------


class RequestError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def shape_text(input_shape: tuple[int, ...]) -> str:
    return f"[{', '.join(map(str, input_shape))}]"


# What `serve()` hands replicas that cannot see the token's own variable: its SHA-256, never the
# token. Ray writes every runtime_env verbatim to runtime_env_agent.log, so a token passed there
# would sit in the cluster's logs.
TOKEN_DIGEST_ENV = "TANDEM_AUTH_TOKEN_SHA256"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_bearer(header: str | None, digest: str | None) -> None:
    """Constant-time check of `Authorization: Bearer <token>` against the token's SHA-256; no-op when auth is off."""
    if digest is None:
        return
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(given.strip()), digest):
        raise RequestError(401, "unauthorized", "missing or wrong bearer token; send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refusing it as soon as it passes max_bytes (before reading the rest)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, "body_too_large", f"the body is {declared} bytes, over the {max_bytes}-byte limit (serving.limits.max_body_bytes); send fewer examples per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, "body_too_large", f"the body is over the {max_bytes}-byte limit (serving.limits.max_body_bytes); send fewer examples per request")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    if not raw:
        raise RequestError(400, "not_json", 'the body is empty; send JSON like {"inputs": [...]}')
    try:
        return json.loads(raw)
    except RecursionError:  # json's C decoder recurses once per nesting level
        raise RequestError(400, "not_json", 'the body is nested too deeply to decode; send JSON like {"inputs": [[...], ...]}') from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer over Python's 4300-digit limit
        raise RequestError(400, "not_json", f'the body is not valid JSON ({exc}); send JSON like {{"inputs": [...]}}') from None


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    return depth


def parse_predict(payload: Any, input_shape: tuple[int, ...], max_inputs: int) -> tuple[np.ndarray, bool]:
    """(float32 batch (N, *input_shape), probabilities?) from a decoded body, or a RequestError."""
    expected = f"one example of shape {shape_text(input_shape)} or a list of them"
    if not isinstance(payload, dict):
        raise RequestError(422, "wrong_body", f'the body must be a JSON object like {{"inputs": [...]}} holding {expected}')
    unknown = sorted(set(payload) - set(PredictRequest.model_fields))
    if unknown:
        raise RequestError(422, "unknown_keys", f"unknown key(s) {unknown} in the body; valid keys: {list(PredictRequest.model_fields)}")
    if "inputs" not in payload:
        raise RequestError(422, "missing_inputs", f'the body has no "inputs"; send {expected}')
    probabilities = payload.get("probabilities", False)
    if not isinstance(probabilities, bool):
        raise RequestError(422, "wrong_type", f'"probabilities" must be true or false, got {json.dumps(probabilities)}')
    inputs = payload["inputs"]
    if not isinstance(inputs, list):
        raise RequestError(422, "wrong_shape", f'"inputs" must be a list: {expected}')
    if not inputs:
        raise RequestError(422, "empty_inputs", f'"inputs" is empty; send {expected}')
    depth = _depth(inputs)
    is_batch = depth == len(input_shape) + 1
    if is_batch and len(inputs) > max_inputs:
        raise RequestError(413, "too_many_inputs", f'"inputs" holds {len(inputs)} examples, over the limit of {max_inputs} (serving.limits.max_inputs); split the request')
    try:
        array = np.asarray(inputs)
    except (ValueError, TypeError):
        raise RequestError(422, "wrong_shape", f'"inputs" is ragged (lists of different lengths); send {expected}') from None
    if array.dtype.kind not in "iuf":
        found = {"b": "booleans", "U": "strings", "S": "bytes", "O": "mixed or non-numeric values"}.get(array.dtype.kind, str(array.dtype))
        raise RequestError(422, "wrong_dtype", f'"inputs" must hold numbers ({DTYPE}); found {found}')
    if array.ndim == len(input_shape):
        array = array[None]
    if array.ndim != len(input_shape) + 1 or tuple(array.shape[1:]) != tuple(input_shape):
        got = list(array.shape if depth != len(input_shape) else array.shape[1:])
        raise RequestError(422, "wrong_shape", f'"inputs" has shape {got}; expected {expected} (shape [N, {", ".join(map(str, input_shape))}])')
    with np.errstate(over="ignore"):  # a number beyond float32 becomes inf, refused just below
        batch = array.astype(np.float32)
    finite = np.isfinite(batch).reshape(len(batch), -1).all(axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise RequestError(422, "not_finite", f'"inputs" example {bad} holds NaN or infinity (or a number beyond float32); send finite numbers')
    return batch, probabilities


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def error_response(exc: RequestError, input_shape: tuple[int, ...] | None) -> JSONResponse:
    body: dict[str, Any] = {"error": exc.code, "message": exc.message}
    if input_shape is not None and exc.status == 422:
        body.update(expected_shape=list(input_shape), dtype=DTYPE)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def overloaded_response(message: str, retry_after_s: float) -> JSONResponse:
    # Retry-After is whole seconds (RFC 9110); never 0, which would invite an immediate retry storm.
    retry = str(max(1, math.ceil(retry_after_s)))
    return JSONResponse({"error": "overloaded", "message": message}, status_code=503, headers={"Retry-After": retry})


# ---------------------------------------------------------------------------------------------
# the replica: model deployment (engine + batcher) or router ingress (handles + router)
# ---------------------------------------------------------------------------------------------

api = FastAPI(
    title="Tandem",
    description="Predictions from a Tandem model artifact. POST one example or a list to /v1/predict.",
    version="1",
)
ROUTES = "POST /v1/predict, GET /v1/models, GET /v1/stats, GET /healthz"


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


def _backpressure(exc: BaseException) -> float | None:
    """Retry-After seconds when exc is a refusal (batcher shedding or Serve back-pressure), else None."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = getattr(exc, "cause", None)  # a RayTaskError from a handle call carries the replica's exception
    if isinstance(cause, Overloaded):
        exc = cause
    if isinstance(exc, Overloaded):
        return exc.retry_after_s
    if isinstance(exc, BackPressureError):
        return exc.retry_after_s or 1.0
    if isinstance(exc, DeploymentUnavailableError):
        return 1.0
    return None


# A model replica that dies mid-request (killed, out of memory, node lost) fails the ingress's
# handle call. A prediction is a pure function of its input, so the ingress sends it again: to the
# next deployment in the router's order first, then to the same one (Serve has by then marked the
# dead replica and picks another replica or its replacement). Bounded, with a short doubling
# backoff: a request that keeps losing its replica answers 503 rather than waiting on.
REPLICA_RETRIES = 3
RETRY_BACKOFF_S = 0.05
# A deployment whose last replica died has nothing to answer with until Serve's replacement is up
# (tens of seconds on a loaded 2-core machine: process start, model load, calibration), and Serve's
# router holds requests for it meanwhile instead of failing them. So a death marks the deployment
# down: calls waiting on it are abandoned and resent, and it gets no new requests (unless every
# other deployment refuses) until a probe (its `stats`) answers. An attempt that takes longer
# than ATTEMPT_TIMEOUT_S is treated the same way: Serve answers back-pressure within milliseconds
# and the batcher sheds at its latency target, so an answer this late means no live replica.
ATTEMPT_TIMEOUT_S = 5.0
PROBE_EVERY_S = 0.5


class ReplicaLost(RuntimeError):
    """The ingress abandoned a call: its deployment went down ("down"), or no answer came in time ("timeout")."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _replica_died(exc: BaseException) -> bool:
    """Whether exc says the replica (not the request) failed: then the request is safe to resend.

    RayActorError covers ActorDiedError (the actor is gone) and ActorUnavailableError (Serve's
    gRPC transport reports a replica that stopped answering with it); ReplicaUnavailableError is
    Serve's own "the chosen replica left before the request was sent". A RayTaskError whose cause
    is an exception of the model (a user error) is none of these and is never retried.
    """
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    died = (RayActorError, ReplicaUnavailableError, ReplicaLost)
    return isinstance(exc, died) or isinstance(getattr(exc, "cause", None), died)


# Everything TandemServer uses is defined above it, and this module does not use
# `from __future__ import annotations`: Serve's ingress wrapper resolves the methods' globals and
# FastAPI their annotations as the module is at decoration time (a later function was a NameError,
# a string annotation `Request` became a query parameter).


def batcher_queue_limit(config: TandemConfig) -> int:
    """Requests a replica's batcher queues before it may shed: two full batches (or the configured
    queue limit when lower). Beyond them a request waits at least two forward passes, which is
    when a missed target becomes likely; it is still served unless the predicted finish is late."""
    serving = config.serving
    return max(1, min(serving.limits.max_queued_requests, 2 * serving.batching.max_batch_size))


def admission_floor(config: TandemConfig) -> int:
    """Requests a replica always admits: one full batch. Batching needs requests together, and a
    closed-loop client pool up to that size is never refused (refusing it would only slow it)."""
    return max(MIN_IN_FLIGHT, config.serving.batching.max_batch_size)


def tandem_metrics() -> Any:
    """Tandem's Prometheus metrics, or None where they cannot register (they are an aid, never a
    reason for a replica to fail)."""
    try:
        from serving.metrics import TandemMetrics

        return TandemMetrics()
    except Exception:
        logger.exception("Tandem metrics are off: could not create them")
        return None


class LocalModel:
    """The engine of one deployment behind its adaptive batcher, calibrated at start."""

    def __init__(self, config: TandemConfig, artifact: Path, deployment: dict[str, Any], input_shape: tuple[int, ...], metrics: Any):
        from serving.engines import load_engine

        self.engine = load_engine(
            artifact,
            engine=deployment["engine"],
            precision=deployment["precision"],
            quantize=deployment["quantize"],
            threads=deployment["threads"],
            device="auto",
        )
        batching = config.serving.batching
        settings = BatcherSettings(
            max_batch_size=batching.max_batch_size,
            target_p99_ms=batching.target_p99_ms,
            max_queued=batcher_queue_limit(config),
            adaptive=batching.adaptive,
            max_wait_ms=batching.max_wait_ms,
        )
        self.batcher = AdaptiveBatcher(self.engine.predict, settings)
        self.metrics = metrics
        if metrics is not None:
            self.batcher.on_batch = metrics.on_batch(self.batcher)
        self.batcher.calibrate(np.zeros(input_shape, dtype=np.float32))

    async def logits(self, x: np.ndarray) -> np.ndarray:
        try:
            return await self.batcher.submit(x)
        except Overloaded:
            if self.metrics is not None:
                self.metrics.shed.inc()
            raise


@ray_serve.deployment
class ModelReplica:
    """A model deployment behind the router ingress: no HTTP of its own (Serve allows one FastAPI
    deployment per application), called through a DeploymentHandle with validated arrays."""

    def __init__(self, spec: dict[str, Any]):
        config = validate_config(spec["config"])
        manifest = read_manifest(Path(spec["artifact"]))
        shape = tuple(int(s) for s in manifest["model"]["input_shape"])
        self.name = spec["name"]
        self.model = LocalModel(config, Path(spec["artifact"]), spec["deployment"], shape, tandem_metrics())

    async def predict_array(self, x: np.ndarray) -> np.ndarray:
        return await self.model.logits(x)

    def stats(self) -> dict[str, Any]:
        import ray

        resources = ray.get_runtime_context().get_assigned_resources()
        return {"deployment": self.name, "pid": os.getpid(), "resources": resources, "batcher": self.model.batcher.stats()}


@ray_serve.deployment
@ray_serve.ingress(api)
class TandemServer:
    """A model deployment (role "model") or the router ingress (role "router"); both serve HTTP
    when they are the application's ingress. `spec` is plain data made by `build_app`."""

    def __init__(self, spec: dict[str, Any]):
        self.config = validate_config(spec["config"])
        self.role = spec["role"]
        self.name = spec["name"]
        self.artifact = Path(spec["artifact"])
        manifest = read_manifest(self.artifact)
        self.version = str(manifest.get("version") or manifest["files"]["model.pt"]["sha256"][:12])
        self.input_shape = tuple(int(s) for s in manifest["model"]["input_shape"])
        self.num_classes = int(manifest["model"]["num_classes"])
        self.card = self._model_card(manifest)
        serving = self.config.serving
        self.limits = serving.limits
        self.token_digest = self._bearer_digest(serving.auth.token_env)
        self.cache = ResultCache(serving.cache.max_entries, serving.cache.ttl_s) if serving.cache.enabled else None
        if self.cache is not None:
            self.cache.set_version(self.version)
        self.metrics = tandem_metrics()
        batching = serving.batching
        # The gate sits on a model replica that is the HTTP ingress. The router ingress has none:
        # its in-flight count spans every deployment, and the requests past the first deployment's
        # share are exactly the ones it spills to the next (their batchers shed when late).
        gated = batching.admission == "latency" and self.role == "model"
        self.admission = Admission(batching.target_p99_ms, min_in_flight=admission_floor(self.config)) if gated else None
        self.model: LocalModel | None = None
        self.router: Router | None = None
        if self.role == "model":
            self.model = LocalModel(self.config, self.artifact, spec["deployment"], self.input_shape, self.metrics)
        else:
            self.handles = spec["handles"]
            self.router = Router([d.name for d in serving.deployments], serving.router.policy, serving.router.spill_threshold)
        # Requests resent because a model replica died, by deployment and by error, and those that
        # still failed after REPLICA_RETRIES (answered 503).
        self.retries: dict[str, Any] = {"total": 0, "gave_up": 0, "by_deployment": {}, "by_error": {}, "marked_down": {}}
        # Per model deployment: an Event set while it is down (see ATTEMPT_TIMEOUT_S).
        self._down: dict[str, asyncio.Event] = {}
        self._probes: dict[str, asyncio.Task] = {}

    # ---------------------------------------------------------------- set-up

    @staticmethod
    def _bearer_digest(token_env: str | None) -> str | None:
        """SHA-256 of the token: from token_env (a Kubernetes Secret), else from serve()'s digest."""
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

    def _model_card(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "version": self.version,
            "input_shape": list(self.input_shape),
            "dtype": DTYPE,
            "num_classes": self.num_classes,
            "metrics": manifest.get("metrics", {}),
            "deployments": [
                {"name": d.name, "engine": d.engine, "precision": d.precision, "quantize": d.quantize} for d in self.config.serving.deployments
            ],
        }

    # ---------------------------------------------------------------- HTTP routes

    @api.post("/v1/predict", response_model=PredictResponse, responses=ERROR_RESPONSES, openapi_extra=PREDICT_BODY)
    async def predict(self, request: Request) -> JSONResponse:
        ticket = None
        answered = False
        try:
            check_bearer(request.headers.get("authorization"), self.token_digest)
            ticket = self._admit()
            raw = await read_body(request, self.limits.max_body_bytes)
            x, probabilities = parse_predict(parse_json(raw), self.input_shape, self.limits.max_inputs)
            logits, served_by, cached = await self._cached_logits(x)
            answered = cached < len(x)  # an answer wholly from the cache says nothing of the model's cost
        except RequestError as exc:
            return error_response(exc, self.input_shape)
        except Exception as exc:
            retry = _backpressure(exc)
            if retry is None:
                raise
            return overloaded_response(str(exc).splitlines()[-1] if str(exc) else "overloaded; retry later", retry)
        finally:
            if ticket is not None:
                self.admission.leave(ticket, answered)
        body: dict[str, Any] = {
            "predictions": logits.argmax(axis=1).tolist(),
            "model_version": self.version,
            "deployment": served_by,
            "cached": cached,
        }
        if probabilities:
            body["probabilities"] = softmax(logits).tolist()
        return JSONResponse(body)

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
            "retries": self.retries,
        }

    async def _deployment_stats(self) -> dict[str, Any]:
        """Each model deployment's stats (pid, batcher) from one of its replicas, for /v1/stats."""

        async def one(name: str) -> dict[str, Any]:
            async def call() -> dict[str, Any]:
                return await self.handles[name].stats.remote()

            try:
                return await asyncio.wait_for(call(), timeout=5.0)
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
        return await self._route(x)

    async def _route(self, x: np.ndarray) -> tuple[np.ndarray, str]:
        """Send x to the deployments in the router's order until one answers.

        A refusal (back-pressure, shedding) moves on to the next deployment; a replica lost under
        the request puts its deployment at the back of the queue and the request is resent (see
        REPLICA_RETRIES). Deployments that are down go last. Any other error is the model's and
        goes to the caller as it is.
        """
        assert self.router is not None
        refusals: list[tuple[str, float, str]] = []
        order = self.router.order()
        queue = [n for n in order if not self._is_down(n)] + [n for n in order if self._is_down(n)]
        deaths = 0
        while queue:
            target = queue.pop(0)
            self.router.started(target)
            served = False
            try:
                logits = await self._attempt(target, x)
                served = True
            except Exception as exc:
                if _replica_died(exc):
                    self._mark_down(target)
                    if deaths == REPLICA_RETRIES:
                        self.retries["gave_up"] += 1
                        raise Overloaded(
                            f"unavailable: model replicas were lost under this request {deaths + 1} times ({target} last); retry later", 1.0
                        ) from exc
                    deaths += 1
                    self._note_retry(target, exc)
                    queue.append(target)
                    await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (deaths - 1))
                    continue
                retry = _backpressure(exc)
                if retry is None:
                    raise
                refusals.append((target, retry, str(exc).splitlines()[-1] if str(exc) else type(exc).__name__))
                continue
            finally:
                self.router.finished(target, served)
            if target != self.router.names[0] and self.metrics is not None:
                self.metrics.spillover.inc(tags={"target": target})
            return logits, target
        names = ", ".join(name for name, _, _ in refusals)
        raise Overloaded(f"overloaded: every deployment refused the request ({names}); retry later", min(r for _, r, _ in refusals))

    def _is_down(self, name: str) -> bool:
        event = self._down.get(name)
        return event is not None and event.is_set()

    async def _attempt(self, target: str, x: np.ndarray) -> np.ndarray:
        """One handle call, abandoned (ReplicaLost) when the deployment goes down meanwhile or
        no answer comes within ATTEMPT_TIMEOUT_S."""
        down = self._down.setdefault(target, asyncio.Event())
        call = asyncio.ensure_future(self._call(target, x))
        # A call made while the deployment is down (every other one refused) only has the timeout.
        watch = asyncio.ensure_future(down.wait()) if not down.is_set() else None
        try:
            done, _ = await asyncio.wait({call} | ({watch} if watch else set()), timeout=ATTEMPT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            if watch is not None:
                watch.cancel()
        if call in done:
            return call.result()
        call.cancel()
        if down.is_set():
            raise ReplicaLost("down", f"deployment {target} went down")
        raise ReplicaLost("timeout", f"deployment {target} gave no answer within {ATTEMPT_TIMEOUT_S:.0f} s")

    async def _call(self, target: str, x: np.ndarray) -> np.ndarray:
        return await self.handles[target].predict_array.remote(x)

    def _mark_down(self, target: str) -> None:
        down = self._down.setdefault(target, asyncio.Event())
        if down.is_set():
            return
        down.set()  # wakes every call waiting on this deployment: they are resent elsewhere
        self.retries["marked_down"][target] = self.retries["marked_down"].get(target, 0) + 1
        logger.warning("deployment %s marked down (a replica was lost); probing it every %.1f s", target, PROBE_EVERY_S)
        self._probes[target] = asyncio.ensure_future(self._probe(target))

    async def _probe(self, target: str) -> None:
        """Until a replica of target answers `stats`, then mark it up (a fresh, unset Event)."""

        async def ask() -> Any:
            return await self.handles[target].stats.remote()

        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            try:
                await asyncio.wait_for(ask(), timeout=ATTEMPT_TIMEOUT_S)
            except Exception:
                continue
            self._down[target] = asyncio.Event()
            self._probes.pop(target, None)
            logger.warning("deployment %s is up again", target)
            return

    def _note_retry(self, target: str, exc: BaseException) -> None:
        error = type(getattr(exc, "cause", None) or exc).__name__
        if isinstance(exc, ReplicaLost):
            error = f"{error}:{exc.reason}"
        self.retries["total"] += 1
        self.retries["by_deployment"][target] = self.retries["by_deployment"].get(target, 0) + 1
        self.retries["by_error"][error] = self.retries["by_error"].get(error, 0) + 1
        if self.retries["total"] == 1 or self.retries["total"] % 100 == 0:
            logger.warning("a replica of %s died under a request (%s); resent it (%d resent so far)", target, error, self.retries["total"])
        if self.metrics is not None:
            self.metrics.replica_retries.inc(tags={"target": target, "error": error})


# ---------------------------------------------------------------------------------------------
# building the application
# ---------------------------------------------------------------------------------------------


def http_path(config: TandemConfig) -> str:
    # TODO(lead): serving.http_path is requested as a config field; until then the default.
    path = getattr(config.serving, "http_path", "haproxy")
    if path not in HTTP_PATHS:
        raise ValueError(f"serving.http_path: '{path}' is not one of {', '.join(HTTP_PATHS)}")
    return path


def has_router(config: TandemConfig) -> bool:
    """Whether the app has a separate "Ingress" deployment (only with several model deployments)."""
    return len(config.serving.deployments) > 1


def ingress_deployment_name(config: TandemConfig) -> str:
    return INGRESS if has_router(config) else config.serving.deployments[0].name


def serve_env(config: TandemConfig) -> dict[str, str]:
    """Environment variables for the Serve controller and every replica (see the module docstring)."""
    path = http_path(config)
    env: dict[str, str] = {}
    if path in ("haproxy", "direct"):
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if path == "haproxy":
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        # A replica that dies (killed, out of memory, node lost) closes the connections of the
        # requests it held without an answer. HAProxy's default retries only connections that
        # failed to open; a prediction is a pure function of its input, so resending one that got
        # no answer (on another replica: `option redispatch`) is safe.
        # HAProxy can resend only a request that fits its buffer (tune.bufsize, 16 KiB in Ray:
        # about a dozen 64-float examples); a larger one still fails with its replica.
        # Measured (tests/reliability/test_serving_faults.py, 2 replicas, one SIGKILLed under
        # load): 4 of 3,470 requests lost with the default, 1 of 3,890 with this (HAProxy closed
        # that client's connection instead of resending; not understood yet).
        env["RAY_SERVE_HAPROXY_RETRY_ON"] = HAPROXY_RETRY_ON
    # The user's own Serve settings win over ours (and travel to the replicas too).
    env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")})
    return env


_local_haproxy_env: dict[str, str] = {}


def local_haproxy_env() -> dict[str, str]:
    """Extra controller settings for a Serve that Tandem starts on this machine (one set per process).

    HAProxy's files go to a private temp folder and its stats and metrics ports to free ports, so
    that several local clusters (tests, developers) do not collide on /tmp/haproxy-serve, 8404
    and 9101 (which HAProxy binds on every interface). The HAProxy manager is the controller's
    child actor and inherits these; replicas do not need them.
    """
    if not _local_haproxy_env:
        # Short: HAProxy refuses socket paths over 97 bytes and Serve adds the 56-character node id.
        state = tempfile.mkdtemp(prefix="thap-", dir="/tmp")
        _local_haproxy_env.update(
            # A loaded machine starts the HAProxy manager actor in more than Serve's 5 s readiness
            # window; three misses get it killed and serve.start fails. Allow 30 s.
            RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="30",
            # HAProxy's 4 default threads compete with the replicas on a small machine; one thread
            # forwards far more requests per second than a Python replica answers.
            RAY_SERVE_HAPROXY_NBTHREAD="1",
            RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=f"{state}/haproxy.cfg",
            RAY_SERVE_HAPROXY_SOCKET_PATH=f"{state}/admin.sock",
            RAY_SERVE_HAPROXY_SERVER_STATE_BASE=state,
            RAY_SERVE_HAPROXY_SERVER_STATE_FILE=f"{state}/server-state",
            RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH=f"{state}/metrics.sock",
            RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
            RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
        )
    return {**_local_haproxy_env, **{k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}}


def deployment_options(config: TandemConfig, replica_env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Serve options of every deployment of the app, by deployment name (the one source for
    build_app and the Serve config file)."""
    from serving.serve_config import ingress_options, model_deployment_options

    env = dict(replica_env or {})
    options: dict[str, dict[str, Any]] = {}
    entries = [model_deployment_options(config, d) for d in config.serving.deployments]
    if has_router(config):
        entries.insert(0, ingress_options(config))
    for entry in entries:
        # Serve's own refusals (more requests waiting for a slot than max_queued_requests) say when
        # to retry too; without this they are 503s with no Retry-After.
        entry = {**entry, "backpressure_config": {"status_code": 503, "retry_after_s": 1}}
        if env:
            actor = dict(entry.get("ray_actor_options", {}))
            actor["runtime_env"] = {"env_vars": env}
            entry["ray_actor_options"] = actor
        options[entry["name"]] = entry
    return options


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application for {"config": <TandemConfig as dict>, "artifact": "latest" | path}."""
    config = validate_config(args["config"])
    artifact = resolve_artifact(args.get("artifact") or config.serving.artifact, storage_root(config), config.name)
    read_manifest(artifact)  # a missing or damaged artifact fails here, in the caller, not in every replica
    replica_env = {**serve_env(config), **dict(args.get("replica_env") or {})}
    options = deployment_options(config, replica_env)
    base = {"config": config.to_dict(), "artifact": str(Path(artifact).resolve())}

    def model_spec(index: int) -> dict[str, Any]:
        deployment = config.serving.deployments[index]
        return {**base, "role": "model", "name": deployment.name, "deployment": deployment.model_dump(mode="json")}

    if not has_router(config):
        return TandemServer.options(**options[config.serving.deployments[0].name]).bind(model_spec(0))
    handles = {d.name: ModelReplica.options(**options[d.name]).bind(model_spec(i)) for i, d in enumerate(config.serving.deployments)}
    return TandemServer.options(**options[INGRESS]).bind({**base, "role": "router", "name": INGRESS, "handles": handles})


# ---------------------------------------------------------------------------------------------
# deploying from Python
# ---------------------------------------------------------------------------------------------

_ray_context: Any = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_ray(config: TandemConfig) -> bool:
    """Start or join Ray for config.cluster unless this process is connected; True if Ray is local."""
    global _ray_context
    import ray

    from cluster.runtime import connect

    if not ray.is_initialized():
        _ray_context = connect(config)
        _ray_context.__enter__()
    return config.cluster.address == "local"


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def base_url(config: TandemConfig) -> str:
    """The stable URL of the app: HAProxy or Serve's proxy plus the route prefix.

    The port is the running Serve's (a Serve started earlier with other http_options keeps them)."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    return f"http://{_client_host(http.host)}:{http.port}{config.serving.route_prefix.rstrip('/')}"


def replica_urls(config: TandemConfig) -> list[str]:
    """The ingress replicas' own direct-ingress URLs (empty when direct ingress is off).

    Reads the controller's target groups (a private Serve API: the list HAProxy is fed)."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    groups = ray.get(client._controller.get_target_groups.remote(config.name, from_proxy_manager=True))
    prefix = config.serving.route_prefix.rstrip("/")
    host = _client_host(client.http_config.host)
    urls = []
    for group in groups:
        if group.app_name == config.name and getattr(group.protocol, "value", group.protocol) == "HTTP":
            urls += [f"http://{host}:{t.port}{prefix}" for t in group.targets if t.port != client.http_config.port]
    return urls


def wait_until_ready(url: str, version: str | None = None, timeout_s: float = READY_TIMEOUT_S, token: str | None = None) -> None:
    """Poll GET {url}/healthz until it answers 200 (with `version`, when given)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/healthz", timeout=5, headers=headers)
            if reply.status_code == 200 and (version is None or reply.json().get("version") == version):
                return
            last = f"{reply.status_code} {reply.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s (last: {last}); see the Serve logs under Ray's session folder")


def serve(config: TandemConfig, artifact: str = "latest", blocking: bool = False) -> str:
    """Deploy (or roll out in place) the app for `config` serving `artifact`; return its base URL.

    A running app of the same name is updated: Serve starts replicas of the new version and drains
    the old ones, so requests in flight during the rollout are answered.
    """
    local = _ensure_ray(config)
    replica_env = serve_env(config)
    controller_env = {**local_haproxy_env(), **replica_env} if local and http_path(config) == "haproxy" else dict(replica_env)
    token_env = config.serving.auth.token_env
    if token_env and os.environ.get(token_env):
        # Local convenience: the replicas of an already running Ray do not see this process's env.
        # They get the token's digest, never the token (see TOKEN_DIGEST_ENV).
        replica_env[TOKEN_DIGEST_ENV] = token_digest(os.environ[token_env])
    serving = config.serving
    ray_serve.start(
        http_options={"host": serving.host, "port": serving.port, "location": "EveryNode"},
        controller_options={"runtime_env": {"env_vars": controller_env}},
    )
    path = resolve_artifact(artifact, storage_root(config), config.name)
    version = str(read_manifest(path).get("version"))
    app = build_app({"config": config.to_dict(), "artifact": str(path), "replica_env": replica_env})
    ray_serve.run(app, name=config.name, route_prefix=serving.route_prefix, blocking=False)
    url = base_url(config)
    if http_path(config) == "direct":
        url = next(iter(replica_urls(config)), url)
    wait_until_ready(url, version, token=os.environ.get(token_env) if token_env else None)
    logger.info("serving %s (model %s) at %s", config.name, version, url)
    if blocking:
        print(f"serving {config.name} (model {version}) at {url}; Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            shutdown()
    return url


def shutdown() -> None:
    """Tear down Serve; shut Ray down too when serve() started it."""
    global _ray_context
    import ray

    if ray.is_initialized():
        ray_serve.shutdown()
    if _ray_context is not None:
        context, _ray_context = _ray_context, None
        context.__exit__(None, None, None)


def status(config: TandemConfig) -> dict[str, Any]:
    """Replica counts per deployment of the running app (for tests and `tandem serve --status`)."""
    app = ray_serve.status().applications.get(config.name)
    if app is None:
        return {}
    return {name: {getattr(state, "value", str(state)): count for state, count in d.replica_states.items()} for name, d in app.deployments.items()}
