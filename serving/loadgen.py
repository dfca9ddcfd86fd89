"""The one HTTP load generator: `tandem bench`, `tandem run`, `tandem profile`, the serving
benchmark and the tests all measure with it. A closed loop (below) gives a `LoadResult`; an open
loop (`open_loop`, `--rate`: Poisson arrivals that do not wait for answers, for overload) gives
one record per request.

    python -m serving.loadgen URL --inputs inputs.json --requests 400 --concurrency 8 [--token-env TANDEM_TOKEN]
        [--protocol v1|v2] [--model NAME] [--path /v1/predict]

`concurrency` clients, each on its own keep-alive connection, send one example per request, one
request after another, until `requests` have been sent or `max_seconds` passed (bounded in count
and in time, so it always stops by itself). Loopback only: it refuses other hosts.

Two request encodings: `v1` (default), a JSON body `{"inputs": [...], "probabilities": false}` to
POST {url}/v1/predict; `v2`, the Open Inference Protocol's binary form (serving/oip.py) to POST
{url}/v2/models/{model}/infer: a JSON header asking for the predictions as binary data, then the
example's raw little-endian float32 bytes. `path` sends either to another path (a peer server
under the same JSON shape, say).
`load_from_process` runs it in a separate Python process, so the client never shares the
server's GIL; in-process use (`run_load`, `closed_loop`) is for tests and quick probes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

from serving.oip import HEADER_LENGTH, INPUT

LOOPBACK = ("127.0.0.1", "localhost", "::1")
NO_ANSWER = -1  # the status recorded for a request that got no HTTP answer (connection error, timeout)
TIMED_OUT = -2  # open loop: the status of a request the client gave up on after its timeout
REQUEST_TIMEOUT_S = 60.0  # a request unanswered this long is recorded as NO_ANSWER
PROTOCOLS = ("v1", "v2")
V1_PATH = "/v1/predict"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


@dataclass
class LoadResult:
    """What a closed-loop load measured; latencies are of the answered (200) requests only."""

    concurrency: int
    requests: int  # sent
    ok: int  # answered 200
    refused: int  # answered 503 (shed, with Retry-After)
    failed: int  # any other status, or no answer
    codes: dict[str, int]  # by status; "-1" for no answer
    requests_per_s: float  # answered requests per second of wall time
    p50_ms: float
    p99_ms: float
    max_ms: float  # slowest request of any outcome
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Wire:
    """Where and how the requests of a load go: the path after the URL's own path, the body's
    content type, and headers every request carries (the same for every body of a load)."""

    path: str = V1_PATH
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()


class RawConnection:
    """One keep-alive HTTP/1.1 connection over asyncio streams.

    httpx spends about a millisecond of CPU per request; on a 2-core machine shared with the
    server that is a large part of what a load test would measure. This sends pre-encoded requests
    and parses only the status line, Content-Length, Retry-After and the body.
    """

    def __init__(self, url: str, token: str | None = None, content_type: str = JSON_TYPE, headers: tuple[tuple[str, str], ...] = ()):
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self.prefix = parsed.path.rstrip("/")
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        # Built once: the per-request cost is one concatenation.
        self.head = f"Host: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n{auth}{extra}"
        self.reader: Any = None
        self.writer: Any = None

    async def _connect(self) -> None:
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


def v2_head(example_shape: tuple[int, ...]) -> bytes:
    """The JSON part of a binary /v2 infer request for one example of `example_shape`: the same
    for every such example, so its length is one header value for the whole load."""
    size = 4 * int(np.prod(example_shape))  # float32
    tensor = {"name": INPUT, "shape": [1, *example_shape], "datatype": "FP32", "parameters": {"binary_data_size": size}}
    request = {"inputs": [tensor], "outputs": [{"name": "predictions", "parameters": {"binary_data": True}}]}
    return json.dumps(request, separators=(",", ":")).encode()


def encode_requests(examples: Any, probabilities: bool = False, protocol: str = "v1") -> list[bytes]:
    """One pre-encoded body per example (encoding is kept out of the timed path): v1's JSON, or
    v2's JSON header followed by the example's little-endian float32 bytes (predictions only)."""
    rows = np.asarray(examples)
    if protocol == "v1":
        return [json.dumps({"inputs": row.tolist(), "probabilities": probabilities}).encode() for row in rows]
    if protocol != "v2":
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if probabilities:
        raise ValueError("v2 bodies ask for the predictions only; use protocol='v1' for probabilities")
    head = v2_head(rows.shape[1:])
    return [head + np.ascontiguousarray(row, dtype="<f4").tobytes() for row in rows]


def wire_for(protocol: str = "v1", model: str | None = None, path: str | None = None, example_shape: tuple[int, ...] = (64,)) -> Wire:
    """The Wire of encode_requests(protocol) bodies: v1 JSON to /v1/predict, or v2 binary to
    /v2/models/{model}/infer with the JSON header's length; `path` overrides the path."""
    if protocol == "v1":
        return Wire(path or V1_PATH)
    if protocol != "v2":
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if not (model or path):
        raise ValueError("protocol 'v2' needs the model name: requests go to /v2/models/{model}/infer")
    headers = ((HEADER_LENGTH, str(len(v2_head(tuple(example_shape))))),)
    return Wire(path or f"/v2/models/{model}/infer", BINARY_TYPE, headers)


