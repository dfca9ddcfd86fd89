"""Tuning benchmark: ASHA against FIFO on the same sampled configurations, side by side.

For every seed, one random search (`tuning.search.seed` = seed, so both arms sample the same
configurations) runs twice through `tuning.tune`, the real path (every trial a Ray Train +
DeepSpeed run): once with FIFO (every trial trains every epoch) and once with ASHA. Reported per
seed and arm:
- total epochs trained (the search's cost), and ASHA's as a ratio to FIFO's;
- wall time until any trial first reported a metric within 2% of the best final metric (FIFO's
  best final metric is the reference: it saw every trial to the end), and the ratio;
- whether ASHA found the same best configuration as FIFO.
Targets (the issue's): ASHA uses at most 0.3x FIFO's epochs, and finds FIFO's best configuration
in at least 4 of 5 seeds.

A PBT part (benchmarks/_tuning_pbt.py) runs after the seeds: exploits that restart the trial
against exploits in place, writing benchmarks/results/tuning_pbt.{json,md,png}; `--part` runs one.

Writes benchmarks/results/tuning.{json,md,png}. Run: `python -m benchmarks tuning` (the full size:
5 seeds x 12 samples x 9 epochs, hours on a 2-core machine) or with `--small` (1 seed x 6 samples
x 4 epochs) for a quick look; every size flag can be set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results")
LOAD_AT_START: list[float] = []
WITHIN = 0.02
TARGET_EPOCH_RATIO = 0.3
TARGET_SAME_BEST = 4 / 5


def bench_config(storage: Path, seed: int, scheduler: str, args: argparse.Namespace):
    from cluster.config import load_config

    tuning = (
        f"{{samples: {args.samples}, max_concurrent_trials: {args.concurrency}, search: {{name: random, seed: {seed}}},"
        f" scheduler: {{name: {scheduler}, grace_period: {args.grace}, reduction_factor: {args.reduction_factor}"
        + (f", rung_min_results: {args.rung_min_results}" if args.rung_min_results and scheduler == "asha" else "")
        + "},"
        " space: {training.optimizer.lr: {loguniform: [1.0e-4, 1.0e-1]}, model.args.hidden: {choice: [[16], [32], [64]]}}}"
    )
    return load_config(None, trial_overrides(storage, args, args.epochs, tuning))


def trial_overrides(storage: Path, args: argparse.Namespace, epochs: int, tuning: str) -> list[str]:
    """The --set overrides every arm's search shares: small digits trials, a checkpoint every epoch."""
    return [
        f"cluster.storage={storage}",
        f"cluster.local.num_cpus={args.cpus}",
        "data.batch_size=64",
        "data.augment=[]",
        f"training.max_steps_per_epoch={args.steps_per_epoch}",
        f"training.epochs={epochs}",
        "training.checkpoint.every_epochs=1",
        # Constant learning rate: a cosine schedule that only decays near the end would make early
        # epochs a poorer predictor of the final ranking, against ASHA's premise.
        "training.schedule.name=constant",
        "training.schedule.warmup_steps=0",
        f"tuning={tuning}",
    ]


def time_to_target(result: Any, metric: str, mode: str, target: float, started_at: float) -> float | None:
    """Seconds from the arm's start until a trial first reported a value within WITHIN of target."""
    good = (lambda v: v <= target * (1 + WITHIN)) if mode == "min" else (lambda v: v >= target * (1 - WITHIN))
    times = [h["time"] for t in result.trials for h in t.history if h["time"] is not None and h[metric] is not None and good(h[metric])]
    return min(times) - started_at if times else None


def search_settings(result: Any) -> tuple[str, str]:
    table = json.loads((result.run_dir / "results.json").read_text())
    return table["metric"], table["mode"]


def sample_index(trial_id: str) -> int:
    """Tune's trial ids end in the sample's index: <experiment>_00003."""
    return int(trial_id.rsplit("_", 1)[-1])


