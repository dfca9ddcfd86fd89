"""The written forms of a profile: profile.json, a self-contained profile.html and rich tables.

The HTML needs no network: inline CSS, no scripts from elsewhere, and the PNG plots beside it
referenced by relative path (the report folder moves as a whole). A small inline script marks
`<body data-images="loaded">` (and the title) once every image has loaded with a non-zero size,
or "broken" when one has not, so a headless browser can check the page by reading its DOM.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from cluster.artifacts import atomic_write_json, atomic_write_text
from cluster.storage import Location, location
from profiling.plots import human_bytes, human_flops, human_seconds

CAPTIONS = {
    "cost": "Training vs inference cost per example: counted FLOPs (left) and measured time on one core (right).",
    "latency": "Latency per batch by engine: p50 (solid) and p99 (dotted).",
    "throughput": "Examples per second by engine and batch size; the dashed line is the training step's throughput.",
    "roofline": "Achieved FLOP/s against arithmetic intensity, under the measured peak (flat) and triad bandwidth (slope).",
    "zero_memory": "Parameters, gradients and optimizer state per rank at each ZeRO stage (formula), and the run's measured bytes.",
}


def write_json(data: dict[str, Any], path: Path) -> None:
    atomic_write_json(path, data)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ms(value: float) -> str:
    return f"{value:.3g}"


# ---------------------------------------------------------------------------------------------
# rows shared by the HTML and the terminal
# ---------------------------------------------------------------------------------------------


def machine_rows(data: dict[str, Any]) -> list[list[str]]:
    machine = data["machine"]
    rows = []
    for peak in machine["peaks"]:
        bandwidth = next((b for b in machine["bandwidth"] if b["device"] == peak["device"] and b["threads"] == peak["threads"]), None)
        rows.append(
            [
                peak["device"],
                str(peak["threads"] or "-"),
                peak["dtype"],
                f"{human_flops(peak['flops_per_s'], 'FLOP/s')} ({peak['op']}, {peak['size']}²)",
                f"{human_bytes(bandwidth['bytes_per_s'])}/s" if bandwidth else "-",
            ]
        )
    return rows


def training_rows(data: dict[str, Any]) -> list[list[str]]:
    t = data["training"]
    rows = [
        ["parameters", f"{t['parameters']:,}"],
        ["FLOPs per example, forward + backward (counted)", human_flops(t["flops_per_example"])],
        ["FLOPs per example, forward", human_flops(t["forward_flops_per_example"])],
        [
            "step (in process)",
            f"{t['step_s'] * 1e3:.3g} ms at batch {t['batch_size']}, {t['optimizer']}, {t['precision']}, "
            f"{t['device']} {t['threads'] or ''}{' thread' if t['threads'] else ''}",
        ],
        ["samples/s per worker", f"{t['samples_per_s']:,.0f}"],
        [
            "achieved / peak",
            f"{human_flops(t['achieved_flops_per_s'], 'FLOP/s')} / "
            f"{human_flops(t['peak_flops_per_s'], 'FLOP/s') if t['peak_flops_per_s'] else '-'} ({_pct(t['fraction_of_peak'])})",
        ],
        [
            "epoch (estimate)",
            f"{human_seconds(t['epoch_s'])}: {t['micro_batches_per_epoch']} micro-batches per worker, {t['workers']} workers"
            + (f", {t['core_sharing']:.1f} workers per core" if t["core_sharing"] > 1 else ""),
        ],
        ["configured run (estimate)", f"{human_seconds(t['run_s'])} for {t['epochs']} epochs"],
    ]
    run = t.get("run")
    if run and run.get("step_time_s"):
        rows.append(
            [
                "run (measured)",
                f"{run['step_time_s'] * 1e3:.3g} ms per step, {run['samples_per_s']:,.0f} samples/s over "
                f"{run['world_size']} workers, epoch {human_seconds(run.get('epoch_s') or 0)} "
                f"({run.get('step_time_vs_in_process', 0):.1f}x the in-process step)",
            ]
        )
    return rows


def zero_rows(data: dict[str, Any]) -> list[list[str]]:
    zero = data["zero"]
    run = zero.get("run")
    rows = []
    for row in zero["stages"]:
        measured = "-"
        if run and run["stage"] == row["stage"]:
            formula = run.get("formula") or {}
            measured = (
                f"params {human_bytes(run['param_bytes'])} (formula {human_bytes(formula.get('params', 0))}), "
                f"optimizer {human_bytes(run['optimizer_bytes'] or 0)} (formula {human_bytes(formula.get('optimizer', 0))})"
            )
        mark = " (configured)" if row["stage"] == zero["configured_stage"] else ""
        rows.append(
            [
                f"ZeRO-{row['stage']}{mark}",
                human_bytes(row["params_bytes"]),
                human_bytes(row["grads_bytes"]),
                human_bytes(row["optimizer_bytes"]),
                human_bytes(row["total_bytes"]),
                measured,
            ]
        )
    return rows


def inference_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    sizes = data["inference"]["batch_sizes"]
    header = ["engine", "device", "FLOPs/ex", "weights"] + [f"b={s} p50/p99 ms" for s in sizes] + ["best ex/s", "best % of peak"]
    rows = []
    for engine in data["inference"]["engines"]:
        by_batch = {r["batch"]: r for r in engine["latency"]}
        best = max(engine["latency"], key=lambda r: r["examples_per_s"])
        cells = [
            engine["label"],
            engine["device"],
            human_flops(engine["forward_flops_per_example"]),
            human_bytes(engine["memory"]["weights_bytes"]),
        ]
        cells += [f"{_ms(by_batch[s]['p50_ms'])}/{_ms(by_batch[s]['p99_ms'])}" if s in by_batch else "-" for s in sizes]
        cells += [f"{best['examples_per_s']:,.0f} (b={best['batch']})", _pct(best["fraction_of_peak"])]
        rows.append(cells)
    return header, rows


def comparison_rows(data: dict[str, Any]) -> list[list[str]]:
    c = data["comparison"]
    return [
        [
            "FLOPs per example",
            human_flops(c["training_flops_per_example"]),
            human_flops(c["inference_flops_per_example"]),
            f"{c['flops_ratio']:.2f}x",
        ],
        [
            "time per example, batch 1",
            human_seconds(c["training_s_per_example"]),
            f"{human_seconds(c['inference_s_per_example_batch1'])} ({c['best_batch1_engine']})",
            f"{c['time_ratio_batch1']:.2f}x",
        ],
        [
            "time per example, best batch",
            human_seconds(c["training_s_per_example"]),
            f"{human_seconds(c['inference_s_per_example_best'])} ({c['best_throughput_engine']}, b={c['best_throughput_batch']})",
            f"{c['time_ratio_best']:.2f}x",
        ],
        [
            "one epoch = inferences",
            f"{c['inferences_per_epoch_by_flops']:,.0f} by FLOPs",
            f"{c['inferences_per_epoch_by_time_batch1']:,.0f} at batch 1 / {c['inferences_per_epoch_by_time_best']:,.0f} batched, by time",
            "",
        ],
    ]


def served_rows(data: dict[str, Any]) -> list[list[str]]:
    served = data.get("served") or {}
    return [
        [
            str(level["concurrency"]),
            str(level["requests"]),
            str(level["requests"] - level["ok"]),
            _ms(level["p50_ms"]),
            _ms(level["p99_ms"]),
            f"{level['requests_per_s']:,.0f}",
        ]
        for level in served.get("levels") or []
    ]


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.88rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; white-space: nowrap; }
.scroll { overflow-x: auto; max-width: 100%; }
.notes { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5rem 1rem; }
.rec li { margin-bottom: 0.5rem; } .figure { color: #555; font-size: 0.85rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85rem; }
"""

