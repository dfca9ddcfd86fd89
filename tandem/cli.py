"""The `tandem` command line: one verb per stage, each a few lines over a library function.

Every verb but `jobs` (which talks to a cluster, not about a config) takes CONFIG as an optional
first argument (the packaged example when omitted) and `--set path=value` overrides. A config
problem prints every problem and exits 2; any other known failure prints one line and exits 1;
neither prints a traceback. The long verbs (train, tune, run) show Tandem's lines and send Ray's and
DeepSpeed's output to the run folder's console.log (cluster/console.py); `tandem -v VERB` shows
everything.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.text import Text

from cluster.config import ConfigError, TandemConfig, load_config
from cluster.console import quiet_terminal, terminal_err, terminal_out
from cluster.errors import TandemError
from tandem.submit import STAGES

app = typer.Typer(
    help="Tandem: train, tune, optimize and serve a PyTorch model on one Ray cluster, from one config file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# markup=False, emoji=False: what these print holds user text (config values, paths, error
# messages); "[/]", "[a-z]" or ":x:" in it must print as written, not as Rich markup or an emoji.
# Both write to the real terminal, also while a long verb sends everything else to its log.
console = Console(file=terminal_out, markup=False, emoji=False, soft_wrap=True)  # a path is one line in a log too
err = Console(file=terminal_err, markup=False, emoji=False, soft_wrap=True)
VERBOSE = {"on": False}


@app.callback()
def options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's, DeepSpeed's and the workers' output too.")] = False,
) -> None:
    """Tandem: train, tune, optimize and serve a PyTorch model on one Ray cluster, from one config file."""
    VERBOSE["on"] = verbose


def quiet(cfg: TandemConfig):
    """The long verbs' terminal: the log starts beside the runs and moves into the run folder.
    With run state in an object store the log stays in this machine's Tandem cache (logs/)."""
    from cluster.runtime import storage_root
    from cluster.storage import cache_dir

    root = storage_root(cfg)
    folder = cache_dir() / "logs" / cfg.name if root.remote else (root / cfg.name).path
    log = folder / f".console-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    return quiet_terminal(log, verbose=VERBOSE["on"] or os.environ.get("TANDEM_VERBOSE") == "1")


