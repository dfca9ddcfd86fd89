"""What a tuning run leaves behind: a table, results.csv, results.json, a plot and the tuning manifest.

    <storage>/<name>/tune-<stamp>/
        config.yaml            the config the tune ran with (tuning section included)
        best_config.yaml       that config with the best trial's values: `tandem train` it to retrain
        metrics.jsonl          the best trial's epochs (so the folder reads like a training run)
        artifacts/             the best trial's model, consolidated exactly like a training run's
        results.csv, .json     one row per trial: params, metric, epochs trained, status
        results.png            the metric per epoch of every trial; stopped trials end in an x
        tuning_manifest.json   search settings, best trial, links and sha256 of all of the above
        trials/<trial id>/     Tune's trial folders: train-N/ (each start's Train run),
                               checkpoint_*/ (Tune's copies), segments.jsonl, progress.csv

Status: `completed` (trained every epoch), `stopped` (ended early by the scheduler or the time
budget) or `error`. "Epochs trained" counts the epochs a trial itself trained, so the total
over trials is the search's cost; a PBT trial that exploits continues from the donor's epoch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from cluster.storage import Location, location, location_of
from tuning.segments import read_segments
from tuning.space import SearchSpace

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
RESULTS_PNG = "results.png"
TUNING_MANIFEST = "tuning_manifest.json"


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    status: str
    epochs_trained: int  # epochs the trial's Train runs completed (train-*/metrics.jsonl)
    epochs_reported: int  # of those, the ones Tune received before it stopped the trial
    last_epoch: int
    metric: float | None
    best_metric: float | None
    path: str  # the trial folder: a path, or a URI in an object store
    history: list[dict[str, float]] = field(default_factory=list)
    starts: int = 0
    exploited_from: list[str] = field(default_factory=list)
    error: str | None = None
    sampled: dict[str, Any] = field(default_factory=dict, repr=False)
    checkpoint: str | None = None  # the last Tune checkpoint: a path, or a URI in an object store
    reports: list[dict[str, Any]] = field(default_factory=list, repr=False)  # every report's metrics, in order


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def summarize_result(result: Any, space: SearchSpace, metric: str, mode: str, epochs: int, keep: tuple[str, ...] = ()) -> TrialSummary:
    """One Tune Result -> a TrialSummary (history from its reports, starts from segments.jsonl).
    keep: the metrics of each report to carry in `reports` (the training loop's own)."""
    frame = result.metrics_dataframe
    rows = [] if frame is None else frame.to_dict("records")
    trial_dir = location_of(result.filesystem, result.path)
    history = [
        {"epoch": int(r["epoch"]), metric: _finite(r.get(metric)), "time": _finite(r.get("reported_at"))}
        for r in rows
        if _finite(r.get("epoch")) is not None
    ]
    values = [h[metric] for h in history if h[metric] is not None]
    last_epoch = history[-1]["epoch"] if history else 0
    if result.error is not None:
        status = "error"
    elif last_epoch >= epochs:
        status = "completed"
    else:
        status = "stopped"
    segments = read_segments(trial_dir)
    starts = [s for s in segments if s.get("event") == "start"]
    takeovers = [s for s in segments if s.get("event") in ("start", "exploit")]
    trial_id = trial_dir.name
    # The config the trial trained last: an exploit in place changed it without a new start, and
    # Tune's Result holds the config the trial's actor started with.
    last_exploit = takeovers[-1] if takeovers and takeovers[-1]["event"] == "exploit" else None
    sampled = {k: v for k, v in (last_exploit["sampled"] if last_exploit else result.config or {}).items() if k in space.paths}
    return TrialSummary(
        trial_id=trial_id,
        params=space.decode(sampled),
        status=status,
        epochs_trained=max(len(history), trained_epochs(trial_dir)),
        epochs_reported=len(history),
        last_epoch=last_epoch,
        metric=values[-1] if values else None,
        best_metric=(min(values) if mode == "min" else max(values)) if values else None,
        path=str(trial_dir),
        history=history,
        starts=len(starts),
        exploited_from=list(dict.fromkeys(s["from_trial"] for s in takeovers if s.get("from_trial") and s["from_trial"] != trial_id)),
        error=None
        if result.error is None
        else f"{type(result.error).__name__}: {str(result.error).splitlines()[0] if str(result.error) else ''}",
        sampled=sampled,
        checkpoint=None if result.checkpoint is None else str(location_of(result.checkpoint.filesystem, result.checkpoint.path)),
        reports=[{k: r[k] for k in keep if _finite(r.get(k)) is not None} for r in rows],
    )


def trained_epochs(trial_dir: Location) -> int:
    """Epochs every Train run of the trial completed, from each run's metrics.jsonl.

    More than Tune received when a trial was stopped: its workers keep training while Tune
    decides, until the stop aborts the run. This is the search's real cost.
    """
    from training.trainer import read_history

    return sum(len(read_history(segment)) for segment in trial_dir.children() if segment.name.startswith("train-"))


def pick_best(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    """The trial with the best final metric among those that left a checkpoint (ties: more epochs)."""
    candidates = [t for t in trials if t.metric is not None and t.checkpoint]
    if not candidates:
        return None
    sign = 1 if mode == "min" else -1
    return min(candidates, key=lambda t: (sign * t.metric, -t.last_epoch, t.trial_id))


def ordered(trials: list[TrialSummary], mode: str) -> list[TrialSummary]:
    sign = 1 if mode == "min" else -1
    return sorted(trials, key=lambda t: (t.metric is None, sign * (t.metric or 0.0), t.trial_id))


def short_name(path: str) -> str:
    """training.optimizer.lr -> lr (for legends)."""
    return path.rsplit(".", 1)[-1]


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# ---------------------------------------------------------------------------------------------
# table, CSV, JSON
# ---------------------------------------------------------------------------------------------


def results_table(trials: list[TrialSummary], best: TrialSummary | None, metric: str, mode: str, title: str) -> Any:
    from rich.table import Table

    from cluster.tables import readable

    paths = list(trials[0].params) if trials else []
    table = Table(title=title, title_justify="left")
    table.add_column("best")  # named: in a log each trial prints as "header: value" lines (cluster/tables.py)
    table.add_column("trial")
    for path in paths:
        table.add_column(path, justify="right")
    table.add_column(f"{metric} ({mode})", justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("status")
    styles = {"completed": "green", "stopped": "yellow", "error": "red"}
    for t in ordered(trials, mode):
        mark = "*" if best is not None and t.trial_id == best.trial_id else ""
        status = t.status + (f" (from {', '.join(t.exploited_from)})" if t.exploited_from else "")
        table.add_row(
            mark,
            t.trial_id,
            *(format_value(t.params.get(p)) for p in paths),
            "-" if t.metric is None else f"{t.metric:.4f}",
            str(t.epochs_trained),
            f"[{styles.get(t.status, 'white')}]{status}[/]",
        )
    return readable(table)


def print_table(trials: list[TrialSummary], best: TrialSummary | None, metric: str, mode: str, title: str) -> None:
    from rich.console import Console

    from cluster.console import terminal_out

    Console(file=terminal_out).print(results_table(trials, best, metric, mode, title))


def write_csv(path: Location, trials: list[TrialSummary], metric: str, mode: str) -> None:
    paths = list(trials[0].params) if trials else []
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "trial_id",
            "status",
            "epochs_trained",
            "epochs_reported",
            "last_epoch",
            metric,
            f"best_{metric}",
            *paths,
            "starts",
            "exploited_from",
            "path",
        ]
    )
    for t in ordered(trials, mode):
        writer.writerow(
            [
                t.trial_id,
                t.status,
                t.epochs_trained,
                t.epochs_reported,
                t.last_epoch,
                t.metric,
                t.best_metric,
                *(format_value(t.params.get(p)) for p in paths),
                t.starts,
                " ".join(t.exploited_from),
                t.path,
            ]
        )
    location(path).put_text(buffer.getvalue())


def write_json(path: Location, trials: list[TrialSummary], best: TrialSummary | None, summary: dict[str, Any]) -> None:
    rows = []
    for t in trials:
        row = asdict(t)
        row.pop("sampled")
        row.pop("reports")
        rows.append(row)
    location(path).put_json({**summary, "best_trial": best.trial_id if best else None, "trials": rows})


# ---------------------------------------------------------------------------------------------
# the plot
# ---------------------------------------------------------------------------------------------


def plot_trials(path: Location, trials: list[TrialSummary], best: TrialSummary | None, metric: str, title: str) -> None:
    """The metric per epoch of every trial: stopped trials dashed, ending in an x; the best one bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    styles = {"completed": "-", "stopped": "--", "error": ":"}
    for t in trials:
        points = [(h["epoch"], h[metric]) for h in t.history if h[metric] is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        is_best = best is not None and t.trial_id == best.trial_id
        label = f"{t.trial_id} " + ", ".join(f"{short_name(k)}={format_value(v)}" for k, v in t.params.items())
        line = ax.plot(
            xs,
            ys,
            styles.get(t.status, "-"),
            marker="o",
            markersize=3,
            linewidth=2.8 if is_best else 1.2,
            label=("* " if is_best else "") + label + ("" if t.status == "completed" else f" [{t.status}]"),
        )[0]
        if t.status != "completed":
            ax.plot(xs[-1], ys[-1], "x", color=line.get_color(), markersize=10, markeredgewidth=2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(trials) <= 16:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    location(path).put_bytes(buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# the tuning manifest
# ---------------------------------------------------------------------------------------------


def write_tuning_manifest(run_dir: Location, info: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """tuning_manifest.json: the search, its best trial, the artifact link and sha256 of each result file.

    Not named manifest.json: a folder holding manifest.json is read as an artifacts folder.
    """
    run_dir = location(run_dir)
    found = {}
    for name in files:
        try:
            data = (run_dir / name).read_bytes()
        except FileNotFoundError:
            continue
        found[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {"kind": "tuning", **info, "files": found}
    (run_dir / TUNING_MANIFEST).put_json(manifest)
    return manifest
