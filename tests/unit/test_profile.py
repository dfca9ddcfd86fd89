"""`tandem profile` on the digits MLP: the report, its counts and formulas, its plots, its HTML, its failures.

Real torch and onnxruntime, a real loopback HTTP server for the served figures, a real headless
Chromium for the HTML, a real S3 server on loopback (moto) for a run and its report in a bucket;
no Ray. Every profile runs with quick=True (small matrices, three batch sizes, short budgets):
the figures are rough, the structure and the counts are exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cluster.artifacts import atomic_save_torch, write_manifest
from cluster.config import ConfigError, load_config
from cluster.storage import downloads, fetch_folder, location
from profiling.measure import forward_flops, probe_serve_app, served_latency, training_flops
from profiling.plots import PLOTS
from profiling.profile import ProfileReport, profile, write_atomically, write_report
from tests.conftest import run_chromium, screenshot
from tests.unit.artifact_helpers import MLP_ARGS, train_artifact
from training.ds_config import zero_memory_formula
from training.models import mlp, parameter_count

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DIGITS_MLP = (64, 128, 128, 10)  # the packaged example: 64 pixels, hidden [128, 128], 10 classes
# Per-rank tensor bytes as a real 2-worker ZeRO-2 fp32 run of the packaged example logged them
# (training.loop._rank_state_bytes): parameters whole, AdamW moments halved, plus 8 bytes of
# DeepSpeed's alignment padding on the flat optimizer partition.
RUN_METRICS = [
    {
        "epoch": 1,
        "step": 22,
        "train_loss": 2.13,
        "val_loss": 1.57,
        "val_accuracy": 0.75,
        "samples_per_s": 1365.8,
        "step_time_s": 0.0469,
        "world_size": 2,
        "optimizer_bytes_per_rank": [104496.0, 104496.0],
        "param_bytes_per_rank": [104488.0, 104488.0],
    },
    {
        "epoch": 2,
        "step": 44,
        "train_loss": 0.93,
        "val_loss": 0.68,
        "val_accuracy": 0.86,
        "samples_per_s": 1905.9,
        "step_time_s": 0.0336,
        "world_size": 2,
        "optimizer_bytes_per_rank": [104496.0, 104496.0],
        "param_bytes_per_rank": [104488.0, 104488.0],
    },
]


def hand_count(widths: tuple[int, ...]) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs per example of an MLP with these layer widths.

    A Linear layer's forward is one product of 2 * in * out FLOPs; its backward is two (input
    gradient and weight gradient), except the first layer's, whose input needs no gradient.
    Bias adds and ReLUs are not products and are not counted (well under 1% here).
    """
    layers = list(zip(widths[:-1], widths[1:], strict=True))
    forward = sum(2 * a * b for a, b in layers)
    backward = 2 * layers[0][0] * layers[0][1] + sum(4 * a * b for a, b in layers[1:])
    return forward, forward + backward


# ---------------------------------------------------------------------------------------------
# fixtures: an untrained profile, and a trained one with ONNX, int8, pruned, distilled and a run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> ProfileReport:
    storage = tmp_path_factory.mktemp("untrained")
    return profile(load_config(None, [f"cluster.storage={storage}"]), quick=True)


def add_onnx_files(folder: Path, pruned: bool = True) -> None:
    """model.onnx (legacy exporter: 0.1 s, not dynamo's seconds), model.int8.onnx and, optionally, a pruned pair; then the manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from cluster.artifacts import load_model
    from serving.optimize.prune import prune_model

    model, manifest = load_model(folder)
    example = torch.zeros(2, *manifest["model"]["input_shape"])
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}}
    torch.onnx.export(
        model, (example,), folder / "model.onnx", dynamo=False, input_names=["input"], output_names=["logits"], dynamic_axes=axes
    )
    quantize_dynamic(str(folder / "model.onnx"), str(folder / "model.int8.onnx"), weight_type=QuantType.QInt8)
    if pruned:
        prune_model(model, sparsity=0.5, structured=False)
        atomic_save_torch(model.state_dict(), folder / "model.pruned.pt")
        torch.onnx.export(
            model, (example,), folder / "model.pruned.onnx", dynamo=False, input_names=["input"], output_names=["logits"], dynamic_axes=axes
        )
    write_manifest(folder, {})


class PredictHandler(BaseHTTPRequestHandler):
    """POST /v1/predict {"inputs": [...]} -> {"predictions": [...]}, like the Tandem Serve app's API."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the app's server does: no new connection per request
    answered: list[int] = []  # one entry per prediction answered (list.append is atomic across handler threads)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/predict":
            PredictHandler.answered.append(len(body["inputs"]))
        status, answer = (200, {"predictions": [0] * len(body["inputs"])}) if self.path == "/v1/predict" else (404, {"detail": "not found"})
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