ConfigArg = Annotated[Path | None, typer.Argument(help="Tandem YAML config (default: the packaged digits example).", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config value: --set training.epochs=3 (repeatable).")]


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A problem the user can fix (a `TandemError`) prints as one line and exits 1, a config problem
    prints every problem and exits 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            err.print(Text("config error", style="bold red"), str(exc), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except TandemError as exc:
            err.print(Text("error", style="bold red"), str(exc), highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def load(config: Path | None, overrides: list[str] | None) -> TandemConfig:
    return load_config(config, overrides or [])


def summary(cfg: TandemConfig) -> str:
    groups = ", ".join(
        f"{n} ({g.cpus:g} CPU, {g.gpus} GPU, {g.min_replicas}-{g.max_replicas} nodes)" for n, g in cfg.cluster.node_groups.items()
    )
    t = cfg.training
    deps = ", ".join(f"{d.name}:{d.engine}{'/int8' if d.quantize == 'int8' else ''}" for d in cfg.serving.deployments)
    tuning = "off" if cfg.tuning is None else f"{cfg.tuning.samples} samples, {cfg.tuning.scheduler.name}, {cfg.tuning.search.name}"
    lines = [
        f"name        {cfg.name}",
        f"cluster     address={cfg.cluster.address} storage={cfg.cluster.storage} groups: {groups}",
        f"model       {cfg.model.builder} {cfg.model.args}",
        f"data        {cfg.data.source} batch={cfg.data.batch_size} augment={[a.name for a in cfg.data.augment]}",
        f"training    {t.workers} workers, ZeRO-{t.deepspeed.zero_stage}, {t.precision}, {t.epochs} epochs, {t.optimizer.name} "
        f"lr={t.optimizer.lr:g}",
        f"tuning      {tuning}",
        f"serving     {deps}; batching max={cfg.serving.batching.max_batch_size} p99<={cfg.serving.batching.target_p99_ms:g}ms",
    ]
    return "\n".join(lines)


@app.command()
@friendly_errors
def validate(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Check a config (schema, model, data, DeepSpeed, search space); print a summary (exit 0) or every problem (exit 2)."""
    cfg = load(config, set_)
    # What `tandem train` checks on the driver before Ray starts: the data loads, the model builds
    # and takes the data's shape, the DeepSpeed JSON has no conflicting override.
    from cluster.runtime import require_reachable_storage
    from training.trainer import preflight

    preflight(cfg)
    require_reachable_storage(cfg)  # a missing bucket or refused credentials (one request; nothing for a folder)
    if cfg.tuning is not None:
        # The search space's paths and values, the scheduler's settings and every model/data value
        # it can sample: what `tandem tune` checks before any trial, without starting Ray.
        from tuning.tuner import check_tuning

        check_tuning(cfg)
    console.print(Text("valid", style="green"), f"{config or 'packaged example'}\n{summary(cfg)}", highlight=False)


@app.command("show-config")
@friendly_errors
def show_config(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Print the resolved config with every default filled in (valid input for `tandem validate`)."""
    sys.stdout.write(load(config, set_).to_yaml())


@app.command()
@friendly_errors
def train(
    config: ConfigArg = None,
    set_: SetOpt = None,
    resume: Annotated[str | None, typer.Option("--resume", help="Continue a run: a run folder, a checkpoint folder or 'latest'.")] = None,
) -> None:
    """Train with Ray Train + DeepSpeed; writes a run folder with the consolidated artifact."""
    from tandem.servable import ensure_exported
    from training.trainer import train as run_training

    cfg = load(config, set_)
    with quiet(cfg):
        result = run_training(cfg, resume=resume)
        ensure_exported(cfg, result.artifact_dir)  # servable as the config's deployments ask, with no manual step
    console.print(f"artifact: {result.artifact_dir}")


@app.command()
@friendly_errors
def tune(
    config: ConfigArg = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the newest tuning run of this config without rerunning finished trials.")
    ] = False,
) -> None:
    """Search hyperparameters with Ray Tune around the same trainer; hands the best artifact on."""
    from tandem.servable import ensure_exported
    from tuning.tuner import tune as run_tune

    cfg = load(config, set_)
    with quiet(cfg):
        result = run_tune(cfg, resume=resume)
        ensure_exported(cfg, result.artifact_dir)
    console.print(f"best trial {result.best.trial_id}: {result.best.params}\nartifact: {result.artifact_dir}\nresults: {result.run_dir}")


FromOpt = Annotated[str, typer.Option("--from", help="Artifact to use: 'latest', a run folder or an artifacts folder.")]


@app.command()
@friendly_errors
def predict(
    config: ConfigArg = None,
    set_: SetOpt = None,
    input_: Annotated[
        str | None,
        typer.Option(
            "--input",
            help="A file, folder or glob of Parquet, CSV, .npy or JSON-lines files, or an s3:// or gs:// URI of "
            "Parquet files (default: predict.input).",
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", help="Folder or object-store prefix for predictions/, errors/ and summary.json (default: predict.output)."
        ),
    ] = None,
    from_: FromOpt = "latest",
) -> None:
    """Offline batch inference: every row of the input through Ray Data actor pools, written as Parquet."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from serving.offline import ERRORS
    from serving.offline import predict as run_predict
    from tandem.servable import servable_artifact

    cfg = load(config, set_)
    input_ = input_ or cfg.predict.input
    output = output or cfg.predict.output
    if not input_ or not output:
        raise TandemError("tandem predict needs --input and --output (or predict.input and predict.output in the config)")
    columns = [TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
    started = time.perf_counter()
    with quiet(cfg), Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("rows", total=None, rate="")

        def show(done: int, errors: int, total: int) -> None:
            rate = (done + errors) / max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=done + errors, total=total, rate=f"{rate:,.0f} rows/s, {errors} bad")

        summary = run_predict(cfg, input_, output, source=str(servable_artifact(cfg, from_)), progress=show)
    console.print(
        f"predicted {summary.rows:,} rows ({summary.errors:,} bad, in {summary.output_dir / ERRORS}) in {summary.wall_s:.1f} s: "
        f"{summary.rows_per_s:,.0f} rows/s with model version {summary.model_version}"
    )
    for actor, stats in sorted(summary.per_actor.items()):
        console.print(
            f"  {actor}: {stats['rows']:,.0f} rows, {stats['rows_per_s']:,.0f} rows/s while working, {stats['cores']:.1f} cores busy"
        )
    console.print(f"output: {summary.output_dir}")


@app.command("import")
@friendly_errors
def import_(
    config: ConfigArg = None,
    set_: SetOpt = None,
    weights: Annotated[Path, typer.Option("--weights", help="A state_dict saved by torch (torch.save(model.state_dict(), path)).")] = ...,
) -> None:
    """Make a model trained elsewhere a Tandem artifact: the config's model.builder with these weights, verified like a run's."""
    from tandem.servable import ensure_exported
    from training.importing import import_weights

    cfg = load(config, set_)
    result = import_weights(cfg, weights)
    ensure_exported(cfg, result.artifact_dir)
    m = result.metrics
    console.print(f"imported {weights} (val_accuracy {m['val_accuracy']:.4f}, val_loss {m['val_loss']:.4f})")
    console.print(f"artifact: {result.artifact_dir} (version {result.version})")


@app.command()
@friendly_errors
def export(config: ConfigArg = None, set_: SetOpt = None, from_: FromOpt = "latest") -> None:
    """Export ONNX, int8 and pruned artifacts with parity reports (a crossed gate exits 1)."""
    from serving.optimize.export import export as run_export
    from serving.optimize.parity import format_report

    result = run_export(load(config, set_), source=from_)
    console.print(format_report(result.report))
    console.print(f"artifacts: {result.artifact_dir}")


@app.command()
@friendly_errors
def serve(config: ConfigArg = None, set_: SetOpt = None, from_: FromOpt = "latest") -> None:
    """Deploy (or roll out in place) the model as a Ray Serve application; Ctrl-C stops it."""
    from serving.deploy import serve as run_serve
    from tandem.servable import servable_artifact

    cfg = load(config, set_)
    run_serve(cfg, artifact=str(servable_artifact(cfg, from_)), blocking=True)


@app.command("serve-config")
@friendly_errors
def serve_config(
    config: ConfigArg = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Where to write the Serve config YAML.")] = Path("serve_config.yaml"),
    from_: FromOpt = "latest",
    for_: Annotated[
        str,
        typer.Option(
            "--for",
            help="local: `serve deploy` on this machine (the config's host); cluster: a remote head or pods (every interface, "
            "address auto). The RayService's serveConfigV2 is the cluster file plus, with serving.http_path: haproxy, the "
            "shedding settings of Tandem's image (RAY_SERVE_HAPROXY_BINARY_PATH, TANDEM_HAPROXY_SERVER_MAXCONN, "
            "TANDEM_HAPROXY_QUEUE_MS), which a file for any cluster leaves out: it cannot know where tandem-haproxy is.",
        ),
    ] = "local",
) -> None:
    """Write the Ray Serve config file (for `serve deploy` and the KubeRay RayService)."""
    from serving.serve_config import write_serve_config
    from tandem.k8s import kubernetes_config

    if for_ not in ("local", "cluster"):
        raise TandemError(f"--for {for_!r}: use local (serve deploy on this machine) or cluster (a remote head, the RayService)")
    cfg = load(config, set_)
    console.print(f"wrote {write_serve_config(kubernetes_config(cfg) if for_ == 'cluster' else cfg, out, artifact=from_)}")


@app.command()
@friendly_errors
def bench(
    config: ConfigArg = None,
    set_: SetOpt = None,
    url: Annotated[str | None, typer.Option("--url", help="Endpoint (default: the config's serving host, port and route prefix).")] = None,
    requests: Annotated[int, typer.Option("--requests")] = 500,
    concurrency: Annotated[list[int] | None, typer.Option("--concurrency", help="Repeatable.")] = None,
) -> None:
    """Load-test a running Tandem endpoint on loopback from a separate client process."""
    from serving.deploy import configured_url, wait_until_ready
    from serving.loadgen import load_from_process
    from training.data import load_dataset

    cfg = load(config, set_)
    target = url or configured_url(cfg)
    token_env = cfg.serving.auth.token_env
    try:
        wait_until_ready(target, token=os.environ.get(token_env) if token_env else None, timeout_s=2)
    except TimeoutError as exc:
        raise TandemError(
            f"nothing answers at {target}/healthz ({exc}); start it with `tandem serve` on this config, or pass --url"
        ) from None
    examples = load_dataset(cfg).x[:256].tolist()
    for c in concurrency or [1, 8, 32]:
        r = load_from_process(target, examples, requests, c, cfg.serving.auth.token_env)
        console.print(
            f"c={c:<3} {r.requests_per_s:8.0f} req/s  p50 {r.p50_ms:6.1f} ms  p99 {r.p99_ms:6.1f} ms  ok {r.ok}  refused {r.refused}  "
            f"failed {r.failed}"
        )


@app.command()
@friendly_errors
def profile(
    config: ConfigArg = None,
    set_: SetOpt = None,
    from_: Annotated[str | None, typer.Option("--from", help="A run or artifacts folder, or 'latest' (default: latest if any).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Report folder or object-store URI (default: <run>/profile).")] = None,
    url: Annotated[str | None, typer.Option("--url", help="A running Tandem endpoint, for served latency.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer repetitions and batch sizes.")] = False,
) -> None:
    """Training cost versus inference cost of the model on this hardware: terminal summary, JSON, HTML with plots."""
    from profiling.profile import profile as run_profile

    report = run_profile(load(config, set_), source=from_, out_dir=out, serve_url=url, quick=quick)
    console.print(report.summary())  # ends with the report's path


@app.command()
@friendly_errors
def run(
    config: ConfigArg = None,
    set_: SetOpt = None,
    tune_: Annotated[bool, typer.Option("--tune", help="Tune first (needs a tuning section) and serve the best trial.")] = False,
    keep_serving: Annotated[bool, typer.Option("--keep-serving", help="Keep the endpoint up after the summary.")] = False,
    requests: Annotated[int, typer.Option("--requests", help="Requests of the closing load test.")] = 300,
) -> None:
    """The whole lifecycle: train (or tune) -> export -> serve -> load test -> summary."""
    from tandem.pipeline import run_lifecycle

    cfg = load(config, set_)
    if tune_ and cfg.tuning is None:
        raise TandemError("--tune needs a `tuning:` section in the config")
    console.print(Text("tandem run", style="bold"), f"{config or 'packaged example'}\n{summary(cfg)}", highlight=False)
    with quiet(cfg):
        run_lifecycle(cfg, use_tune=tune_, keep_serving=keep_serving, requests=requests)


AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray dashboard address, e.g. http://HEAD:8265 (default: RAY_ADDRESS).")]


@app.command()
@friendly_errors
def submit(
    config: ConfigArg = None,
    stage: Annotated[str, typer.Argument(help=" | ".join(STAGES))] = "train",
    set_: SetOpt = None,
    address: AddressOpt = None,
    no_follow: Annotated[bool, typer.Option("--no-follow", help="Return after submitting instead of streaming the logs.")] = False,
) -> None:
    """Submit a stage to a running Ray cluster as a Ray job; exits with the job's status."""
    from tandem.submit import submit as run_submit

    code = run_submit(load(config, set_), stage, address, config, set_ or [], follow=not no_follow)
    raise typer.Exit(code)


def default_k8s_folder(cfg: TandemConfig) -> Path:
    """Named after the config, so that rendering in this repo never overwrites its committed k8s/
    (the packaged example's --draft rendering), and two configs never share a folder."""
    return Path(f"k8s-{cfg.name}")


@app.command()
@friendly_errors
def k8s(
    config: ConfigArg = None,
    set_: SetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for the manifests: one folder per step (train/ or tune/, serve/, predict/, cluster/), each applied "
            "with `kubectl apply -k`; what an earlier rendering wrote there is replaced, other files are left alone. "
            "Default: k8s-NAME (the config's name) in the current folder.",
            show_default=False,
        ),
    ] = None,
    draft: Annotated[
        bool, typer.Option("--draft", help="Render even with Ray's stock image or pod-local storage (reported as warnings).")
    ] = False,
) -> None:
    """Render KubeRay manifests, one folder per step: train (or tune), then serve (or predict); cluster."""
    import dataclasses

    from tandem.checks import DRAFT_FIELDS, format_findings, has_errors, predeploy_checks
    from tandem.k8s_files import write_manifests

    cfg = load(config, set_)
    out = out or default_k8s_folder(cfg)
    findings = predeploy_checks(cfg, "kubernetes")
    if draft:
        findings = [dataclasses.replace(f, level="warning") if f.path in DRAFT_FIELDS else f for f in findings]
    err.print(format_findings(findings), soft_wrap=True)
    if has_errors(findings):
        raise typer.Exit(1)
    for path in write_manifests(cfg, out):
        console.print(f"wrote {path}")


# tandem/checks.py's Target, spelled out here so that `tandem --help` need not import the checks
# (and numpy with them); tests/unit/test_cli.py keeps the two equal.
CheckTarget = Literal["all", "submit", "kubernetes"]


@app.command()
@friendly_errors
def check(
    config: ConfigArg = None,
    set_: SetOpt = None,
    for_: Annotated[
        CheckTarget,
        typer.Option(
            "--for",
            help="submit: before `tandem submit` to a running Ray cluster; kubernetes: before `tandem k8s` and `kubectl apply`; all: both.",
        ),
    ] = "all",
) -> None:
    """Pre-deploy checks (exit 1 on an error): `--for submit` before `tandem submit`, `--for kubernetes` before `tandem k8s`."""
    from tandem.checks import format_findings, has_errors, predeploy_checks

    findings = predeploy_checks(load(config, set_), for_)
    console.print(format_findings(findings), soft_wrap=True)
    raise typer.Exit(1 if has_errors(findings) else 0)


@app.command()
@friendly_errors
def jobs(
    action: Annotated[str, typer.Argument(help="list | status | logs | stop")] = "list",
    job_id: Annotated[str | None, typer.Argument(help="Job (submission) id, for status, logs and stop.")] = None,
    address: AddressOpt = None,
) -> None:
    """Inspect or stop jobs on a Ray cluster."""
    from tandem import submit as jobs_api

    if action == "list":
        console.print(jobs_api.format_jobs(jobs_api.list_jobs(address)))
        return
    if action not in ("status", "logs", "stop") or job_id is None:
        raise TandemError("usage: tandem jobs list | tandem jobs status|logs|stop JOB_ID")
    if action == "status":
        console.print(jobs_api.job_status(address, job_id))
    elif action == "logs":
        sys.stdout.write(jobs_api.job_logs(address, job_id))
    else:
        console.print("stopped" if jobs_api.stop_job(address, job_id) else "not running")


def main(argv: list[str] | None = None) -> None:
    """The `tandem` entry point; argv defaults to sys.argv[1:]."""
    app(args=argv)


if __name__ == "__main__":
    main()
