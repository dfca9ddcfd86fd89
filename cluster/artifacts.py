"""Run folders and model artifacts: the one contract between training, tuning and serving.

    <storage>/<name>/<run-id>/
        config.yaml          the resolved config
        metrics.jsonl        one line per epoch
        checkpoints/         Ray Train storage (every rank's DeepSpeed shards)
        artifacts/
            model.pt         consolidated fp32 state_dict (torch.load(weights_only=True))
            model.onnx ...   added by export
            manifest.json    model spec, metrics, lineage, sha256 of every file

Every write is atomic (a temp file in the same folder, fsync, rename, fsync of the folder): a
crash mid-write leaves the old file or none, never a partial one. Every load checks the file's
sha256 against the manifest and loads the very bytes it checked: a truncated or altered file is
refused, never loaded. A manifest entry must name a file inside its folder (no "../x", absolute
path or symlink out); torch.load only ever runs with weights_only=True.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.errors import TandemError
from cluster.storage import Location, atomic_write_bytes, fetch_folder, location, publish_folder, sha256_file

MANIFEST = "manifest.json"
MODEL_FILE = "model.pt"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(TandemError, RuntimeError):
    """An artifact is missing, altered or unsafe; the message names the file and the fix."""


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_torch(obj: Any, path: Path) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def new_run_dir(storage: Location, name: str, prefix: str = "") -> Location:
    """A fresh run folder `<storage>/<name>/<prefix><timestamp>`; never reuses an existing one.

    On an object store the folder exists once its first file is written; the caller writes
    config.yaml at once."""
    base = location(storage) / name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        run = base / f"{prefix}{stamp}{'' if n == 0 else f'-{n}'}"
        if run.remote:
            if not run.exists() and not run.children():
                return run
            continue
        try:
            Path(run.uri).mkdir(parents=True)
            return run
        except FileExistsError:
            continue
    raise ArtifactError(f"could not create a run folder under {base}")


def _inside(folder: Path, name: Any) -> Path:
    """The path of a manifest entry, refusing entries that point outside the folder.

    Resolving follows symlinks, so a link inside the folder that points out is refused too."""
    where = f"{Path(folder) / MANIFEST}: entry {name!r}"
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ArtifactError(f"{where} is not a file name; the manifest is damaged, export or train again")
    root = Path(folder).resolve()
    candidate = (root / name).resolve()
    if Path(name).is_absolute() or root not in candidate.parents:
        raise ArtifactError(
            f"{where} points outside its artifact folder ({candidate}); refusing to load it. Keep every file of an artifact inside its "
            "folder"
        )
    return candidate


def write_manifest(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in the folder and write manifest.json (merging `info` into an existing one)."""
    folder = Path(folder)
    manifest: dict[str, Any] = {}
    if (folder / MANIFEST).exists():
        manifest = _load_manifest_json(folder / MANIFEST)
    manifest.update(info)
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]
    for p in files:
        _inside(folder, p.name)  # never record a symlink that points out of the folder
    manifest["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def _load_manifest_json(path: Path | Location) -> dict[str, Any]:
    """A manifest file, local or in an object store, as a dict (not yet checked entry by entry)."""
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist; train a model first (tandem train) or point at an artifacts folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is damaged, export or train again") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a JSON object; the artifact is damaged, export or train again")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an artifacts folder, after checking that every entry is well formed and
    names a file inside the folder (its checksums are checked when a file is loaded)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{path} does not exist; train a model first (tandem train) or point at an artifacts folder")
    manifest = _load_manifest_json(path)
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: 'files' is not a mapping of file name to checksum; the artifact is damaged, export or train again")
    for name, entry in files.items():
        _inside(Path(folder), name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise ArtifactError(f"{path}: entry '{name}' has no valid sha256; the artifact is damaged, export or train again")
    return manifest


def read_verified(folder: Path, name: str) -> bytes:
    """The bytes of one file of an artifact, after checking them against the manifest's sha256.

    Hashing and loading the same bytes leaves no window for the file to change in between."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    entry = manifest.get("files", {}).get(name)
    if entry is None:
        raise ArtifactError(f"{folder / name} is not listed in {folder / MANIFEST}; refusing an unverified file")
    path = _inside(folder, name)
    if not path.is_file():
        raise ArtifactError(
            f"{path} is missing; the manifest lists it with sha256 {entry['sha256']}. Copy the whole artifacts folder, or train or export "
            "again"
        )
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry["sha256"]:
        size = (
            f" ({len(data)} bytes, the manifest records {entry['bytes']})"
            if isinstance(entry.get("bytes"), int) and entry["bytes"] != len(data)
            else ""
        )
        raise ArtifactError(
            f"{path} fails its checksum{size}: sha256 {actual} but {folder / MANIFEST} records {entry['sha256']}; "
            "the file was truncated or altered, refusing to load it. Train or export it again (or copy the artifact again)"
        )
    return data


def verify_file(folder: Path, name: str) -> Path:
    """Check one file of an artifact against its manifest checksum and return its path."""
    read_verified(folder, name)
    return _inside(Path(folder), name)


def verify_artifact(folder: Path) -> dict[str, Any]:
    """Verify every file listed in the manifest; return the manifest."""
    manifest = read_manifest(folder)
    for name in manifest.get("files", {}):
        verify_file(folder, name)
    return manifest


def load_state_dict(folder: Path, name: str = MODEL_FILE) -> dict[str, Any]:
    import torch

    data = read_verified(folder, name)
    try:
        # weights_only=True: an artifact is tensors, never pickled code.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(
            f"{Path(folder) / name} holds more than tensors, so torch.load(weights_only=True) refused it ({first}); "
            "an artifact is a plain state_dict. Do not load this file; train or export the model again"
        ) from None


def model_version(artifact: Path | Location | dict[str, Any]) -> str:
    """The model version: the first 12 hex digits of model.pt's sha256 (changes with the weights).

    artifact: an artifacts folder, or its manifest already read."""
    if isinstance(artifact, Location) and artifact.remote:
        artifact = _load_manifest_json(artifact / MANIFEST)
    manifest = artifact if isinstance(artifact, dict) else read_manifest(Path(str(artifact)))
    entry = manifest.get("files", {}).get(MODEL_FILE)
    if entry is None:
        where = "the manifest" if isinstance(artifact, dict) else Path(artifact) / MANIFEST
        raise ArtifactError(f"{where} lists no {MODEL_FILE}; train a model first (tandem train)")
    return entry["sha256"][:12]


def save_model_artifact(
    folder: Path | Location, state_dict: dict[str, Any], model_spec: dict[str, Any], info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write model.pt (atomically) and manifest.json for a trained model.

    model_spec: {"builder": "module:function", "args": {...}, "input_shape": [...], "num_classes": N},
    enough to rebuild the module without the config. info: metrics, config_hash, lineage, ...
    """
    if isinstance(folder, Location) and folder.remote:
        # Written in a local staging folder, then published with the manifest last.
        with tempfile.TemporaryDirectory(prefix="tandem-artifact-") as staging:
            manifest = save_model_artifact(Path(staging), state_dict, model_spec, info)
            publish_folder(Path(staging), folder)
        return manifest
    folder = Path(str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    cpu_state = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_save_torch(cpu_state, folder / MODEL_FILE)
    manifest = write_manifest(folder, {"model": model_spec, **(info or {})})
    manifest["version"] = model_version(manifest)
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


def find_latest_artifact(storage: Location, name: str) -> Location:
    """The newest `artifacts/` folder with a manifest under `<storage>/<name>/` (by the manifest's
    time, then the run folder's name, which is a timestamp)."""
    base = location(storage) / name
    candidates = [run / "artifacts" for run in base.children() if (run / "artifacts" / MANIFEST).is_file()]
    if not candidates:
        raise ArtifactError(f"no trained artifact under {base}; run `tandem train` first or pass --from RUN")
    return max(candidates, key=lambda folder: ((folder / MANIFEST).stat()[0], folder.parent.name))


def resolve_artifact(ref: str | Path | Location, storage: Location, name: str) -> Location:
    """An artifacts folder from 'latest', a run folder or an artifacts folder (a path or a URI)."""
    if str(ref) == "latest":
        return find_latest_artifact(storage, name)
    where = location(ref)
    if (where / MANIFEST).is_file():
        return where
    if (where / "artifacts" / MANIFEST).is_file():
        return where / "artifacts"
    raise ArtifactError(f"{where} is neither a run folder nor an artifacts folder (no {MANIFEST}); pass a run folder or 'latest'")


def local_artifact(folder: Location | Path | str) -> Path:
    """The artifact as a local folder: itself when local, else this node's cached copy of it
    (cluster/storage.py `fetch_folder`: each file downloaded once per node, by its sha256)."""
    return fetch_folder(location(folder), MANIFEST)
