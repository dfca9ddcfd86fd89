"""Export, int8, pruning, parity and the gate, on real models trained for seconds on the digits.

Real torch, real onnxruntime, no mocks. One exported digits MLP is shared (artifact_helpers);
tests that change an artifact work on a copy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console

from cluster.artifacts import ArtifactError, load_model, read_manifest, verify_artifact
from serving.engines import INT8_FILE, ONNX_FILE, PRUNED_FILE, PRUNED_ONNX_FILE, load_engine
from serving.optimize.export import ParityGateError, export, export_onnx, format_report, pick_int8
from serving.optimize.onnx_export import file_opset
from serving.optimize.parity import gate_failures
from serving.optimize.prune import prune_model
from serving.optimize.quantize import candidate_modes
from tests.unit.artifact_helpers import (
    LOOSE_GATE,
    MLP_ARGS,
    copy_artifact,
    digits_val,
    export_config,
    exported_mlp,
    file_digests,
    flip_byte,
    onnx_weight_sparsity,
    train_artifact,
)
from training.data import digits, split
from training.models import cnn, mlp, transformer


def max_logit_diff(artifact, **engine) -> float:
    x, _ = digits_val()
    reference = load_engine(artifact, engine="torch", device="cpu").predict(x)
    return float(np.abs(load_engine(artifact, device="cpu", **engine).predict(x) - reference).max())


# ---------------------------------------------------------------------------------------------
# ONNX round trip of every built-in model
# ---------------------------------------------------------------------------------------------


def test_mlp_onnx_matches_torch_within_1e_4():
    artifact = exported_mlp()
    assert max_logit_diff(artifact) <= 1e-4
    info = read_manifest(artifact)["export"]
    assert info["onnx"]["exporter"] == "dynamo"  # the fallback (legacy) would be a regression worth seeing


@pytest.mark.parametrize(
    ("builder", "args", "epochs", "quantize"),
    [
        ("training.models:cnn", {"channels": [8, 16]}, 2, "static"),  # conv: static QDQ with calibration
        ("training.models:transformer", {"dim": 32, "depth": 1, "heads": 2}, 2, "none"),
    ],
    ids=["cnn", "transformer"],
)
def test_builtin_model_exports_round_trip(tmp_path, builder, args, epochs, quantize):
    artifact = train_artifact(tmp_path / "digits" / "run-1" / "artifacts", builder=builder, args=args, epochs=epochs)
    config = export_config(tmp_path, builder=builder, args=args, quantize=quantize, gate=LOOSE_GATE, latency_batch_sizes=[8])
    result = export(config, "latest", latency_budget_s=0.01)
    assert result.artifact_dir == artifact
    assert max_logit_diff(artifact) <= 1e-4
    if quantize == "static":
        assert candidate_modes("auto", artifact / ONNX_FILE) == ["static", "dynamic"]  # a conv graph
        assert result.info["quantize"]["method"] == "static"
        assert result.report[INT8_FILE]["argmax_agreement"] >= 0.95
    verify_artifact(artifact)  # every file, old and new, matches the refreshed manifest


def test_opset_below_18_falls_back_to_the_legacy_exporter(tmp_path):
    # dynamo builds opset 18 and, for ReduceMean, cannot convert it down (it would silently keep 18).
    model = cnn((64,), 10, channels=[4]).eval()
    info = export_onnx(model, (64,), tmp_path / "model.onnx", opset=17)
    assert info["exporter"] == "legacy" and "instead of 17" in info["fallback_because"]
    assert file_opset(tmp_path / "model.onnx") == 17


# ---------------------------------------------------------------------------------------------
# int8 and the parity report
# ---------------------------------------------------------------------------------------------


def test_int8_digits_mlp_keeps_accuracy_and_agreement():
    artifact = exported_mlp()
    report = read_manifest(artifact)["parity"]
    int8 = report[INT8_FILE]
    assert int8["accuracy_drop"] <= 0.01
    assert int8["argmax_agreement"] >= 0.99
    assert int8["bytes"] < report[ONNX_FILE]["bytes"] / 2  # int8 weights: about a quarter, plus scales
    # The report's numbers are what the served engine does: recompute them through load_engine.
    x, y = digits_val()
    torch_logits = load_engine(artifact, engine="torch", device="cpu").predict(x)
    int8_logits = load_engine(artifact, quantize="int8", device="cpu").predict(x)
    assert (int8_logits.argmax(1) == torch_logits.argmax(1)).mean() == pytest.approx(int8["argmax_agreement"])
    assert (int8_logits.argmax(1) == y).mean() == pytest.approx(int8["accuracy"])


def test_parity_report_covers_every_artifact_and_prints():
    artifact = exported_mlp()
    manifest = read_manifest(artifact)
    report = manifest["parity"]
    assert set(report) == {"model.pt", ONNX_FILE, INT8_FILE, PRUNED_FILE, PRUNED_ONNX_FILE}
    for name, entry in report.items():
        assert set(entry["latency_ms"]) == {"1", "32"}, name
        assert entry["bytes"] == manifest["files"][name]["bytes"]
        assert entry["examples"] == len(digits_val()[1])
        assert 0.0 <= entry["mean_abs_logit_diff"] <= entry["max_abs_logit_diff"]
    assert report["model.pt"]["max_abs_logit_diff"] == 0.0
    assert set(manifest["export"]["quantize"]["candidates"]) == {"dynamic", "static"}  # auto measured both
    assert manifest["version"] == manifest["files"]["model.pt"]["sha256"][:12]  # export left the model version alone
    console = Console(width=220, record=True)
    console.print(format_report(report))
    text = console.export_text()
    assert INT8_FILE in text and "batch 32 ms" in text


# ---------------------------------------------------------------------------------------------
# pruning
# ---------------------------------------------------------------------------------------------


def test_pruning_reaches_the_configured_sparsity_in_the_exported_model():
    artifact = exported_mlp()
    assert onnx_weight_sparsity(artifact / PRUNED_ONNX_FILE) >= 0.5 - 1e-3
    assert onnx_weight_sparsity(artifact / ONNX_FILE) < 0.01
    pruned, _ = load_model(artifact, PRUNED_FILE)
    weights = [m.weight for m in pruned.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros >= 0.5 - 1e-3
    assert not any(name.endswith(("_orig", "_mask")) for name in pruned.state_dict())  # permanent: no masks left
    assert read_manifest(artifact)["parity"][PRUNED_ONNX_FILE]["sparsity"] >= 0.5


def test_structured_pruning_removes_whole_neurons_and_keeps_the_output_layer(tmp_path):
    artifact = copy_artifact(exported_mlp(), tmp_path)
    config = export_config(
        tmp_path,
        args=MLP_ARGS,
        onnx=False,
        quantize="auto",
        prune={"sparsity": 0.25, "structured": True},
        gate=LOOSE_GATE,
        latency_batch_sizes=[8],
    )
    result = export(config, artifact, latency_budget_s=0.01)
    assert result.files == [PRUNED_FILE]
    assert result.info["quantize"]["skipped"]
    pruned, _ = load_model(artifact, PRUNED_FILE)
    hidden = [m for m in pruned.modules() if isinstance(m, torch.nn.Linear)]
    for layer in hidden[:-1]:
        dead = layer.weight.abs().sum(dim=1) == 0
        assert int(dead.sum()) == math.ceil(0.25 * layer.out_features)
        assert torch.all(layer.bias[dead] == 0)  # a pruned neuron emits nothing, not its bias
    assert int((hidden[-1].weight.abs().sum(dim=1) == 0).sum()) == 0  # every class keeps its row
    assert result.report[PRUNED_FILE]["sparsity"] == pytest.approx(0.25, abs=1e-6)
    assert not (artifact / ONNX_FILE).exists()  # onnx: false replaced the previous export's files


def test_unstructured_pruning_reaches_target_on_a_transformer():
    model = transformer((64,), 10, dim=32, depth=1, heads=2).eval()
    result = prune_model(model, 0.3)
    assert result.sparsity >= 0.3 - 1e-6
    attention = model.encoder.layers[0].self_attn
    assert float((attention.in_proj_weight == 0).float().mean()) > 0  # attention projections are pruned too
    assert model(torch.zeros(2, 64)).shape == (2, 10)


def test_pruning_refuses_a_sparsity_of_one():
    with pytest.raises(ValueError, match="export.prune.sparsity"):
        prune_model(mlp((64,), 10), 1.0)


# ---------------------------------------------------------------------------------------------
# integrity and the gate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.pt", ONNX_FILE, INT8_FILE])
def test_corrupted_artifact_is_refused_naming_file_and_checksum(tmp_path, name):
    artifact = copy_artifact(exported_mlp(), tmp_path)
    recorded = read_manifest(artifact)["files"][name]["sha256"]
    flip_byte(artifact / name)
    engine = {"model.pt": {"engine": "torch"}, ONNX_FILE: {}, INT8_FILE: {"quantize": "int8"}}[name]
    with pytest.raises(ArtifactError) as caught:
        load_engine(artifact, device="cpu", **engine)
    message = str(caught.value)
    assert name in message and "sha256" in message and recorded in message


def test_export_refuses_a_corrupted_model_pt(tmp_path):
    artifact = copy_artifact(exported_mlp(), tmp_path)
    flip_byte(artifact / "model.pt")
    config = export_config(tmp_path, args=MLP_ARGS, quantize="none", latency_batch_sizes=[1])
    with pytest.raises(ArtifactError, match=r"model\.pt fails its checksum"):
        export(config, "latest")


def test_gate_failure_names_metric_limit_and_field_and_keeps_earlier_artifacts(tmp_path):
    artifact = copy_artifact(exported_mlp(), tmp_path)
    before = file_digests(artifact)
    # 95% of the weights gone: far past a 1-point accuracy drop. onnx: false would also delete the
    # earlier ONNX files on success, so an intact folder proves nothing was committed.
    config = export_config(tmp_path, args=MLP_ARGS, onnx=False, quantize="none", prune={"sparsity": 0.95}, latency_batch_sizes=[1])
    with pytest.raises(ParityGateError) as caught:
        export(config, "latest", latency_budget_s=0.01)
    message = str(caught.value)
    assert "model.pruned.pt" in message
    assert "export.gate.max_accuracy_drop: 0.01" in message and "points below" in message
    assert "export.prune.sparsity" in message  # the fix
    assert "unchanged" in message
    assert isinstance(caught.value, ValueError)
    assert file_digests(artifact) == before
    assert not [p for p in artifact.iterdir() if p.name.startswith(".")]  # no staging left behind
    verify_artifact(artifact)


def test_gate_failures_report_every_crossing_at_once():
    config = export_config("/tmp/unused", args=MLP_ARGS)
    entry = {"accuracy": 0.9, "source_accuracy": 0.95, "accuracy_drop": 0.05, "argmax_agreement": 0.9}
    failures = gate_failures({"model.pt": {**entry, "accuracy_drop": 0.0}, INT8_FILE: entry}, config.export.gate)
    assert len(failures) == 2
    assert "export.gate.min_argmax_agreement: 0.99" in failures[1] and "export.quantize" in failures[1]


def test_auto_quantize_tries_dynamic_first_without_convolutions():
    artifact = exported_mlp()
    assert candidate_modes("auto", artifact / ONNX_FILE) == ["dynamic", "static"]
    assert candidate_modes("none", artifact / ONNX_FILE) == []
    with pytest.raises(ValueError, match="export.quantize"):
        candidate_modes("int4", artifact / ONNX_FILE)


def test_auto_picks_the_fastest_int8_that_passes_the_gate_else_the_most_faithful():
    gate = export_config("/tmp/unused", args=MLP_ARGS).export.gate
    good = {"accuracy": 0.97, "source_accuracy": 0.97, "accuracy_drop": 0.0, "argmax_agreement": 1.0, "max_abs_logit_diff": 0.2}
    candidates = {"dynamic": {**good, "probe_latency_ms": 0.2}, "static": {**good, "probe_latency_ms": 0.1}}
    assert pick_int8(candidates, gate) == "static"
    candidates["static"].update(argmax_agreement=0.995, probe_latency_ms=0.19)  # within 10%: fidelity decides
    assert pick_int8(candidates, gate) == "dynamic"
    candidates["static"].update(argmax_agreement=0.9, probe_latency_ms=0.1)  # faster but crosses the gate
    assert pick_int8(candidates, gate) == "dynamic"
    candidates["dynamic"].update(argmax_agreement=0.95)  # neither passes: keep the closer one, the gate reports it
    assert pick_int8(candidates, gate) == "dynamic"


def test_manifest_records_the_export():
    manifest = read_manifest(exported_mlp())
    info = manifest["export"]
    assert info["source_version"] == manifest["version"]
    val_examples = len(split(digits(), 0.2, 0)[1].y)
    assert info["data"] == {"source": "training.data:digits", "args": {}, "val_fraction": 0.2, "seed": 0, "val_examples": val_examples}
    assert info["prune"]["sparsity"] >= 0.5 and info["prune"]["structured"] is False
    json.dumps(manifest)  # plain JSON all the way down
