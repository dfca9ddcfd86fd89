"""A small client for a Tandem endpoint.

    from serving.client import predict
    predict("http://127.0.0.1:8000", [[0.0] * 64], probabilities=True)
    # {"predictions": [3], "probabilities": [[...]], "model_version": "...", "deployment": "cpu", "cached": 0}

Refusals raise `TandemHTTPError` carrying the status, the server's error code and message (which
names the expected shape), and Retry-After for 503s. For many requests, pass a shared
`httpx.Client` (keep-alive: a new TCP connection per request costs more than the prediction).
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from cluster.errors import TandemError


class TandemHTTPError(TandemError, RuntimeError):
    """A refusal from a Tandem endpoint: status, the server's error code and message, Retry-After."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


def _as_json(inputs: Any) -> Any:
    return inputs.tolist() if isinstance(inputs, np.ndarray) else inputs


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def raise_for_error(reply: httpx.Response) -> None:
    if reply.status_code < 400:
        return
    try:
        body = reply.json()
        code, message = str(body.get("error", "error")), str(body.get("message", reply.text))
    except ValueError:
        code, message = "error", reply.text
    retry = reply.headers.get("retry-after")
    raise TandemHTTPError(reply.status_code, code, message, float(retry) if retry and retry.isdigit() else None)


def predict(
    url: str,
    inputs: Any,
    token: str | None = None,
    probabilities: bool = False,
    *,
    client: httpx.Client | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """POST {url}/v1/predict with one example or a list (nested lists or a numpy array)."""
    body = {"inputs": _as_json(inputs), "probabilities": probabilities}
    target = f"{url.rstrip('/')}/v1/predict"
    send = client.post if client is not None else httpx.post
    try:
        reply = send(target, json=body, headers=_headers(token), timeout=timeout)
    except (httpx.RemoteProtocolError, httpx.ConnectError):
        # A keep-alive connection closed under us (a draining replica, an HAProxy reload). A
        # prediction is a pure function of its input, so sending it again is safe.
        reply = send(target, json=body, headers=_headers(token), timeout=timeout)
    raise_for_error(reply)
    return reply.json()


def models(url: str, token: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """GET {url}/v1/models: name, version, input shape and dtype, artifact metrics."""
    reply = httpx.get(f"{url.rstrip('/')}/v1/models", headers=_headers(token), timeout=timeout)
    raise_for_error(reply)
    return reply.json()


def health(url: str, timeout: float = 5.0) -> dict[str, Any]:
    reply = httpx.get(f"{url.rstrip('/')}/healthz", timeout=timeout)
    raise_for_error(reply)
    return reply.json()