IMAGE_CHECK = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', String(loaded));
  document.body.setAttribute('data-images', loaded === images.length ? 'loaded' : 'broken');
  document.title = document.title + (loaded === images.length ? ' [images loaded]' : ' [images broken]');
});
"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    # Wide tables (eight batch sizes) scroll inside their own box instead of widening the page.
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _figure(data: dict[str, Any], name: str) -> str:
    filename = data["plots"][name]
    caption = CAPTIONS[name]
    return (
        f'<figure><img src="{html.escape(filename)}" alt="{html.escape(caption)}" data-plot="{html.escape(name)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _source_line(data: dict[str, Any]) -> str:
    source = data["source"]
    model = source["model"]
    what = f"trained artifact {source['artifact_dir']}" if source["trained"] else "untrained model built from the config"
    return f"{model.get('builder')} {json.dumps(model.get('args', {}))} — {what}"


def _machine_line(data: dict[str, Any]) -> str:
    m = data["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return f"{m['cpu']}, {m['cores']} cores, {human_bytes(m['memory_bytes'])}{gpu}; load average {m['load_average']:.1f}; {versions}"


def render_html(data: dict[str, Any]) -> str:
    title = f"Tandem profile: {data['name']}"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data["notes"])
    recs = "".join(
        f"<li><b>{html.escape(r['topic'])}</b>: {html.escape(r['advice'])}<div class='figure'>rests on: "
        f"{html.escape(r['figure'])}</div></li>"
        for r in data["recommendations"]
    )
    inference_header, inference_body = inference_rows(data)
    served = ""
    if data.get("served"):
        served = f"<h2>Served end to end</h2><p>{html.escape(str(data['served']['url']))}, one example per request</p>" + _table(
            ["concurrency", "requests", "not ok", "p50 ms", "p99 ms", "requests/s"], served_rows(data)
        )
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='sub'>{html.escape(_source_line(data))}<br>{html.escape(_machine_line(data))}<br>"
        f"generated {html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}{' (quick)' if data['quick'] else ''}</p>",
        f"<div class='notes'><ul>{notes}</ul></div>" if notes else "",
        f"<h2>Recommendations</h2><ol class='rec'>{recs}</ol>",
        "<h2>Training vs inference</h2>"
        + _table(["per example", "training", "inference", "training / inference"], comparison_rows(data))
        + _figure(data, "cost"),
        "<h2>Machine limits</h2>" + _table(["device", "threads", "dtype", "GEMM peak", "triad bandwidth"], machine_rows(data)),
        "<h2>Training</h2>" + _table(["", "value"], training_rows(data)),
        "<h2>Memory per ZeRO stage (per rank)</h2>"
        + _table(["stage", "parameters", "gradients", "optimizer", "total", "measured in the run"], zero_rows(data))
        + _figure(data, "zero_memory"),
        "<h2>Inference</h2>" + _table(inference_header, inference_body) + _figure(data, "latency") + _figure(data, "throughput"),
        served,
        "<h2>Roofline</h2>" + _figure(data, "roofline"),
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body data-images='pending'>\n{''.join(sections)}\n<script>{IMAGE_CHECK}</script>\n</body></html>\n"
    )


