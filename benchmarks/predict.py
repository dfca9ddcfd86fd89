"""`tandem predict` against a single-process loop: rows per second and peak memory.

`python -m benchmarks predict [--wide-rows N] [--digits-rows N]`. One Parquet input per model,
ONNX Runtime fp32 on one thread, batch size 256, arms one at a time on one local Ray:
- loop: one process reads the input row group by row group, runs the same engine at the same
  batch size and writes the predictions as Parquet (what a user writes without Ray);
- predict_1, predict_2: `tandem predict` (serving/offline.py) with 1 and 2 actors.

Rows per second count from the arm's start to its last row written, start-up included (Ray is up
already and the benchmark process has imported what every arm imports; the actors and their
engines are not started). A predict arm also reports its steady rate: rows over the seconds its
busiest actor spent on chunks (serving/offline.py's per-actor summary), which is what a long job
runs at once the pool is up; the fixed start-up is the difference. Cores busy: the CPU seconds
of this process and of the actors (on chunks) over the arm's seconds; an actor reads the next
chunk and writes the last one while its engine runs, so one actor may keep more than one core
busy, and this column shows it.

Targets: predict_1 >= 0.9x the loop end to end on the wide MLP, and on the digits MLP at 10N
rows (a job of seconds; at N rows the loop's whole run, 0.7 s, is shorter than a Ray Data actor
pool's start, so that row shows the fixed cost); on the wide MLP predict_2 >= 1.7x predict_1
(2 cores). Memory: the peak RSS of the driver and of each actor process, sampled from /proc every
0.1 s, for the digits MLP at N rows and at 10N rows: flat means the 10N peaks stay within 1.25x
of the N peaks.

Writes benchmarks/results/predict.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.loop import process_status_mb

RESULTS = Path(__file__).with_name("results")
MODELS = {"wide": [2048, 2048, 2048], "digits": [128, 128]}
BATCH = 256
ROW_GROUP = 8192


def actor_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if b"PredictChunks" in handle.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


class PeakMemory:
    """Peak RSS of this process (the driver) and of the largest actor process while the block runs."""

    def __enter__(self) -> PeakMemory:
        self.driver, self.actor, self._stop = 0.0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.driver = max(self.driver, process_status_mb("VmRSS", os.getpid()))
            self.actor = max([self.actor] + [process_status_mb("VmRSS", p) for p in actor_pids()])
            time.sleep(0.1)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def write_input(path: Path, rows: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(path, pa.schema([(f"f{i}", pa.float32()) for i in range(64)])) as writer:
        for start in range(0, rows, ROW_GROUP):
            x = rng.random((min(ROW_GROUP, rows - start), 64), dtype=np.float32)
            writer.write_table(pa.table({f"f{i}": x[:, i] for i in range(64)}), row_group_size=ROW_GROUP)


def loop_arm(artifact: Path, input_path: Path, output: Path) -> int:
    """The single-process loop: read a row group, predict in batches, write its predictions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from serving.engines import load_engine

    engine = load_engine(artifact, engine="onnxruntime", device="cpu", threads=1)
    output.mkdir(parents=True, exist_ok=True)
    source, rows = pq.ParquetFile(input_path), 0
    for group in range(source.metadata.num_row_groups):
        x = np.stack([c.to_numpy() for c in source.read_row_group(group).columns], axis=1).astype(np.float32)
        predicted = np.concatenate([engine.predict(x[i : i + BATCH]).argmax(1) for i in range(0, len(x), BATCH)])
        pq.write_table(pa.table({"id": np.arange(rows, rows + len(x)), "prediction": predicted}), output / f"part-{group:06d}.parquet")
        rows += len(x)
    return rows


def predict_arm(storage: Path, name: str, hidden: list[int], input_path: Path, output: Path, actors: int) -> int:
    from cluster.config import validate_config
    from serving.offline import predict

    config = validate_config(
        {
            "name": name,
            "cluster": {"storage": str(storage)},
            "model": {"builder": "training.models:mlp", "args": {"hidden": hidden}},
            "serving": {"deployments": [{"name": "model", "engine": "onnxruntime", "cpus": 1, "threads": 1}]},
            "predict": {"actors": actors, "batch_size": BATCH, "chunk_rows": ROW_GROUP},
        }
    )
    summary = predict(config, str(input_path), output, source=str(storage / name / "bench" / "artifacts"))
    actors = summary.per_actor.values()
    return summary.rows, max(stats["seconds"] for stats in actors), sum(stats["cpu_seconds"] for stats in actors)