async def closed_loop(
    url: str,
    bodies: list[bytes],
    concurrency: int,
    token: str | None = None,
    timeout_s: float = REQUEST_TIMEOUT_S,
    max_seconds: float | None = None,
    wire: Wire = Wire(),
) -> list[dict[str, Any]]:
    """`concurrency` clients on their own keep-alive connections send `bodies` (shared, in order)
    one request after another, taking no new request after `max_seconds`, to `wire.path` (v1's
    /v1/predict by default). One record per request: index, status (NO_ANSWER when none came),
    seconds, retry_after, body."""
    pending = iter(range(len(bodies)))
    stop_at = time.perf_counter() + max_seconds if max_seconds is not None else None
    records: list[dict[str, Any]] = []

    async def client() -> None:
        connection = RawConnection(url, token, wire.content_type, wire.headers)
        try:
            for index in pending:
                start = time.perf_counter()
                if stop_at is not None and start > stop_at:
                    return
                try:
                    status, headers, body = await asyncio.wait_for(connection.post(wire.path, bodies[index]), timeout_s)
                except (OSError, EOFError, asyncio.TimeoutError, ValueError) as exc:
                    status, headers, body = NO_ANSWER, {}, repr(exc).encode()
                    await connection.close()
                records.append(
                    {
                        "index": index,
                        "status": status,
                        "seconds": time.perf_counter() - start,
                        "retry_after": headers.get("retry-after"),
                        "body": body,
                    }
                )
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records


def summarize(records: list[dict[str, Any]], wall_s: float, concurrency: int) -> LoadResult:
    """The LoadResult of closed_loop's records over `wall_s` seconds."""
    ok = np.array([r["seconds"] for r in records if r["status"] == 200]) * 1000
    codes: dict[str, int] = {}
    for record in records:
        codes[str(record["status"])] = codes.get(str(record["status"]), 0) + 1
    refused = codes.get("503", 0)
    return LoadResult(
        concurrency=concurrency,
        requests=len(records),
        ok=len(ok),
        refused=refused,
        failed=len(records) - len(ok) - refused,
        codes=dict(sorted(codes.items())),
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        p50_ms=float(np.percentile(ok, 50)) if len(ok) else float("nan"),
        p99_ms=float(np.percentile(ok, 99)) if len(ok) else float("nan"),
        max_ms=float(max(r["seconds"] for r in records) * 1000) if records else float("nan"),
        wall_s=wall_s,
    )


def run_load(
    url: str,
    examples: Any,
    requests: int,
    concurrency: int,
    token: str | None = None,
    max_seconds: float = 60.0,
    protocol: str = "v1",
    model: str | None = None,
    path: str | None = None,
) -> LoadResult:
    """Closed-loop load on a running endpoint: `requests` requests, one example each, cycling
    through `examples`, from `concurrency` keep-alive connections, for at most `max_seconds`.
    protocol, model, path: how the requests are encoded and where they go (see wire_for)."""
    require_loopback(url)
    rows = np.asarray(examples, dtype=np.float32)
    wire = wire_for(protocol, model, path, rows.shape[1:])
    bodies = encode_requests(rows[np.arange(requests) % len(rows)], protocol=protocol)
    start = time.perf_counter()
    records = asyncio.run(closed_loop(url, bodies, concurrency, token, max_seconds=max_seconds, wire=wire))
    return summarize(records, time.perf_counter() - start, concurrency)


def load_from_process(
    url: str,
    examples: Any,
    requests: int,
    concurrency: int,
    token_env: str | None = None,
    max_seconds: float = 60.0,
    protocol: str = "v1",
    model: str | None = None,
    path: str | None = None,
) -> LoadResult:
    """Run `run_load` in a separate Python process (its own GIL and event loop) and return its result."""
    options = ["--requests", str(requests), "--concurrency", str(concurrency), "--max-seconds", str(max_seconds)]
    if token_env:
        options += ["--token-env", token_env]
    options += ["--protocol", protocol] + (["--model", model] if model else []) + (["--path", path] if path else [])
    # The last requests may start at max_seconds and take a request timeout; a minute more for start-up.
    return LoadResult(**_loadgen_process(url, examples, options, timeout_s=max_seconds + REQUEST_TIMEOUT_S + 60))


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"load is only sent to loopback addresses; got host {host!r}")


