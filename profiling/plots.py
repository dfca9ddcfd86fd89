"""The PNG plots of a profile report, drawn from the report's own data (profile.json) and nothing else.

    paths = draw_plots(data, folder)     # {"latency": folder / "latency.png", ...}

matplotlib's object API (`Figure`, no pyplot): no global figure state and no display needed, so it
runs in a headless process, a test or a Ray worker alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

PLOTS = {
    "latency": "latency.png",
    "throughput": "throughput.png",
    "roofline": "roofline.png",
    "zero_memory": "zero_memory.png",
    "cost": "cost.png",
}
DPI = 100
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]


def human_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def human_flops(value: float, suffix: str = "FLOP") -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}{suffix}"
    return f"{value:.3g} {suffix}"


def human_seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.3g} h"
    if value >= 60:
        return f"{value / 60:.3g} min"
    if value >= 1:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} µs"


def _save(fig: Figure, path: Path) -> Path:
    # bbox_inches="tight" keeps legends placed outside the axes inside the image.
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")
    return path


def _legend_outside(ax: Any) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _batch_axis(ax: Any) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.grid(True, which="both", alpha=0.3)


def plot_latency(data: dict[str, Any], path: Path) -> Path:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for color, engine in zip(COLORS, data["inference"]["engines"], strict=False):
        sizes = [row["batch"] for row in engine["latency"]]
        ax.plot(sizes, [row["p50_ms"] for row in engine["latency"]], "o-", color=color, label=f"{engine['label']} p50")
        ax.plot(sizes, [row["p99_ms"] for row in engine["latency"]], ":", color=color, alpha=0.7)
    _batch_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel("latency per batch (ms); dotted: p99")
    ax.set_title(f"Inference latency vs batch size ({_thread_note(data)})")
    _legend_outside(ax)
    return _save(fig, path)


def plot_throughput(data: dict[str, Any], path: Path) -> Path:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for color, engine in zip(COLORS, data["inference"]["engines"], strict=False):
        rows = engine["latency"]
        ax.plot([r["batch"] for r in rows], [r["examples_per_s"] for r in rows], "o-", color=color, label=engine["label"])
    training = data["training"]
    ax.axhline(training["samples_per_s"], color="black", linestyle="--", label=f"training, {training['batch_size']}/step")
    _batch_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel("examples per second")
    ax.set_title(f"Throughput vs batch size ({_thread_note(data)})")
    _legend_outside(ax)
    return _save(fig, path)


def _thread_note(data: dict[str, Any]) -> str:
    threads = data["inference"].get("threads")
    return f"{threads} thread{'s' if threads != 1 else ''} per engine on CPU" if threads else "GPU"


def _roofs(data: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """(label, peak FLOP/s, bandwidth B/s, line style) of every roof at a device and thread count the measurements used."""
    machine = data["machine"]
    used = {(data["training"]["device"], data["training"]["threads"])} | {(e["device"], e["threads"]) for e in data["inference"]["engines"]}
    roofs = []
    for peak in machine["peaks"]:
        if (peak["device"], peak["threads"]) not in used:
            continue
        bandwidth = next((b for b in machine["bandwidth"] if b["device"] == peak["device"] and b["threads"] == peak["threads"]), None)
        if bandwidth is None:
            continue
        threads = f", {peak['threads']} thr" if peak["threads"] else ""
        style = "-" if peak["dtype"] == "fp32" else "--"
        roofs.append((f"{peak['device']} {peak['dtype']}{threads}", peak["flops_per_s"], bandwidth["bytes_per_s"], style))
    return roofs


def plot_roofline(data: dict[str, Any], path: Path) -> Path:
    """Achieved FLOP/s against arithmetic intensity, under roofs of measured peak and triad bandwidth."""
    import numpy as np

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    training = data["training"]
    points = [training["arithmetic_intensity"]] + [r["arithmetic_intensity"] for e in data["inference"]["engines"] for r in e["latency"]]
    roofs = _roofs(data)
    ridges = [peak / bandwidth for _, peak, bandwidth, _ in roofs]
    low = min(points + ridges) / 4
    high = max(points + ridges) * 4
    x = np.logspace(np.log10(low), np.log10(high), 200)
    for i, (label, peak, bandwidth, style) in enumerate(roofs):
        ax.plot(
            x,
            np.minimum(peak, bandwidth * x),
            style,
            color="0.25" if i % 2 == 0 else "0.55",
            linewidth=1.2,
            label=f"roof {label}: {human_flops(peak, 'FLOP/s')}, {human_bytes(bandwidth)}/s",
        )
    for color, engine in zip(COLORS, data["inference"]["engines"], strict=False):
        rows = engine["latency"]
        ax.plot(
            [r["arithmetic_intensity"] for r in rows],
            [r["achieved_flops_per_s"] for r in rows],
            "o-",
            color=color,
            markersize=4,
            label=f"{engine['label']} (batch {rows[0]['batch']}..{rows[-1]['batch']})",
        )
    ax.plot(
        [training["arithmetic_intensity"]],
        [training["achieved_flops_per_s"]],
        "*",
        color="black",
        markersize=14,
        label=f"training step (batch {training['batch_size']})",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved, estimated)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title("Roofline: measured peaks and bandwidth")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def plot_zero_memory(data: dict[str, Any], path: Path) -> Path:
    """Stacked bytes per rank for ZeRO 0-3 (formula), with the run's measured tensor bytes beside its stage."""
    zero = data["zero"]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    stages = [row["stage"] for row in zero["stages"]]
    parts = (
        ("params_bytes", "parameters", "#1f77b4"),
        ("grads_bytes", "gradients", "#ff7f0e"),
        ("optimizer_bytes", "optimizer state", "#2ca02c"),
    )
    bottom = [0.0] * len(stages)
    for key, label, color in parts:
        values = [row[key] / 1e6 for row in zero["stages"]]
        ax.bar([s - 0.2 for s in stages], values, 0.38, bottom=bottom, color=color, label=f"{label} (formula)")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    run = zero.get("run")
    if run and run.get("param_bytes") is not None:
        measured = [run["param_bytes"] / 1e6, (run.get("optimizer_bytes") or 0.0) / 1e6]
        ax.bar(
            [run["stage"] + 0.2], [measured[0]], 0.38, color="#1f77b4", hatch="//", edgecolor="black", label="parameters (measured, run)"
        )
        ax.bar(
            [run["stage"] + 0.2],
            [measured[1]],
            0.38,
            bottom=[measured[0]],
            color="#2ca02c",
            hatch="//",
            edgecolor="black",
            label="optimizer state (measured, run)",
        )
    configured = zero["configured_stage"]
    ax.annotate("configured", (configured - 0.2, bottom[configured]), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.set_xticks(stages, [f"ZeRO-{s}" for s in stages])
    ax.set_ylabel(f"MB per rank ({zero['workers']} workers, {zero['precision']}, {zero['optimizer']})")
    ax.set_title(f"Training state per rank, {zero['parameters']:,} parameters")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_cost(data: dict[str, Any], path: Path) -> Path:
    """Training vs inference cost per example, in counted FLOPs and in measured time."""
    comparison = data["comparison"]
    fig = Figure(figsize=(9, 4.2))
    left, right = fig.subplots(1, 2)
    flops = [
        ("training\n(fwd+bwd)", comparison["training_flops_per_example"]),
        ("inference\n(fwd)", comparison["inference_flops_per_example"]),
    ]
    left.bar([f[0] for f in flops], [f[1] for f in flops], color=["#444444", "#1f77b4"])
    for i, (_, value) in enumerate(flops):
        left.annotate(human_flops(value), (i, value), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    left.set_ylabel("FLOPs per example")
    left.set_title(f"Compute: training = {comparison['flops_ratio']:.2f}x inference")
    times = [
        ("training\nstep", comparison["training_s_per_example"]),
        (f"inference\nbatch 1\n{comparison['best_batch1_engine']}", comparison["inference_s_per_example_batch1"]),
        (
            f"inference\nbatch {comparison['best_throughput_batch']}\n{comparison['best_throughput_engine']}",
            comparison["inference_s_per_example_best"],
        ),
    ]
    right.bar(range(len(times)), [t[1] * 1e6 for t in times], color=["#444444", "#1f77b4", "#2ca02c"])
    right.set_xticks(range(len(times)), [t[0] for t in times], fontsize=8)
    for i, (_, value) in enumerate(times):
        right.annotate(human_seconds(value), (i, value * 1e6), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("µs per example (one core)")
    right.set_title(f"One epoch = {comparison['inferences_per_epoch_by_time_batch1']:,.0f} single inferences")
    return _save(fig, path)


DRAWERS = {
    "latency": plot_latency,
    "throughput": plot_throughput,
    "roofline": plot_roofline,
    "zero_memory": plot_zero_memory,
    "cost": plot_cost,
}


def draw_plots(data: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Every plot of the report into `folder`; returns {name: path}."""
    return {name: DRAWERS[name](data, Path(folder) / filename) for name, filename in PLOTS.items()}
