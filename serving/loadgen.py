"""A bounded closed-loop HTTP load generator, run as its own process so it never shares the server's cores' GIL.

    python -m serving.loadgen URL --inputs inputs.json --requests 400 --concurrency 8 [--token-env TANDEM_TOKEN]

Each of `concurrency` threads keeps one keep-alive connection and sends one example per request
until `requests` have been sent or `max_seconds` passed. Prints one JSON line: counts (ok, shed
with 503, failed), requests/s, p50/p99 latency in ms. Loopback only: it refuses other hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_load(url: str, inputs: list[Any], requests: int, concurrency: int, token: str | None = None, max_seconds: float = 60.0) -> dict[str, Any]:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"load is only sent to loopback addresses; got host {host!r}")
    target = url.rstrip("/") + "/v1/predict"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    lock = threading.Lock()
    counter = {"sent": 0}
    latencies: list[float] = []
    codes: dict[int, int] = {}
    deadline = time.monotonic() + max_seconds

    def next_index() -> int | None:
        with lock:
            if counter["sent"] >= requests or time.monotonic() > deadline:
                return None
            counter["sent"] += 1
            return counter["sent"] - 1

    def worker() -> None:
        with httpx.Client(timeout=30.0) as client:
            while (i := next_index()) is not None:
                started = time.perf_counter()
                try:
                    code = client.post(target, json={"inputs": inputs[i % len(inputs)]}, headers=headers).status_code
                except httpx.HTTPError:
                    code = 0
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if code == 200:
                        latencies.append(elapsed)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ok = codes.get(200, 0)
    return {
        "requests": sum(codes.values()),
        "concurrency": concurrency,
        "ok": ok,
        "shed": codes.get(503, 0),
        "failed": sum(n for c, n in codes.items() if c not in (200, 503)),
        "codes": {str(k): v for k, v in sorted(codes.items())},
        "requests_per_s": ok / wall if wall else 0.0,
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "wall_s": wall,
    }


def load_from_process(url: str, inputs: list[Any], requests: int, concurrency: int, token_env: str | None = None, max_seconds: float = 60.0) -> dict[str, Any]:
    """Run `run_load` in a separate Python process and return its JSON result."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(inputs, handle)
    cmd = [sys.executable, "-m", "serving.loadgen", url, "--inputs", handle.name, "--requests", str(requests),
           "--concurrency", str(concurrency), "--max-seconds", str(max_seconds)]
    if token_env:
        cmd += ["--token-env", token_env]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max_seconds + 60, env=dict(os.environ))
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--inputs", required=True, help="JSON file: a list of examples")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--token-env", default=None, help="environment variable holding the bearer token")
    args = parser.parse_args(argv)
    inputs = json.loads(Path(args.inputs).read_text())
    token = os.environ.get(args.token_env) if args.token_env else None
    print(json.dumps(run_load(args.url, inputs, args.requests, args.concurrency, token, args.max_seconds)))


if __name__ == "__main__":
    main()
