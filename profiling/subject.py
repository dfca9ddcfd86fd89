"""What a profile measures: the plan (how long, which sizes) and the subject (an artifact, or the untrained model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.artifacts import ArtifactError, find_latest_artifact, load_model, local_artifact, resolve_artifact
from cluster.config import ConfigError, Problem, TandemConfig
from cluster.runtime import require_reachable_storage, storage_root
from cluster.storage import Location, StorageError, location, native
from training.data import ArrayDataset, load_dataset
from training.trainer import preflight

REPORT_DIR = "profile"
ENGINE_THREADS = 1  # a serving replica's default (serving.deployments[].threads) and a Ray Train worker's OMP_NUM_THREADS


# ---------------------------------------------------------------------------------------------
# how hard to measure
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    batch_sizes: tuple[int, ...]
    gemm_size: dict[str, int]
    triad_elements: dict[str, int]
    peak_budget_s: float
    step_budget_s: float
    latency_budget_s: float
    served_requests: int


def plan_for(quick: bool) -> Plan:
    """quick: small matrices and arrays, three batch sizes, short budgets (tests; figures are rough)."""
    if quick:
        return Plan((1, 8, 32), {"cpu": 256, "cuda": 1024}, {"cpu": 1 << 18, "cuda": 1 << 22}, 0.05, 0.1, 0.03, 16)
    # 2048^2 fp32 takes ~0.1 s per product on one core here; 2^24-float arrays (64 MB each) are
    # far beyond any CPU cache, so the triad measures DRAM, not L3.
    return Plan((1, 2, 4, 8, 16, 32, 64, 128), {"cpu": 2048, "cuda": 8192}, {"cpu": 1 << 24, "cuda": 1 << 27}, 0.5, 1.0, 0.25, 200)


# ---------------------------------------------------------------------------------------------
# what is profiled
# ---------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """The trained artifact and its run folder, or neither (the untrained model from the config).

    artifact_dir and run_dir are where they live: Paths for local storage, Locations (URIs) in an
    object store, as in training's TrainResult. local_dir holds the artifact's verified files on
    this machine: artifact_dir itself when local, this node's cached copy of a stored one."""

    artifact_dir: Path | Location | None
    run_dir: Path | Location | None
    manifest: dict[str, Any] = field(default_factory=dict)
    local_dir: Path | None = None

    @property
    def trained(self) -> bool:
        return self.artifact_dir is not None


def find_subject(config: TandemConfig, source: str | Path | None) -> Subject:
    """source None: the latest artifact under storage when there is one, else the untrained model."""
    require_reachable_storage(config)  # a missing bucket or refused credentials, named before minutes of measuring
    storage = storage_root(config)
    if source is None:
        try:
            where = find_latest_artifact(storage, config.name)
        except ArtifactError:
            return Subject(None, None)
    else:
        where = resolve_artifact(source, storage, config.name)
    folder = local_artifact(where)  # a stored artifact: its files fetched once per node, checked against its manifest
    _, manifest = load_model(folder)  # verifies model.pt's sha256 before anything is measured
    return Subject(native(where), run_folder_of(where, manifest), manifest, folder)


def run_folder_of(artifact_dir: Location, manifest: dict[str, Any]) -> Path | Location | None:
    """The run folder of an artifact (where metrics.jsonl and config.yaml live), if it has one.

    The artifact's own parent first: the manifest's run_dir is where the run was trained, and a
    copied or moved run would otherwise send the report (and the metrics read) to the original.
    """
    if is_run_folder(artifact_dir.parent):
        return native(artifact_dir.parent)
    recorded = manifest.get("run_dir")
    try:
        if recorded and is_run_folder(location(recorded)):
            return native(location(recorded))
    except StorageError:  # trained in a store this shell cannot reach: the record is a hint, not a requirement
        pass
    return None


def is_run_folder(folder: Location) -> bool:
    """A folder `tandem train` made: it has the run's metrics or its config (an artifacts folder alone has neither)."""
    return (folder / "metrics.jsonl").exists() or (folder / "config.yaml").exists()


def checked_dataset(config: TandemConfig, subject: Subject) -> ArrayDataset:
    """The configured data, after the checks training runs (preflight) and, for an artifact, its model's input shape."""
    preflight(config)  # data source, model build, forward on two examples, DeepSpeed JSON: ConfigError naming the field
    dataset = load_dataset(config)
    if subject.trained:
        expected = tuple(subject.manifest["model"]["input_shape"])
        if dataset.input_shape != expected:
            raise ConfigError(
                [
                    Problem(
                        path="data.source",
                        value=config.data.source,
                        message=(
                            f"returns examples of shape {dataset.input_shape}, but the model of {subject.artifact_dir} takes {expected}; "
                            "fix the data source, or profile another run with --from"
                        ),
                    )
                ]
            )
    return dataset


# ---------------------------------------------------------------------------------------------
# training phase
# ---------------------------------------------------------------------------------------------