def measure(label: str, run: Any, *args: Any) -> dict[str, Any]:
    """Runs one arm: run(*args) returns its rows, or (rows, seconds its busiest actor was busy,
    its actors' CPU seconds). cpu_s: the CPU seconds of this process (the loop, or the predict
    driver) and of the actors, so that an arm that overlaps its work on both cores shows it."""
    started, cpu_started = time.perf_counter(), time.process_time()
    with PeakMemory() as memory:
        done = run(*args)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    rows, busy, actor_cpu = done if isinstance(done, tuple) else (done, seconds, 0.0)
    row = {"arm": label, "rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1)}
    row |= {"cpu_s": round(cpu + actor_cpu, 2), "cores": round((cpu + actor_cpu) / seconds, 2)}
    row |= {"steady_rows_per_s": round(rows / busy, 1), "startup_s": round(seconds - busy, 2)}
    row |= {"driver_peak_mb": round(memory.driver), "actor_peak_mb": round(memory.actor)}
    print(json.dumps(row), flush=True)
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | rows | arm | rows/s | vs loop | steady rows/s | steady vs loop | start-up s | cores busy "
        "| driver peak MB | actor peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in result["models"].items():
        for r in rows:
            loop = next(x for x in rows if x["arm"] == "loop" + ("_10x" if r["arm"].endswith("_10x") else ""))
            lines.append(
                f"| {model} | {r['rows']} | {r['arm']} | {r['rows_per_s']:.0f} | {r['rows_per_s'] / loop['rows_per_s']:.2f}x | "
                f"{r['steady_rows_per_s']:.0f} | {r['steady_rows_per_s'] / loop['steady_rows_per_s']:.2f}x | {r['startup_s']:.1f} | "
                f"{r['cores']:.2f} | "
                f"{r['driver_peak_mb']} | {r['actor_peak_mb'] or '-'} |"
            )
    ratios = result["ratios"]
    lines.append(
        f"\npredict_1 / loop, end to end: wide {ratios['wide_predict_1_vs_loop']:.2f}x, digits {ratios['digits_predict_1_vs_loop']:.2f}x, "
        f"digits at 10x the rows {ratios['digits_10x_predict_1_vs_loop']:.2f}x; steady: wide {ratios['wide_steady_1_vs_loop']:.2f}x, "
        f"digits {ratios['digits_steady_1_vs_loop']:.2f}x (target >= 0.9); "
        f"predict_2 / predict_1 on the wide MLP: {ratios['wide_predict_2_vs_1']:.2f}x (target >= 1.7); "
        f"digits peaks at 10x the rows / at 1x: driver {ratios['digits_driver_peak_10x']:.2f}x, actor "
        f"{ratios['digits_actor_peak_10x']:.2f}x (flat: <= 1.25x)."
    )
    lines.append(f"\nLoad average at start {result['load_average'][0]:.2f}, at end {result['load_average'][1]:.2f}.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, model in zip(axes, ("wide", "digits"), strict=True):
        rows = [r for r in result["models"][model] if r["arm"] in ("loop", "predict_1", "predict_2")]
        ax.bar([r["arm"] for r in rows], [r["rows_per_s"] for r in rows], color=["grey", "tab:blue", "tab:green"])
        ax.set_title(f"{model} MLP ({rows[0]['rows']} rows)")
        ax.set_ylabel("rows per second")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def warm_imports() -> None:
    """What the arms import, imported once before any arm, so that the first arm does not pay
    for the others (Ray Data for the predict arms, ONNX Runtime and pyarrow for all)."""
    import onnxruntime  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import ray.data  # noqa: F401

    import serving.offline  # noqa: F401


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.serving import make_artifact, start_ray

    parser = argparse.ArgumentParser(prog="python -m benchmarks predict", description=__doc__.splitlines()[0])
    parser.add_argument("--wide-rows", type=int, default=120_000)
    parser.add_argument("--digits-rows", type=int, default=500_000)
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    print(f"load average at start: {load_start:.2f}", flush=True)
    start_ray(num_cpus=4)
    warm_imports()
    scratch = Path(tempfile.mkdtemp(prefix="tandem-predict-bench-"))
    result: dict[str, Any] = {"batch_size": BATCH, "engine": "onnxruntime fp32, 1 thread", "models": {}}
    for model, rows in (("wide", args.wide_rows), ("digits", args.digits_rows)):
        artifact = make_artifact(scratch, model, MODELS[model])
        sizes = [rows, 10 * rows] if model == "digits" else [rows]
        arms = []
        for n in sizes:
            input_path = scratch / f"{model}-{n}.parquet"
            write_input(input_path, n)
            suffix = "" if n == rows else "_10x"
            arms.append(measure(f"loop{suffix}", loop_arm, artifact, input_path, scratch / f"out-{model}-loop{suffix}"))
            for actors in (1, 2):
                label = f"predict_{actors}{suffix}"
                out = scratch / f"out-{model}-{label}"
                arms.append(measure(label, predict_arm, scratch, model, MODELS[model], input_path, out, actors))
        result["models"][model] = arms
    by = {m: {r["arm"]: r for r in rows} for m, rows in result["models"].items()}
    result["ratios"] = {
        "wide_predict_1_vs_loop": by["wide"]["predict_1"]["rows_per_s"] / by["wide"]["loop"]["rows_per_s"],
        "digits_predict_1_vs_loop": by["digits"]["predict_1"]["rows_per_s"] / by["digits"]["loop"]["rows_per_s"],
        "digits_10x_predict_1_vs_loop": by["digits"]["predict_1_10x"]["rows_per_s"] / by["digits"]["loop_10x"]["rows_per_s"],
        "wide_steady_1_vs_loop": by["wide"]["predict_1"]["steady_rows_per_s"] / by["wide"]["loop"]["steady_rows_per_s"],
        "digits_steady_1_vs_loop": by["digits"]["predict_1"]["steady_rows_per_s"] / by["digits"]["loop"]["steady_rows_per_s"],
        "wide_predict_2_vs_1": by["wide"]["predict_2"]["rows_per_s"] / by["wide"]["predict_1"]["rows_per_s"],
        "digits_driver_peak_10x": by["digits"]["predict_2_10x"]["driver_peak_mb"] / by["digits"]["predict_2"]["driver_peak_mb"],
        "digits_actor_peak_10x": by["digits"]["predict_2_10x"]["actor_peak_mb"] / max(1, by["digits"]["predict_2"]["actor_peak_mb"]),
    }
    result["load_average"] = [load_start, os.getloadavg()[0]]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "predict.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "predict.md").write_text(markdown(result))
    plot(result, RESULTS / "predict.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
