"""Engines benchmark: torch eager fp32 against ONNX Runtime fp32 and int8, side by side in one run.

Per model (digits MLP, wide MLP, CNN, transformer, each trained for a few seconds on the digits so
that argmax agreement means something) and batch size (1, 8, 32, 128):

- latency: median wall time of one `predict` call; the arms are interleaved in rounds so that
  load from other processes on this shared machine hits all of them alike;
- speedup against torch eager at the same batch size;
- fraction of this machine's fp32 GEMM peak: the model's FLOPs (torch's FlopCounterMode, one
  multiply-add = 2 FLOPs) per second over a large torch.mm's, both with the same fixed threads.
  int8 does the same arithmetic in integers; its fraction says how much of the fp32 peak the
  same work would need;
- max |logit difference| and argmax agreement against eager on the held-out split.

Every arm is built by the real pipeline (save_model_artifact -> serving.optimize.export.export ->
serving.engines.load_engine), so this measures what serving runs: quantize: auto picks the int8
method. Target: ORT int8 at least 2x eager on the digits MLP at batch 8 and above, with argmax
agreement at least 99.5%.

Run: `python -m benchmarks engines [--threads N] [--quick]`; writes
benchmarks/results/engines.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).with_name("results")
BATCH_SIZES = (1, 8, 32, 128)
ARMS = ("torch-eager-fp32", "ort-fp32", "ort-int8")
# name -> builder, args, training epochs (seconds of training each on an idle 2-core CPU)
MODELS: dict[str, tuple[str, dict[str, Any], int]] = {
    "digits-mlp": ("training.models:mlp", {"hidden": [128, 128]}, 20),
    "wide-mlp": ("training.models:mlp", {"hidden": [1024, 1024]}, 4),
    "cnn": ("training.models:cnn", {"channels": [16, 32]}, 6),
    "transformer": ("training.models:transformer", {"dim": 64, "depth": 2, "heads": 4}, 4),
}
TARGET_MODEL, TARGET_SPEEDUP, TARGET_AGREEMENT, TARGET_MIN_BATCH = "digits-mlp", 2.0, 0.995, 8


# ---------------------------------------------------------------------------------------------
# machine peak and model FLOPs
# ---------------------------------------------------------------------------------------------


def gemm_peak_gflops(threads: int, n: int = 2048, seconds: float = 1.0) -> float:
    """Best fp32 GFLOP/s of an n x n torch.mm over about `seconds` (numpy's BLAS here is far slower)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        torch.mm(a, b)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * n**3 / best / 1e9


class GemmProbe:
    """A fixed torch.mm timed in the same rounds as the arms; its best run over the whole
    benchmark (with the 2048² one at the start) is the peak. On a shared machine a single
    measurement at the start can land in a busy moment and understate the peak."""

    def __init__(self, n: int = 1024):
        self.a, self.b = torch.randn(n, n), torch.randn(n, n)
        self.flops = 2 * n**3

    def predict(self, batch: np.ndarray) -> None:
        torch.mm(self.a, self.b)


def flops_per_example(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one example's forward pass (grad mode on: the counter must see the plain ops, not
    the fused inference fast path of nn.TransformerEncoderLayer)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# building the arms through the real pipeline
# ---------------------------------------------------------------------------------------------


def train_and_save(folder: Path, builder: str, args: dict[str, Any], epochs: int) -> dict[str, Any]:
    from cluster.artifacts import save_model_artifact
    from cluster.config import resolve_import_path
    from training.data import digits, split

    torch.manual_seed(0)
    train, val = split(digits(), 0.2, 0)
    model = resolve_import_path(builder)(input_shape=train.input_shape, num_classes=10, **args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            batch = order[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    spec = {"builder": builder, "args": args, "input_shape": list(train.input_shape), "num_classes": 10}
    save_model_artifact(folder, model.state_dict(), spec)
    return {
        "train_seconds": round(time.perf_counter() - started, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops": flops_per_example(model, train.input_shape),
    }


def export_arms(storage: Path, name: str, builder: str, args: dict[str, Any], threads: int) -> dict[str, Any]:
    from cluster.config import validate_config
    from serving.optimize.export import export

    config = validate_config(
        {
            "name": "bench",
            "cluster": {"storage": str(storage)},
            "model": {"builder": builder, "args": args},
            "export": {"quantize": "auto", "gate": {"max_accuracy_drop": 1.0, "min_argmax_agreement": 0.0}, "latency_batch_sizes": [32]},
        }
    )
    result = export(config, storage / "bench" / name / "artifacts", threads=threads, latency_budget_s=0.05)
    return {
        "int8_method": result.info["quantize"]["method"],
        "exporter": result.info["onnx"]["exporter"],
        "bytes": {k: v["bytes"] for k, v in result.report.items()},
    }


def load_arms(artifact: Path, threads: int) -> dict[str, Any]:
    from serving.engines import load_engine

    return {
        "torch-eager-fp32": load_engine(artifact, engine="torch", threads=threads, device="cpu"),
        "ort-fp32": load_engine(artifact, engine="onnxruntime", threads=threads, device="cpu"),
        "ort-int8": load_engine(artifact, engine="onnxruntime", quantize="int8", threads=threads, device="cpu"),
    }


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def interleaved_samples_ms(engines: dict[str, Any], batch: np.ndarray, rounds: int, seconds_per_round: float) -> dict[str, list[float]]:
    """ms per call of each engine, timed in alternating rounds (drift hits every arm alike)."""
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine.predict(batch)
        engine.predict(batch)
    for _ in range(rounds):
        for name, engine in engines.items():
            spent = 0.0
            while spent < seconds_per_round or len(samples[name]) < 3:
                start = time.perf_counter()
                engine.predict(batch)
                elapsed = time.perf_counter() - start
                samples[name].append(elapsed * 1e3)
                spent += elapsed
    return samples


def fidelity(engines: dict[str, Any], x: np.ndarray) -> dict[str, dict[str, float]]:
    reference = engines["torch-eager-fp32"].predict(x)
    out = {}
    for name, engine in engines.items():
        logits = engine.predict(x)
        out[name] = {
            "max_abs_logit_diff": float(np.abs(logits - reference).max()),
            "argmax_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
        }
    return out


def measure_model(name: str, storage: Path, threads: int, rounds: int, seconds_per_round: float) -> list[dict[str, Any]]:
    from training.data import digits, split

    builder, args, epochs = MODELS[name]
    folder = storage / "bench" / name / "artifacts"
    setup = train_and_save(folder, builder, args, epochs)
    setup.update(export_arms(storage, name, builder, args, threads))
    engines = load_arms(folder, threads)
    _, val = split(digits(), 0.2, 0)
    agree = fidelity(engines, val.x)
    probe = GemmProbe()
    rows = []
    for size in BATCH_SIZES:
        batch = np.ascontiguousarray(val.x[np.resize(np.arange(len(val.x)), size)])
        samples = interleaved_samples_ms({**engines, "gemm": probe}, batch, rounds, seconds_per_round)
        latency = {arm: float(np.median(samples[arm])) for arm in ARMS}
        probe_peak = probe.flops / (min(samples["gemm"]) / 1e3) / 1e9
        for arm in ARMS:
            gflops = setup["flops"] * size / (latency[arm] / 1e3) / 1e9
            rows.append(
                {
                    "model": name,
                    "batch": size,
                    "arm": arm,
                    "latency_ms": round(latency[arm], 5),
                    "examples_per_s": round(size / (latency[arm] / 1e3), 1),
                    "speedup_vs_eager": round(latency["torch-eager-fp32"] / latency[arm], 3),
                    "gflops": round(gflops, 3),
                    "probe_peak_gflops": round(probe_peak, 2),
                    **{k: round(v, 6) for k, v in agree[arm].items()},
                    "parameters": setup["parameters"],
                    "int8_method": setup["int8_method"],
                }
            )
    print(f"{name}: {json.dumps(setup)}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------


def target_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    int8 = [r for r in rows if r["model"] == TARGET_MODEL and r["arm"] == "ort-int8" and r["batch"] >= TARGET_MIN_BATCH]
    met = bool(int8) and all(r["speedup_vs_eager"] >= TARGET_SPEEDUP and r["argmax_agreement"] >= TARGET_AGREEMENT for r in int8)
    return {
        "target": f"ORT int8 >= {TARGET_SPEEDUP}x eager on {TARGET_MODEL} at batch >= {TARGET_MIN_BATCH}, argmax agreement >= "
        f"{TARGET_AGREEMENT}",
        "met": met,
        "speedups": {str(r["batch"]): r["speedup_vs_eager"] for r in int8},
        "argmax_agreement": int8[0]["argmax_agreement"] if int8 else None,
    }


def markdown(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    lines = [
        f"Threads: {setup['threads']}; fp32 GEMM peak: {setup['gemm_peak_gflops']:.0f} GFLOP/s (best torch.mm over the run, "
        f"{setup['threads']} thread(s)); load average {setup['load_average'][0]:.1f} at start, {setup['load_average_end'][0]:.1f} at end, "
        f"on {setup['cpus']} cores (above ~2 the machine is shared and every figure is noisier).",
        "",
        "| model | batch | torch eager fp32 ms | ORT fp32 ms (x) | ORT int8 ms (x) | int8 method | % of fp32 peak (eager / ORT fp32 / "
        "int8) | max \\|Δlogit\\| fp32 / int8 | argmax agreement int8 |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    by = {(r["model"], r["batch"], r["arm"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for size in BATCH_SIZES:
            eager, fp32, int8 = (by[(model, size, arm)] for arm in ARMS)
            peak = " / ".join(f"{100 * r['fraction_of_fp32_peak']:.1f}" for r in (eager, fp32, int8))
            lines.append(
                f"| {model} | {size} | {eager['latency_ms']:.3f} | {fp32['latency_ms']:.3f} ({fp32['speedup_vs_eager']:.2f}x) | "
                f"{int8['latency_ms']:.3f} ({int8['speedup_vs_eager']:.2f}x) | {int8['int8_method']} | {peak} | "
                f"{fp32['max_abs_logit_diff']:.1e} / {int8['max_abs_logit_diff']:.1e} | {int8['argmax_agreement']:.4f} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(3.4 * len(models), 3.4), sharey=True)
    for ax, model in zip(np.atleast_1d(axes), models, strict=True):
        for arm, color in zip(ARMS, ("#888", "#47a", "#d62"), strict=True):
            points = [(r["batch"], r["speedup_vs_eager"]) for r in rows if r["model"] == model and r["arm"] == arm]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color, label=arm)
        ax.axhline(TARGET_SPEEDUP, color="red", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(BATCH_SIZES, [str(b) for b in BATCH_SIZES])
        ax.set_title(model)
        ax.set_xlabel("batch size")
    np.atleast_1d(axes)[0].set_ylabel("speedup vs torch eager fp32")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle("Inference engines, CPU, threads fixed (red: 2x target)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks engines", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every arm and of the GEMM peak (default 1)")
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds (a smoke run, noisier figures)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS), help="models to run")
    options = parser.parse_args(argv or [])
    rounds, seconds_per_round = (2, 0.05) if options.quick else (7, 0.1)
    RESULTS.mkdir(exist_ok=True)
    setup = {
        "threads": options.threads,
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "gemm_peak_gflops_start": round(gemm_peak_gflops(options.threads), 2),
        "rounds": rounds,
        "seconds_per_round": seconds_per_round,
        "torch": torch.__version__,
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as storage:
        for name in options.models:
            rows += measure_model(name, Path(storage), options.threads, rounds, seconds_per_round)
    setup["load_average_end"] = list(os.getloadavg())
    setup["gemm_peak_gflops"] = round(max([setup["gemm_peak_gflops_start"]] + [r["probe_peak_gflops"] for r in rows]), 2)
    for row in rows:
        row["fraction_of_fp32_peak"] = round(row["gflops"] / setup["gemm_peak_gflops"], 4)
    report = {"setup": setup, "target": target_check(rows), "rows": rows}
    (RESULTS / "engines.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(rows, setup)
    (RESULTS / "engines.md").write_text(table + "\n")
    plot(rows, RESULTS / "engines.png")
    print(json.dumps(report, indent=2))
    print(table)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
