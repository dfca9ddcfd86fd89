"""Experiment tracking: MLflow runs and TensorBoard event files, written from one place, the driver.

Off unless the config's `tracking:` section turns a backend on:
- MLflow (`tracking.mlflow`): a run per training run, per tuning run (the parent) and per trial
  (a child, tagged `mlflow.parentRunId`); the config flattened into params; per-epoch metrics at
  step = epoch; tags (run name, config hash, model version, git commit when there is one); files
  as artifacts. The default store is `sqlite:///<cluster.storage>/mlflow.db` with artifacts under
  `<cluster.storage>/mlartifacts`, beside the runs (MLflow 3 refuses new `./mlruns` file stores).
- TensorBoard (`tracking.tensorboard`): event files in `<run or trial>/tensorboard`, one scalar
  per metric per epoch.

Workers never log: the Train controller appends each epoch to `metrics.jsonl` and the driver
follows that file (`follow_metrics`), so a run logs once, whatever its worker count. Credentials
come from the environment (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), never the config. A backend
that fails (a server that is down, a refused connection) is one warning, and the run goes on
without it: tracking never stops training.

May import: `cluster.config`, `cluster.artifacts`; mlflow and tensorboardX are imported when a backend is on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cluster.artifacts import atomic_write_bytes
from cluster.config import TandemConfig
from cluster.storage import Location, location

logger = logging.getLogger("tandem.tracking")

TRACKING_RECORD = "tracking.json"  # in a run folder: which MLflow run it logged to
TENSORBOARD_DIR = "tensorboard"
FOLLOW_POLL_S = 1.0
# MLflow retries a failing HTTP call 7 times with backoff (minutes); a tracker that is down should
# cost seconds before Tandem warns and trains on. A user's own setting wins.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def job_env(config: TandemConfig) -> dict[str, str]:
    """What a submitted job needs to log as the submitter would: the MLflow credentials set here."""
    if config.tracking.mlflow is None:
        return {}
    return {name: os.environ[name] for name in MLFLOW_CREDENTIALS if os.environ.get(name)}


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of a report (per-rank lists and node ids are left out)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'training': {'optimizer': {'lr': 0.1}}} -> {'training.optimizer.lr': '0.1'}: MLflow params."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


@functools.cache  # one `git` per process, not one per trial's run
def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the working directory's git checkout, when there is one."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def mlflow_uri(config: TandemConfig) -> str:
    from cluster.runtime import storage_root

    settings = config.tracking.mlflow
    return (settings.tracking_uri if settings and settings.tracking_uri else None) or f"sqlite:///{storage_root(config) / 'mlflow.db'}"


def base_tags(config: TandemConfig, run_name: str) -> dict[str, str]:
    tags = {"mlflow.runName": run_name, "tandem.config_hash": config.config_hash(), "tandem.config_name": config.name}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


class Tracker:
    """One tracked run: an MLflow run and/or a TensorBoard writer, either possibly absent.

    Every method is safe to call: a backend whose call fails is warned about once and dropped.
    """

    def __init__(self, mlflow_client: Any = None, run_id: str | None = None, writer: Any = None, where: str = ""):
        self.client, self.run_id, self.writer, self.where = mlflow_client, run_id, writer, where
        self._lock = threading.Lock()  # the follower thread and the driver share one tracker

    @property
    def active(self) -> bool:
        return self.client is not None or self.writer is not None

    def _mlflow(self, what: str, call: Any) -> None:
        if self.client is None:
            return
        try:
            call(self.client)
        except Exception as exc:  # noqa: BLE001 - any tracker failure is a warning, never a failed run
            logger.warning("MLflow %s failed (%s); %s goes on without MLflow: %s", what, self.where, self.where or "the run", _short(exc))
            self.client = None

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        """One report: every scalar metric at step = its epoch."""
        step = int(metrics.get("epoch", 0))
        scalars = {k: v for k, v in scalar_metrics(metrics).items() if k != "epoch"}
        with self._lock:
            if self.client is not None:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                batch = [Metric(key=k, value=float(v), timestamp=now, step=step) for k, v in scalars.items()]
                self._mlflow("metrics", lambda c: c.log_batch(self.run_id, metrics=batch))
            if self.writer is not None:
                try:
                    for key, value in scalars.items():
                        self.writer.add_scalar(key, value, step)
                    self.writer.flush()
                except Exception as exc:  # noqa: BLE001
                    logger.warning("TensorBoard writing failed (%s): %s", self.where, _short(exc))
                    self.writer = None

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._lock:
            self._mlflow("tags", lambda c: [c.set_tag(self.run_id, k, str(v)) for k, v in tags.items()])

    def log_files(self, paths: list[Path | Location], folder: str | None = None) -> None:
        """Files (or folders) as MLflow artifacts; missing ones are skipped. A file in an object
        store is copied through a temporary file (MLflow's client logs local files)."""
        with self._lock:
            for path in paths:
                if isinstance(path, Location) and path.remote:
                    self._log_remote_file(path, folder)
                    continue
                path = Path(str(path))
                if path.is_dir():
                    self._mlflow(f"artifact {path}", lambda c, p=path: c.log_artifacts(self.run_id, str(p), p.name))
                elif path.is_file():
                    self._mlflow(f"artifact {path}", lambda c, p=path: c.log_artifact(self.run_id, str(p), folder))

    def _log_remote_file(self, where: Location, folder: str | None) -> None:
        import tempfile

        try:
            data = where.read_bytes()
        except FileNotFoundError:
            return
        with tempfile.TemporaryDirectory(prefix="tandem-mlflow-") as staging:
            local = Path(staging) / where.name
            atomic_write_bytes(local, data)
            self._mlflow(f"artifact {where}", lambda c: c.log_artifact(self.run_id, str(local), folder))

    def finish(self, status: str = "FINISHED") -> None:
        with self._lock:
            self._mlflow("closing the run", lambda c: c.set_terminated(self.run_id, status))
            if self.writer is not None:
                with contextlib.suppress(Exception):
                    self.writer.close()
                self.writer = None


def _mlflow_client_of(uri: str) -> Any:
    """MLflow's client for `uri`, with Tandem's HTTP defaults where the user set none."""
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _tensorboard_writer(folder: Path | Location, where: str) -> Any:
    """A TensorBoard writer for `folder`/tensorboard, or None with a warning."""
    folder = location(folder).path  # local: TensorBoard on an object store is refused when the config is read
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter(logdir=str(Path(folder) / TENSORBOARD_DIR))
    except Exception as exc:  # noqa: BLE001
        logger.warning("TensorBoard event files cannot be written in %s (%s): %s", folder, where, _short(exc))
        return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _mlflow_client(config: TandemConfig, where: str) -> tuple[Any, str | None]:
    """A client and the experiment id, or (None, None) with a warning when MLflow cannot be reached."""
    uri = mlflow_uri(config)
    try:
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        client = _mlflow_client_of(uri)
        name = config.tracking.mlflow.experiment or config.name
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return client, experiment.experiment_id
        from cluster.runtime import storage_root

        # MLflow's artifacts beside the runs: the store's URI (MLflow's client uploads there
        # with boto3), or the local storage folder for the default sqlite store.
        root = storage_root(config)
        artifacts = None
        if root.remote:
            artifacts = str(root / "mlartifacts" / name)
        elif uri.startswith("sqlite:///"):
            artifacts = (root / "mlartifacts" / name).path.as_uri()
        return client, client.create_experiment(name, artifact_location=artifacts)
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, misconfigured: a warning, not a failed run
        logger.warning("MLflow at %s is not reachable (%s); %s goes on without MLflow", uri, _short(exc), where)
        return None, None


def open_tracker(
    config: TandemConfig,
    folder: Path,
    run_name: str,
    *,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    parent: Tracker | None = None,
    client: Any = None,
    experiment_id: str | None = None,
    tensorboard: bool = True,
) -> Tracker:
    """Start tracking a run whose files live in `folder` (an inactive Tracker when tracking is off).

    params: logged as MLflow params (default: the whole config, flattened). parent: nests the run
    under another (a trial under its tuning run). client/experiment_id: reuse a parent's connection.
    tensorboard: False for a run with no epochs of its own (a tuning run; its trials have them).
    """
    settings = config.tracking
    tracker = Tracker(where=f"run {run_name}")
    if settings.tensorboard and tensorboard:
        tracker.writer = _tensorboard_writer(folder, tracker.where)
    if settings.mlflow is None:
        return tracker
    if client is None:
        client, experiment_id = _mlflow_client(config, tracker.where)
    if client is None:
        return tracker
    all_tags = {**base_tags(config, run_name), **(tags or {})}
    if parent is not None and parent.run_id:
        all_tags["mlflow.parentRunId"] = parent.run_id
    try:
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    except Exception as exc:  # noqa: BLE001
        logger.warning("MLflow could not start run %s (%s); it goes on without MLflow", run_name, _short(exc))
        return tracker
    tracker.client, tracker.run_id = client, run.info.run_id
    values = flatten(config.to_dict()) if params is None else {k: str(v) for k, v in params.items()}
    _log_params(tracker, values)
    return tracker


def _log_params(tracker: Tracker, values: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in values.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        chunk = items[start : start + 100]
        tracker._mlflow("params", lambda c, chunk=chunk: c.log_batch(tracker.run_id, params=chunk))


def record_run(folder: Path | Location, tracker: Tracker, config: TandemConfig) -> None:
    """Remember the MLflow run of a run folder, so `tandem export` can add its files to it."""
    if tracker.run_id:
        (location(folder) / TRACKING_RECORD).put_json({"mlflow_run_id": tracker.run_id, "tracking_uri": mlflow_uri(config)})


def reopen_tracker(config: TandemConfig, folder: Path | Location) -> Tracker:
    """The MLflow run a run folder logged to (an inactive Tracker when there is none or tracking is off)."""
    path = location(folder) / TRACKING_RECORD
    if config.tracking.mlflow is None or not path.is_file():
        return Tracker()
    record = json.loads(path.read_text())
    try:
        return Tracker(_mlflow_client_of(record["tracking_uri"]), record["mlflow_run_id"], where=f"run {location(folder).name}")
    except Exception as exc:  # noqa: BLE001
        logger.warning("MLflow run of %s cannot be reopened: %s", folder, _short(exc))
        return Tracker()


@contextlib.contextmanager
def follow_metrics(path: Path | Location, tracker: Tracker, skip_existing: bool = False) -> Iterator[None]:
    """Log each line the Train controller appends to `path` (metrics.jsonl) while the block runs,
    and whatever is left when it ends. skip_existing: lines already there were logged before (a resume)."""
    if not tracker.active:
        yield
        return
    done = threading.Event()
    # Byte offset of the first line not yet logged: each poll reads only what was appended.
    path = location(path)
    offset = [path.stat()[1] if skip_existing and path.exists() else 0]

    def drain() -> None:
        for line in _new_lines(path, offset):
            tracker.log_epoch(json.loads(line))

    def loop() -> None:
        while not done.wait(FOLLOW_POLL_S):
            with contextlib.suppress(Exception):  # a half-written line is read again next time
                drain()

    thread = threading.Thread(target=loop, name="tandem-tracking", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)
        with contextlib.suppress(Exception):
            drain()


def _new_lines(path: Path | Location, offset: list[int]) -> list[str]:
    """The complete lines appended to `path` since `offset[0]`, which moves past them (a line
    still being written stays for the next call). An object store's file is read whole."""
    path = location(path)
    if not path.remote:
        if not path.path.exists():
            return []
        with open(path.path, "rb") as handle:
            handle.seek(offset[0])
            data = handle.read()
    else:
        try:
            data = path.read_bytes()[offset[0] :]
        except FileNotFoundError:
            return []
    complete = data[: data.rfind(b"\n") + 1]
    offset[0] += len(complete)
    return [line for line in complete.decode().split("\n") if line.strip()]


def track_run(config: TandemConfig, folder: Path | Location, continuing: bool) -> Tracker:
    """The tracker of a training run folder: a new MLflow run, or the one it logged to before when
    `continuing` (a resumed run folder), with TensorBoard writing into the folder when on."""
    if not continuing or not (location(folder) / TRACKING_RECORD).is_file():
        tracker = open_tracker(config, folder, location(folder).name)
        record_run(folder, tracker, config)
        return tracker
    tracker = reopen_tracker(config, folder)
    tracker._mlflow("reopening the run", lambda c: c.update_run(tracker.run_id, "RUNNING"))
    if config.tracking.tensorboard:
        tracker.writer = _tensorboard_writer(folder, tracker.where)
    return tracker


def track_export(config: TandemConfig, artifact_dir: Path | Location, report: dict[str, Any], exported: list[Path | Location]) -> None:
    """Add an export's parity report and models to the MLflow run that made the artifact: its
    training run, or the tuning run for a tune's best model (when tracking is on)."""
    folder = location(artifact_dir)
    tracker = reopen_tracker(config, folder.parent)
    if not tracker.active:
        return
    report_path = folder.parent / "parity_report.json"
    report_path.put_json(report)
    tracker.log_files([report_path, folder / "manifest.json", *exported], "export")
