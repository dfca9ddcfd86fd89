"""Inference engines: one small interface, two implementations, loaded from a verified artifact.

    engine = load_engine(artifact_dir, engine="onnxruntime", quantize="int8", threads=1)
    logits = engine.predict(x)          # float32 (N, *input_shape) -> float32 (N, num_classes)

An engine is anything that satisfies `Engine` (a Protocol, not a base class): a new engine is a
small class with `name`, `input_shape`, `num_classes` and `predict`, plus a branch in
`load_engine`. Every loader checks the file's sha256 against the artifact's manifest before it
reads a byte of the model, so a truncated or altered file is refused, never served.

Threads are explicit everywhere: serving replicas are sized in CPUs, and an engine that takes
every core (torch's and ORT's default) oversubscribes a node that runs several replicas.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from cluster.artifacts import MANIFEST, MODEL_FILE, ArtifactError, load_model, read_manifest, verify_file
from cluster.errors import EngineError

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
PRUNED_FILE = "model.pruned.pt"
PRUNED_ONNX_FILE = "model.pruned.onnx"

Device = Literal["auto", "cpu", "cuda"]


@runtime_checkable
class Engine(Protocol):
    name: str
    input_shape: tuple[int, ...]
    num_classes: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, *input_shape) -> float32 logits (N, num_classes)."""
        ...


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with `threads` intra-op threads (measurements, exports), then give the process its setting back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_batch(x: np.ndarray, input_shape: tuple[int, ...], engine: str) -> np.ndarray:
    """x as a C-contiguous float32 batch of the engine's input shape, or a ValueError naming both shapes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise EngineError(f"{engine}: input of shape {tuple(x.shape)} does not match the model's (N, {', '.join(map(str, input_shape))})")
    return x


# ---------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------


def _torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' was asked for but torch sees no CUDA device; use device 'cpu' or 'auto', or give the replica gpus")
    if device not in ("cpu", "cuda"):
        raise EngineError(f"device '{device}' is not one of auto, cpu, cuda")
    return device


def _torch_dtype(precision: str, device: str) -> Any:
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise EngineError(f"precision '{precision}' is not one of {', '.join(dtypes)}")
    if precision == "fp16" and device == "cpu":
        # Most CPU kernels have no fp16 path (they upcast or fail); bf16 is the CPU half type.
        raise EngineError("precision 'fp16' needs a CUDA device; use bf16 or fp32 on CPU, or give the deployment gpus")
    return dtypes[precision]


class TorchEngine:
    """Eager torch on CPU or CUDA in fp32, bf16 or fp16, under torch.inference_mode."""

    def __init__(
        self, model: Any, *, input_shape: tuple[int, ...], num_classes: int, precision: str = "fp32", device: str = "auto", threads: int = 1
    ):
        import torch

        self.device = _torch_device(device)
        self.dtype = _torch_dtype(precision, self.device)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.name = f"torch-{precision}"
        if self.device == "cpu":
            # Process-wide setting: one engine per replica process is the serving layout.
            torch.set_num_threads(int(threads))
        self.model = model.to(device=self.device, dtype=self.dtype).eval()

    def predict(self, x: np.ndarray) -> np.ndarray:
        import torch

        x = check_batch(x, self.input_shape, self.name)
        with torch.inference_mode():
            batch = torch.from_numpy(x).to(self.device, self.dtype, non_blocking=True)
            logits = self.model(batch)
            # .cpu() is a host-device sync on CUDA: the one per batch we cannot avoid.
            return logits.float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# onnxruntime
# ---------------------------------------------------------------------------------------------


def ort_session_options(threads: int = 1) -> Any:
    """Session options with explicit thread counts and thread spinning off.

    ORT's worker threads spin for a while after each run by default; in a process that also runs
    torch (or next to other replicas on the same cores) the spinning threads steal those cores:
    eager torch ran 20x slower next to a spinning ORT session on a 2-core machine.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def ort_providers(device: str) -> list[str]:
    """CUDA first where onnxruntime has it (CPU stays as the fallback for unsupported ops)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise EngineError(
            f"device 'cuda' was asked for but this onnxruntime has only {available}; install onnxruntime-gpu or use device 'cpu'/'auto'"
        )
    if device not in ("auto", "cpu", "cuda"):
        raise EngineError(f"device '{device}' is not one of auto, cpu, cuda")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda and device != "cpu" else ["CPUExecutionProvider"]


def ort_session(model: str | Path | bytes, threads: int = 1, device: str = "cpu") -> Any:
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, ort_session_options(threads), providers=ort_providers(device))


class OnnxEngine:
    """An onnxruntime session over one .onnx file (fp32 or int8)."""

    def __init__(
        self, path: Path, *, input_shape: tuple[int, ...], num_classes: int, name: str = "onnx-fp32", threads: int = 1, device: str = "auto"
    ):
        self.session = ort_session(Path(path), threads=threads, device=device)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.name = name

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = check_batch(x, self.input_shape, self.name)
        return self.session.run([self.output_name], {self.input_name: x})[0]


# ---------------------------------------------------------------------------------------------
# loading from an artifact
# ---------------------------------------------------------------------------------------------


def artifacts_folder(path: Path) -> Path:
    """An artifacts folder from itself or from its run folder."""
    path = Path(path).expanduser()
    if not (path / MANIFEST).exists() and (path / "artifacts" / MANIFEST).exists():
        return path / "artifacts"
    return path


def _require_listed(folder: Path, manifest: dict[str, Any], name: str, fix: str) -> None:
    if name not in manifest.get("files", {}):
        raise ArtifactError(f"{folder / name} is not part of this artifact (not in {folder / MANIFEST}); {fix}")


def check_engine_args(engine: str, precision: str, quantize: str, pruned: bool) -> None:
    """Refuse contradictory settings before touching any file; each message names the fix."""
    if engine not in ("torch", "onnxruntime"):
        raise EngineError(f"engine '{engine}' is not one of torch, onnxruntime")
    if quantize not in ("none", "int8"):
        raise EngineError(f"quantize '{quantize}' is not one of none, int8")
    if engine == "torch" and quantize != "none":
        raise EngineError(
            f"quantize '{quantize}' is for engine 'onnxruntime'; the torch engine serves model.pt (set quantize: none or engine: "
            "onnxruntime)"
        )
    if engine == "onnxruntime" and precision != "fp32":
        raise EngineError(f"precision '{precision}' is for engine 'torch'; onnxruntime serves fp32 or int8 (set quantize: int8 for int8)")
    if quantize == "int8" and pruned:
        raise EngineError("there is no pruned int8 model; serve the pruned model with quantize: none")


def artifact_file(engine: str, quantize: str = "none", pruned: bool = False) -> str:
    """The artifact file an engine loads."""
    if engine == "torch":
        return PRUNED_FILE if pruned else MODEL_FILE
    return INT8_FILE if quantize == "int8" else PRUNED_ONNX_FILE if pruned else ONNX_FILE


def load_engine(
    artifact_dir: Path,
    engine: str = "onnxruntime",
    precision: str = "fp32",
    quantize: str = "none",
    threads: int = 1,
    device: str = "auto",
    *,
    pruned: bool = False,
) -> Engine:
    """An engine for a verified artifact; the file's sha256 is checked against the manifest first.

    engine: torch | onnxruntime; precision (torch): fp32 | bf16 | fp16; quantize (onnxruntime):
    none | int8 (model.int8.onnx); pruned: the pruned model written by export.prune
    (model.pruned.pt / model.pruned.onnx). artifact_dir: an artifacts folder or its run folder.
    """
    check_engine_args(engine, precision, quantize, pruned)
    folder = artifacts_folder(artifact_dir)
    manifest = read_manifest(folder)
    spec = manifest["model"]
    shape, classes = tuple(spec["input_shape"]), int(spec["num_classes"])
    name = artifact_file(engine, quantize, pruned)
    if engine == "torch":
        _require_listed(folder, manifest, name, "run `tandem export` with export.prune set")
        model, _ = load_model(folder, name)  # verifies sha256, torch.load(weights_only=True)
        return TorchEngine(model, input_shape=shape, num_classes=classes, precision=precision, device=device, threads=threads)
    fix = "run `tandem export` first" + (
        " with export.quantize other than none" if quantize == "int8" else " with export.prune set" if pruned else ""
    )
    _require_listed(folder, manifest, name, fix)
    path = verify_file(folder, name)
    label = "onnx-int8" if quantize == "int8" else "onnx-pruned" if pruned else "onnx-fp32"
    return OnnxEngine(path, input_shape=shape, num_classes=classes, name=label, threads=threads, device=device)
