"""Running a stage on a Ray cluster that is already up: `tandem submit` and `tandem jobs`.

`submit(config, stage, address, config_path, overrides)` is what `ray job submit --working-dir .
-- tandem STAGE CONFIG` does, from the config: it runs the pre-deploy checks, uploads the working
directory with the runtime_env of `cluster.runtime_env`, starts `tandem STAGE CONFIG --set
cluster.address=auto [--set ...]` on the cluster, streams the job's logs and returns an exit code
from the job's status (0 SUCCEEDED, 1 FAILED or STOPPED, 2 when the checks found errors).

Token authentication: the client sends RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or
~/.ray/auth_token, and only when RAY_AUTH_MODE=token, which `cluster.auth: token` (the default)
sets unless the user already set it. A cluster on Kubernetes keeps its token in a Secret (see
tandem/k8s.py); a head started with `ray start` uses the token of the shell that started it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from cluster.config import TandemConfig
from cluster.errors import TandemError
from cluster.runtime import runtime_env
from cluster.storage import is_uri, store_env
from cluster.tracking import job_env

# The verbs a job may run; `tandem submit --help` names them from here.
STAGES = ("train", "tune", "export", "serve", "run", "validate", "predict")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_S = 1.0


class SubmitError(TandemError, RuntimeError):
    """A submission problem the user can fix; the message says how."""


# ---------------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------------


def resolve_address(address: str | None, config: TandemConfig | None = None) -> str:
    """The dashboard address: --address, else RAY_ADDRESS or cluster.address when they are http(s)."""
    if address:
        if address.startswith("ray://") or address in ("auto", "local"):
            raise SubmitError(f"--address {address}: jobs go to the dashboard's HTTP address, e.g. --address http://HEAD:8265")
        return (address if address.startswith(("http://", "https://")) else f"http://{address}").rstrip("/")
    # Inside a Ray job RAY_ADDRESS is the GCS address (host:6379), not a dashboard: only http(s) counts.
    for candidate in (os.environ.get("RAY_ADDRESS"), config.cluster.address if config else None):
        if candidate and candidate.startswith(("http://", "https://")):
            return candidate.rstrip("/")
    raise SubmitError("no cluster to submit to; pass --address http://HEAD:8265 or set RAY_ADDRESS=http://HEAD:8265")


def set_auth_mode(mode: str) -> None:
    """RAY_AUTH_MODE for this process's Ray client, unless the user set it (as runtime.apply_auth_mode)."""
    os.environ.setdefault("RAY_AUTH_MODE", mode)
    # Ray reads the mode into its config at import; refresh it so the client sends the token.
    from ray._raylet import Config

    Config.initialize("")


def job_client(address: str | None, auth: str = "token", config: TandemConfig | None = None) -> Any:
    """A JobSubmissionClient for the cluster, with errors that say what to do."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address, config)
    set_auth_mode(auth)
    try:
        return JobSubmissionClient(url)
    except AuthenticationError as exc:
        raise SubmitError(
            f"{url} refused the client's token ({str(exc).splitlines()[0]}); set RAY_AUTH_TOKEN to the cluster's token "
            "(`ray get-auth-token` on the head, or the Kubernetes Secret named in k8s/raycluster.yaml)"
        ) from None
    except ConnectionError:
        raise SubmitError(
            f"cannot reach a Ray dashboard at {url}; start the head with `ray start --head --dashboard-host=0.0.0.0` "
            "(or `kubectl port-forward svc/NAME-head-svc 8265`) and pass its address"
        ) from None


def _job_call(fn: Any, job_id: str) -> Any:
    try:
        return fn(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise SubmitError(f"no job '{job_id}' on this cluster; `tandem jobs list` shows the jobs") from None
        raise


# ---------------------------------------------------------------------------------------------
# submitting
# ---------------------------------------------------------------------------------------------


def config_path_in_job(config_path: str | Path | None, working_dir: Path) -> str | None:
    """The config's path as the job sees it: relative to the uploaded working_dir."""
    if config_path is None:
        return None  # the packaged example, installed with Tandem on the cluster
    path = Path(config_path).resolve()
    if not path.is_relative_to(working_dir):
        raise SubmitError(
            f"{config_path} is outside the working_dir {working_dir}, so the job cannot read it; "
            "move it into the working_dir or set cluster.runtime_env.working_dir to a folder that holds it"
        )
    return path.relative_to(working_dir).as_posix()


def job_entrypoint(stage: str, config_path: str | None, overrides: list[str] | None) -> str:
    """`tandem STAGE [CONFIG] --set cluster.address=auto [--set ...]`, quoted for the job's shell."""
    args = ["tandem", stage] + ([config_path] if config_path else []) + ["--set", "cluster.address=auto"]
    for override in overrides or []:
        args += ["--set", override]
    return shlex.join(args)


