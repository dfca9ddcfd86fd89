"""The pydantic models of the export and serving sections (schema.py holds the rest and the root).

Imports nothing of Tandem above cluster/config/base.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from cluster.config.base import Fraction, PositiveInt, Strict


class PruneConfig(Strict):
    sparsity: Fraction = Field(0.5, description="Fraction of weights (or neurons/channels when structured) set to zero.")
    structured: bool = Field(False, description="Prune whole neurons/channels instead of single weights.")
    fine_tune_epochs: int = Field(
        0, ge=0, description="Epochs of fine-tuning after pruning, in the export's process on the training split (the zeros kept)."
    )


class ParityGate(Strict):
    max_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="Largest accepted accuracy drop against the source model (0.01 = 1 point)."
    )
    min_argmax_agreement: Fraction = Field(0.99, description="Smallest accepted fraction of equal argmax predictions.")


class ExportConfig(Strict):
    onnx: bool = Field(True, description="Export an ONNX model.")
    opset: int = Field(18, ge=13, le=23, description="ONNX opset.")
    quantize: Literal["none", "dynamic", "static", "auto"] = Field("auto", description="int8 quantization of the ONNX model.")
    prune: PruneConfig | None = Field(None, description="Magnitude pruning (off when absent).")
    gate: ParityGate = Field(default_factory=ParityGate, description="Parity gate that fails the export when crossed.")
    latency_batch_sizes: list[PositiveInt] = Field([1, 8, 32, 128], description="Batch sizes of the parity report's latency table.")


AUTO = "auto"


class Autoscaling(Strict):
    min_replicas: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        AUTO, description="Fewest replicas; 'auto': as many as max_replicas resolves to (a fixed count filling the cores)."
    )
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start (default: min_replicas).")
    max_replicas: PositiveInt | Literal["auto"] = Field(
        AUTO,
        description="Most replicas; 'auto': one per `threads` cores (per GPU with gpus) where the replicas run: the node group's "
        "nodes when pinned, else the cluster Ray reports when the app is built (a single node: its cores).",
    )
    target_ongoing_requests: float = Field(16, gt=0, description="Ongoing requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(5.0, ge=0, description="Seconds of sustained load before scaling up.")
    downscale_delay_s: float = Field(30.0, ge=0, description="Seconds of low load before scaling down.")
    look_back_s: float = Field(
        30.0,
        gt=0,
        description="Seconds of load metrics Serve averages for each decision (Serve's look_back_period_s; Ray 2.60 warns below "
        "10 s, its deprecated metrics_interval_s: replicas push their load every RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S, "
        "10 s by default).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if AUTO not in (self.min_replicas, self.max_replicas) and self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is larger than max_replicas ({self.max_replicas}); lower min_replicas or raise "
                "max_replicas"
            )
        if self.initial_replicas is not None and AUTO not in (self.min_replicas, self.max_replicas):
            if not self.min_replicas <= self.initial_replicas <= self.max_replicas:
                raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie between min_replicas and max_replicas")
        return self

    def bounds(self, slots: int) -> tuple[int, int]:
        """(min, max) replicas with 'auto' resolved, given the replicas the serving hardware holds
        (`slots`: cores / threads, or GPUs / gpus; at least 1). An explicit bound wins: 'auto'
        beside it is clamped to it."""
        slots = max(1, slots)
        high = slots if self.max_replicas == AUTO else self.max_replicas
        if self.min_replicas == AUTO:
            low = min(slots, high)
        else:
            low = self.min_replicas
            high = max(high, low)
        return low, high


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
    max_ongoing_requests: int | None = Field(
        None, gt=0, description="Requests Serve lets into one replica at once (default: max(4 x serving.batching.max_batch_size, 64))."
    )
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


class RouterConfig(Strict):
    policy: Literal["spillover", "round_robin", "least_loaded"] = Field("spillover", description="How the ingress picks a deployment.")
    spill_threshold: PositiveInt = Field(32, description="spillover: in-flight requests of a deployment above which the next one is used.")


class CacheConfig(Strict):
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
    router: RouterConfig = Field(default_factory=RouterConfig, description="Routing between deployments.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Result cache.")
    limits: Limits = Field(default_factory=Limits, description="Request limits.")
    auth: Auth = Field(default_factory=Auth, description="Bearer-token auth.")
    access_log: bool = Field(
        False,
        description="Ray Serve's access log, a line per request in every replica's log (off: it costs about 0.1 ms of replica CPU "
        "per request; /v1/stats and the Prometheus metrics count requests either way).",
    )

    @field_validator("deployments")
    @classmethod
    def _unique_names(cls, deployments: list[Deployment]) -> list[Deployment]:
        names = [d.name for d in deployments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"deployment names must be unique; {dupes} appear more than once")
        return deployments


class PredictConfig(Strict):
    input: str | None = Field(
        None, description="Input files for `tandem predict` (a file, folder or glob; `--input` wins): on shared storage for a cluster job."
    )
    output: str | None = Field(
        None, description="Output folder for `tandem predict` (`--output` wins): on shared storage for a cluster job."
    )
    deployments: list[str] | None = Field(
        None,
        description="Serving deployments whose engine, node group, threads and GPUs `tandem predict` uses, one actor pool each "
        "(default: every deployment).",
    )
    actors: PositiveInt | None = Field(None, description="Actors per pool (default: the deployment's max_replicas, or 1 when auto).")
    batch_size: PositiveInt = Field(256, description="Rows per forward pass.")
    chunk_rows: PositiveInt = Field(8192, description="Rows an actor reads, predicts and writes as one output part file.")
    features: list[str] | None = Field(
        None, description="Input columns holding the features, in order (default: every column but id_column and label_column)."
    )
    id_column: str | None = Field(None, description="Input key column copied to the output (default: the row's number in the input).")
    label_column: str | None = Field(None, description="A column to leave out of the features (e.g. the label of a labelled file).")
    probabilities: bool = Field(False, description="Also write each row's class probabilities.")
