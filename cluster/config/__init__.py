"""The one Tandem configuration.

    from cluster.config import load_config, TandemConfig
    config = load_config("my.yaml", ["training.epochs=3"])   # every problem at once, or a TandemConfig

Where things go:
- schema.py    pydantic models of every section and the root (a new field goes here, with its description);
                 export and serving in serving_schema.py, the shared base class and types in base.py
- checks.py    cross-section checks, one small function per trap (a new trap goes here)
- problems.py  Problem and ConfigError: each problem names its dotted path, the value and the fix
- loading.py   YAML reading (duplicate keys refused), `--set` overrides, validation, config_with

Imports nothing of Tandem above `cluster.errors`.
"""

from cluster.config.checks import cross_field_problems
from cluster.config.loading import apply_overrides, config_with, load_config, parse_override, read_yaml, set_path, validate_config
from cluster.config.problems import ConfigError, Problem
from cluster.config.schema import (
    CONFIG_VERSION,
    PACKAGED_EXAMPLE,
    Augment,
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    DistillConfig,
    KubernetesConfig,
    ModelConfig,
    NodeGroup,
    RuntimeEnv,
    TandemConfig,
    TrainingConfig,
    TuningConfig,
    looks_like_files,
    resolve_import_path,
)
from cluster.config.serving_schema import (
    AUTO,
    Auth,
    Autoscaling,
    Batching,
    CacheConfig,
    Deployment,
    ExportConfig,
    Limits,
    ParityGate,
    RouterConfig,
    ServingConfig,
)

__all__ = [
    "AUTO",
    "CONFIG_VERSION",
    "PACKAGED_EXAMPLE",
    "Augment",
    "Auth",
    "Autoscaling",
    "Batching",
    "CacheConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "Deployment",
    "DistillConfig",
    "ExportConfig",
    "KubernetesConfig",
    "Limits",
    "ModelConfig",
    "NodeGroup",
    "ParityGate",
    "Problem",
    "RouterConfig",
    "RuntimeEnv",
    "ServingConfig",
    "TandemConfig",
    "TrainingConfig",
    "TuningConfig",
    "apply_overrides",
    "config_with",
    "cross_field_problems",
    "load_config",
    "parse_override",
    "read_yaml",
    "looks_like_files",
    "resolve_import_path",
    "set_path",
    "validate_config",
]
