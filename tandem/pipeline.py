"""`tandem run`: the whole lifecycle on one Ray, from one config.

train (or tune) -> export (ONNX, int8, parity report) -> serve -> check that served predictions
equal the artifact's -> a short bounded load from a separate client process -> summary -> shut
down (or keep serving). Each stage is the same library function its own verb calls; this module
only sequences them, so it imports training, tuning and serving lazily (the load generator
excepted: it is light).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from cluster.config import TandemConfig
from cluster.console import terminal_out
from cluster.runtime import connect
from cluster.tables import Readable, readable
from serving.loadgen import LoadResult, load_from_process

console = Console(file=terminal_out)  # the real terminal, also while `tandem run` is quiet


@dataclass
class RunSummary:
    artifact_dir: Path
    train_metrics: dict[str, Any]
    parity: dict[str, Any]
    url: str
    served_match: float
    served_version: str
    load: LoadResult
    timings_s: dict[str, float] = field(default_factory=dict)


def _stage(name: str, timings: dict[str, float]):
    class _Timer:
        def __enter__(self):
            console.rule(f"[bold]{name}")
            self.started = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = time.perf_counter() - self.started

    return _Timer()


def _train_or_tune(config: TandemConfig, use_tune: bool) -> tuple[Path, dict[str, Any]]:
    if use_tune:
        from tuning.tuner import tune

        result = tune(config)
        return result.artifact_dir, dict(result.best_metrics)
    from training.trainer import train

    result = train(config)
    return result.artifact_dir, result.metrics


def served_agreement(url: str, artifact_dir: Path, config: TandemConfig, examples: np.ndarray, token: str | None) -> tuple[float, str]:
    """Fraction of examples where the HTTP answer equals the first deployment's engine run here,
    and the model version the server says answered."""
    from serving.client import predict
    from serving.engines import load_engine

    deployment = config.serving.deployments[0]
    engine = load_engine(
        artifact_dir, engine=deployment.engine, precision=deployment.precision, quantize=deployment.quantize, threads=1, device="cpu"
    )
    local = engine.predict(examples).argmax(1)
    answer = predict(url, examples.tolist(), token=token)
    return float((np.asarray(answer["predictions"]) == local).mean()), str(answer.get("model_version"))


def summary_table(summary: RunSummary) -> Readable:
    table = Table(title="tandem run", show_header=False)
    m = summary.train_metrics
    table.add_row("artifact", str(summary.artifact_dir))
    table.add_row(
        "trained",
        f"val_accuracy {m.get('val_accuracy', float('nan')):.4f}, val_loss {m.get('val_loss', float('nan')):.4f}, {m.get('step', '?')} "
        "steps",
    )
    for name, row in summary.parity.items():
        acc = row.get("accuracy")
        table.add_row(
            f"parity {name}",
            f"accuracy {acc:.4f}, argmax agreement {row.get('argmax_agreement', float('nan')):.4f}" if acc is not None else str(row),
        )
    table.add_row("served == artifact", f"{summary.served_match:.1%} of held-out examples")
    table.add_row("served version", summary.served_version)
    load = summary.load
    table.add_row("load", f"{load.ok}/{load.requests} ok, {load.refused} refused, {load.failed} failed at concurrency {load.concurrency}")
    table.add_row("latency", f"p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms, {load.requests_per_s:.0f} req/s")
    table.add_row("endpoint", summary.url)
    table.add_row("stage times", ", ".join(f"{k} {v:.0f}s" for k, v in summary.timings_s.items()))
    return readable(table)  # in a log: one "name: value" line per row


def run_lifecycle(
    config: TandemConfig, use_tune: bool = False, keep_serving: bool = False, requests: int = 300, concurrency: int = 8
) -> RunSummary:
    import os

    from serving.deploy import serve, serve_until_stopped, shutdown
    from serving.optimize.export import export
    from serving.optimize.parity import format_report
    from training.data import load_dataset, split

    timings: dict[str, float] = {}
    token_env = config.serving.auth.token_env
    token = os.environ.get(token_env) if token_env else None
    with connect(config):
        with _stage("train" if not use_tune else "tune", timings):
            artifact_dir, metrics = _train_or_tune(config, use_tune)
        with _stage("export", timings):
            exported = export(config, source=artifact_dir)
            console.print(format_report(exported.report))
        with _stage("serve", timings):
            url = serve(config, artifact=str(artifact_dir))
            console.print(f"serving at {url}")
        try:
            with _stage("load", timings):
                _, val = split(load_dataset(config), config.data.val_fraction, config.data.seed)
                match, version = served_agreement(url, artifact_dir, config, val.x[:64], token)
                load = load_from_process(url, val.x[: min(len(val.x), 256)].tolist(), requests, concurrency, token_env)
            summary = RunSummary(artifact_dir, metrics, exported.report, url, match, version, load, timings)
            console.print(summary_table(summary))
            console.print(f"run folder: {artifact_dir.parent}")
            if keep_serving:
                console.print(f"serving at {url}; Ctrl-C or SIGTERM stops")
                serve_until_stopped(config)  # SIGTERM too: `tandem jobs stop` on a submitted run
        finally:
            shutdown(config)
    return summary
