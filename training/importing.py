"""`tandem import CONFIG --weights model.pt`: a model trained elsewhere becomes a Tandem artifact.

The weights are a `state_dict` saved by torch (`torch.save(model.state_dict(), path)`), read with
`weights_only=True` (no pickled code runs). They must fit the module the config's `model.builder`
and `model.args` build for the config's data: the first key that is missing, unexpected or of
another shape is named. The artifact is written exactly like a training run's (`artifacts/`
with model.pt, the manifest, checksums and the model version) in a new run folder, with the
validation split's loss and accuracy as its metrics, so `tandem export`, `tandem serve` and
`tandem predict` take it like any other.

May import: `cluster`; torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.artifacts import ArtifactError, new_run_dir, save_model_artifact, sha256_file
from cluster.config import TandemConfig
from cluster.runtime import require_reachable_storage, storage_root
from cluster.storage import native


class WeightsMismatchError(ArtifactError):
    """A state_dict that does not fit the configured module."""


@dataclass
class ImportResult:
    run_dir: Path
    artifact_dir: Path
    version: str
    metrics: dict[str, float]


def read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a torch-saved state_dict, loaded with weights_only=True."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same fix
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours its message
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ArtifactError(
            f"--weights {path} is not a state_dict torch can load with weights_only=True ({first}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        hint = " (a whole module or a training checkpoint?)" if isinstance(state, dict) else ""
        raise ArtifactError(f"--weights {path} holds {type(state).__name__}{hint}, not a state_dict of tensors; save model.state_dict()")
    return state


def mismatch(expected: dict[str, Any], given: dict[str, Any]) -> str | None:
    """The first key that differs between the module's state_dict and the given one, in words."""
    for key, tensor in expected.items():
        if key not in given:
            return f"key '{key}' (shape {tuple(tensor.shape)}) is missing from the weights"
        if tuple(given[key].shape) != tuple(tensor.shape):
            return f"key '{key}' has shape {tuple(given[key].shape)} in the weights but {tuple(tensor.shape)} in the module"
    for key, tensor in given.items():
        if key not in expected:
            return f"key '{key}' (shape {tuple(tensor.shape)}) is in the weights but not in the module"
    return None


def validation_metrics(model: Any, config: TandemConfig) -> dict[str, float]:
    """Loss and accuracy on the validation split training would hold out (same fraction and seed)."""
    import torch

    from training.data import load_dataset, split

    _, val = split(load_dataset(config), config.data.val_fraction, config.data.seed)
    with torch.no_grad():
        logits = model(torch.from_numpy(val.x))
        labels = torch.from_numpy(val.y).long()
        loss = float(torch.nn.functional.cross_entropy(logits, labels))
        accuracy = float((logits.argmax(1) == labels).float().mean())
    return {"val_loss": loss, "val_accuracy": accuracy}


def import_weights(config: TandemConfig, weights: Path) -> ImportResult:
    """Build the configured module, load `weights` into it and write a verified artifact."""
    from training.data import load_dataset
    from training.models import build_model, model_spec
    from training.trainer import preflight

    preflight(config)  # the data source and the module build, or a ConfigError naming the field
    require_reachable_storage(config)
    dataset = load_dataset(config)
    model = build_model(config, dataset.input_shape, dataset.num_classes)
    state = read_state_dict(weights)
    problem = mismatch(model.state_dict(), state)
    if problem:
        raise WeightsMismatchError(
            f"--weights {weights} does not fit {config.model.builder} with model.args {config.model.args}: {problem}; "
            "set model.builder and model.args to the module the weights were trained as"
        )
    model.load_state_dict(state)
    model.eval()
    metrics = validation_metrics(model, config)
    run_dir = new_run_dir(storage_root(config), config.name)
    (run_dir / "config.yaml").put_text(config.to_yaml())
    manifest = save_model_artifact(
        run_dir / "artifacts",
        model.state_dict(),
        model_spec(config, dataset.input_shape, dataset.num_classes),
        {
            "name": config.name,
            "config_hash": config.config_hash(),
            "metrics": metrics,
            "run_dir": str(run_dir),
            "epochs": 0,
            "imported": {"weights": str(Path(weights).resolve()), "sha256": sha256_file(Path(weights))},
        },
    )
    return ImportResult(run_dir=native(run_dir), artifact_dir=native(run_dir / "artifacts"), version=manifest["version"], metrics=metrics)