class LoopbackServer(ThreadingHTTPServer):
    request_queue_size = 128  # the default listen backlog (5) drops connections of 32 concurrent clients
    daemon_threads = True


@contextmanager
def loopback_app() -> Iterator[str]:
    server = LoopbackServer(("127.0.0.1", 0), PredictHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[ProfileReport, Path]:
    """A run folder like `tandem train` + `tandem export` leave, a distilled student beside it, a loopback app."""
    storage = tmp_path_factory.mktemp("trained")
    config = load_config(None, [f"cluster.storage={storage}"])
    run = storage / "digits" / "20260101-000000"
    artifacts = train_artifact(run / "artifacts", args=MLP_ARGS, epochs=1)
    add_onnx_files(artifacts)
    (run / "config.yaml").write_text(config.to_yaml())
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in RUN_METRICS))
    student = storage / "digits" / "20260101-010000"
    train_artifact(student / "artifacts", args={"hidden": [32]}, epochs=1)
    student_config = load_config(
        None, [f"cluster.storage={storage}", "model.args.hidden=[32]", f"training.distill={{teacher: {artifacts}}}"]
    )
    (student / "config.yaml").write_text(student_config.to_yaml())
    PredictHandler.answered.clear()
    with loopback_app() as url:
        report = profile(config, source=run, serve_url=url, quick=True)
    return report, run


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def test_untrained_model_is_profiled_and_says_so(untrained):
    data = untrained.data
    assert untrained.out_dir.name == "profile-untrained" and untrained.html_path.exists() and untrained.json_path.exists()
    assert json.loads(untrained.json_path.read_text())["source"]["trained"] is False
    assert any("untrained model built from the config" in note for note in data["notes"])
    assert [e["label"] for e in data["inference"]["engines"]] == ["torch-fp32", "torch-bf16"]
    assert any("tandem export" in note for note in data["notes"]), "the missing ONNX rows are explained"
    assert "untrained model built from the config" in untrained.html_path.read_text()


def test_flop_counts_match_a_hand_count_of_the_digits_mlp(untrained):
    forward, step = hand_count(DIGITS_MLP)
    training = untrained.data["training"]
    assert training["forward_flops_per_example"] == pytest.approx(forward, rel=0.01)
    assert training["flops_per_example"] == pytest.approx(step, rel=0.01)
    for engine in untrained.data["inference"]["engines"]:
        assert engine["forward_flops_per_example"] == pytest.approx(forward, rel=0.01)
    comparison = untrained.data["comparison"]
    assert comparison["flops_ratio"] == pytest.approx(step / forward, rel=0.01)
    assert comparison["inferences_per_epoch_by_flops"] == pytest.approx(training["train_examples"] * step / forward, rel=0.01)


@pytest.mark.parametrize("widths", [(10, 7), (20, 50, 3), (64, 256, 256, 10)])
def test_flop_counter_matches_a_hand_count_of_any_mlp(widths):
    model = mlp((widths[0],), widths[-1], hidden=list(widths[1:-1]))
    x, y = torch.randn(8, widths[0]), torch.randint(0, widths[-1], (8,))
    forward, step = hand_count(widths)
    assert forward_flops(model, x)["per_example"] == pytest.approx(forward, rel=0.01)
    assert training_flops(model, x, y)["per_example"] == pytest.approx(step, rel=0.01)


def test_zero_memory_per_stage_matches_the_formula(untrained):
    zero = untrained.data["zero"]
    assert (zero["workers"], zero["precision"], zero["optimizer"], zero["configured_stage"]) == (2, "fp32", "adamw", 2)
    assert zero["parameters"] == sum(a * b + b for a, b in zip(DIGITS_MLP[:-1], DIGITS_MLP[1:], strict=True))
    for row in zero["stages"]:
        formula = zero_memory_formula(zero["parameters"], 2, row["stage"], "fp32", "adamw")
        assert (row["params_bytes"], row["grads_bytes"], row["optimizer_bytes"]) == (
            formula["params"],
            formula["grads"],
            formula["optimizer"],
        )
        assert row["total_bytes"] == sum(formula.values())
    assert zero["run"] is None, "no run: nothing measured to compare"


