"""A servable model from every training path: export on first need, under the parity gate.

`tandem train`, `tandem tune` and `tandem import` end with an artifact whose files match the
config's deployments (an ONNX Runtime deployment needs model.onnx or model.int8.onnx, which
training alone does not write); `tandem serve` and `tandem predict` make sure of it again for an
artifact trained before. So the cluster recipes (a RayJob or `ray job submit -- tandem train`,
then a Serve config or a RayService naming the artifact) serve with no manual step between.
The export is `tandem export`'s, parity gate included: a crossed gate refuses, naming the gate,
and the artifact keeps its files as they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.artifacts import local_artifact, read_manifest
from cluster.config import TandemConfig
from cluster.storage import Location, location
from serving.engines import artifact_file


def missing_for_serving(config: TandemConfig, manifest: dict[str, Any]) -> list[str]:
    """The files the config's deployments load that the artifact does not list yet."""
    listed = set(manifest.get("files") or {})
    needed = {artifact_file(d.engine, d.quantize) for d in config.serving.deployments}
    return sorted(name for name in needed if name not in listed)


def ensure_exported(config: TandemConfig, where: Location | Path | str, gate_refuses: bool = False) -> dict[str, Any]:
    """Export the artifact when the deployments need a file it lacks; return its manifest.

    After training (`gate_refuses` False) a crossed parity gate is said, not raised: the run did
    train, and its artifact stays as it was, unservable as configured until the gate passes, which
    `tandem serve` and `tandem predict` (`gate_refuses` True) then refuse with the same reason.
    """
    from serving.optimize.export import export
    from serving.optimize.parity import ParityGateError

    where = location(where)
    manifest = read_manifest(local_artifact(where))
    missing = missing_for_serving(config, manifest)
    if not missing:
        return manifest
    print(f"[tandem] exporting {where} for serving (it has no {', '.join(missing)} yet), under export.gate", flush=True)
    try:
        export(config, source=str(where))
    except ParityGateError as exc:
        if gate_refuses:
            raise
        print(f"[tandem] trained, but not servable as configured: {exc}", flush=True)
    return read_manifest(local_artifact(where))


def servable_artifact(config: TandemConfig, ref: str) -> Location:
    """The artifact `ref` names ('latest', a run folder, an artifacts folder; a path or a URI),
    exported first when the deployments need files it lacks."""
    from cluster.artifacts import resolve_artifact
    from cluster.runtime import storage_root

    where = resolve_artifact(ref, storage_root(config), config.name)
    ensure_exported(config, where, gate_refuses=True)
    return where
