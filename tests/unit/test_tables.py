"""Tables in a log (cluster/tables.py): printed to 80 columns without a terminal (a pipe, CI), every
table Tandem prints keeps every value whole; a terminal and a wide console still get the table."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from cluster.tables import Readable
from serving.loadgen import LoadResult
from serving.optimize.parity import format_report
from tandem.pipeline import RunSummary, summary_table
from tuning.results import TrialSummary, pick_best, results_table

CUT = "…"  # what rich puts at the end of a cell too narrow for it


TORCH_MS = {"1": 0.052, "32": 0.31, "256": 1.9}


def parity_report() -> dict:
    def entry(engine: str, nbytes: int, accuracy: float, drop: float, diff: float, latency: dict[str, float]) -> dict:
        return {
            "engine": engine,
            "bytes": nbytes,
            "accuracy": accuracy,
            "accuracy_drop": drop,
            "argmax_agreement": 1.0 - drop,
            "max_abs_logit_diff": diff,
            "mean_abs_logit_diff": diff / 4,
            "latency_ms": latency,
            "speedup": {size: TORCH_MS[size] / latency_ms for size, latency_ms in latency.items()},  # over model.pt
        }

    return {
        "model.pt": entry("torch", 431_211, 0.9750, 0.0, 0.0, TORCH_MS),
        "model.onnx": entry("onnxruntime", 430_002, 0.9750, 0.0, 2.4e-6, {"1": 0.021, "32": 0.12, "256": 0.76}),
        "model.int8.onnx": entry("onnxruntime", 112_640, 0.9722, 0.0028, 0.031, {"1": 0.019, "32": 0.09}),
    }


def trials() -> list[TrialSummary]:
    def trial(trial_id: str, lr: float, status: str, loss: float | None, exploited_from: list[str]) -> TrialSummary:
        return TrialSummary(
            trial_id=trial_id,
            params={"training.optimizer.lr": lr, "model.args.hidden_sizes": [256, 128], "data.augment.noise_std": 0.05},
            status=status,
            epochs_trained=3,
            epochs_reported=3,
            last_epoch=3,
            metric=loss,
            best_metric=loss,
            path=f"/runs/digits/tune/{trial_id}",
            checkpoint=f"/runs/digits/tune/{trial_id}/checkpoint_000002",
            exploited_from=exploited_from,
        )

    return [
        trial("train_fn_8f3a1_00000", 1e-3, "completed", 0.1123, []),
        trial("train_fn_8f3a1_00001", 3e-2, "stopped", 0.4501, ["train_fn_8f3a1_00000"]),
        trial("train_fn_8f3a1_00002", 1e-1, "error", None, []),
    ]


def run_summary() -> RunSummary:
    load = LoadResult(8, 300, 297, 3, 0, {"200": 297, "503": 3}, 1412.0, 4.8, 17.3, 40.2, 0.21)
    return RunSummary(
        artifact_dir=Path("/home/someone/tandem/runs/digits/20261207-120102-3f9a/artifacts"),
        train_metrics={"val_accuracy": 0.975, "val_loss": 0.0912, "step": 300},
        parity={"model.onnx": {"accuracy": 0.975, "argmax_agreement": 1.0}},
        url="http://127.0.0.1:8000/digits",
        served_match=1.0,
        served_version="3f9a2c81d0e4",
        load=load,
        timings_s={"train": 17.2, "export": 4.1, "serve": 6.3, "load": 1.0},
    )


TABLES = {
    "parity": lambda: format_report(parity_report()),
    "tuning": lambda: results_table(trials(), pick_best(trials(), "min"), "val_loss", "min", "tuning digits: 3 trials"),
    "run summary": lambda: summary_table(run_summary()),
}


def printed(renderable: Readable, width: int = 80, terminal: bool = False) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=terminal, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def cells(renderable: Readable) -> list[str]:
    """The plain text of every header, cell and the title, markup read as printing reads it."""
    console = Console()
    table = renderable.table
    texts = [str(table.title)] + [console.render_str(str(c.header)).plain for c in table.columns]
    texts += [console.render_str(cell).plain for column in table.columns for cell in column.cells]
    return [text for text in texts if text]


def words(text: str) -> str:
    return " ".join(text.split())  # a long value may wrap onto the next line


@pytest.mark.parametrize("name", list(TABLES))
def test_a_table_in_an_80_column_log_cuts_no_cell_and_shows_every_value(name):
    renderable = TABLES[name]()
    text = printed(renderable)
    assert CUT not in text, text
    assert all(len(line) <= 80 for line in text.splitlines()), text
    for value in cells(renderable):
        assert words(value) in words(text), (value, text)


def test_the_parity_log_prints_one_record_per_artifact_with_every_batch_size():
    text = printed(format_report(parity_report()))
    records = text.split("\n- ")
    assert len(records) == 1 + 3, text  # the title, then the artifacts
    assert "- artifact: model.int8.onnx\n  engine: onnxruntime\n" in text
    assert records[2].endswith("  batch 256 ms (x): 0.760 (2.50)")
    assert "  batch 256 ms (x): -\n" in records[3]  # the int8 model was not timed at 256: said, as in the table


def test_a_key_value_table_prints_one_line_per_row():
    text = printed(summary_table(run_summary()))
    assert "\nserved == artifact: 100.0% of held-out examples\n" in text
    assert "\nlatency: p50 4.8 ms, p99 17.3 ms, 1412 req/s\n" in text


@pytest.mark.parametrize("name", list(TABLES))
def test_a_terminal_and_a_wide_log_still_get_the_table(name):
    for text in (printed(TABLES[name](), width=80, terminal=True), printed(TABLES[name](), width=400)):
        assert "┃" in text or "│" in text, text