def write_html(data: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, render_html(data))


# ---------------------------------------------------------------------------------------------
# terminal
# ---------------------------------------------------------------------------------------------


def _rich_table(title: str, header: list[str], rows: list[list[str]]) -> Any:
    from rich.table import Table

    from cluster.tables import readable

    table = Table(title=title, title_justify="left", show_lines=False)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*[str(c) for c in row])
    return readable(table)  # in a log: records, not cells cut to "…"


def summary(data: dict[str, Any], out_dir: Path | Location | None = None) -> Any:
    """The report as rich renderables, for `console.print`."""
    from rich.console import Group
    from rich.text import Text

    inference_header, inference_body = inference_rows(data)
    parts: list[Any] = [
        Text(f"tandem profile: {_source_line(data)}", style="bold"),
        Text(_machine_line(data), style="dim"),
        _rich_table("Machine limits", ["device", "threads", "dtype", "GEMM peak", "triad bandwidth"], machine_rows(data)),
        _rich_table("Training", ["", "value"], training_rows(data)),
        _rich_table(
            "ZeRO state per rank", ["stage", "parameters", "gradients", "optimizer", "total", "measured in the run"], zero_rows(data)
        ),
        _rich_table("Inference (latency per batch)", inference_header, inference_body),
    ]
    if data.get("served"):
        parts.append(
            _rich_table(
                f"Served: {data['served']['url']}",
                ["concurrency", "requests", "not ok", "p50 ms", "p99 ms", "requests/s"],
                served_rows(data),
            )
        )
    parts.append(_rich_table("Training vs inference", ["per example", "training", "inference", "ratio"], comparison_rows(data)))
    recs = Text("Recommendations\n", style="bold")
    for i, rec in enumerate(data["recommendations"], 1):
        recs.append(f"{i}. {rec['topic']}: {rec['advice']}\n")
        recs.append(f"   rests on: {rec['figure']}\n", style="dim")
    parts.append(recs)
    if data["notes"]:
        parts.append(Text("Notes\n" + "\n".join(f"- {n}" for n in data["notes"]), style="yellow"))
    if out_dir is not None:
        parts.append(Text(f"report: {location(out_dir) / 'profile.html'}", style="bold green"))
    return Group(*parts)
