"""The one Tandem configuration: pydantic models, loading, `--set` overrides and cross-field checks.

Every model forbids unknown keys and documents each field. `load_config` reports every problem
at once as one `ConfigError`, each problem naming its dotted path, the bad value and the fix.
Cross-section checks (a deployment on a node group that does not exist, ...) live in
`cross_field_problems`, one small function per trap, so that they run even when another section
has field errors of its own.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import json
import os
import reprlib
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

CONFIG_VERSION = 1
PACKAGED_EXAMPLE = Path(__file__).with_name("example.yaml")


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are validated."""

    # ser_json_inf_nan: an infinite float (e.g. in model.args) stays a float in to_dict(), so
    # show-config prints `.inf`, not the `null` pydantic's JSON mode writes by default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="constants")


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


def _import_path_validator(value: str) -> str:
    resolve_import_path(value)
    return value


PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


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
    num_cpus: float | None = Field(None, gt=0, description="Logical CPUs of the local Ray; may exceed the physical cores. Default: enough for training and serving.")
    include_dashboard: bool = Field(False, description="Start Ray's dashboard with the local Ray (needed for `ray job submit`).")


class RuntimeEnv(Strict):
    working_dir: str | None = Field(None, description="Directory uploaded with a submitted job (default: the current directory).")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment variables for every Ray worker of a job.")
    pip: list[str] = Field(default_factory=list, description="Extra pip packages for a submitted job; leave empty when the image has them.")


class KubernetesConfig(Strict):
    upgrade_strategy: Literal["NewCluster", "None"] = Field(
        "NewCluster", description="RayService upgrade: a second cluster, zero downtime, twice the resources meanwhile; None updates in place."
    )
    head_cpus: float = Field(2.0, gt=0, description="CPUs of the head pod (it runs no tasks).")
    head_memory: str = Field("8Gi", pattern=r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti)?$", description="Memory of the head pod.")
    job_ttl_s: int = Field(300, ge=0, description="Seconds a finished RayJob's cluster is kept.")
    job_backoff_limit: int = Field(0, ge=0, description="Retries of a failed RayJob, each on a new cluster.")
    job_deadline_s: int | None = Field(None, gt=0, description="RayJob activeDeadlineSeconds.")
    autoscaler_idle_timeout_s: int = Field(60, ge=0, description="Seconds an idle worker pod is kept before the autoscaler removes it.")
    auth_secret: str | None = Field(None, description="Secret holding the Ray token (key auth_token); default <name>-ray-token.")
    storage_claim: str | None = Field(None, description="ReadWriteMany PVC mounted at cluster.storage in every pod; cluster.storage must then be absolute.")
    ray_version: str | None = Field(None, pattern=r"^\d+\.\d+\.\d+$", description="Ray version of cluster.image when its tag does not say.")


class ClusterConfig(Strict):
    address: str = Field("local", description="'local' (start Ray here), 'auto' (join RAY_ADDRESS or a running head) or 'ray://host:10001'.")
    storage: str = Field("./runs", description="Local path or URI where runs, checkpoints and artifacts are written.")
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
    builder: str = Field("training.models:mlp", description="'module:function' returning an nn.Module; called with input_shape, num_classes and args.")
    args: dict[str, Any] = Field(default_factory=lambda: {"hidden": [256, 256]}, description="Keyword arguments for the builder.")

    @field_validator("builder")
    @classmethod
    def _builder_imports(cls, value: str) -> str:
        return _import_path_validator(value)


