"""The pydantic models of every config section: what each field means, its default and its range.

Every model forbids unknown keys and documents each field (docs/reference/configuration.md is
generated from these descriptions). Checks across sections live in checks.py, loading in loading.py.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from cluster.config.base import Fraction, PositiveInt, Strict
from cluster.config.serving_schema import (
    ExportConfig,
    PredictConfig,
    ServingConfig,
)

CONFIG_VERSION = 1
PACKAGED_EXAMPLE = Path(__file__).parents[1] / "example.yaml"


def resolve_import_path(path: str) -> Any:
    """Import `module:attribute` and return the attribute; raises ValueError with the fix."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(f"'{path}' is not an import path; write it as 'package.module:function'")
    module_name, attr = path.split(":")
    # Like `python -m`, user modules are found relative to the current directory too.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"module '{module_name}' cannot be imported ({exc}); check the spelling or install it") from None
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attr, public, n=1)
        hint = f"; did you mean '{module_name}:{close[0]}'?" if close else ""
        raise ValueError(f"module '{module_name}' has no attribute '{attr}'{hint}")
    return getattr(module, attr)


def looks_like_files(spec: str) -> bool:
    """True when a data source names files (a path, a glob, a folder or a URI), False for a
    'module:function' import path."""
    return re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec) is None


def _import_path_validator(value: str) -> str:
    resolve_import_path(value)
    return value


# ---------------------------------------------------------------------------------------------
# cluster
# ---------------------------------------------------------------------------------------------


class NodeGroup(Strict):
    cpus: float = Field(1.0, gt=0, description="CPUs per node of this group (Ray logical CPUs, Kubernetes CPU request).")
    gpus: int = Field(0, ge=0, description="GPUs per node of this group (nvidia.com/gpu on Kubernetes).")
    memory: str = Field("4Gi", pattern=r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti)?$", description="Memory per node, Kubernetes quantity (e.g. 8Gi).")
    replicas: int | None = Field(None, ge=0, description="Nodes to start with; defaults to min_replicas.")
    min_replicas: int = Field(1, ge=0, description="Fewest nodes the autoscaler keeps (0 means cold starts).")
    max_replicas: int = Field(1, ge=0, description="Most nodes the autoscaler may start.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Kubernetes nodeSelector for this group's pods.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Kubernetes tolerations for this group's pods.")

    @model_validator(mode="after")
    def _replica_bounds(self) -> NodeGroup:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is larger than max_replicas ({self.max_replicas}); "
                "lower min_replicas or raise max_replicas"
            )
        return self


class LocalMode(Strict):
    simulate_nodes: bool = Field(False, description="Start one local Ray node per node group (ray.cluster_utils.Cluster), for tests.")
    num_cpus: float | None = Field(
        None, gt=0, description="Logical CPUs of the local Ray; may exceed the physical cores. Default: enough for training and serving."
    )
    include_dashboard: bool = Field(False, description="Start Ray's dashboard with the local Ray (needed for `ray job submit`).")


class RuntimeEnv(Strict):
    working_dir: str | None = Field(None, description="Directory uploaded with a submitted job (default: the current directory).")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment variables for every Ray worker of a job.")
    pip: list[str] = Field(default_factory=list, description="Extra pip packages for a submitted job; leave empty when the image has them.")


class KubernetesConfig(Strict):
    upgrade_strategy: Literal["NewCluster", "None"] = Field(
        "NewCluster",
        description="RayService upgrade: a second cluster, zero downtime, twice the resources meanwhile; None updates in place.",
    )
    head_cpus: float = Field(2.0, gt=0, description="CPUs of the head pod (it runs no tasks).")
    head_memory: str = Field("8Gi", pattern=r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti)?$", description="Memory of the head pod.")
    job_ttl_s: int = Field(300, ge=0, description="Seconds a finished RayJob's cluster is kept.")
    job_backoff_limit: int = Field(0, ge=0, description="Retries of a failed RayJob, each on a new cluster.")
    job_deadline_s: int | None = Field(None, gt=0, description="RayJob activeDeadlineSeconds.")
    autoscaler_idle_timeout_s: int = Field(60, ge=0, description="Seconds an idle worker pod is kept before the autoscaler removes it.")
    auth_secret: str | None = Field(None, description="Secret holding the Ray token (key auth_token); default <name>-ray-token.")
    storage_claim: str | None = Field(
        None, description="ReadWriteMany PVC mounted at cluster.storage in every pod; cluster.storage must then be absolute."
    )
    ray_version: str | None = Field(None, pattern=r"^\d+\.\d+\.\d+$", description="Ray version of cluster.image when its tag does not say.")


