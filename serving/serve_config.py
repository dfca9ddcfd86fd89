"""The Ray Serve config file, derived from the Tandem config (never written by hand beside it).

`build_serve_config(config)` returns the dict that `serve deploy FILE` takes and that a KubeRay
RayService embeds as `serveConfigV2` (tandem/k8s.py dumps exactly this dict). One application,
named after the config, built by `serving.app:build_app({"config": ..., "artifact": ...})`; its
deployments and their options come from serving/settings.py, the same that build_app gives them.

Rendering needs neither Ray Serve nor FastAPI: this module imports the foundation and
serving/settings.py only. Ray validates the dict with `ray.serve.schema.ServeDeploySchema`;
tests/unit/test_serve_config.py does the same, and also refuses keys that schema would silently
accept (it allows extras).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cluster.artifacts import atomic_write_text
from cluster.config import TandemConfig
from cluster.runtime import runtime_env
from serving.settings import APP_BUILDER, controller_env, deployment_options, serve_env


def build_serve_config(config: TandemConfig, artifact: str = "latest", front_binary: str | None = None) -> dict[str, Any]:
    """The Ray Serve config file (multi-application format) for `config`, serving `artifact`.

    Its Serve settings follow from the config alone: RAY_SERVE_* variables of the shell that
    renders it never land in a file (or a RayService). front_binary: where `tandem-haproxy` is on
    the cluster's nodes (the RayService names Tandem's image's); a file for any cluster has none.
    """
    serving = config.serving
    settings = serve_env(serving, front_binary=front_binary)
    application = {
        "name": config.name,
        "route_prefix": serving.route_prefix,
        "import_path": APP_BUILDER,
        "args": {"config": config.to_dict(), "artifact": artifact},
        "runtime_env": runtime_env(config.cluster.runtime_env, env_vars=settings),
        "deployments": list(deployment_options(config).values()),
    }
    serve_config: dict[str, Any] = {
        # A proxy on every node with a replica: KubeRay's serve Service routes to all of them.
        "proxy_location": "EveryNode",
        "http_options": {"host": serving.host, "port": serving.port},
    }
    if settings:
        # Serve reads these at import, so the controller needs them too (applied when it starts).
        serve_config["controller_options"] = {"runtime_env": {"env_vars": controller_env(settings)}}
    serve_config["applications"] = [application]
    return serve_config


def dump_serve_config(serve_config: dict[str, Any]) -> str:
    """YAML text of a Serve config, keys in the order Ray documents them."""
    return yaml.safe_dump(serve_config, sort_keys=False, width=10**9)


def write_serve_config(config: TandemConfig, path: str | Path, artifact: str = "latest") -> Path:
    """Write the Serve config file for `serve deploy PATH`; returns the path."""
    path = Path(path)
    # Atomic: `serve deploy` or a RayService watching the file never reads half of it.
    atomic_write_text(path, dump_serve_config(build_serve_config(config, artifact)))
    return path
