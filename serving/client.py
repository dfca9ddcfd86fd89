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


class TandemHTTPError(RuntimeError):
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


# ---------------------------------------------------------------------------------------------
# load testing: a lean keep-alive HTTP/1.1 client, so the client is not what is measured
# ---------------------------------------------------------------------------------------------


class RawConnection:
    """One keep-alive HTTP/1.1 connection over asyncio streams.

    httpx spends about a millisecond of CPU per request; on a 2-core machine shared with the
    server that is a large part of what a load test would measure. This sends pre-encoded requests
    and parses only the status line, Content-Length, Retry-After and the body.
    """

    def __init__(self, url: str, token: str | None = None):
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self.prefix = parsed.path.rstrip("/")
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.head = f"Host: {self.host}:{self.port}\r\nContent-Type: application/json\r\n{auth}"
        self.reader: Any = None
        self.writer: Any = None

    async def _connect(self) -> None:
        import asyncio

        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        request = f"POST {self.prefix}{path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        for attempt in (0, 1):
            if self.writer is None:
                await self._connect()
            try:
                self.writer.write(request)
                return await self._read_response()
            except (ConnectionError, EOFError, OSError):
                # The server closed an idle keep-alive connection (or a draining replica did): reconnect once.
                await self.close()
                if attempt:
                    raise
        raise ConnectionError("unreachable")

    async def _read_response(self) -> tuple[int, dict[str, str], bytes]:
        status_line = await self.reader.readline()
        if not status_line:
            raise EOFError("connection closed")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            body = await self.reader.read()
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body

    async def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readline()).strip().split(b";")[0], 16)
            if size == 0:
                await self.reader.readline()
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readline()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        self.reader = self.writer = None


def encode_requests(inputs: np.ndarray, probabilities: bool = False) -> list[bytes]:
    """One pre-encoded /v1/predict body per example (encoding is kept out of the timed path)."""
    import json

    return [json.dumps({"inputs": row.tolist(), "probabilities": probabilities}).encode() for row in np.asarray(inputs)]


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, token: str | None = None, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """`concurrency` clients on their own keep-alive connections send `bodies` (shared, in order)
    one request after another. One record per request: status, seconds, retry_after, body."""
    import asyncio
    import time

    pending = iter(range(len(bodies)))
    records: list[dict[str, Any]] = []

    async def client() -> None:
        connection = RawConnection(url, token)
        try:
            for index in pending:
                start = time.perf_counter()
                try:
                    status, headers, body = await asyncio.wait_for(connection.post("/v1/predict", bodies[index]), timeout_s)
                except (OSError, EOFError, asyncio.TimeoutError, ValueError) as exc:
                    status, headers, body = -1, {}, repr(exc).encode()
                    await connection.close()
                records.append({"index": index, "status": status, "seconds": time.perf_counter() - start, "retry_after": headers.get("retry-after"), "body": body})
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records


def summarize(records: list[dict[str, Any]], wall_s: float) -> dict[str, float]:
    """requests/s, latency percentiles of the answered requests (ms), and status counts."""
    ok = np.array([r["seconds"] for r in records if r["status"] == 200]) * 1000
    statuses = [r["status"] for r in records]
    return {
        "requests": len(records),
        "ok": int((np.array(statuses) == 200).sum()),
        "refused_503": statuses.count(503),
        "errors": len(statuses) - statuses.count(200) - statuses.count(503),
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "p50_ms": float(np.percentile(ok, 50)) if len(ok) else float("nan"),
        "p99_ms": float(np.percentile(ok, 99)) if len(ok) else float("nan"),
        "max_ms": float(max(r["seconds"] for r in records) * 1000) if records else float("nan"),
    }


def load_test(url: str, inputs: np.ndarray, concurrency: int = 8, requests: int = 1000, token: str | None = None) -> dict[str, float]:
    """Closed-loop load test of a running endpoint (what `tandem bench` runs): `requests` requests,
    one example each, cycling through `inputs`, from `concurrency` keep-alive connections."""
    import asyncio
    import time

    rows = np.asarray(inputs, dtype=np.float32)
    bodies = encode_requests(rows[np.arange(requests) % len(rows)])
    start = time.perf_counter()
    records = asyncio.run(closed_loop(url, bodies, concurrency, token))
    return {"concurrency": concurrency, **summarize(records, time.perf_counter() - start)}


def bench(config: Any, concurrency: tuple[int, ...] = (1, 8, 32), requests: int = 1000, url: str | None = None) -> list[dict[str, float]]:
    """`tandem bench`: closed-loop load on the endpoint a config describes, with its own data.

    url defaults to http://serving.host:serving.port + route_prefix (HAProxy or Serve's proxy);
    the bearer token comes from the environment variable serving.auth.token_env names.
    """
    import os

    from cluster.config import resolve_import_path

    serving = config.serving
    host = "127.0.0.1" if serving.host in ("0.0.0.0", "::", "") else serving.host
    url = url or f"http://{host}:{serving.port}{serving.route_prefix.rstrip('/')}"
    dataset = resolve_import_path(config.data.source)(**config.data.args)
    token = os.environ.get(serving.auth.token_env) if serving.auth.token_env else None
    return [load_test(url, dataset.x, concurrency=c, requests=requests, token=token) for c in concurrency]