class ClusterConfig(Strict):
    address: str = Field(
        "local", description="'local' (start Ray here), 'auto' (join RAY_ADDRESS or a running head) or 'ray://host:10001'."
    )
    storage: str = Field(
        "./runs",
        description="Where runs, checkpoints and artifacts are written: a folder (on a cluster of more than one node, one every node "
        "mounts at this path) or an object-store URI such as s3://bucket/runs, with credentials from the environment (AWS_*, "
        "AWS_ENDPOINT_URL for an S3-compatible store), never from here.",
    )
    node_groups: dict[str, NodeGroup] = Field(
        default_factory=lambda: {"cpu": NodeGroup(cpus=2, memory="8Gi")},
        description="Node groups: Ray custom resources locally and KubeRay worker groups on Kubernetes.",
    )
    local: LocalMode = Field(default_factory=LocalMode, description="Settings for address: local.")
    image: str = Field("rayproject/ray:2.60.0-py311-cpu", description="Container image for KubeRay pods (build it from the Dockerfile).")
    runtime_env: RuntimeEnv = Field(default_factory=RuntimeEnv, description="runtime_env for submitted jobs.")
    auth: Literal["token", "disabled"] = Field(
        "token", description="Ray token authentication for clusters Tandem starts or submits to ('token' keeps Ray 2.60's default)."
    )
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig, description="KubeRay settings for tandem k8s.")

    @field_validator("address")
    @classmethod
    def _address_form(cls, value: str) -> str:
        if value in ("local", "auto") or value.startswith(("ray://", "http://", "https://")):
            return value
        raise ValueError(f"'{value}' is not an address; use 'local', 'auto' or 'ray://host:10001'")

    @field_validator("node_groups")
    @classmethod
    def _group_names(cls, groups: dict[str, NodeGroup]) -> dict[str, NodeGroup]:
        for name in groups:
            if not name.replace("-", "").replace("_", "").isalnum() or not name[0].isalpha():
                raise ValueError(f"node group name '{name}' must start with a letter and use letters, digits, '-' or '_'")
        return groups


# ---------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------


class ModelConfig(Strict):
    builder: str = Field(
        "training.models:mlp", description="'module:function' returning an nn.Module; called with input_shape, num_classes and args."
    )
    args: dict[str, Any] = Field(default_factory=lambda: {"hidden": [256, 256]}, description="Keyword arguments for the builder.")

    @field_validator("builder")
    @classmethod
    def _builder_imports(cls, value: str) -> str:
        return _import_path_validator(value)


class Augment(Strict):
    name: Literal["noise", "shift", "hook"] = Field(
        description="noise: Gaussian noise; shift: random shift of image-like inputs; hook: a user function."
    )
    std: float = Field(0.1, ge=0, description="Standard deviation of the Gaussian noise (noise).")
    pixels: int = Field(1, ge=0, description="Largest shift in pixels along each axis (shift).")
    fn: str | None = Field(None, description="'module:function(x: Tensor, generator) -> Tensor' (hook).")

    @model_validator(mode="after")
    def _hook_needs_fn(self) -> Augment:
        if self.name == "hook":
            if not self.fn:
                raise ValueError("augment 'hook' needs fn: 'module:function'")
            resolve_import_path(self.fn)
        return self


class DataConfig(Strict):
    source: str = Field(
        "training.data:digits",
        description="'module:function' returning a training.data.ArrayDataset, or files streamed by Ray Data: a path, folder or glob "
        "of Parquet, CSV, .npy (label in the last column) or JSON-lines files.",
    )
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for a 'module:function' data source.")
    features: list[str] | None = Field(
        None, description="Files: the columns holding the features, in order (a column may hold a list); default every other column."
    )
    label_column: str = Field("label", description="Files: the column holding the integer class label.")
    batch_size: PositiveInt = Field(64, description="Micro-batch size per worker.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Fraction of the data held out for validation.")
    augment: list[Augment] = Field(default_factory=list, description="Training-time augmentations, applied in order.")
    seed: int = Field(0, description="Seed of the train/validation split.")

    @field_validator("source")
    @classmethod
    def _source_imports(cls, value: str) -> str:
        # Files are checked where they are read, before Ray starts (training/file_source.py).
        return value if looks_like_files(value) else _import_path_validator(value)

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_shorthand(cls, value: Any) -> Any:
        # `augment: [noise, shift]` is the common case; expand names to full entries.
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


