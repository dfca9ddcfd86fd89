"""Start-up benchmark: how long `tandem train` of the packaged example takes to its first optimizer step.

One epoch of the packaged example, as a user runs it (`tandem -v train --set training.epochs=1`,
a fresh local Ray), with the DeepSpeed op already in the extension cache. Each output line is
timestamped as it arrives; the phases are the lines Ray, Ray Train and Tandem print at each
boundary, and the first step is when a worker's test-only progress file (TANDEM_PROGRESS_DIR,
written after every step) first appears. Repeats (default 3) give the median per phase.

Arms, alternated run by run so that load hits both alike:
- tandem: the defaults (what training/startup.py changes in Ray Train's start-up);
- ray_train_defaults: the same command with TANDEM_RAY_TRAIN_DEFAULTS=1: Ray Train's own 2 s
  poll, its preemption watcher, its default callbacks and its own coordinator start.
Both arms import DeepSpeed the trimmed way (training/ds_config.py, `import_deepspeed`).

Writes benchmarks/results/startup.{json,md,png}. Run: `python -m benchmarks startup [REPEATS]`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results")
VENV_BIN = Path(sys.executable).parent
# (phase name, the first output line that ends it); the order is the order of a start.
MARKS = [
    ("python, imports, config, pre-flight", "Started a local Ray instance"),
    ("local Ray up -> run folder", "[tandem] run folder"),
    ("Train controller up, asks for workers", "Attempting to start training worker group"),
    ("worker processes up, process group", "Setting up process group"),
    ("worker group started", "Started training worker group"),
]
FIRST_STEP = "worker: data, model, DeepSpeed init -> first step"
EPOCH = "first epoch done"
EXIT = "artifact written, Ray shut down, exit"
TARGET_FIRST_STEP_S = 15.0
# Ray Train as it comes: training/startup.py's switch for all of its changes.
RAY_DEFAULTS = {"TANDEM_RAY_TRAIN_DEFAULTS": "1"}
ARMS = {"tandem": {}, "ray_train_defaults": RAY_DEFAULTS}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def one_start(workdir: Path, arm_env: dict[str, str]) -> dict[str, float]:
    """Seconds from the command's start to each mark, to the first step and to exit."""
    progress = workdir / "progress"
    progress.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in RAY_DEFAULTS}
    env.update(arm_env)
    env.update(TANDEM_PROGRESS_DIR=str(progress), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    cmd = [str(VENV_BIN / "tandem"), "-v", "train", "--set", f"cluster.storage={workdir / 'runs'}", "--set", "training.epochs=1"]
    started = time.monotonic()
    seen: dict[str, float] = {}
    first_step: list[float] = []

    def watch_progress() -> None:
        while proc.poll() is None and not first_step:
            if any(progress.glob("rank-*.json")):
                first_step.append(time.monotonic() - started)
                return
            time.sleep(0.01)

    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = threading.Thread(target=watch_progress, daemon=True)
    watcher.start()
    tail: list[str] = []
    for line in proc.stdout:
        now = time.monotonic() - started
        tail = (tail + [line])[-40:]
        for name, needle in MARKS:
            if needle in line and name not in seen:
                seen[name] = now
        if "[tandem] epoch" in line and EPOCH not in seen:
            seen[EPOCH] = now
    proc.wait()
    watcher.join(timeout=5)
    if proc.returncode != 0:
        raise SystemExit(f"tandem train failed ({proc.returncode}):\n{''.join(tail)}")
    seen[EXIT] = time.monotonic() - started
    if first_step:
        seen[FIRST_STEP] = first_step[0]
    return seen


def phases(marks: dict[str, float]) -> dict[str, float]:
    """Durations of consecutive phases from the cumulative marks (a missing mark merges its phase into the next)."""
    order = [name for name, _ in MARKS] + [FIRST_STEP, EPOCH, EXIT]
    durations, last = {}, 0.0
    for name in order:
        if name in marks:
            durations[name] = marks[name] - last
            last = marks[name]
    return durations


def plot(runs: list[dict[str, float]], path: Path) -> None:
    rows = [phases(m) for m in runs]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [name for name, _ in MARKS] + [FIRST_STEP, EPOCH, EXIT]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    left = 0.0
    for name in order:
        value = statistics.median(r[name] for r in rows if name in r) if any(name in r for r in rows) else 0.0
        ax.barh(0, value, left=left, label=f"{name} ({value:.1f} s)")
        left += value
    ax.set_yticks([])
    ax.set_xlabel("seconds since `tandem train` started (median of repeats)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summarize(runs: list[dict[str, float]]) -> dict:
    durations = [phases(m) for m in runs]
    return {
        "first_step_s": round(statistics.median(m[FIRST_STEP] for m in runs if FIRST_STEP in m), 2),
        "exit_s": round(statistics.median(m[EXIT] for m in runs), 2),
        "phases_median_s": {name: round(statistics.median(d[name] for d in durations if name in d), 2) for name in durations[0]},
        "runs": runs,
    }


def main(argv: list[str]) -> None:
    repeats = int(argv[0]) if argv else 3
    load_start = load()
    print(f"load average at start: {load_start}", flush=True)
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for i in range(repeats):
        for arm, arm_env in ARMS.items():
            with tempfile.TemporaryDirectory(prefix="tandem-startup-") as folder:
                marks = one_start(Path(folder), arm_env)
            runs[arm].append(marks)
            print(f"{arm} run {i + 1}: first step at {marks.get(FIRST_STEP, float('nan')):.1f} s, exit {marks[EXIT]:.1f} s", flush=True)
    arms = {arm: summarize(r) for arm, r in runs.items()}
    tandem, ray_poll = arms["tandem"], arms["ray_train_defaults"]
    result = {
        "command": "tandem -v train --set training.epochs=1 (packaged example, fresh local Ray, extension cached)",
        "repeats": repeats,
        "target_first_step_s": TARGET_FIRST_STEP_S,
        "first_step_ratio_tandem_to_ray_train_defaults": round(tandem["first_step_s"] / ray_poll["first_step_s"], 3),
        "arms": arms,
        "load_average": {"start": load_start, "end": load()},
        "machine": f"{os.cpu_count()} CPUs",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(result, indent=2))
    names = list(tandem["phases_median_s"])
    lines = ["| phase (median s) | tandem | Ray Train's defaults |", "|---|---|---|"]
    lines += [f"| {n} | {tandem['phases_median_s'].get(n, 0):.1f} | {ray_poll['phases_median_s'].get(n, 0):.1f} |" for n in names]
    lines.append(
        f"| **first optimizer step** (target ≤ {TARGET_FIRST_STEP_S:g} s) | **{tandem['first_step_s']:.1f}** | "
        f"{ray_poll['first_step_s']:.1f} ({result['first_step_ratio_tandem_to_ray_train_defaults']:.2f}x) |"
    )
    lines.append(f"| exit | {tandem['exit_s']:.1f} | {ray_poll['exit_s']:.1f} |")
    lines.append(f"\nLoad average at start {load_start}, at end {result['load_average']['end']}.")
    (RESULTS / "startup.md").write_text("\n".join(lines) + "\n")
    plot(runs["tandem"], RESULTS / "startup.png")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
