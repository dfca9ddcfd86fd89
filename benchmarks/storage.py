"""Run state on a local folder against an S3-compatible object store: what the bucket costs.

`python -m benchmarks storage [REPEATS]` (default 2). The packaged example as a user runs it,
each command a fresh process with a fresh local Ray, in two arms alternated run by run so that
load hits both alike:
- local: `cluster.storage` a folder on this machine's disk;
- s3: `cluster.storage: s3://tandem-bench/runs` on moto's standalone S3 server, started here on
  loopback (the server the tests use), the variables a user sets for such a store (AWS_* and
  AWS_ENDPOINT_URL).

Per run: `tandem train` (8 epochs, the packaged example) split at its "[tandem] exporting" line
into train (to the artifact in storage) and export (ONNX, int8, parity report, into storage);
then `tandem serve` with the packaged deployment at 2 replicas, from its start to the "serving"
line (Serve's app RUNNING: both replicas built their engine from the artifact) and the bytes the
node's artifact cache downloaded, by process (cluster/storage.py `downloads.jsonl`): on one
node the driver fetches the artifact first and each replica finds every file in the cache. The
loopback server has none of a real store's latency: the s3 arm is a lower bound.

Writes benchmarks/results/storage.{json,md,png}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results")
VENV_BIN = Path(sys.executable).parent
BUCKET = "tandem-bench"
EXPORTING = "[tandem] exporting"
SERVING = "serving digits"
TIMEOUT_S = 900
PHASES = ("train_s", "export_s", "serve_ready_s")
REPLICAS = 2


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server on loopback with the bucket; the variables a shell for it has."""
    import boto3

    port = free_port()
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    server = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench-secret")  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return server, env
        except Exception:  # not listening yet
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"moto_server did not start:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.3)


def timed_lines(cmd: list[str], env: dict[str, str], cwd: Path, stop_at: str | None = None) -> tuple[dict[str, float], int]:
    """Seconds from the command's start to the first line holding each of EXPORTING, SERVING, and
    to its exit; with `stop_at`, SIGINT (Ctrl-C) once that line shows."""
    started = time.monotonic()
    marks: dict[str, float] = {}
    tail: list[str] = []
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        for needle in (EXPORTING, SERVING):
            if needle in line and needle not in marks:
                marks[needle] = time.monotonic() - started
        if stop_at and stop_at in line:
            os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=TIMEOUT_S)
    marks["exit"] = time.monotonic() - started
    if proc.returncode != 0 or (stop_at and stop_at not in marks):
        raise SystemExit(f"{' '.join(cmd[1:3])} failed ({proc.returncode}):\n{''.join(tail)}")
    return marks, proc.pid


def downloaded_by_process(cache: Path, driver_pid: int, replicas: int) -> dict[str, int]:
    """Bytes the node's cache downloaded for the driver (`tandem serve`, which checks the artifact
    is servable first) and for each replica (0 for one that found every file in the cache)."""
    log = cache / "downloads.jsonl"
    by_pid: dict[int, int] = {}
    for line in log.read_text().splitlines() if log.is_file() else []:
        record = json.loads(line)
        by_pid[record["pid"]] = by_pid.get(record["pid"], 0) + record["bytes"]
    others = sorted((b for pid, b in by_pid.items() if pid != driver_pid), reverse=True)
    return {"driver": by_pid.get(driver_pid, 0), **{f"replica {i + 1}": b for i, b in enumerate((others + [0] * replicas)[:replicas])}}