class OptimizerConfig(Strict):
    name: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")


class ScheduleConfig(Strict):
    name: Literal["constant", "cosine", "linear", "step"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to the peak learning rate.")
    min_lr_ratio: Fraction = Field(0.0, description="Final learning rate as a fraction of the peak (cosine, linear).")
    step_size: PositiveInt = Field(100, description="Steps between decays (step).")
    gamma: float = Field(0.5, gt=0, le=1, description="Decay factor (step).")


class DeepSpeedSection(Strict):
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage 0 (DDP-like), 1, 2 or 3.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="Offload optimizer state to CPU (ZeRO 1-3).")
    offload_params: Literal["none", "cpu"] = Field("none", description="Offload parameters to CPU (ZeRO 3 only).")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Merged last into the derived DeepSpeed JSON; conflicts are errors."
    )

    @model_validator(mode="after")
    def _offload_stages(self) -> DeepSpeedSection:
        if self.offload_params == "cpu" and self.zero_stage != 3:
            raise ValueError(f"offload_params: cpu needs zero_stage: 3 (got {self.zero_stage}); set zero_stage: 3 or offload_params: none")
        if self.offload_optimizer == "cpu" and self.zero_stage == 0:
            raise ValueError("offload_optimizer: cpu needs zero_stage 1, 2 or 3; raise zero_stage or set offload_optimizer: none")
        return self


class CheckpointConfig(Strict):
    every_epochs: PositiveInt = Field(1, description="Save a checkpoint every N epochs (and after the last).")
    keep: PositiveInt = Field(2, description="Checkpoints kept by Ray Train.")
    metric: str = Field("val_loss", description="Metric that ranks checkpoints.")
    mode: Literal["min", "max"] = Field("min", description="Whether a lower or higher metric is better.")


class DistillConfig(Strict):
    teacher: str = Field(description="Teacher artifact: a run folder, an artifacts folder or 'latest'.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the distillation loss.")
    alpha: Fraction = Field(0.5, description="Weight of the distillation loss; 1 - alpha weighs the label loss.")


class TrainingConfig(Strict):
    workers: PositiveInt = Field(2, description="Ray Train workers; one per GPU, or per CPU slot without GPUs.")
    node_group: str | None = Field(None, description="Node group the workers are pinned to (by its custom resource).")
    use_gpu: Literal["auto", "true", "false"] = Field("auto", description="auto: GPUs when the cluster has them.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs per worker (fractions allowed).")
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = Field(
        "pack", description="Placement group strategy of the workers."
    )
    epochs: PositiveInt = Field(10, description="Training epochs.")
    max_steps_per_epoch: int | None = Field(None, gt=0, description="Cap on optimizer steps per epoch (for quick runs).")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Learning-rate schedule.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision (fp16 needs a GPU).")
    gradient_accumulation: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient clipping norm (0 turns it off).")
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection, description="DeepSpeed settings.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts before the run fails (-1: unlimited).")
    seed: int = Field(0, description="Seed of model init and data order (offset per rank).")
    distill: DistillConfig | None = Field(None, description="Knowledge distillation from a teacher artifact.")

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _bool_to_str(cls, value: Any) -> Any:
        # YAML reads `use_gpu: true` as a boolean; accept it.
        return str(value).lower() if isinstance(value, bool) else value


# ---------------------------------------------------------------------------------------------
# tuning
# ---------------------------------------------------------------------------------------------

SEARCH_KINDS = ("uniform", "loguniform", "randint", "choice", "grid")