class Augment(Strict):
    name: Literal["noise", "shift", "hook"] = Field(description="noise: Gaussian noise; shift: random shift of image-like inputs; hook: a user function.")
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
    source: str = Field("training.data:digits", description="'module:function' returning a training.data.ArrayDataset.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the data source.")
    batch_size: PositiveInt = Field(64, description="Micro-batch size per worker.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Fraction of the data held out for validation.")
    augment: list[Augment] = Field(default_factory=list, description="Training-time augmentations, applied in order.")
    seed: int = Field(0, description="Seed of the train/validation split.")

    @field_validator("source")
    @classmethod
    def _source_imports(cls, value: str) -> str:
        return _import_path_validator(value)

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
    overrides: dict[str, Any] = Field(default_factory=dict, description="Merged last into the derived DeepSpeed JSON; conflicts are errors.")

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
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = Field("pack", description="Placement group strategy of the workers.")
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
    perturbation_interval: PositiveInt = Field(2, description="PBT: epochs between exploit/explore steps.")


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
    space: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Dotted config path -> {uniform|loguniform|randint|choice|grid: args}.")

    @field_validator("space")
    @classmethod
    def _space_kinds(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for path, spec in space.items():
            if len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
                raise ValueError(f"space['{path}'] must be one of {{{', '.join(k + ': ...' for k in SEARCH_KINDS)}}}, got {spec}")
        return space


# ---------------------------------------------------------------------------------------------
# export and serving
# ---------------------------------------------------------------------------------------------


class PruneConfig(Strict):
    sparsity: Fraction = Field(0.5, description="Fraction of weights (or neurons/channels when structured) set to zero.")
    structured: bool = Field(False, description="Prune whole neurons/channels instead of single weights.")
    fine_tune_epochs: int = Field(0, ge=0, description="Epochs of fine-tuning after pruning, through the normal trainer.")


class ParityGate(Strict):
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="Largest accepted accuracy drop against the source model (0.01 = 1 point).")
    min_argmax_agreement: Fraction = Field(0.99, description="Smallest accepted fraction of equal argmax predictions.")


class ExportConfig(Strict):
    onnx: bool = Field(True, description="Export an ONNX model.")
    opset: int = Field(18, ge=13, le=23, description="ONNX opset.")
    quantize: Literal["none", "dynamic", "static", "auto"] = Field("auto", description="int8 quantization of the ONNX model.")
    prune: PruneConfig | None = Field(None, description="Magnitude pruning (off when absent).")
    gate: ParityGate = Field(default_factory=ParityGate, description="Parity gate that fails the export when crossed.")
    latency_batch_sizes: list[PositiveInt] = Field([1, 8, 32, 128], description="Batch sizes of the parity report's latency table.")


class Autoscaling(Strict):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start (default: min_replicas).")
    max_replicas: PositiveInt = Field(1, description="Most replicas.")
    target_ongoing_requests: float = Field(16, gt=0, description="Ongoing requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(5.0, ge=0, description="Seconds of sustained load before scaling up.")
    downscale_delay_s: float = Field(30.0, ge=0, description="Seconds of low load before scaling down.")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is larger than max_replicas ({self.max_replicas}); lower min_replicas or raise max_replicas"
            )
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie between min_replicas and max_replicas")
        return self


