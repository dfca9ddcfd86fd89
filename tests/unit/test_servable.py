"""A servable model from every training path (tandem/servable.py): the export that training verbs
run at their end when the deployments need files the artifact lacks, under the parity gate."""

from __future__ import annotations

import pytest

from cluster.artifacts import read_manifest
from serving.optimize.parity import ParityGateError
from tandem.servable import ensure_exported, missing_for_serving, servable_artifact
from tests.unit.artifact_helpers import MLP_ARGS, export_config, file_digests, train_artifact


def test_a_crossed_gate_after_training_is_said_and_serving_refuses_with_the_same_reason(tmp_path, capsys):
    folder = train_artifact(tmp_path / "digits" / "run-1" / "artifacts", args=MLP_ARGS, epochs=5)
    # 99% of the weights pruned, no fine-tuning, no accuracy drop allowed: the gate is crossed.
    config = export_config(tmp_path, args=MLP_ARGS, prune={"sparsity": 0.99}, gate={"max_accuracy_drop": 0.0}, latency_batch_sizes=[1])
    before = file_digests(folder)
    assert missing_for_serving(config, read_manifest(folder)) == ["model.onnx"]

    ensure_exported(config, folder)  # what `tandem train`, `tune` and `import` run at their end: the run still succeeds
    said = capsys.readouterr().out
    assert "exporting" in said and "trained, but not servable as configured" in said and "export.gate" in said, said
    assert file_digests(folder) == before  # nothing written: the artifact stays as training left it

    with pytest.raises(ParityGateError, match="max_accuracy_drop"):  # `tandem serve` and `tandem predict`
        servable_artifact(config, str(folder))