def test_every_plot_is_a_valid_png(untrained, trained):
    from PIL import Image

    for report in (untrained, trained[0]):
        assert set(report.plot_paths) == {"latency", "throughput", "roofline", "zero_memory", "cost"}
        for path in report.plot_paths.values():
            assert path.read_bytes()[:8] == PNG_SIGNATURE, path
            with Image.open(path) as image:
                image.load()  # decodes every pixel: a truncated file fails here
                assert image.width >= 400 and image.height >= 300
                assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20, f"{path} looks blank"


def test_trained_run_gets_every_engine_and_the_zero_bytes_its_workers_logged(trained):
    report, run = trained
    data = report.data
    assert report.out_dir == run / "profile" and data["source"]["trained"] is True
    labels = [e["label"] for e in data["inference"]["engines"]]
    for label in ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8", "pruned-torch-fp32", "pruned-onnx-fp32", "distilled-torch-fp32"):
        assert label in labels
    by_label = {e["label"]: e for e in data["inference"]["engines"]}
    forward, _ = hand_count(DIGITS_MLP)
    assert by_label["onnx-int8"]["forward_flops_per_example"] == pytest.approx(forward, rel=0.01)
    assert by_label["distilled-torch-fp32"]["forward_flops_per_example"] == pytest.approx(hand_count((64, 32, 10))[0], rel=0.01)
    for engine in data["inference"]["engines"]:
        assert [r["batch"] for r in engine["latency"]] == [1, 8, 32]
        assert all(r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] * 0.999 and r["examples_per_s"] > 0 for r in engine["latency"])
    # What the workers logged in metrics.jsonl (typed into RUN_METRICS here), read back as the
    # run's column, beside the formula for the run's own stage. That the logged bytes of a real
    # DeepSpeed run match the formula is tests/integration/test_profile_report.py's to prove.
    measured = data["zero"]["run"]
    assert measured["stage"] == 2 and measured["workers"] == 2, "the run's stage comes from its config.yaml"
    assert measured["param_bytes"] == max(RUN_METRICS[-1]["param_bytes_per_rank"])
    assert measured["optimizer_bytes"] == max(RUN_METRICS[-1]["optimizer_bytes_per_rank"])
    formula = zero_memory_formula(parameter_count(mlp((64,), 10, **MLP_ARGS)), 2, 2, "fp32", "adamw")
    assert measured["formula"]["params"] == formula["params"]
    assert data["training"]["run"]["step_time_s"] == RUN_METRICS[-1]["step_time_s"]


def test_served_figures_are_measured_over_http_against_the_serve_url(trained):
    # The URL is a loopback stub speaking the app's /v1/predict (not a Serve app): what is proved
    # is that every request the figures count was sent to, and answered by, the server at serve_url.
    served = trained[0].data["served"]
    assert [level["concurrency"] for level in served["levels"]] == [1, 32]
    for level in served["levels"]:
        assert level["ok"] == level["requests"], level["codes"]
        assert level["requests"] >= level["concurrency"] and level["p50_ms"] > 0
    assert len(PredictHandler.answered) >= 1 + sum(level["ok"] for level in served["levels"]), "the probe and every counted request"
    assert "Served end to end" in trained[0].html_path.read_text()


def test_every_recommendation_names_the_figure_it_rests_on(trained):
    recommendations = trained[0].data["recommendations"]
    topics = {r["topic"] for r in recommendations}
    assert {"serving engine", "batching", "quantization", "ZeRO stage", "training hardware"} <= topics
    for rec in recommendations:
        assert rec["advice"] and any(ch.isdigit() for ch in rec["figure"]), rec


def test_summary_prints_the_tables(trained):
    from rich.console import Console

    console = Console(record=True, width=220)
    console.print(trained[0].summary())
    text = console.export_text()
    for heading in (
        "Machine limits",
        "Training",
        "ZeRO state per rank",
        "Inference",
        "Training vs inference",
        "Recommendations",
        "onnx-int8",
    ):
        assert heading in text


