"""Training benchmark: the cost of Tandem's Ray Train + DeepSpeed path against plain torch.

Arms, side by side in one run, on the same MLP, the same synthetic data and the same number of
steps, each rank with one intra-op thread:
- raw:    a single-process torch loop (1 rank, the same per-rank micro-batch)
- ddp:    torch DistributedDataParallel over gloo, 2 ranks (torch.multiprocessing)
- zero1/2/3: Tandem (Ray Train TorchTrainer + DeepSpeed) with 2 workers

Reported: steady-state step time (warm-up epoch skipped) as a ratio to DDP, start-up time (process
start to the first step) separately, and per-rank parameter / optimizer bytes against the ZeRO
formula. Writes benchmarks/results/training.{json,md,png}. Run: `python -m benchmarks training`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).with_name("results")
HIDDEN = [512, 512]
FEATURES, CLASSES, SAMPLES = 256, 10, 8192
BATCH = 64
EPOCHS = 4  # the first is warm-up
STEPS = 40  # per epoch


def _data():
    from training.data import synthetic

    return synthetic(samples=SAMPLES, features=FEATURES, classes=CLASSES, seed=0)


def _model():
    from training.models import mlp

    torch.manual_seed(0)
    return mlp((FEATURES,), CLASSES, hidden=HIDDEN)


def _epoch_times(model, optimizer, x, y, rank, world, epochs=EPOCHS, steps=STEPS):
    times = []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(epoch * 100 + rank)
        order = torch.randperm(len(y), generator=g)
        started = time.perf_counter()
        for s in range(steps):
            idx = order[s * BATCH : (s + 1) * BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        times.append((time.perf_counter() - started) / steps)
    return times


def arm_raw() -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = _data()
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    startup = time.perf_counter() - started
    times = _epoch_times(model, optimizer, x, y, 0, 1)
    return {"arm": "raw", "ranks": 1, "startup_s": startup, "step_time_s": sum(times[1:]) / len(times[1:])}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    started = time.perf_counter()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = _data()
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    startup = time.perf_counter() - started
    times = _epoch_times(model, optimizer, x, y, rank, world)
    if rank == 0:
        Path(out).write_text(json.dumps({"startup_s": startup, "times": times}))
    dist.destroy_process_group()


def arm_ddp() -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp(suffix=".json")
    started = time.perf_counter()
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    wall = time.perf_counter() - started
    result = json.loads(Path(out).read_text())
    times = result["times"]
    return {"arm": "ddp", "ranks": 2, "startup_s": result["startup_s"], "wall_s": wall, "step_time_s": sum(times[1:]) / len(times[1:])}


def arm_tandem(stage: int, storage: Path) -> dict:
    from cluster.artifacts import load_model
    from cluster.config import load_config
    from training.ds_config import zero_memory_formula
    from training.models import parameter_count
    from training.trainer import train

    config = load_config(
        None,
        [
            f"cluster.storage={storage}",
            "data.source=training.data:synthetic",
            f"data.args={{samples: {SAMPLES}, features: {FEATURES}, classes: {CLASSES}}}",
            f"data.batch_size={BATCH}",
            "data.augment=[]",
            "data.val_fraction=0.05",
            f"model.args.hidden={HIDDEN}",
            f"training.epochs={EPOCHS}",
            f"training.max_steps_per_epoch={STEPS}",
            f"training.deepspeed.zero_stage={stage}",
            "training.schedule.name=constant",
            f"training.checkpoint.every_epochs={EPOCHS}",
            "training.optimizer.weight_decay=0",
        ],
    )
    started = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - started
    history = result.history
    steady = [h["step_time_s"] for h in history[1:]]
    n_params = parameter_count(load_model(result.artifact_dir)[0])
    formula = zero_memory_formula(n_params, 2, stage)
    return {
        "arm": f"zero{stage}",
        "ranks": 2,
        "wall_s": wall,
        "startup_s": wall - sum(h["step_time_s"] * STEPS for h in history),
        "step_time_s": sum(steady) / len(steady),
        "param_bytes_per_rank": result.metrics["param_bytes_per_rank"],
        "optimizer_bytes_per_rank": result.metrics["optimizer_bytes_per_rank"],
        "formula_param_bytes": formula["params"],
        "formula_optimizer_bytes": formula["optimizer"],
        "params": n_params,
    }


def markdown(rows: list[dict]) -> str:
    ddp = next(r for r in rows if r["arm"] == "ddp")["step_time_s"]
    lines = [
        "| arm | ranks | step time (ms) | vs DDP | start-up (s) | params/rank (measured / formula) | optimizer state/rank (measured / "
        "formula) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = ("", "")
        if "param_bytes_per_rank" in r:
            mem = (
                f"{r['param_bytes_per_rank'][0] / 1e6:.2f} / {r['formula_param_bytes'] / 1e6:.2f} MB",
                f"{r['optimizer_bytes_per_rank'][0] / 1e6:.2f} / {r['formula_optimizer_bytes'] / 1e6:.2f} MB",
            )
        lines.append(
            f"| {r['arm']} | {r['ranks']} | {r['step_time_s'] * 1e3:.1f} | {r['step_time_s'] / ddp:.2f}x | {r['startup_s']:.1f} | {mem[0]} "
            f"| {mem[1]} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ddp = next(r for r in rows if r["arm"] == "ddp")["step_time_s"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["arm"] for r in rows], [r["step_time_s"] / ddp for r in rows], color=["#888", "#4a7", "#47a", "#36c", "#25d"][: len(rows)])
    ax.axhline(1.10, color="red", linestyle="--", label="target: ZeRO-1 <= 1.10x DDP")
    ax.set_ylabel("steady-state step time / DDP")
    ax.set_title(f"MLP {FEATURES}-{HIDDEN}-{CLASSES}, batch {BATCH}/rank, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    RESULTS.mkdir(exist_ok=True)
    rows = [arm_raw(), arm_ddp()]
    with tempfile.TemporaryDirectory() as storage:
        for stage in (1, 2, 3):
            rows.append(arm_tandem(stage, Path(storage)))
    report = {
        "rows": rows,
        "setup": {
            "hidden": HIDDEN,
            "features": FEATURES,
            "batch_per_rank": BATCH,
            "epochs": EPOCHS,
            "steps_per_epoch": STEPS,
            "cpus": os.cpu_count(),
        },
    }
    (RESULTS / "training.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "training.md").write_text(markdown(rows) + "\n")
    plot(rows, RESULTS / "training.png")
    print(json.dumps(report, indent=2))
    print(markdown(rows))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