class Deployment(Strict):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", description="Deployment name.")
    engine: Literal["torch", "onnxruntime"] = Field("onnxruntime", description="Inference engine.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="torch engine precision.")
    quantize: Literal["none", "int8"] = Field("none", description="onnxruntime: serve the int8 model.")
    node_group: str | None = Field(None, description="Node group the replicas are pinned to.")
    cpus: float = Field(1.0, gt=0, description="CPUs per replica (fractions allowed).")
    gpus: float = Field(0.0, ge=0, description="GPUs per replica.")
    threads: PositiveInt = Field(1, description="Intra-op threads of the engine.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Ray Serve autoscaling.")
    max_ongoing_requests: int | None = Field(None, gt=0, description="Per replica (default: derived from batching, see README).")
    max_queued_requests: int | None = Field(None, gt=0, description="Per deployment handle (default: serving.limits.max_queued_requests).")


class Batching(Strict):
    adaptive: bool = Field(True, description="Latency-aware adaptive batching (false: fixed wait).")
    max_batch_size: PositiveInt = Field(32, description="Largest batch one forward pass takes.")
    target_p99_ms: float = Field(50.0, gt=0, description="Latency target the adaptive batcher keeps.")
    max_wait_ms: float = Field(5.0, ge=0, description="Fixed wait when adaptive is false.")
    admission: Literal["latency", "queue"] = Field(
        "latency",
        description="latency: a model replica that is the HTTP ingress answers 503 at once to a request predicted to spend more "
        "than 0.3 x target_p99_ms inside it, never while fewer than max_batch_size are inside (serving/admission.py); "
        "queue: only the queue limits shed.",
    )


class Router(Strict):
    policy: Literal["spillover", "round_robin", "least_loaded"] = Field("spillover", description="How the ingress picks a deployment.")
    spill_threshold: PositiveInt = Field(32, description="spillover: in-flight requests of a deployment above which the next one is used.")


class Cache(Strict):
    enabled: bool = Field(False, description="Cache results by input and model version.")
    max_entries: PositiveInt = Field(10000, description="Most cached results (LRU).")
    ttl_s: float = Field(300.0, gt=0, description="Seconds a cached result stays valid.")


class Limits(Strict):
    max_queued_requests: PositiveInt = Field(256, description="Requests waiting beyond which the endpoint answers 503.")
    max_body_bytes: PositiveInt = Field(1_048_576, description="Largest request body.")
    max_inputs: PositiveInt = Field(256, description="Most examples in one request.")


class Auth(Strict):
    token_env: str | None = Field(None, description="Environment variable holding the bearer token (off when unset).")


class ServingConfig(Strict):
    route_prefix: str = Field("/", pattern=r"^/", description="HTTP route prefix of the application.")
    host: str = Field("127.0.0.1", description="HTTP host of the Serve proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy.")
    http_path: Literal["haproxy", "direct", "proxy"] = Field(
        "haproxy",
        description=(
            "How HTTP reaches the replicas: 'haproxy' (Ray's direct ingress behind its HAProxy on host:port; stable URL, "
            "several replicas), 'direct' (direct ingress on the one replica's own port; fastest, one replica), "
            "'proxy' (Ray Serve's default proxy; slowest)."
        ),
    )
    artifact: str = Field("latest", description="Artifact to serve: a run folder, an artifacts folder or 'latest'.")
    deployments: list[Deployment] = Field(
        default_factory=lambda: [Deployment(name="cpu", engine="onnxruntime", cpus=0.5)],
        min_length=1,
        description="Model deployments, in router preference order.",
    )
    batching: Batching = Field(default_factory=Batching, description="Batching inside each replica.")
    router: Router = Field(default_factory=Router, description="Routing between deployments.")
    cache: Cache = Field(default_factory=Cache, description="Result cache.")
    limits: Limits = Field(default_factory=Limits, description="Request limits.")
    auth: Auth = Field(default_factory=Auth, description="Bearer-token auth.")

    @field_validator("deployments")
    @classmethod
    def _unique_names(cls, deployments: list[Deployment]) -> list[Deployment]:
        names = [d.name for d in deployments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"deployment names must be unique; {dupes} appear more than once")
        return deployments


class TandemConfig(Strict):
    version: Literal[1] = Field(1, description="Config format version.")
    name: str = Field("tandem", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", description="Run name: lowercase letters, digits and '-' (used in Kubernetes names).")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Where Ray runs.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model.")
    data: DataConfig = Field(default_factory=DataConfig, description="The data.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Training.")
    tuning: TuningConfig | None = Field(None, description="Hyperparameter search (off when absent).")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Inference optimization.")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="Serving.")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


class Problem(BaseModel):
    path: str
    value: Any = None
    message: str

    def __str__(self) -> str:
        shown = "" if self.value is None else f": {_short(self.value)}"
        path = self.path or "<root>"
        # A key with control characters (a stray \r, an escape sequence) is shown escaped: printed
        # raw it would be invisible, or rewrite the user's terminal. Messages quote keys too.
        return f"{path if path.isprintable() else ascii(path)}{shown} — {_escape_controls(self.message)}"


def _escape_controls(text: str) -> str:
    return "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in text)


class ConfigError(ValueError):
    """Every problem of a config at once; `str()` lists them, one per line."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(problems)} problem{'s' if len(problems) != 1 else ''}{where}:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    except (ValueError, RecursionError):  # a YAML alias that contains itself, or very deep nesting
        text = reprlib.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk a pydantic model class along an error location; return the model owning the last key."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            if isinstance(part, int):
                continue
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _description_at(root: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    keys = [p for p in loc if isinstance(p, str)]
    owner = _model_at(root, tuple(keys))
    field = owner.model_fields.get(keys[-1]) if owner and keys else None
    return field.description if field else None


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside `X | None`, `list[X]` or `dict[str, X]`, else the annotation."""
    for arg in getattr(annotation, "__args__", ()) or ():
        inner = _inner_model(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def problems_from_validation(error: ValidationError, prefix: tuple[Any, ...], root: type[BaseModel], source: str | None) -> list[Problem]:
    problems = []
    for item in error.errors(include_url=False):
        # pydantic adds union-member tags (e.g. 'TuningConfig', 'function-after[...]') to locations; drop them.
        loc = prefix + tuple(p for p in item["loc"] if not (isinstance(p, str) and (p[:1].isupper() or "[" in p)))
        path = _dotted(loc)
        kind = item["type"]
        if kind == "extra_forbidden":
            owner = _model_at(root, loc)
            valid = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            where = f" in {source}" if source else ""
            message = f"unknown key{where}; {hint}valid keys here: {', '.join(valid)}"
            problems.append(Problem(path=path, message=message))
            continue
        message = item["msg"].removeprefix("Value error, ")
        if kind == "missing":
            message = "required field is missing; add it"
        elif not item["msg"].startswith("Value error"):
            # pydantic's own messages say what is wrong; the field's description says what is expected.
            described = _description_at(root, loc)
            if described:
                message = f"{message}; expected: {described}"
        problems.append(Problem(path=path, value=item.get("input") if kind != "missing" else None, message=message))
    return problems


# ---------------------------------------------------------------------------------------------
# cross-field checks: one function per trap
# ---------------------------------------------------------------------------------------------


def _check_node_group_refs(sections: dict[str, Any]) -> list[Problem]:
    cluster, training, serving = sections.get("cluster"), sections.get("training"), sections.get("serving")
    if cluster is None:
        return []
    groups = sorted(cluster.node_groups)
    problems = []
    refs = []
    if training is not None and training.node_group is not None:
        refs.append(("training.node_group", training.node_group))
    if serving is not None:
        refs += [(f"serving.deployments[{i}].node_group", d.node_group) for i, d in enumerate(serving.deployments) if d.node_group]
    for path, group in refs:
        if group not in cluster.node_groups:
            close = difflib.get_close_matches(group, groups, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(Problem(path=path, value=group, message=f"no such node group; {hint}cluster.node_groups has {groups}; add it there or pick one of those"))
    return problems


def _check_gpus_on_groups(sections: dict[str, Any]) -> list[Problem]:
    cluster, training, serving = sections.get("cluster"), sections.get("training"), sections.get("serving")
    if cluster is None:
        return []
    problems = []
    if training is not None and training.use_gpu == "true":
        group = cluster.node_groups.get(training.node_group or "")
        if training.node_group and group is not None and group.gpus == 0:
            problems.append(Problem(path="training.use_gpu", value="true", message=f"node group '{training.node_group}' has gpus: 0; set cluster.node_groups.{training.node_group}.gpus or use_gpu: auto"))
        if not training.node_group and not any(g.gpus for g in cluster.node_groups.values()) and cluster.address == "local":
            problems.append(Problem(path="training.use_gpu", value="true", message="no node group has GPUs; add gpus to a node group or set use_gpu: auto"))
    if serving is not None:
        for i, dep in enumerate(serving.deployments):
            group = cluster.node_groups.get(dep.node_group or "")
            if dep.gpus > 0 and group is not None:
                if group.gpus == 0:
                    problems.append(Problem(path=f"serving.deployments[{i}].gpus", value=dep.gpus, message=f"node group '{dep.node_group}' has gpus: 0; set cluster.node_groups.{dep.node_group}.gpus or use gpus: 0"))
                elif dep.gpus > group.gpus:
                    problems.append(Problem(path=f"serving.deployments[{i}].gpus", value=dep.gpus, message=f"more than the {group.gpus} GPU(s) of a '{dep.node_group}' node; the replica could never be placed; lower gpus"))
    return problems


def _check_fp16_needs_gpu(sections: dict[str, Any]) -> list[Problem]:
    cluster, training, serving = sections.get("cluster"), sections.get("training"), sections.get("serving")
    problems = []
    if training is not None and training.precision == "fp16":
        group_gpus = 0
        if cluster is not None:
            group = cluster.node_groups.get(training.node_group or "")
            group_gpus = group.gpus if group else max((g.gpus for g in cluster.node_groups.values()), default=0)
        if training.use_gpu == "false" or group_gpus == 0:
            problems.append(Problem(path="training.precision", value="fp16", message="fp16 with loss scaling needs a GPU; use bf16 or fp32 on CPU, or give the node group gpus"))
    if serving is not None:
        for i, dep in enumerate(serving.deployments):
            if dep.precision == "fp16" and dep.gpus == 0:
                problems.append(Problem(path=f"serving.deployments[{i}].precision", value="fp16", message="fp16 inference needs gpus > 0; use bf16 or fp32 on CPU"))
    return problems


def derived_max_ongoing_requests(serving: ServingConfig, deployment: Deployment) -> int:
    """Per-replica max_ongoing_requests: explicit, or enough for 4 full batches in flight.

    Ray's default (5) is far below a batch; the router then retries with backoff and bursts stall
    for seconds while the replica idles (see the README). Four batches keep one running, one
    filling and two queued.
    """
    return deployment.max_ongoing_requests or max(4 * serving.batching.max_batch_size, 64)


def _check_batches_can_fill(sections: dict[str, Any]) -> list[Problem]:
    serving = sections.get("serving")
    if serving is None:
        return []
    problems = []
    for i, dep in enumerate(serving.deployments):
        if dep.max_ongoing_requests is not None and serving.batching.max_batch_size > dep.max_ongoing_requests:
            problems.append(
                Problem(
                    path="serving.batching.max_batch_size",
                    value=serving.batching.max_batch_size,
                    message=(
                        f"larger than serving.deployments[{i}].max_ongoing_requests ({dep.max_ongoing_requests}); batches would never fill. "
                        "Raise max_ongoing_requests or lower max_batch_size"
                    ),
                )
            )
    return problems


def _check_tuning_paths(sections: dict[str, Any]) -> list[Problem]:
    tuning = sections.get("tuning")
    if tuning is None:
        return []
    problems = []
    for path in tuning.space:
        head = path.split(".")[0]
        if head not in TandemConfig.model_fields or head in ("version", "name", "tuning"):
            problems.append(Problem(path=f"tuning.space['{path}']", message=f"'{head}' is not a config section that can be searched; use a path like training.optimizer.lr"))
    return problems


CROSS_FIELD_CHECKS = (_check_node_group_refs, _check_gpus_on_groups, _check_fp16_needs_gpu, _check_batches_can_fill, _check_tuning_paths)


def cross_field_problems(sections: dict[str, Any]) -> list[Problem]:
    return [p for check in CROSS_FIELD_CHECKS for p in check(sections)]


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`a.b[0].c=value` -> (['a', 'b', 0, 'c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError([Problem(path="--set", value=text, message="an override is PATH=VALUE, e.g. --set training.epochs=3")])
    key, raw = text.split("=", 1)
    parts: list[str | int] = []
    for piece in key.strip().split("."):
        name, *indices = piece.replace("]", "").split("[")
        if name:
            parts.append(name)
        parts += [int(i) for i in indices if i.isdigit()]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def set_path(tree: dict[str, Any], parts: list[str | int], value: Any) -> None:
    """Set a value at a path in a plain dict/list tree, creating dicts on the way."""
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[part]  # type: ignore[index]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    problems = []
    for text in overrides or []:
        try:
            parts, value = parse_override(text)
            set_path(raw, parts, value)
        except ConfigError as exc:
            problems += exc.problems
        except (IndexError, KeyError, TypeError, AttributeError):
            problems.append(Problem(path="--set", value=text, message="the path does not lead into the config; check the dotted path and list indices"))
    if problems:
        raise ConfigError(problems)
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError([Problem(path="<file>", value=str(path), message="no such file; give the path of a Tandem YAML config")])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([Problem(path="<file>", value=str(path), message=f"not valid YAML{where}: {getattr(exc, 'problem', exc)}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem(path="<file>", value=str(path), message="not a text file (not UTF-8); give a YAML config")]) from None
    except OSError as exc:  # a folder, no permission, ...
        raise ConfigError([Problem(path="<file>", value=str(path), message=f"cannot be read ({exc.strerror or exc}); give the path of a Tandem YAML config")]) from None
    except RecursionError:
        raise ConfigError([Problem(path="<file>", value=str(path), message="nested too deeply to parse; a Tandem config is a few levels of sections")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([Problem(path="<root>", value=raw, message="a config is a YAML mapping of sections (cluster, model, data, training, ...)")], str(path))
    return raw


MAX_CONFIG_VALUES = 100_000


def _alias_problems(tree: Any) -> list[Problem]:
    """YAML aliases gone wrong: a value that contains itself (an alias inside its own anchor), or
    aliases of aliases that expand to more values than any config holds ("billion laughs"). Both
    pass a field typed Any and then hang or crash whatever prints or serializes the config. Each
    shared value is walked once, so the check costs the distinct values, not the expansion."""
    problems: list[Problem] = []
    sizes: dict[int, int] = {}

    def walk(node: Any, loc: tuple[Any, ...], ancestors: set[int]) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in ancestors:
            problems.append(Problem(path=_dotted(loc), message="contains itself (a YAML alias used inside its own anchor); write the value out"))
            return 1
        ancestors.add(id(node))
        size = 1 + sum(
            walk(value, loc + (key if isinstance(key, (str, int)) else str(key),), ancestors)
            for key, value in (node.items() if isinstance(node, dict) else enumerate(node))
        )
        ancestors.discard(id(node))
        sizes[id(node)] = size
        return size

    total = walk(tree, (), set())
    if total > MAX_CONFIG_VALUES:
        problems.append(Problem(path="<root>", message=f"expands to {total:,} values (YAML aliases of aliases), over {MAX_CONFIG_VALUES:,}; a config is small, write it without nested aliases"))
    return problems


def validate_config(raw: Any, source: str | None = None) -> TandemConfig:
    """Validate a plain dict; every problem (field and cross-field) is reported in one ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError([Problem(path="<root>", value=raw, message="a config is a mapping of sections (cluster, model, data, training, ...)")], source)
    try:
        aliases = _alias_problems(raw)
    except RecursionError:
        aliases = [Problem(path="<root>", message="nested too deeply; a Tandem config is a few levels of sections")]
    if aliases:
        raise ConfigError(aliases, source)
    problems: list[Problem] = []
    sections: dict[str, Any] = {}
    for key in raw:
        if not isinstance(key, str) or key not in TandemConfig.model_fields:
            close = difflib.get_close_matches(str(key), list(TandemConfig.model_fields), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            where = f" in {source}" if source else ""
            problems.append(Problem(path=str(key), message=f"unknown section{where}; {hint}valid sections: {', '.join(TandemConfig.model_fields)}"))
    # Validate each section on its own so one broken section does not hide the others' problems.
    valid = True
    for name, field in TandemConfig.model_fields.items():
        if name not in raw:
            sections[name] = field.get_default(call_default_factory=True)
            continue
        # The field's own constraints (name's pattern) live in its metadata, not its annotation.
        adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)
        try:
            sections[name] = adapter.validate_python(raw[name])
        except ValidationError as exc:
            valid = False
            problems += problems_from_validation(exc, (name,), TandemConfig, source)
            sections[name] = _validate_without_errors(adapter, raw[name], exc)
    problems += cross_field_problems({k: v for k, v in sections.items() if v is not None})
    if problems or not valid:
        raise ConfigError(problems, source)
    try:
        return TandemConfig(**sections)
    except ValidationError as exc:  # a check the per-section pass could not see
        raise ConfigError(problems_from_validation(exc, (), TandemConfig, source), source) from None


def _validate_without_errors(adapter: TypeAdapter, raw: Any, error: ValidationError, rounds: int = 3) -> Any:
    """The section with its broken fields dropped (defaults in their place), or None.

    Only used so that cross-field checks still run on a section that has field errors, and all
    problems are reported together.
    """
    trimmed = copy.deepcopy(raw)
    for _ in range(rounds):
        for item in error.errors():
            loc = [p for p in item["loc"] if not (isinstance(p, str) and (p[:1].isupper() or "[" in p))]
            _delete_path(trimmed, loc)
        try:
            return adapter.validate_python(trimmed)
        except ValidationError as exc:
            error = exc
    return None


def _delete_path(tree: Any, loc: list[Any]) -> None:
    node = tree
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return
    if loc and isinstance(node, dict):
        node.pop(loc[-1], None)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TandemConfig:
    """Read a YAML config (the packaged example when path is None), apply `--set` overrides, validate."""
    path = Path(path) if path is not None else PACKAGED_EXAMPLE
    raw = apply_overrides(read_yaml(path), overrides)
    return validate_config(raw, source=str(path))


def config_with(config: TandemConfig, updates: dict[str, Any]) -> TandemConfig:
    """A copy of config with dotted-path updates applied and validated again (used by tuning)."""
    raw = config.to_dict()
    for dotted, value in updates.items():
        parts, _ = parse_override(f"{dotted}=")
        set_path(raw, parts, value)
    return validate_config(raw)