# ---------------------------------------------------------------------------------------------
# failures write nothing
# ---------------------------------------------------------------------------------------------


def test_wrong_data_shape_for_a_trained_model_fails_clearly_and_writes_nothing(trained):
    _, run = trained
    config = load_config(None, [f"cluster.storage={run.parents[1]}", "data.source=tests.unit.profile_sources:digits_missing_a_feature"])
    before = sorted(p.name for p in run.iterdir())
    out = run / "profile-bad"
    with pytest.raises(ConfigError) as error:
        profile(config, source=run, out_dir=out, quick=True)
    assert "data.source" in str(error.value) and "(63,)" in str(error.value) and "(64,)" in str(error.value)
    assert sorted(p.name for p in run.iterdir()) == before, "no report, no temp folder"


def test_a_model_that_cannot_run_on_the_data_fails_clearly_and_writes_nothing(tmp_path):
    config = load_config(
        None,
        [
            f"cluster.storage={tmp_path}",
            "data.source=tests.unit.profile_sources:digits_missing_a_feature",
            "model.builder=tests.unit.profile_sources:fixed_64_features_mlp",
            "model.args={}",
        ],
    )
    with pytest.raises(ConfigError) as error:
        profile(config, quick=True)
    assert "data.source" in str(error.value) and "fix the data source" in str(error.value)
    assert list(tmp_path.rglob("*")) == [], "nothing written under storage"


