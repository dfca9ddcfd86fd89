"""The inference engines on a real exported digits MLP: names, shapes, precision, threads, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.artifacts import ArtifactError
from serving.engines import Engine, OnnxEngine, TorchEngine, load_engine, ort_session_options
from tests.unit.artifact_helpers import MLP_ARGS, digits_val, exported_mlp, train_artifact


@pytest.fixture(scope="module")
def artifact():
    return exported_mlp()


@pytest.mark.parametrize(
    ("kwargs", "name", "kind"),
    [
        ({"engine": "torch"}, "torch-fp32", TorchEngine),
        ({"engine": "torch", "precision": "bf16"}, "torch-bf16", TorchEngine),
        ({"engine": "onnxruntime"}, "onnx-fp32", OnnxEngine),
        ({"engine": "onnxruntime", "quantize": "int8"}, "onnx-int8", OnnxEngine),
        ({"engine": "torch", "pruned": True}, "torch-fp32", TorchEngine),
        ({"engine": "onnxruntime", "pruned": True}, "onnx-pruned", OnnxEngine),
    ],
    ids=["torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8", "torch-pruned", "onnx-pruned"],
)
def test_every_engine_predicts_float32_logits(artifact, kwargs, name, kind):
    engine = load_engine(artifact, device="cpu", **kwargs)
    assert isinstance(engine, kind) and isinstance(engine, Engine)
    assert engine.name == name and engine.input_shape == (64,) and engine.num_classes == 10
    x, y = digits_val()
    logits = engine.predict(x)
    assert logits.dtype == np.float32 and logits.shape == (len(x), 10)
    assert (logits.argmax(1) == y).mean() > 0.9


def test_bf16_torch_agrees_with_fp32(artifact):
    x, _ = digits_val()
    fp32 = load_engine(artifact, engine="torch", device="cpu").predict(x)
    bf16 = load_engine(artifact, engine="torch", precision="bf16", device="cpu").predict(x)
    assert (fp32.argmax(1) == bf16.argmax(1)).mean() >= 0.98
    assert np.abs(fp32 - bf16).max() < 0.5  # bf16 keeps 8 bits of mantissa


def test_predict_accepts_any_batch_size_and_float64(artifact):
    engine = load_engine(artifact, device="cpu")
    x, _ = digits_val()
    for size in (1, 7, 300):
        assert engine.predict(x[:size].astype(np.float64)).shape == (size, 10)


def test_wrong_input_shape_names_both_shapes(artifact):
    engine = load_engine(artifact, device="cpu")
    with pytest.raises(ValueError, match=r"\(3, 8, 8\).*\(N, 64\)"):
        engine.predict(np.zeros((3, 8, 8), np.float32))


def test_a_run_folder_works_as_artifact_dir(artifact):
    assert load_engine(artifact.parent, device="cpu").name == "onnx-fp32"


def test_session_options_fix_threads_and_turn_spinning_off():
    options = ort_session_options(threads=2)
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_torch_engine_sets_threads(artifact):
    before = torch.get_num_threads()
    try:
        load_engine(artifact, engine="torch", threads=1, device="cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"engine": "torch", "quantize": "int8"}, "quantize 'int8' is for engine 'onnxruntime'"),
        ({"engine": "onnxruntime", "precision": "bf16"}, "precision 'bf16' is for engine 'torch'"),
        ({"engine": "tensorrt"}, "engine 'tensorrt' is not one of torch, onnxruntime"),
        ({"engine": "torch", "precision": "fp16", "device": "cpu"}, "fp16' needs a CUDA device"),
        ({"engine": "onnxruntime", "quantize": "int4"}, "quantize 'int4' is not one of none, int8"),
    ],
)
def test_mismatched_settings_are_refused_with_the_fix(artifact, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_engine(artifact, **kwargs)


def test_unexported_artifact_names_the_missing_file_and_the_command(tmp_path):
    artifact = train_artifact(tmp_path / "artifacts", args=MLP_ARGS, epochs=1)
    with pytest.raises(ArtifactError, match=r"model\.onnx is not part of this artifact.*tandem export"):
        load_engine(artifact)
    with pytest.raises(ArtifactError, match=r"model\.int8\.onnx.*export\.quantize"):
        load_engine(artifact, quantize="int8")
    assert load_engine(artifact, engine="torch", device="cpu").name == "torch-fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(artifact):
    with pytest.raises(ValueError, match="no CUDA device"):
        load_engine(artifact, engine="torch", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_torch_engine_on_cuda(artifact, precision):
    x, _ = digits_val()
    reference = load_engine(artifact, engine="torch", device="cpu").predict(x)
    engine = load_engine(artifact, engine="torch", precision=precision, device="cuda")
    logits = engine.predict(x)
    assert engine.device == "cuda" and logits.dtype == np.float32
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.98