def submission_id(config: TandemConfig, stage: str) -> str:
    """A readable, unique job id: digits-train-20250101-120000-1a2b."""
    return f"{config.name}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(
    config: TandemConfig,
    stage: str,
    address: str | None,
    config_path: str | Path | None,
    overrides: list[str] | None,
    follow: bool = True,
    out: TextIO | None = None,
) -> int:
    """Submit `tandem STAGE` as a Ray job; follow its logs; return 0 when it SUCCEEDED.

    `overrides` are the user's --set values: they were applied to `config` already and are passed
    on to the job, which loads the same file with the same overrides.
    """
    # Imported here: the checks load the manifest and Serve config code (numpy with it), which
    # `tandem --help` should not pay for to name STAGES.
    from tandem.checks import format_findings, has_errors, predeploy_checks

    out = out or sys.stdout
    if stage not in STAGES:
        raise SubmitError(f"stage '{stage}' is not one of {', '.join(STAGES)}")
    if stage == "predict" and not (config.predict.input and config.predict.output):
        raise SubmitError(
            "a submitted predict reads predict.input and writes predict.output: set both to paths on the cluster's shared storage "
            "(--set predict.input=/mnt/data/rows.parquet --set predict.output=/mnt/out)"
        )
    findings = predeploy_checks(config, "submit")
    if findings:
        print(format_findings(findings), file=sys.stderr, flush=True)
    if has_errors(findings):
        return 2
    client = job_client(address, config.cluster.auth, config)
    warn_on_version_mismatch(client)
    working_dir = Path(config.cluster.runtime_env.working_dir or ".").resolve()
    entrypoint = job_entrypoint(stage, config_path_in_job(config_path, working_dir), overrides)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        # PYTHONUNBUFFERED: the job's logs stream as they are written.
        # MLflow credentials set in this shell go with the job (tracking on), so its driver logs as this user would;
        # the object store's variables too when cluster.storage is a URI, so it reads and writes as this user would.
        runtime_env=runtime_env(
            config.cluster.runtime_env,
            env_vars={"PYTHONUNBUFFERED": "1", **job_env(config), **(store_env() if is_uri(config.cluster.storage) else {})},
            upload=working_dir,
        ),
        submission_id=submission_id(config, stage),
        metadata={"tandem_stage": stage, "tandem_config": config.name, "config_hash": config.config_hash()},
    )
    print(f"submitted {job_id} to {client.get_address()}: {entrypoint}", file=out, flush=True)
    if not follow:
        print(f"follow it with `tandem jobs logs {job_id}`; stop it with `tandem jobs stop {job_id}`", file=out, flush=True)
        return 0
    return follow_job(client, job_id, out)


def warn_on_version_mismatch(client: Any) -> None:
    import ray

    # Set by the client's own version check when it connected.
    remote = getattr(client, "_server_ray_version", None)
    if remote and remote != ray.__version__:
        print(f"warning: the cluster runs Ray {remote} but Ray {ray.__version__} is installed here", file=sys.stderr, flush=True)


async def _stream_logs(client: Any, job_id: str, out: TextIO) -> None:
    async for lines in client.tail_job_logs(job_id):
        out.write(lines)
        out.flush()


def follow_job(client: Any, job_id: str, out: TextIO | None = None) -> int:
    """Stream the job's logs until it ends; print its status; 0 for SUCCEEDED, else 1."""
    import aiohttp

    out = out or sys.stdout
    try:
        asyncio.run(_stream_logs(client, job_id, out))
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. `tandem jobs stop {job_id}` stops it.", file=sys.stderr, flush=True)
        return 130
    except (RuntimeError, OSError, aiohttp.ClientError) as exc:
        # The stream can end early (dashboard restart, proxy timeout); the status still tells.
        print(f"warning: the log stream of {job_id} ended early ({exc}); waiting for the job to finish", file=sys.stderr, flush=True)
    status = wait_for_job(client, job_id)
    info = client.get_job_info(job_id)
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED", file=out, flush=True)
        return 0
    # Ray's message repeats the last logs, which were streamed already: keep its first sentence.
    reason = (info.message or "no message").strip().splitlines()[0].split(", last available logs")[0]
    detail = f" ({info.error_type})" if getattr(info, "error_type", None) else ""
    print(f"job {job_id} {status}{detail}: {reason}", file=sys.stderr, flush=True)
    return 1


def wait_for_job(client: Any, job_id: str) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (the log stream may end a little earlier)."""
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(POLL_S)


# ---------------------------------------------------------------------------------------------
# tandem jobs
# ---------------------------------------------------------------------------------------------


def list_jobs(address: str | None = None, auth: str = "token") -> list[Any]:
    """Every job of the cluster (ray.job_submission.JobDetails), oldest first."""
    jobs = job_client(address, auth).list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0)


def format_jobs(jobs: list[Any]) -> str:
    """A table: submission id, status, Tandem stage, start time, entrypoint."""
    if not jobs:
        return "no jobs"
    rows = [("ID", "STATUS", "STAGE", "STARTED", "ENTRYPOINT")]
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        stage = (job.metadata or {}).get("tandem_stage", "-")
        rows.append((job.submission_id or job.job_id or "-", str(job.status.value), stage, started, job.entrypoint))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(widths[i]) if i < 4 else cell for i, cell in enumerate(row)) for row in rows)


def job_status(address: str | None, job_id: str, auth: str = "token") -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(_job_call(job_client(address, auth).get_job_status, job_id).value)


def job_logs(address: str | None, job_id: str, auth: str = "token") -> str:
    """Everything the job's driver has printed so far."""
    return _job_call(job_client(address, auth).get_job_logs, job_id)


def stop_job(address: str | None, job_id: str, auth: str = "token") -> bool:
    """Ask the cluster to stop the job; False when it had already finished."""
    return bool(_job_call(job_client(address, auth).stop_job, job_id))
