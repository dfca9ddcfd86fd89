"""The tuning benchmark's PBT part: exploits that restart the trial against exploits in place.

The same search twice per repeat (`tuning.search.seed` fixed, so both arms sample the same
learning rates): a population of `--pbt-trials` trials, all running at once, `--pbt-epochs`
epochs, a perturbation every epoch, the learning rate mutated. One arm with
`tuning.scheduler.exploit: restart` (Ray Tune's way: every exploit is a new trial actor, Train run,
worker group and DeepSpeed start-up from the donor's checkpoint), one with `in_place` (the
exploiter's live Train run loads the checkpoint). Arms alternate between repeats. Reported per arm:
wall time of the whole search, Ray Train starts, exploits, epochs trained and the best final
metric; the in-place/restart wall-time ratio against the issue's target (at most 0.5x).

Writes benchmarks/results/tuning_pbt.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

TARGET_WALL_RATIO = 0.5
ARMS = ("restart", "in_place")


def pbt_config(storage: Path, exploit: str, args: argparse.Namespace):
    from benchmarks.tuning import trial_overrides
    from cluster.config import load_config

    n = args.pbt_trials
    tuning = (
        f"{{samples: {n}, max_concurrent_trials: {n}, search: {{name: random, seed: {args.pbt_seed}}},"
        f" scheduler: {{name: pbt, perturbation_interval: 1, exploit: {exploit}}},"
        " space: {training.optimizer.lr: {loguniform: [1.0e-4, 1.0e-1]}}}"
    )
    return load_config(None, trial_overrides(storage, args, args.pbt_epochs, tuning))


def run_pbt_arm(exploit: str, repeat: int, args: argparse.Namespace, storage: Path) -> dict[str, Any]:
    from tuning import tune
    from tuning.segments import read_segments
    from tuning.tuner import SCHEDULER_FILE

    config = pbt_config(storage / f"pbt-{exploit}-{repeat}", exploit, args)
    started = time.perf_counter()
    result = tune(config)
    wall = time.perf_counter() - started
    scheduler = json.loads((result.run_dir / SCHEDULER_FILE).read_text())
    events = [s["event"] for t in result.trials for s in read_segments(Path(t.path))]
    return {
        "repeat": repeat,
        "wall_s": round(wall, 1),
        "train_starts": events.count("start"),
        "exploits": scheduler["perturbations"],
        "in_place_exploits": scheduler["in_place_exploits"],
        "epochs_trained": result.total_epochs,
        "best_metric": result.best.metric if result.best else None,
        "completed_trials": sum(t.status == "completed" for t in result.trials),
    }


def run_pbt(args: argparse.Namespace, storage: Path) -> dict[str, Any]:
    load_start = list(os.getloadavg())
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for repeat in range(args.pbt_repeats):
        # Alternate which arm goes first, so a drift in the machine's state does not favour one arm.
        for arm in ARMS if repeat % 2 == 0 else ARMS[::-1]:
            runs[arm].append(run_pbt_arm(arm, repeat, args, storage))
            print(f"[bench] pbt {arm} (repeat {repeat}): {runs[arm][-1]}", flush=True)
    median = {arm: statistics.median(r["wall_s"] for r in runs[arm]) for arm in ARMS}
    ratio = median["in_place"] / median["restart"]
    return {
        "benchmark": "tuning_pbt",
        "settings": {
            "trials": args.pbt_trials,
            "epochs": args.pbt_epochs,
            "perturbation_interval": 1,
            "steps_per_epoch": args.steps_per_epoch,
            "seed": args.pbt_seed,
            "repeats": args.pbt_repeats,
            "cpus": args.cpus,
        },
        "runs": runs,
        "median_wall_s": median,
        "wall_ratio": round(ratio, 3),
        "meets_target": ratio <= TARGET_WALL_RATIO,
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
    }


def pbt_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"# Tuning: PBT exploits in place vs restarting ({s['trials']} trials at once x {s['epochs']} epochs, perturbation every "
        f"epoch, {s['steps_per_epoch']} steps per epoch, seed {s['seed']})",
        "",
        "| arm | repeat | wall s | Train starts | exploits (in place) | epochs trained | best val_loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        for r in report["runs"][arm]:
            best = "-" if r["best_metric"] is None else f"{r['best_metric']:.4f}"
            lines.append(
                f"| {arm} | {r['repeat']} | {r['wall_s']:.1f} | {r['train_starts']} | {r['exploits']} ({r['in_place_exploits']}) "
                f"| {r['epochs_trained']} | {best} |"
            )
    met = "met" if report["meets_target"] else "not met"
    load = report["load_average"]
    lines += [
        "",
        f"In place / restart, median wall time: {report['wall_ratio']:.2f}x (target <= {TARGET_WALL_RATIO}x: {met}). "
        f"Load average (1, 5, 15 min) at start {[round(x, 2) for x in load['start']]}, at end {[round(x, 2) for x in load['end']]}; "
        f"{s['cpus']:g} logical CPUs on 2 cores.",
    ]
    return "\n".join(lines) + "\n"


def pbt_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (wall_ax, starts_ax) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    for ax, key, title in ((wall_ax, "wall_s", "search wall time (s)"), (starts_ax, "train_starts", "Ray Train starts")):
        for i, arm in enumerate(ARMS):
            values = [r[key] for r in report["runs"][arm]]
            ax.bar([i], [statistics.median(values)], 0.6, label=arm.replace("_", " "))
            ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(ARMS)), [a.replace("_", " ") for a in ARMS])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"PBT: exploits in place vs restarting ({report['wall_ratio']:.2f}x wall time)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_pbt_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning_pbt.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "tuning_pbt.md").write_text(pbt_markdown(report))
    pbt_plot(out / "tuning_pbt.png", report)
