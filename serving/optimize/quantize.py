"""int8 quantization of an exported ONNX model with onnxruntime's quantization tools.

    dynamic   weights int8 ahead of time, activations quantized per batch at run time
              (MatMulInteger): the right choice for Linear-heavy models (MLP, transformer).
    static    QDQ format with activation ranges calibrated on training data: Conv runs as
              QLinearConv. Dynamic int8 made a small CNN 3x slower on this CPU (its ConvInteger
              kernel is slow), static did not.
    auto      export measures both and keeps the one that passes the parity gate fastest.

Both use 7-bit weights (reduce_range). x86 CPUs without VNNI (AVX2 only, like the 2-core AMD
EPYC this was measured on) multiply uint8 x int8 with VPMADDUBSW, whose int16 sums saturate with
full-range weights: per-channel static int8 of the CNN gave logit errors of 5.2 and 94%
agreement with 8-bit weights, 0.33 and 99.2% with 7-bit ones. The model is exported once and
served on whatever CPU the serving nodes have, so we take the setting that is safe everywhere.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cluster.errors import EngineError

QUANT_MODES = ("dynamic", "static")
CALIBRATION_EXAMPLES = 512
CALIBRATION_BATCH = 64


def has_convolutions(onnx_path: Path) -> bool:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(node.op_type == "Conv" for node in graph.node)


def candidate_modes(requested: str, onnx_path: Path) -> list[str]:
    """The modes to try, the likely winner first: static for conv models, dynamic otherwise."""
    if requested == "none":
        return []
    if requested in QUANT_MODES:
        return [requested]
    if requested != "auto":
        raise EngineError(f"export.quantize: '{requested}' is not one of none, dynamic, static, auto")
    return ["static", "dynamic"] if has_convolutions(onnx_path) else ["dynamic", "static"]


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The tools log a "consider pre-processing" warning on the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_dynamic_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per_channel stays off: for MatMul the tool picks axis 0 (the input features), which gave
    # logit errors of 3.0 on the digits MLP against 0.19 per tensor.
    with _quiet_quantizer():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=False, reduce_range=True)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over an array of training examples."""

    def __init__(self, input_name: str, examples: np.ndarray, batch: int = CALIBRATION_BATCH):
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            {input_name: np.ascontiguousarray(examples[i : i + batch], dtype=np.float32)} for i in range(0, len(examples), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # part of the reader protocol; calibration reads the data once
        pass


def calibration_sample(x_train: np.ndarray, seed: int, limit: int = CALIBRATION_EXAMPLES) -> np.ndarray:
    """A seeded random subset of the training split: activation ranges must come from training data."""
    order = np.random.default_rng(seed).permutation(len(x_train))[:limit]
    return x_train[np.sort(order)]


def quantize_static_int8(source: Path, target: Path, calibration: np.ndarray) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    with _quiet_quantizer():
        quantize_static(
            str(source),
            str(target),
            _Calibration(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,  # per output channel of each Conv (axis 0), which is what per-channel means there
            reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
        )


def quantize_int8(mode: str, source: Path, target: Path, calibration: np.ndarray) -> None:
    if mode == "dynamic":
        quantize_dynamic_int8(source, target)
    elif mode == "static":
        quantize_static_int8(source, target, calibration)
    else:
        raise EngineError(f"quantization mode '{mode}' is not one of {', '.join(QUANT_MODES)}")
