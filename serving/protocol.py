"""Tandem's wire protocol (`/v1`): request and response schemas, request decoding, error bodies.

Pure functions over bytes and numpy arrays: no Ray, no HTTP server, so every refusal can be
unit-tested on its own (tests/unit/test_app_validation.py). Every refusal is a `RequestError`
that names the request part and the fix; `error_body` turns it into the JSON body

    {"error": code, "message": ..., "expected_shape": [...], "dtype": "float32"}

400 not JSON, 401 missing or wrong bearer token, 413 body over limits.max_body_bytes or more than
limits.max_inputs examples, 422 wrong shape / dtype / NaN or infinity / empty / unknown keys,
503 with Retry-After when overloaded (see serving/app.py for who refuses when).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from starlette.requests import Request

DTYPE = "float32"


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


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_bearer(header: str | None, digest: str | None) -> None:
    """Constant-time check of `Authorization: Bearer <token>` against the token's SHA-256; no-op when auth is off."""
    if digest is None:
        return
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(given.strip()), digest):
        raise RequestError(
            401, "unauthorized", "missing or wrong bearer token; send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"}
        )


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refusing it as soon as it passes max_bytes (before reading the rest)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(
            413,
            "body_too_large",
            f"the body is {declared} bytes, over the {max_bytes}-byte limit (serving.limits.max_body_bytes); send fewer examples per "
            "request",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(
                413,
                "body_too_large",
                f"the body is over the {max_bytes}-byte limit (serving.limits.max_body_bytes); send fewer examples per request",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    if not raw:
        raise RequestError(400, "not_json", 'the body is empty; send JSON like {"inputs": [...]}')
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass  # NaN, Infinity, integers past 64 bits, deep nesting: the standard library decides, and says why
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
        raise RequestError(
            413,
            "too_many_inputs",
            f'"inputs" holds {len(inputs)} examples, over the limit of {max_inputs} (serving.limits.max_inputs); split the request',
        )
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
        raise RequestError(
            422, "wrong_shape", f'"inputs" has shape {got}; expected {expected} (shape [N, {", ".join(map(str, input_shape))}])'
        )
    with np.errstate(over="ignore"):  # a number beyond float32 becomes inf, refused just below
        batch = array.astype(np.float32)
    finite = np.isfinite(batch).reshape(len(batch), -1).all(axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise RequestError(
            422, "not_finite", f'"inputs" example {bad} holds NaN or infinity (or a number beyond float32); send finite numbers'
        )
    return batch, probabilities


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def error_body(exc: RequestError, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
    """The JSON body of a refusal; a 422 also says the shape and dtype one example must have."""
    body: dict[str, Any] = {"error": exc.code, "message": exc.message}
    if input_shape is not None and exc.status == 422:
        body.update(expected_shape=list(input_shape), dtype=DTYPE)
    return body


def retry_after_header(retry_after_s: float) -> dict[str, str]:
    # Retry-After is whole seconds (RFC 9110); never 0, which would invite an immediate retry storm.
    return {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
