"""`tandem-haproxy` (serving/haproxy_front.py): Ray's own HAProxy configuration, rewritten, checked by
the real HAProxy binary, and shedding for real in front of a slow server (no Ray cluster: Ray's
config generator and the bundled HAProxy are used directly)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from serving.haproxy_front import QUEUE_MS_ENV, SERVER_MAXCONN_ENV, real_binary, rewritten_args, shed_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_haproxy_config(folder: Path, server_port: int, frontend_port: int) -> Path:
    """The configuration Ray Serve 2.60's HAProxy manager writes for one app with one replica."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig

    config = HAProxyConfig(
        socket_path=str(folder / "admin.sock"),
        server_state_base=str(folder),
        server_state_file=str(folder / "state"),
        metrics_port=free_port(),
        stats_port=free_port(),
        metrics_enabled=False,
        has_received_routes=True,
        has_received_servers=True,
    )
    config.http_options.port = frontend_port
    config.http_options.host = "127.0.0.1"
    server = ServerConfig(name="replica", host="127.0.0.1", port=server_port)
    backends = {"app": BackendConfig(name="app", path_prefix="/app", app_name="app", servers=[server])}
    api = HAProxyApi(config, backends, config_file_path=str(folder / "haproxy.cfg"))
    api._generate_config_file_internal()
    return folder / "haproxy.cfg"


def test_the_rewrite_bounds_each_server_and_its_queue_and_answers_503_with_retry_after():
    text = (
        "defaults\n    errorfile 503 /x/500.http\n    timeout queue 5s\n"
        "backend app\n    default-server fall 2 check\n    server r 1:2 check\n"
    )
    out = shed_config(text, server_maxconn=64, queue_ms=15, shed_response_path="/y/503.http")
    assert "    default-server fall 2 check maxconn 64\n    timeout queue 15ms\n" in out
    assert "errorfile 503 /y/503.http" in out and "/x/500.http" not in out and "timeout queue 5s" not in out


def test_without_tandem_settings_haproxy_runs_as_ray_configured_it():
    args = ["-db", "-f", "/nowhere/haproxy.cfg", "-sf", "12"]
    assert rewritten_args(args, {}) == args
    assert rewritten_args(["-v"], {SERVER_MAXCONN_ENV: "4"}) == ["-v"]


def test_rays_configuration_rewritten_is_valid_for_the_real_haproxy(tmp_path):
    source = ray_haproxy_config(tmp_path, free_port(), free_port())
    args = rewritten_args(["-db", "-f", str(source), "-sf", "1"], {SERVER_MAXCONN_ENV: "64", QUEUE_MS_ENV: "15"})
    target = Path(args[2])
    assert args[:2] == ["-db", "-f"] and args[3:] == ["-sf", "1"] and target != source
    text = target.read_text()
    assert "maxconn 64" in text and "timeout queue 15ms" in text and f"errorfile 503 {tmp_path / 'tandem-503.http'}" in text
    # Run the installed script the way Ray's HAProxy manager does: RAY_SERVE_HAPROXY_BINARY_PATH
    # names the script itself, which must exec the real HAProxy (not itself) on its copy.
    script = Path(sys.executable).with_name("tandem-haproxy")
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": str(script), SERVER_MAXCONN_ENV: "64", QUEUE_MS_ENV: "15"}
    check = subprocess.run([str(script), "-c", "-f", str(source)], capture_output=True, text=True, timeout=30, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Configuration file is valid" in check.stdout + check.stderr
    assert os.path.realpath(real_binary(str(script))) != os.path.realpath(script)


class HeldHandler(BaseHTTPRequestHandler):
    """A replica whose app requests wait until the test releases them: the one request let in keeps
    the only slot busy for as long as the test needs, on a fast machine or a slow one."""

    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.startswith("/app"):
            self.release.wait(120)  # bounds a hang only: the test sets it
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def held_server():
    HeldHandler.release = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), HeldHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], HeldHandler.release
    HeldHandler.release.set()
    server.shutdown()


def test_haproxy_refuses_what_waits_too_long_for_a_busy_replica_with_a_fast_503(tmp_path, held_server):
    server_port, release = held_server
    frontend = free_port()
    source = ray_haproxy_config(tmp_path, server_port, frontend)
    # One request at a time into the replica, 50 ms in the queue at most.
    args = rewritten_args(["-db", "-f", str(source)], {SERVER_MAXCONN_ENV: "1", QUEUE_MS_ENV: "50"})
    proc = subprocess.Popen([real_binary(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:  # ready once the health check saw the replica up
            try:
                if httpx.get(f"http://127.0.0.1:{frontend}/-/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            exited = proc.poll() is not None
            assert time.monotonic() < deadline and not exited, proc.stderr.read().decode() if exited else "not ready"
            time.sleep(0.1)

        def get(_: int) -> tuple[int, str | None, str]:
            reply = httpx.get(f"http://127.0.0.1:{frontend}/app/x", timeout=120)
            return reply.status_code, reply.headers.get("retry-after"), reply.text

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(get, i) for i in range(6)]
            # The replica holds the one request it was given until the release below; every other
            # request must come back while it is still held: refused from HAProxy's queue, not left
            # to wait for the slot. (The timeout only bounds a hang: HAProxy waited instead.)
            before_release = []
            try:
                for future in as_completed(futures, timeout=60):
                    before_release.append(future.result())
                    if len(before_release) == 5:
                        break
            except FuturesTimeout:
                pytest.fail(f"HAProxy let requests wait for the busy slot instead of refusing them: {before_release}")
            release.set()
            answers = [f.result() for f in futures]
    finally:
        release.set()
        proc.terminate()
        proc.wait(timeout=10)
    assert [status for status, _, _ in before_release] == [503] * 5, before_release
    assert all(retry == "1" and '"overloaded"' in body for _, retry, body in before_release), before_release
    # The request holding the slot is served once released: the replica was busy, not down.
    assert sorted(status for status, _, _ in answers) == [200, 503, 503, 503, 503, 503], answers
