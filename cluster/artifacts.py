"""Run folders and model artifacts: the one contract between training, tuning and serving.

    <storage>/<name>/<run-id>/
        config.yaml          the resolved config
        metrics.jsonl        one line per epoch
        checkpoints/         Ray Train storage (every rank's DeepSpeed shards)
        artifacts/
            model.pt         consolidated fp32 state_dict (torch.load(weights_only=True))
            model.onnx ...   added by export
            manifest.json    model spec, metrics, lineage, sha256 of every file

Every write is atomic (a temp file in the same folder, then rename), and every load checks the
file's sha256 against the manifest first: a truncated or altered file is refused, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MODEL_FILE = "model.pt"


class ArtifactError(RuntimeError):
    """An artifact is missing, altered or unsafe; the message names the file and the fix."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_torch(obj: Any, path: Path) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def new_run_dir(storage: Path, name: str, prefix: str = "") -> Path:
    """A fresh run folder `<storage>/<name>/<prefix><timestamp>`; never reuses an existing one."""
    base = Path(storage) / name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        run = base / f"{prefix}{stamp}{'' if n == 0 else f'-{n}'}"
        try:
            run.mkdir(parents=True)
            return run
        except FileExistsError:
            continue
    raise ArtifactError(f"could not create a run folder under {base}")


def _inside(folder: Path, name: str) -> Path:
    """The path of a manifest entry, refusing entries that point outside the folder."""
    candidate = (folder / name).resolve()
    if Path(name).is_absolute() or folder.resolve() not in candidate.parents:
        raise ArtifactError(f"{folder / MANIFEST}: entry '{name}' points outside its artifact folder; refusing to load it")
    return candidate


def write_manifest(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in the folder and write manifest.json (merging `info` into an existing one)."""
    folder = Path(folder)
    manifest: dict[str, Any] = {}
    if (folder / MANIFEST).exists():
        manifest = json.loads((folder / MANIFEST).read_text())
    manifest.update(info)
    manifest["files"] = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{path} does not exist; train a model first (tandem train) or point at an artifacts folder")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is damaged, export or train again") from None
    for name in manifest.get("files", {}):
        _inside(Path(folder), name)
    return manifest


def verify_file(folder: Path, name: str) -> Path:
    """Check one file of an artifact against its manifest checksum and return its path."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    entry = manifest.get("files", {}).get(name)
    if entry is None:
        raise ArtifactError(f"{folder / name} is not listed in {folder / MANIFEST}; refusing an unverified file")
    path = _inside(folder, name)
    if not path.exists():
        raise ArtifactError(f"{path} is missing; the manifest lists it with sha256 {entry['sha256']}")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ArtifactError(
            f"{path} fails its checksum: sha256 {actual} but {folder / MANIFEST} records {entry['sha256']}; "
            "the file was truncated or altered, train or export it again"
        )
    return path


def verify_artifact(folder: Path) -> dict[str, Any]:
    """Verify every file listed in the manifest; return the manifest."""
    manifest = read_manifest(folder)
    for name in manifest.get("files", {}):
        verify_file(folder, name)
    return manifest


def load_state_dict(folder: Path, name: str = MODEL_FILE) -> dict[str, Any]:
    import torch

    path = verify_file(folder, name)
    # weights_only=True: an artifact is tensors, never pickled code.
    return torch.load(path, map_location="cpu", weights_only=True)


def model_version(folder: Path) -> str:
    """The model version: the first 12 hex digits of model.pt's sha256 (changes with the weights)."""
    return read_manifest(folder)["files"][MODEL_FILE]["sha256"][:12]


def save_model_artifact(folder: Path, state_dict: dict[str, Any], model_spec: dict[str, Any], info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write model.pt (atomically) and manifest.json for a trained model.

    model_spec: {"builder": "module:function", "args": {...}, "input_shape": [...], "num_classes": N},
    enough to rebuild the module without the config. info: metrics, config_hash, lineage, ...
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cpu_state = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_save_torch(cpu_state, folder / MODEL_FILE)
    manifest = write_manifest(folder, {"model": model_spec, **(info or {})})
    manifest["version"] = manifest["files"][MODEL_FILE]["sha256"][:12]
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def build_model_from_manifest(manifest: dict[str, Any]) -> Any:
    """Build the (untrained) nn.Module that an artifact's model.pt belongs to."""
    from cluster.config import resolve_import_path

    spec = manifest["model"]
    builder = resolve_import_path(spec["builder"])
    return builder(input_shape=tuple(spec["input_shape"]), num_classes=spec["num_classes"], **spec.get("args", {}))


def load_model(folder: Path, name: str = MODEL_FILE) -> tuple[Any, dict[str, Any]]:
    """The verified model of an artifact in eval mode, and its manifest."""
    manifest = read_manifest(folder)
    model = build_model_from_manifest(manifest)
    model.load_state_dict(load_state_dict(folder, name))
    model.eval()
    return model, manifest


def find_latest_artifact(storage: Path, name: str) -> Path:
    """The newest `artifacts/` folder with a manifest under `<storage>/<name>/`."""
    base = Path(storage) / name
    candidates = sorted(base.glob("*/artifacts/" + MANIFEST), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ArtifactError(f"no trained artifact under {base}; run `tandem train` first or pass --from RUN")
    return candidates[-1].parent


def resolve_artifact(ref: str | Path, storage: Path, name: str) -> Path:
    """An artifacts folder from 'latest', a run folder or an artifacts folder."""
    if str(ref) == "latest":
        return find_latest_artifact(storage, name)
    path = Path(ref).expanduser()
    if (path / MANIFEST).exists():
        return path
    if (path / "artifacts" / MANIFEST).exists():
        return path / "artifacts"
    raise ArtifactError(f"{path} is neither a run folder nor an artifacts folder (no {MANIFEST}); pass a run folder or 'latest'")