def run_arm(seed: int, scheduler: str, args: argparse.Namespace, storage: Path) -> tuple[Any, float]:
    from tuning import tune

    config = bench_config(storage / scheduler, seed, scheduler, args)
    started_at = time.time()
    return tune(config), started_at


def fifo_by_reference(asha: Any, seed: int, args: argparse.Namespace, storage: Path) -> tuple[Any, float]:
    """What a FIFO search over ASHA's sampled configurations trains and finds, without Tune: each
    configuration trained to the end by the trials' own loop in one process
    (tests/integration/reference_trials.py). Its epochs are samples x epochs by definition; it has
    no time to target (no Tune start-ups to compare)."""
    import subprocess
    import sys
    from types import SimpleNamespace

    config = bench_config(storage / "fifo", seed, "fifo", args)
    folder = storage / f"reference-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config.to_yaml())
    trials = sorted(asha.trials, key=lambda t: t.trial_id)
    (folder / "updates.json").write_text(json.dumps([t.params for t in trials]))
    started = time.time()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.reference_trials",
            str(folder / "config.yaml"),
            str(folder / "updates.json"),
            str(folder / "out.json"),
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"reference trials failed:\n{done.stderr[-3000:]}")
    metric, mode = config.tuning.metric, config.tuning.mode
    rows = json.loads((folder / "out.json").read_text())
    summaries = [
        SimpleNamespace(
            trial_id=t.trial_id, params=t.params, status="completed", epochs_trained=args.epochs, metric=row["final"][metric], history=[]
        )
        for t, row in zip(trials, rows, strict=True)
    ]
    best = (min if mode == "min" else max)(summaries, key=lambda t: t.metric)
    result = SimpleNamespace(trials=summaries, best=best, total_epochs=args.samples * args.epochs, wall_s=time.time() - started)
    return result, started