def one_run(arm: str, folder: Path, store_env: dict[str, str], run_id: str) -> dict[str, Any]:
    storage = str(folder / "runs") if arm == "local" else f"s3://{BUCKET}/runs-{run_id}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", TANDEM_CACHE_DIR=str(folder / "cache"))
    if arm == "s3":
        env.update(store_env)
    sets = ["--set", f"cluster.storage={storage}"]
    trained, _pid = timed_lines([str(VENV_BIN / "tandem"), "train", *sets], env, folder)
    if EXPORTING not in trained:
        raise SystemExit("tandem train did not export at its end")
    # The driver's own download of the artifact (export) is not a replica's: a fresh cache for serving.
    env["TANDEM_CACHE_DIR"] = str(folder / "serve-cache")
    serve_sets = [*sets, "--set", f"serving.port={free_port()}", "--set", f"serving.deployments[0].autoscaling.min_replicas={REPLICAS}"]
    served, driver_pid = timed_lines([str(VENV_BIN / "tandem"), "serve", *serve_sets], env, folder, stop_at=SERVING)
    return {
        "train_s": round(trained[EXPORTING], 2),
        "export_s": round(trained["exit"] - trained[EXPORTING], 2),
        "serve_ready_s": round(served[SERVING], 2),
        "serve_downloads_bytes": downloaded_by_process(folder / "serve-cache", driver_pid, REPLICAS),
    }


def plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    for row, arm in enumerate(runs):
        left = 0.0
        for phase, color in zip(PHASES, ("tab:blue", "tab:orange", "tab:green"), strict=True):
            value = statistics.median(r[phase] for r in runs[arm])
            ax.barh(row, value, left=left, color=color, label=phase if row == 0 else None)
            left += value
    ax.set_yticks(range(len(runs)), list(runs))
    ax.set_xlabel("seconds (median of repeats): train, export, serve ready (2 replicas)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(result: dict[str, Any]) -> str:
    arms = result["arms"]
    lines = ["| median s | local folder | S3 (moto, loopback) | S3 / local |", "|---|---|---|---|"]
    for phase, label in zip(PHASES, ("train (8 epochs, to the artifact)", "export (ONNX, int8, parity)", "serve ready, 2 replicas"),
                            strict=True):  # fmt: skip
        local, s3 = arms["local"][phase], arms["s3"][phase]
        lines.append(f"| {label} | {local:.1f} | {s3:.1f} | {s3 / local:.2f}x |")
    for who in result["serve_downloads"]["s3"]:
        local, s3 = result["serve_downloads"]["local"][who], result["serve_downloads"]["s3"][who]
        lines.append(f"| bytes the node's cache downloaded for the {who} | {local:,} | {s3:,} | |")
    lines.append(f"\n{result['repeats']} runs per arm; load average at start {result['load_average']['start']}, at end "
                 f"{result['load_average']['end']}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    repeats = int(argv[0]) if argv else 2
    load_start = load()
    print(f"load average at start: {load_start}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "s3": []}
    with tempfile.TemporaryDirectory(prefix="tandem-storage-bench-") as root:
        server, store_env = start_moto(Path(root) / "moto.log")
        try:
            # The first `tandem` of a session pays cold caches (imports, Ray's files): a warm-up run, not timed.
            warm = Path(root) / "warm-up"
            warm.mkdir()
            one_run("local", warm, store_env, "warm-up")
            for i in range(repeats):
                for arm in runs:
                    folder = Path(root) / f"{arm}-{i}"
                    folder.mkdir()
                    run = one_run(arm, folder, store_env, f"{i}")
                    runs[arm].append(run)
                    print(f"{arm} run {i + 1}: {json.dumps(run)}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    medians = {arm: {p: round(statistics.median(r[p] for r in rs), 2) for p in PHASES} for arm, rs in runs.items()}
    result = {
        "command": "tandem train (packaged example), then tandem serve at 2 replicas; a fresh local Ray each",
        "repeats": repeats,
        "arms": medians,
        "ratios_s3_to_local": {p: round(medians["s3"][p] / medians["local"][p], 3) for p in PHASES},
        "serve_downloads": {arm: rs[-1]["serve_downloads_bytes"] for arm, rs in runs.items()},
        "runs": runs,
        "load_average": {"start": load_start, "end": load()},
        "machine": f"{os.cpu_count()} CPUs",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "storage.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "storage.md").write_text(table(result))
    plot(runs, RESULTS / "storage.png")
    print(table(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
