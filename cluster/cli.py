"""The `tandem` command line: one verb per stage, each a few lines over a library function.

Every verb takes CONFIG as an optional first argument (the packaged example when omitted) and
`--set path=value` overrides. A config problem prints every problem and exits 2; any other known
failure prints one line and exits 1; neither prints a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cluster.artifacts import ArtifactError
from cluster.config import ConfigError, TandemConfig, load_config

app = typer.Typer(
    help="Tandem: train, tune, optimize and serve a PyTorch model on one Ray cluster, from one config file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
err = Console(stderr=True)

ConfigArg = Annotated[Path | None, typer.Argument(help="Tandem YAML config (default: the packaged digits example).", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config value: --set training.epochs=3 (repeatable).")]


class UserFacingError(RuntimeError):
    """A failure the user can fix; printed as one line, no traceback."""


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn known failures into clean messages and exit codes (2 for config problems)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            err.print(f"[bold red]config error[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (ArtifactError, UserFacingError) as exc:
            err.print(f"[bold red]error[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def load(config: Path | None, overrides: list[str] | None) -> TandemConfig:
    return load_config(config, overrides or [])


def not_available(verb: str, issue: str) -> None:
    err.print(f"tandem {verb}: not available yet ({issue}); `tandem --help` lists what exists.")
    raise typer.Exit(1)


def summary(cfg: TandemConfig) -> str:
    groups = ", ".join(f"{n} ({g.cpus:g} CPU, {g.gpus} GPU, {g.min_replicas}-{g.max_replicas} nodes)" for n, g in cfg.cluster.node_groups.items())
    t = cfg.training
    deps = ", ".join(f"{d.name}:{d.engine}{'/int8' if d.quantize == 'int8' else ''}" for d in cfg.serving.deployments)
    lines = [
        f"name        {cfg.name}",
        f"cluster     address={cfg.cluster.address} storage={cfg.cluster.storage} groups: {groups}",
        f"model       {cfg.model.builder} {cfg.model.args}",
        f"data        {cfg.data.source} batch={cfg.data.batch_size} augment={[a.name for a in cfg.data.augment]}",
        f"training    {t.workers} workers, ZeRO-{t.deepspeed.zero_stage}, {t.precision}, {t.epochs} epochs, {t.optimizer.name} lr={t.optimizer.lr:g}",
        f"tuning      {'off' if cfg.tuning is None else f'{cfg.tuning.samples} samples, {cfg.tuning.scheduler.name}, {cfg.tuning.search.name}'}",
        f"serving     {deps}; batching max={cfg.serving.batching.max_batch_size} p99<={cfg.serving.batching.target_p99_ms:g}ms",
    ]
    return "\n".join(lines)


@app.command()
@friendly_errors
def validate(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Check a config; print a short summary (exit 0) or every problem (exit 2)."""
    cfg = load(config, set_)
    console.print(f"[green]valid[/] {config or 'packaged example'}\n{summary(cfg)}", highlight=False)


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
    cfg = load(config, set_)
    try:
        from training.trainer import train as run_training
    except ImportError:
        not_available("train", "distributed training, issue 3")
    result = run_training(cfg, resume=resume)
    console.print(f"artifact: {result.artifact_dir}")


@app.command()
@friendly_errors
def tune(config: ConfigArg = None, set_: SetOpt = None, resume: Annotated[bool, typer.Option("--resume")] = False) -> None:
    """Search hyperparameters with Ray Tune around the same trainer."""
    not_available("tune", "hyperparameter search, issue 4")


@app.command()
@friendly_errors
def export(config: ConfigArg = None, set_: SetOpt = None, from_: Annotated[str, typer.Option("--from")] = "latest") -> None:
    """Export ONNX, int8, pruned and distilled artifacts with parity reports."""
    not_available("export", "inference optimization, issue 5")


@app.command()
@friendly_errors
def serve(config: ConfigArg = None, set_: SetOpt = None, from_: Annotated[str, typer.Option("--from")] = "latest") -> None:
    """Deploy the model as a Ray Serve application behind one HTTP endpoint."""
    not_available("serve", "serving, issue 6")


@app.command("serve-config")
@friendly_errors
def serve_config(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Write the Ray Serve config file (for `serve deploy` and KubeRay RayService)."""
    not_available("serve-config", "serving, issue 6")


@app.command()
@friendly_errors
def bench(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Load-test a running Tandem endpoint."""
    not_available("bench", "serving, issue 6")


@app.command()
@friendly_errors
def profile(config: ConfigArg = None, set_: SetOpt = None, from_: Annotated[str | None, typer.Option("--from")] = None) -> None:
    """Compare training and inference cost of the model on this hardware (HTML report)."""
    not_available("profile", "issue 8")


@app.command()
@friendly_errors
def run(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """The whole lifecycle: train -> export -> serve -> load test -> summary."""
    cfg = load(config, set_)
    try:
        from training.trainer import train as run_training
    except ImportError:
        not_available("run", "distributed training, issue 3")
    console.print(f"[bold]tandem run[/] {config or 'packaged example'}\n{summary(cfg)}", highlight=False)
    result = run_training(cfg)
    console.print(f"[bold]trained[/] artifact: {result.artifact_dir}")
    for key in ("val_accuracy", "val_loss", "epoch", "step"):
        if key in result.metrics:
            console.print(f"  {key}: {result.metrics[key]}")
    console.print("next stages (export, serve, load test) are not available yet: issues 5, 6 and 7.")


@app.command()
@friendly_errors
def submit(
    config: ConfigArg = None,
    stage: Annotated[str, typer.Argument(help="train | tune | export | serve | run")] = "train",
    set_: SetOpt = None,
    address: Annotated[str | None, typer.Option("--address")] = None,
) -> None:
    """Submit a stage to a running Ray cluster with `ray job submit`."""
    not_available("submit", "cluster submission, issue 7")


@app.command()
@friendly_errors
def k8s(config: ConfigArg = None, set_: SetOpt = None, out: Annotated[Path, typer.Option("--out")] = Path("k8s")) -> None:
    """Render KubeRay RayCluster / RayJob / RayService manifests."""
    not_available("k8s", "KubeRay rendering, issue 7")


@app.command()
@friendly_errors
def check(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """Pre-deploy checks for a cluster or Kubernetes."""
    not_available("check", "issue 7")


@app.command()
@friendly_errors
def jobs(action: Annotated[str, typer.Argument(help="list | status | logs | stop")] = "list", job_id: str | None = None) -> None:
    """Inspect jobs submitted to a Ray cluster."""
    not_available("jobs", "cluster submission, issue 7")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
