"""ONNX export of a trained module: a dynamic batch axis, checked in an ONNX Runtime session.

`export_onnx(model, input_shape, path, opset)` tries torch's dynamo exporter, then the legacy
TorchScript one, and keeps the first file whose session answers like the module at batch sizes
other than the example's. Used by serving.optimize.export; imports serving.engines only.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cluster.artifacts import ArtifactError
from serving.engines import ort_session

EXAMPLE_BATCH = 2  # torch.export specializes a dimension whose example size is 0 or 1
SESSION_CHECK_BATCHES = (1, 3)  # neither is the example batch: proves the batch axis is dynamic
ONNX_ATOL = ONNX_RTOL = 1e-4


class ExportError(ArtifactError):
    """The model could not be exported or the exported model does not match it."""


# ---------------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters warn about torchvision ops and deprecations on every call; none concern us."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        # CRITICAL: onnxscript logs a failed version conversion with a traceback, then carries on.
        logger.setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def file_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _export_dynamo(model: Any, example: Any, path: Path, opset: int) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),  # positional: Sequential's argument is `input`, custom models' may be anything
        external_data=False,
        optimize=True,  # onnxscript's optimizer folds constants and BatchNorm into Conv
        verbose=False,
    )


def _export_legacy(model: Any, example: Any, path: Path, opset: int) -> None:
    import torch

    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


def check_onnx_session(path: Path, model: Any, input_shape: tuple[int, ...]) -> float:
    """Run the file in an ORT session at batch sizes other than the export's and compare with torch.

    Returns the largest absolute logit difference; raises ExportError beyond atol/rtol 1e-4.
    """
    import torch

    session = ort_session(path, threads=1, device="cpu")
    input_name = session.get_inputs()[0].name
    generator = np.random.default_rng(0)
    worst = 0.0
    for batch in SESSION_CHECK_BATCHES:
        x = generator.standard_normal((batch, *input_shape)).astype(np.float32)
        got = session.run(None, {input_name: x})[0]
        with torch.inference_mode():
            want = model(torch.from_numpy(x)).numpy()
        if got.shape != want.shape or not np.allclose(got, want, atol=ONNX_ATOL, rtol=ONNX_RTOL):
            diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
            raise ExportError(
                f"{path.name}: onnxruntime output {got.shape} differs from torch {want.shape} at batch {batch} (max |diff| {diff:.3g})"
            )
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def export_onnx(model: Any, input_shape: tuple[int, ...], path: Path, opset: int) -> dict[str, Any]:
    """Export `model` to `path` with a dynamic batch axis and check it in onnxruntime.

    The dynamo exporter (torch.export + onnxscript) is tried first: it is torch 2.13's default,
    the legacy TorchScript exporter is deprecated, and dynamo's optimizer folds BatchNorm into
    Conv. With torch 2.13 / onnxscript 0.7.2 it exports all three built-in models (mlp, cnn,
    transformer) within 3e-7 of torch at opsets 18-23; it costs 2-5 s of CPU per model (about 8 s
    more for the first export in a process) against 0.1-0.3 s for the legacy exporter, because
    torch.export traces with fake tensors and onnxscript optimizes. The legacy exporter is the
    fallback: for models torch.export cannot trace (data-dependent control flow) and for opsets
    below 18, where dynamo builds opset 18, fails to convert it down and would keep 18.
    """
    import torch

    example = torch.randn(EXAMPLE_BATCH, *input_shape, generator=torch.Generator().manual_seed(0))
    problems = []
    for exporter, run in (("dynamo", _export_dynamo), ("legacy", _export_legacy)):
        try:
            started = time.perf_counter()
            with _quiet_exporter():
                run(model, example, path, opset)
            written = file_opset(path)
            if written != opset:
                # Seen with dynamo below opset 18: the version converter fails, logs it, and keeps 18.
                raise ExportError(f"wrote opset {written} instead of {opset}")
            max_diff = check_onnx_session(path, model, input_shape)
            info = {
                "exporter": exporter,
                "opset": opset,
                "seconds": round(time.perf_counter() - started, 3),
                "session_check_max_abs_diff": max_diff,
            }
            return {**info, "fallback_because": problems[0]} if problems else info
        except Exception as exc:  # noqa: BLE001 - each exporter's failure is reported together below
            problems.append(f"{exporter} exporter: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            path.unlink(missing_ok=True)
    raise ExportError(
        f"could not export {type(model).__name__} to ONNX (opset {opset}): " + "; ".join(problems) + "; try another export.opset"
    )