class SchedulerConfig(Strict):
    name: Literal["fifo", "asha", "median", "pbt"] = Field("fifo", description="Trial scheduler.")
    grace_period: PositiveInt = Field(1, description="Epochs before ASHA or median stopping may stop a trial.")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA reduction factor.")
    max_t: int | None = Field(None, gt=0, description="ASHA max epochs (default: training.epochs).")
    rung_min_results: int | None = Field(
        None,
        gt=0,
        description="ASHA: results a rung waits for before it promotes (trials arriving earlier pause; default: the reduction "
        "factor, rounded up; 1 is Ray's asynchronous ASHA).",
    )
    perturbation_interval: PositiveInt = Field(2, description="PBT: epochs between exploit/explore steps.")
    exploit: Literal["in_place", "restart"] = Field(
        "in_place",
        description="PBT: in_place loads the donor's checkpoint into the exploiter's running Train workers (a learning-rate or "
        "weight-decay mutation); restart starts a new Train run from it, as any other mutation does.",
    )


class SearchConfig(Strict):
    name: Literal["random", "grid", "optuna"] = Field("random", description="Search algorithm.")
    seed: int = Field(0, description="Seed of the search algorithm.")


class TuningConfig(Strict):
    metric: str = Field("val_loss", description="Metric to optimize.")
    mode: Literal["min", "max"] = Field("min", description="Minimize or maximize the metric.")
    samples: PositiveInt = Field(8, description="Trials to sample.")
    max_concurrent_trials: int | None = Field(None, gt=0, description="Trials at once (default: as many as fit).")
    time_budget_s: float | None = Field(None, gt=0, description="Stop the search after this many seconds.")
    workers_per_trial: PositiveInt = Field(1, description="Ray Train workers per trial.")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per trial worker (default: computed to fit).")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Trial scheduler.")
    search: SearchConfig = Field(default_factory=SearchConfig, description="Search algorithm.")
    space: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Dotted config path -> {uniform|loguniform|randint|choice|grid: args}."
    )

    @field_validator("space")
    @classmethod
    def _space_kinds(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for path, spec in space.items():
            if len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
                raise ValueError(f"space['{path}'] must be one of {{{', '.join(k + ': ...' for k in SEARCH_KINDS)}}}, got {spec}")
        return space


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: sqlite:///<cluster.storage>/mlflow.db). Credentials come from the environment "
        "(MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN), never from here.",
    )
    experiment: str | None = Field(None, description="MLflow experiment (default: the config's name).")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        from urllib.parse import urlsplit

        if uri and (urlsplit(uri).username or urlsplit(uri).password):
            raise ValueError(
                "holds credentials, which a config file must not; drop 'user:password@' and set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
            )
        return uri

    @field_validator("tracking_uri")
    @classmethod
    def _no_file_store(cls, uri: str | None) -> str | None:
        # MLflow 3 sends 'file:' URIs and plain paths to its file store, which raises at its first
        # call ("in maintenance mode"): a run would start, then fail in tracking. MLflow's opt-out
        # (MLFLOW_ALLOW_FILE_STORE) is not honoured here: the config is validated again in Ray
        # workers and Serve replicas, whose environment need not have it.
        from urllib.parse import urlsplit

        if not uri or uri in ("databricks", "databricks-uc", "uc"):  # names MLflow resolves without a scheme
            return uri
        scheme = urlsplit(uri).scheme
        if scheme != "file" and len(scheme) > 1:  # a one-letter scheme is a Windows drive (C:\...): a path
            return uri
        folder = urlsplit(uri).path.rstrip("/") if uri.startswith("file:") else uri.rstrip("/")
        raise ValueError(
            f"is an MLflow file store, which MLflow 3 refuses (its file backend is in maintenance mode); use a database store such as "
            f"'sqlite:///{folder}/mlflow.db', or leave tracking_uri unset for sqlite:///<cluster.storage>/mlflow.db"
        )


class TrackingConfig(Strict):
    mlflow: MlflowConfig | None = Field(None, description="Log runs to MLflow (off when absent; `mlflow: {}` for the defaults).")
    tensorboard: bool = Field(False, description="Write TensorBoard event files (scalars per epoch) into each run and trial folder.")


class TandemConfig(Strict):
    version: Literal[1] = Field(1, description="Config format version.")
    name: str = Field(
        "tandem",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Run name: lowercase letters, digits and '-' (used in Kubernetes names).",
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Where Ray runs.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model.")
    data: DataConfig = Field(default_factory=DataConfig, description="The data.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Training.")
    tuning: TuningConfig | None = Field(None, description="Hyperparameter search (off when absent).")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Inference optimization.")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="Serving.")
    predict: PredictConfig = Field(default_factory=PredictConfig, description="Offline batch inference (`tandem predict`).")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Experiment tracking: MLflow and TensorBoard (off by default)."
    )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