def run_seed(seed: int, args: argparse.Namespace, storage: Path) -> dict[str, Any]:
    asha, asha_start = run_arm(seed, "asha", args, storage)
    if args.fifo == "reference":
        fifo, fifo_start = fifo_by_reference(asha, seed, args, storage)
    else:
        fifo, fifo_start = run_arm(seed, "fifo", args, storage)
    metric, mode = search_settings(asha)
    target = fifo.best.metric
    same_samples = {sample_index(t.trial_id): t.params for t in fifo.trials} == {sample_index(t.trial_id): t.params for t in asha.trials}
    arms = {}
    for name, result, started_at in (("fifo", fifo, fifo_start), ("asha", asha, asha_start)):
        arms[name] = {
            "total_epochs": result.total_epochs,
            "wall_s": round(result.wall_s, 1),
            "time_to_within_2pct_s": time_to_target(result, metric, mode, target, started_at),
            "stopped_trials": sum(t.status == "stopped" for t in result.trials),
            "best_params": result.best.params,
            "best_sample": sample_index(result.best.trial_id),
            "best_metric": result.best.metric,
            "trials": [
                {"sample": sample_index(t.trial_id), "params": t.params, "status": t.status, "epochs": t.epochs_trained, metric: t.metric}
                for t in sorted(result.trials, key=lambda t: t.trial_id)
            ],
        }
    ttt = arms["fifo"]["time_to_within_2pct_s"], arms["asha"]["time_to_within_2pct_s"]
    return {
        "seed": seed,
        "fifo_arm": args.fifo,
        "load_average": list(os.getloadavg()),
        "metric": metric,
        "mode": mode,
        "target": target,
        "same_sampled_configs": same_samples,
        "epoch_ratio": arms["asha"]["total_epochs"] / arms["fifo"]["total_epochs"],
        "time_to_target_ratio": (ttt[1] / ttt[0]) if all(ttt) else None,
        "same_best": arms["asha"]["best_sample"] == arms["fifo"]["best_sample"],
        "arms": arms,
    }


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def summarize(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [s["epoch_ratio"] for s in seeds]
    same = sum(s["same_best"] for s in seeds)
    return {
        "mean_epoch_ratio": sum(ratios) / len(ratios),
        "max_epoch_ratio": max(ratios),
        "same_best": f"{same}/{len(seeds)}",
        "meets_epoch_target": max(ratios) <= TARGET_EPOCH_RATIO,
        # The target is over 5 seeds; fewer cannot show it.
        "meets_same_best_target": same / len(seeds) >= TARGET_SAME_BEST if len(seeds) >= 5 else None,
    }


def verdict(met: bool | None) -> str:
    return "needs 5 seeds" if met is None else ("met" if met else "not met")


def markdown(seeds: list[dict[str, Any]], summary: dict[str, Any], args: argparse.Namespace) -> str:
    def seconds(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = [
        f"# Tuning: ASHA vs FIFO ({args.samples} samples x {args.epochs} epochs, {args.concurrency} at once, "
        f"ASHA grace {args.grace}, reduction {args.reduction_factor:g}, rungs wait for "
        f"{args.rung_min_results or 'reduction-factor'} results; FIFO arm: a real Tune search (tune), or every configuration trained "
        "to the end in one process (reference))",
        "",
        "| seed | FIFO arm | FIFO epochs | ASHA epochs | ratio | FIFO s to 2% | ASHA s to 2% | ratio | same best | stopped by ASHA |",
        "|---:|---|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for s in seeds:
        f, a = s["arms"]["fifo"], s["arms"]["asha"]
        ttt = "-" if s["time_to_target_ratio"] is None else f"{s['time_to_target_ratio']:.2f}x"
        lines.append(
            f"| {s['seed']} | {s.get('fifo_arm', 'reference')} | {f['total_epochs']} | {a['total_epochs']} | {s['epoch_ratio']:.2f}x "
            f"| {seconds(f['time_to_within_2pct_s'])} | "
            f"{seconds(a['time_to_within_2pct_s'])} | {ttt} | {'yes' if s['same_best'] else 'no'} | {a['stopped_trials']} |"
        )
    lines += [
        "",
        f"Mean epoch ratio {summary['mean_epoch_ratio']:.2f}x (target <= {TARGET_EPOCH_RATIO}x in every seed: "
        f"{verdict(summary['meets_epoch_target'])}); "
        f"same best configuration in {summary['same_best']} seeds (target >= 4/5: {verdict(summary['meets_same_best_target'])}).",
    ]
    return "\n".join(lines) + "\n"


def plot(path: Path, seeds: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (epochs_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    x = list(range(len(seeds)))
    width = 0.38
    for offset, arm in ((-width / 2, "fifo"), (width / 2, "asha")):
        epochs_ax.bar([i + offset for i in x], [s["arms"][arm]["total_epochs"] for s in seeds], width, label=arm.upper())
        time_ax.bar([i + offset for i in x], [s["arms"][arm]["time_to_within_2pct_s"] or 0 for s in seeds], width, label=arm.upper())
    for ax, title in ((epochs_ax, "epochs trained"), (time_ax, "seconds to within 2% of best")):
        ax.set_xticks(x, [f"seed {s['seed']}" + ("" if s["same_best"] else " (other best)") for s in seeds], fontsize=8)
        ax.set_title(title)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("ASHA vs FIFO on the same sampled configurations")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks tuning", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="1 seed, 6 samples, 4 epochs: a quick look, not the target measurement")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--steps-per-epoch", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--grace", type=int, default=1)
    parser.add_argument("--reduction-factor", type=float, default=3.0)
    parser.add_argument("--cpus", type=float, default=8.0, help="logical CPUs of the local Ray (may exceed the cores)")
    parser.add_argument(
        "--fifo",
        choices=("tune", "reference"),
        default="tune",
        help="the FIFO arm: a real Tune search (side by side, with its time to target), or every configuration trained to the end in "
        "one process (same epochs and best by definition, minutes instead of an hour per seed)",
    )
    parser.add_argument("--rung-min-results", type=int, default=None, help="ASHA: results a rung waits for (default: the reduction factor)")
    parser.add_argument("--part", choices=("all", "asha", "pbt"), default="all", help="ASHA against FIFO, PBT's exploit arms, or both")
    parser.add_argument("--pbt-trials", type=int, default=4, help="PBT: the population, all running at once")
    parser.add_argument("--pbt-epochs", type=int, default=8)
    parser.add_argument("--pbt-seed", type=int, default=0)
    parser.add_argument("--pbt-repeats", type=int, default=2, help="PBT: runs per arm, alternating which arm goes first")
    parser.add_argument("--seed-from", type=int, default=0, help="the first seed (seeds run from it, --seeds of them)")
    parser.add_argument(
        "--keep-seeds",
        action="store_true",
        help="keep the other seeds of the last report in --out (each with its own FIFO arm and load), replacing those run now",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    if "--small" in (argv or []):
        # Smaller defaults; flags given explicitly still win (e.g. --small --seeds 2).
        parser.set_defaults(seeds=1, samples=6, epochs=4, pbt_trials=2, pbt_epochs=4, pbt_repeats=1)
    return parser.parse_args(argv)


def previous_seeds(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The seeds of the last report in --out, with --keep-seeds (else none)."""
    report = args.out / "tuning.json"
    return json.loads(report.read_text())["seeds"] if args.keep_seeds and report.exists() else []


def write_report(seeds: list[dict[str, Any]], args: argparse.Namespace, wall_s: float) -> dict[str, Any]:
    """JSON, markdown and plot of the seeds so far (rewritten after every seed: a long run that is
    cut short still leaves its finished seeds)."""
    summary = summarize(seeds)
    import os

    report = {
        "benchmark": "tuning",
        "load_average": {"start": LOAD_AT_START, "now": list(os.getloadavg())},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "wall_s": round(wall_s, 1),
        "summary": summary,
        "seeds": seeds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tuning.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "tuning.md").write_text(
        markdown(seeds, summary, args)
        + f"\nLoad average (1, 5, 15 min) at start {LOAD_AT_START}, at the last seed {[round(x, 2) for x in os.getloadavg()]} on 2 cores.\n"
    )
    plot(args.out / "tuning.png", seeds)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from cluster.runtime import connect

    global LOAD_AT_START
    LOAD_AT_START = list(os.getloadavg())
    args = parse_args(argv)
    storage = Path(tempfile.mkdtemp(prefix="tandem-bench-tuning-"))
    seeds: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        # One Ray for every arm: tune() joins it instead of starting its own each time.
        with connect(bench_config(storage, 0, "fifo", args)):
            seeds = previous_seeds(args)
            for seed in range(args.seed_from, args.seed_from + args.seeds) if args.part in ("all", "asha") else ():
                done = run_seed(seed, args, storage)
                print(f"[bench] seed {seed}: epochs x{done['epoch_ratio']:.2f}, same best: {done['same_best']}", flush=True)
                seeds = sorted([s for s in seeds if s["seed"] != seed] + [done], key=lambda s: s["seed"])
                report = write_report(seeds, args, time.perf_counter() - started)
            if args.part in ("all", "pbt"):
                from benchmarks._tuning_pbt import run_pbt, write_pbt_report

                report["pbt"] = run_pbt(args, storage)
                write_pbt_report(report["pbt"], args.out)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    print(json.dumps({"summary": report.get("summary"), "wall_s": report.get("wall_s")}, indent=2))
    for name in ("tuning.md", "tuning_pbt.md"):
        if (args.out / name).exists():
            print((args.out / name).read_text())
    return report


if __name__ == "__main__":
    main()
