"""The serving benchmark's report (benchmarks/serving.py): ratios against the peers, the issue's
targets, the markdown tables and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAN = float("nan")
BASELINES = ("litserve", "plain")
# The targets, on the wide model: (what, threshold). Computed, printed and stored; not asserted.
TARGETS = {
    "c32_tandem_default_throughput_vs_litserve": (">=", 2.0),
    "c32_tandem_default_p99_vs_litserve": ("<=", 1.0),
    "c1_tandem_v1_p50_vs_plain": ("<=", 1.2),
    "c1_tandem_v2_p50_vs_plain": ("<=", 1.2),
    "c1_tandem_default_p50_vs_plain": ("<=", 1.2),
    "c32_tandem_v2_cpu_outside_forward_ms_per_request": ("<=", 0.5),
}


def ratio(a: float, b: float) -> float:
    return a / b if b and b == b else NAN  # b == b: not nan


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's requests/s, p50, p99 and CPU per request over the same level's litserve and plain rows."""
    by_level = {(r["model"], r["arm"], r["concurrency"]): r for r in rows}
    for row in rows:
        for baseline in BASELINES:
            base = by_level.get((row["model"], baseline, row["concurrency"]))
            for key, name in (("requests_per_s", "throughput"), ("p50_ms", "p50"), ("p99_ms", "p99"), ("server_cpu_ms_per_request", "cpu")):
                row[f"{name}_vs_{baseline}"] = ratio(row[key], base[key]) if base else NAN


def targets(rows: list[dict[str, Any]], model: str = "wide") -> dict[str, Any]:
    """The targets' values and whether each is met, on `model` (the first model measured when
    `model` was not: a --quick run reports them on digits, labelled)."""
    measured = [r["model"] for r in rows]
    if model not in measured:
        if not measured:
            return {}
        model = measured[0]
    at = {(r["arm"], r["concurrency"]): r for r in rows if r["model"] == model}

    def value(arm: str, concurrency: int, key: str) -> float:
        return at[(arm, concurrency)][key] if (arm, concurrency) in at else NAN

    values = {
        "c32_tandem_default_throughput_vs_litserve": value("tandem_default", 32, "throughput_vs_litserve"),
        "c32_tandem_default_p99_vs_litserve": value("tandem_default", 32, "p99_vs_litserve"),
        "c1_tandem_v1_p50_vs_plain": value("tandem_v1", 1, "p50_vs_plain"),
        "c1_tandem_v2_p50_vs_plain": value("tandem_v2", 1, "p50_vs_plain"),
        "c1_tandem_default_p50_vs_plain": value("tandem_default", 1, "p50_vs_plain"),
        "c32_tandem_v2_cpu_outside_forward_ms_per_request": value("tandem_v2", 32, "cpu_outside_forward_ms_per_request"),
    }
    out: dict[str, Any] = {"model": model}
    for name, (op, threshold) in TARGETS.items():
        v = values[name]
        met = None if v != v else (v >= threshold if op == ">=" else v <= threshold)  # None: not measured
        out[name] = {"value": v, "target": f"{op} {threshold}", "met": met}
    return out


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    setup, rows = report["setup"], report["rows"]
    load = setup["load_average_1m"]
    lines = [
        "## Serving benchmark" + (" (--quick smoke run)" if setup["quick"] else ""),
        "",
        f"Load average (1 min) {load['start']:.2f} at start, {load['end']:.2f} at end; {setup['cpus']} CPUs; "
        f"{setup['minutes']:.1f} minutes; requests per level {setup['requests']}.",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += model_table(model, [r for r in rows if r["model"] == model], report["engines"].get(model, {}))
    lines += ["", f"Targets ({report['targets'].get('model', 'n/a')} model; computed, not asserted):", ""]
    for name, target in report["targets"].items():
        if name != "model":
            met = {True: "met", False: "missed", None: "not measured"}[target["met"]]
            lines.append(f"- {name}: {fmt(target['value'], 2)} (target {target['target']}): {met}")
    estimated = sorted({r["arm"] for r in rows if r["forward_source"] != "measured"})
    if estimated:
        lines.append(f"\nForward time estimated from engine_latency_ms (the server cannot time it) for: {', '.join(estimated)}.")
    return "\n".join(lines) + "\n"


def model_table(model: str, rows: list[dict[str, Any]], engine: dict[str, float]) -> list[str]:
    lines = [
        "",
        f"### {model} (engine alone: {fmt(engine.get('batch_1_ms', NAN), 2)} ms at batch 1, "
        f"{fmt(engine.get('batch_32_ms', NAN), 2)} ms at batch 32)",
        "",
        "| arm | c | req/s | p50 ms | p99 ms | refused / failed | mean batch | server cores | server CPU ms/req "
        "| outside forward ms/req | vs litserve: req/s, p99 | vs plain: req/s, p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        arm = r["arm"] if r.get("replicas", 1) == 1 else f"{r['arm']} ({r['replicas']} replicas)"
        lines.append(
            f"| {arm} | {r['concurrency']} | {r['requests_per_s']:.0f} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | "
            f"{r['refused']} / {r['failed']} | {fmt(r['mean_batch_size'])} | {fmt(r['server_cores'], 2)} | "
            f"{fmt(r['server_cpu_ms_per_request'], 2)} | {fmt(r['cpu_outside_forward_ms_per_request'], 2)} | "
            f"{fmt(r['throughput_vs_litserve'], 2)}x, {fmt(r['p99_vs_litserve'], 2)}x | "
            f"{fmt(r['throughput_vs_plain'], 2)}x, {fmt(r['p50_vs_plain'], 2)}x |"
        )
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per model: requests/s (solid, left axis) and p99 (dashed, right axis) against
    concurrency, one colour per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(7 * max(1, len(models)), 5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        latency_ax = ax.twinx()
        for index, arm in enumerate(dict.fromkeys(r["arm"] for r in rows if r["model"] == model)):
            points = sorted((r for r in rows if r["model"] == model and r["arm"] == arm), key=lambda r: r["concurrency"])
            levels, color = [p["concurrency"] for p in points], f"C{index}"
            ax.plot(levels, [p["requests_per_s"] for p in points], "-o", color=color, label=arm)
            latency_ax.plot(levels, [p["p99_ms"] for p in points], "--x", color=color)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["concurrency"] for r in rows if r["model"] == model})
        ax.set_xticks(ticks, [str(c) for c in ticks])
        latency_ax.set_yscale("log")
        ax.set_xlabel("concurrency (closed-loop clients)")
        ax.set_ylabel("requests/s (solid)")
        latency_ax.set_ylabel("p99 latency, ms (dashed)")
        ax.set_title(f"{model}: one example per request")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