def _loadgen_process(url: str, examples: Any, options: list[str], timeout_s: float) -> Any:
    """Run this module's CLI on `examples` in a separate Python process; return its last line of
    output (one JSON document), parsed."""
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "inputs.json"
        inputs.write_text(json.dumps(np.asarray(examples, dtype=np.float32).tolist()))
        cmd = [sys.executable, "-m", "serving.loadgen", url, "--inputs", str(inputs), *options]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def open_loop(
    url: str,
    bodies: list[bytes],
    rate: float,
    seconds: float,
    max_connections: int = 512,
    timeout_s: float = 5.0,
    wire: Wire = Wire(),
    seed: int = 7,
) -> list[dict[str, Any]]:
    """Poisson arrivals at `rate` per second for `seconds`: the load of many independent users,
    which does not slow down for a slow server (a closed loop does, and so hides overload).

    Each arrival is sent on an idle keep-alive connection, or a new one while fewer than
    `max_connections` are open; beyond that it waits for one, and that wait counts in its latency
    (measured from its arrival time, not from when it was sent). A request unanswered after
    `timeout_s` is given up: status TIMED_OUT. One record per request: status, seconds (from
    arrival), retry_after, done_s (from the start), body (the first 200 bytes of a non-200 answer).
    """
    loop = asyncio.get_running_loop()
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, max(1, int(rate * seconds))))
    idle: list[RawConnection] = []
    slots = asyncio.Semaphore(max_connections)
    records: list[dict[str, Any]] = []
    begin = loop.time()

    async def one(index: int, arrival: float) -> None:
        async with slots:
            connection = idle.pop() if idle else RawConnection(url, content_type=wire.content_type, headers=wire.headers)
            try:
                status, headers, body = await asyncio.wait_for(connection.post(wire.path, bodies[index % len(bodies)]), timeout_s)
                idle.append(connection)
            except asyncio.TimeoutError:
                status, headers, body = TIMED_OUT, {}, b""
                await connection.close()
            except (OSError, EOFError, ValueError) as exc:
                status, headers, body = NO_ANSWER, {}, repr(exc).encode()
                await connection.close()
        done = loop.time() - begin
        records.append(
            {
                "status": status,
                "seconds": done - arrival,
                "retry_after": headers.get("retry-after"),
                "done_s": done,
                "body": body[:200].decode("latin-1") if status != 200 else "",
            }
        )

    tasks = []
    sent = 0
    while sent < len(arrivals):
        now = loop.time() - begin
        while sent < len(arrivals) and arrivals[sent] <= now:  # every arrival that is due, then a millisecond's sleep
            tasks.append(asyncio.create_task(one(sent, float(arrivals[sent]))))
            sent += 1
        await asyncio.sleep(0.001)
    await asyncio.gather(*tasks)
    for connection in idle:
        await connection.close()
    return records


def open_loop_from_process(
    url: str, examples: Any, rate: float, seconds: float, max_connections: int = 512, timeout_s: float = 5.0
) -> tuple[list[dict[str, Any]], float]:
    """Run `open_loop` (v1 JSON, one example per request) in a separate Python process; returns
    its records and its wall time. Its own GIL matters more here than for a closed loop: the
    arrivals must keep their schedule while the server is slow."""
    require_loopback(url)
    options = ["--rate", str(rate), "--seconds", str(seconds), "--connections", str(max_connections), "--timeout", str(timeout_s)]
    result = _loadgen_process(url, examples, options, timeout_s=seconds + timeout_s + 120)
    return result["records"], result["wall_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--inputs", required=True, help="JSON file: a list of examples")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--token-env", default=None, help="environment variable holding the bearer token")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="v1", help="v1 JSON, or v2: the Open Inference Protocol's binary form")
    parser.add_argument("--model", default=None, help="v2: the model name in /v2/models/{model}/infer")
    parser.add_argument("--path", default=None, help="the request path after the URL (default: the protocol's)")
    parser.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second (v1 JSON)")
    parser.add_argument("--seconds", type=float, default=10.0, help="open loop: how long arrivals come")
    parser.add_argument("--connections", type=int, default=512, help="open loop: most connections open at once")
    parser.add_argument("--timeout", type=float, default=5.0, help="open loop: seconds before a request is given up")
    args = parser.parse_args(argv)
    examples = json.loads(Path(args.inputs).read_text())
    token = os.environ.get(args.token_env) if args.token_env else None
    if args.rate is not None:
        bodies = encode_requests(examples)
        start = time.perf_counter()
        records = asyncio.run(open_loop(args.url, bodies, args.rate, args.seconds, args.connections, args.timeout))
        print(json.dumps({"records": records, "wall_s": time.perf_counter() - start}))
        return
    result = run_load(args.url, examples, args.requests, args.concurrency, token, args.max_seconds, args.protocol, args.model, args.path)
    print(json.dumps(result.to_dict()))


if __name__ == "__main__":
    main()
