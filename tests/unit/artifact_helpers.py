"""Real model artifacts for unit tests: a plain torch loop on the digits, saved like training saves.

No Ray, no DeepSpeed: a few seconds of single-process training, then
cluster.artifacts.save_model_artifact, so the folder is exactly what `tandem train` leaves behind
(model.pt, manifest.json with the model spec and sha256). The split is training.data.split with
the config defaults (val_fraction 0.2, seed 0), so export's held-out data is unseen here too.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.artifacts import save_model_artifact
from cluster.config import TandemConfig, resolve_import_path, validate_config
from training.data import digits, split

VAL_FRACTION = 0.2
SPLIT_SEED = 0


def train_artifact(
    folder: Path,
    builder: str = "training.models:mlp",
    args: dict[str, Any] | None = None,
    epochs: int = 20,
    lr: float = 3e-3,
    seed: int = 0,
) -> Path:
    """Train `builder(**args)` on the digits training split for `epochs` and save it under `folder`."""
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine a second torch thread waits on the first at every op.
    torch.set_num_threads(1)
    try:
        model, spec, accuracy = _train(builder, dict(args or {}), epochs, lr, seed)
    finally:
        torch.set_num_threads(threads)
    save_model_artifact(folder, model.state_dict(), spec, info={"metrics": {"val_accuracy": accuracy}})
    return Path(folder)


def _train(builder: str, args: dict[str, Any], epochs: int, lr: float, seed: int) -> tuple[torch.nn.Module, dict[str, Any], float]:
    torch.manual_seed(seed)
    train, val = split(digits(), VAL_FRACTION, SPLIT_SEED)
    spec = {"builder": builder, "args": args, "input_shape": list(train.input_shape), "num_classes": 10}
    model = resolve_import_path(builder)(input_shape=train.input_shape, num_classes=10, **args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 64):
            batch = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        accuracy = float((model(torch.from_numpy(val.x)).argmax(1).numpy() == val.y).mean())
    return model, spec, accuracy


def export_config(storage: Path, builder: str = "training.models:mlp", args: dict[str, Any] | None = None, **export: Any) -> TandemConfig:
    """A config for the digits with the given `export:` section, storage under `storage`."""
    raw = {
        "name": "digits",
        "cluster": {"storage": str(storage)},
        "model": {"builder": builder, "args": dict(args or {})},
        "data": {"source": "training.data:digits", "val_fraction": VAL_FRACTION, "seed": SPLIT_SEED},
        "export": export,
    }
    return validate_config(raw)


def file_digests(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, to prove a folder was left untouched."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def onnx_weight_sparsity(path: Path) -> float:
    """Fraction of zeros over the matrices and kernels (initializers of rank >= 2) of an ONNX file."""
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    weights = [w for w in weights if w.ndim >= 2]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)) if weights else 0.0


def digits_val() -> tuple[np.ndarray, np.ndarray]:
    _, val = split(digits(), VAL_FRACTION, SPLIT_SEED)
    return val.x, val.y


MLP_ARGS = {"hidden": [128, 128]}
LOOSE_GATE = {"max_accuracy_drop": 1.0, "min_argmax_agreement": 0.0}


@functools.cache
def exported_mlp() -> Path:
    """A digits MLP artifact after a full export (model.onnx, int8 by auto, 50% unstructured pruning).

    Built once per test process (a dynamo export costs seconds) and shared by test_export and
    test_engines; tests that change it work on a copy (`copy_artifact`). The gate is loose here:
    tests assert the numbers they care about, and test_export checks the gate on its own.
    """
    root = Path(tempfile.mkdtemp(prefix="tandem-exported-mlp-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    folder = train_artifact(root / "digits" / "run-1" / "artifacts", args=MLP_ARGS, epochs=20)
    from serving.optimize.export import export

    config = export_config(root, args=MLP_ARGS, quantize="auto", prune={"sparsity": 0.5}, gate=LOOSE_GATE, latency_batch_sizes=[1, 32])
    export(config, folder, latency_budget_s=0.02)
    return folder


def copy_artifact(folder: Path, storage: Path, run: str = "run-1") -> Path:
    """A copy of an artifacts folder at <storage>/digits/<run>/artifacts (where 'latest' finds it)."""
    target = Path(storage) / "digits" / run / "artifacts"
    shutil.copytree(folder, target)
    return target


def flip_byte(path: Path) -> None:
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