def test_a_failure_while_writing_keeps_the_earlier_report_and_leaves_no_temp_folder(tmp_path):
    target = tmp_path / "profile"
    write_atomically(target, lambda folder: (folder / "profile.json").write_text("{}"))

    def half_written(folder: Path) -> None:
        (folder / "latency.png").write_bytes(PNG_SIGNATURE)
        raise RuntimeError("plotting failed")

    with pytest.raises(RuntimeError, match="plotting failed"):
        write_atomically(target, half_written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile"]
    assert sorted(p.name for p in target.iterdir()) == ["profile.json"]


def test_an_unreachable_serve_url_fails_before_measuring():
    import socket

    with socket.socket() as sock:  # a port nobody listens on: bound, then closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ValueError, match="tandem serve"):
        probe_serve_app(f"http://127.0.0.1:{port}", np.zeros(64, dtype=np.float32), timeout_s=2)
    with loopback_app() as url, pytest.raises(ValueError, match="answered 404"):
        probe_serve_app(f"{url}/wrong", np.zeros(64, dtype=np.float32))
    with loopback_app() as url:
        level = served_latency(url, np.zeros(64, dtype=np.float32), concurrency=4, requests=8, deadline_s=10)
    assert level["requests"] == 8 and level["ok"] == 8


# ---------------------------------------------------------------------------------------------
# the HTML in a real browser
# ---------------------------------------------------------------------------------------------

# The `chromium` fixture: tests/conftest.py


def test_html_report_renders_with_every_plot_in_headless_chromium(trained, chromium, tmp_path):
    report = trained[0]
    page = report.html_path.as_uri()
    # --virtual-time-budget lets the page finish loading (and its load handler run) before the DOM is dumped.
    dom = run_chromium(chromium, ["--virtual-time-budget=10000", "--dump-dom", page], tmp_path).stdout
    assert 'data-images="loaded"' in dom, dom[-2000:]
    assert f'data-images-loaded="{len(report.plot_paths)}"' in dom
    assert "[images loaded]" in dom
    shot, size, colours = screenshot(chromium, page, 1200, 2400, tmp_path)
    assert size == (1200, 2400)
    assert colours > 200, "the screenshot shows text and plots"
    if os.environ.get("TANDEM_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["TANDEM_KEEP_SCREENSHOT"])


# ---------------------------------------------------------------------------------------------
# cluster.storage in an object store (moto's S3 server on loopback: tests/conftest.py s3_store)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def in_store(s3_store, tmp_path, monkeypatch) -> tuple[object, str, Path]:
    """This process as a user's shell with the store's variables, an artifact cache of its own and
    an empty working folder; returns the store, a fresh s3:// prefix and that working folder."""
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return s3_store, f"s3://{s3_store.bucket}/unit-profile-{uuid.uuid4().hex[:8]}", work


def upload_runs(storage: Path, bucket_storage: str) -> None:
    """The `trained` fixture's runs as training into the bucket leaves them (its local report left
    out); the student's config names its teacher by the teacher's URI, as it would have been trained."""
    for file in sorted(p for p in storage.rglob("*") if p.is_file() and "profile" not in p.relative_to(storage).parts):
        (location(bucket_storage) / file.relative_to(storage).as_posix()).put_bytes(file.read_bytes())
    student = location(bucket_storage) / "digits" / "20260101-010000" / "config.yaml"
    config = yaml.safe_load(student.read_text())
    config["training"]["distill"]["teacher"] = f"{bucket_storage}/digits/20260101-000000/artifacts"
    student.put_text(yaml.safe_dump(config))


def test_a_run_in_an_object_store_is_profiled_from_it_and_its_report_published_there(trained, in_store):
    store, storage, work = in_store
    _, run = trained
    local_before = sorted((p, p.stat().st_mtime_ns) for p in run.parents[1].rglob("*"))
    upload_runs(run.parents[1], storage)
    source = f"{storage}/digits/20260101-000000"

    report = profile(load_config(None, [f"cluster.storage={storage}"]), source=source, quick=True)

    # Read from the store: the artifact through this node's cache, the run's metrics and config in place, the student by listing.
    assert f"{source}/artifacts/model.pt" in {d["uri"] for d in downloads()}
    data = report.data
    assert data["source"]["artifact_dir"] == f"{source}/artifacts" and data["source"]["run_dir"] == source
    labels = {e["label"] for e in data["inference"]["engines"]}
    assert {"onnx-int8", "pruned-onnx-fp32", "distilled-torch-fp32"} <= labels
    assert data["training"]["run"]["epochs_logged"] == 2 and data["zero"]["run"]["stage"] == 2
    # Written to the store, beside the run, with the manifest that publishes it.
    assert report.out_dir == location(f"{source}/profile") and report.html_path.exists()
    prefix = source.removeprefix(f"s3://{store.bucket}/") + "/profile/"
    published = ["manifest.json", "profile.html", "profile.json", *PLOTS.values()]
    assert sorted(store.keys(prefix)) == sorted(prefix + name for name in published)
    client = store.client()

    def read(name: str) -> bytes:
        return client.get_object(Bucket=store.bucket, Key=prefix + name)["Body"].read()

    assert json.loads(read("profile.json")) == json.loads(json.dumps(data, default=str))
    page = read("profile.html").decode()
    assert page.rstrip().endswith("</html>") and all(f'src="{name}"' in page for name in PLOTS.values())
    manifest = json.loads(read("manifest.json"))
    assert manifest["kind"] == "profile" and set(manifest["files"]) == {"profile.html", "profile.json", *PLOTS.values()}
    for name, entry in manifest["files"].items():
        assert hashlib.sha256(read(name)).hexdigest() == entry["sha256"], name
    assert all(read(name)[:8] == PNG_SIGNATURE for name in PLOTS.values())
    assert (fetch_folder(report.out_dir) / "profile.html").read_text() == page, "a reader going by the manifest gets it whole"
    assert list(work.iterdir()) == [], "nothing written under the working folder"
    assert sorted((p, p.stat().st_mtime_ns) for p in run.parents[1].rglob("*")) == local_before, "nor beside the local run"


def test_a_report_that_fails_while_building_publishes_nothing_to_the_store(in_store):
    store, storage, work = in_store
    target = location(f"{storage}/profile")
    prefix = target.uri.removeprefix(f"s3://{store.bucket}/") + "/"

    def half_written(folder: Path) -> None:
        (folder / "latency.png").write_bytes(PNG_SIGNATURE)
        raise RuntimeError("plotting failed")

    with pytest.raises(RuntimeError, match="plotting failed"):
        write_report(target, half_written)
    assert store.keys(prefix) == []
    write_report(target, lambda folder: (folder / "profile.json").write_text('{"n": 1}'))
    with pytest.raises(RuntimeError, match="plotting failed"):
        write_report(target, half_written)
    assert sorted(store.keys(prefix)) == [prefix + "manifest.json", prefix + "profile.json"], "the earlier report, as it was"
    assert (target / "profile.json").read_text() == '{"n": 1}'
    assert list(work.iterdir()) == []
