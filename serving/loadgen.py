"""The one closed-loop HTTP load generator: `tandem bench`, `tandem run`, `tandem profile`, the
serving benchmark and the tests all measure with it, and all get a `LoadResult`.

    python -m serving.loadgen URL --inputs inputs.json --requests 400 --concurrency 8 [--token-env TANDEM_TOKEN]

`concurrency` clients, each on its own keep-alive connection, send one example per request, one
request after another, until `requests` have been sent or `max_seconds` passed (bounded in count
and in time, so it always stops by itself). Loopback only: it refuses other hosts.
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

LOOPBACK = ("127.0.0.1", "localhost", "::1")
NO_ANSWER = -1  # the status recorded for a request that got no HTTP answer (connection error, timeout)


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


def encode_requests(examples: Any, probabilities: bool = False) -> list[bytes]:
    """One pre-encoded /v1/predict body per example (encoding is kept out of the timed path)."""
    return [json.dumps({"inputs": row.tolist(), "probabilities": probabilities}).encode() for row in np.asarray(examples)]


async def closed_loop(
    url: str, bodies: list[bytes], concurrency: int, token: str | None = None, timeout_s: float = 60.0, max_seconds: float | None = None
) -> list[dict[str, Any]]:
    """`concurrency` clients on their own keep-alive connections send `bodies` (shared, in order)
    one request after another, taking no new request after `max_seconds`. One record per request:
    index, status (NO_ANSWER when none came), seconds, retry_after, body."""
    pending = iter(range(len(bodies)))
    stop_at = time.perf_counter() + max_seconds if max_seconds is not None else None
    records: list[dict[str, Any]] = []

    async def client() -> None:
        connection = RawConnection(url, token)
        try:
            for index in pending:
                start = time.perf_counter()
                if stop_at is not None and start > stop_at:
                    return
                try:
                    status, headers, body = await asyncio.wait_for(connection.post("/v1/predict", bodies[index]), timeout_s)
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


def run_load(url: str, examples: Any, requests: int, concurrency: int, token: str | None = None, max_seconds: float = 60.0) -> LoadResult:
    """Closed-loop load on a running endpoint: `requests` requests, one example each, cycling
    through `examples`, from `concurrency` keep-alive connections, for at most `max_seconds`."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"load is only sent to loopback addresses; got host {host!r}")
    rows = np.asarray(examples, dtype=np.float32)
    bodies = encode_requests(rows[np.arange(requests) % len(rows)])
    start = time.perf_counter()
    records = asyncio.run(closed_loop(url, bodies, concurrency, token, max_seconds=max_seconds))
    return summarize(records, time.perf_counter() - start, concurrency)


def load_from_process(
    url: str, examples: Any, requests: int, concurrency: int, token_env: str | None = None, max_seconds: float = 60.0
) -> LoadResult:
    """Run `run_load` in a separate Python process (its own GIL and event loop) and return its result."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(np.asarray(examples, dtype=np.float32).tolist(), handle)
    cmd = [
        sys.executable,
        "-m",
        "serving.loadgen",
        url,
        "--inputs",
        handle.name,
        "--requests",
        str(requests),
        "--concurrency",
        str(concurrency),
        "--max-seconds",
        str(max_seconds),
    ]
    if token_env:
        cmd += ["--token-env", token_env]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max_seconds + 60, env=dict(os.environ))
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-500:]}")
    return LoadResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--inputs", required=True, help="JSON file: a list of examples")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--token-env", default=None, help="environment variable holding the bearer token")
    args = parser.parse_args(argv)
    examples = json.loads(Path(args.inputs).read_text())
    token = os.environ.get(args.token_env) if args.token_env else None
    print(json.dumps(run_load(args.url, examples, args.requests, args.concurrency, token, args.max_seconds).to_dict()))


if __name__ == "__main__":
    main()
