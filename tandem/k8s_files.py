"""The KubeRay manifests of tandem/k8s.py as files: one folder per step, each file commented.

`render_files(config)` gives {STEP/FILE: text}; `write_manifests(config, out_dir)` writes them
(atomically, so `kubectl apply -k` never reads half a file) and removes what an earlier rendering
wrote that is gone now. Every file starts with a header saying where it came from and how to use
it (`file_notes`).
"""

from __future__ import annotations

from pathlib import Path

from cluster.artifacts import atomic_write_text
from cluster.config import TandemConfig
from serving.settings import IMAGE_FRONT_BINARY, serve_env
from tandem.k8s import AUTH_TOKEN_KEY, CONFIG_FILE, CONFIG_MOUNT, HEADER_MARK, SERVING_TOKEN_KEY, dump_yaml, render_steps, resource_names


def settings_only_the_image_has(config: TandemConfig) -> list[str]:
    """What the RayService's serveConfigV2 adds to `tandem serve-config --for cluster`: settings that
    name Tandem's image's tandem-haproxy, which a Serve config file for any cluster cannot know."""
    anywhere = serve_env(config.serving)
    return [name for name in serve_env(config.serving, front_binary=IMAGE_FRONT_BINARY) if name not in anywhere]


def serve_config_note(config: TandemConfig) -> list[str]:
    added = settings_only_the_image_has(config)
    written = "`tandem serve-config --for cluster` writes for this config"
    what = [f"{written}, plus HAProxy's shedding in Tandem's image:", f"{', '.join(added)}."] if added else [f"{written}."]
    return ["Step 2, once step 1's job has succeeded: `kubectl apply -k serve/`. serveConfigV2 is what", *what]


def file_notes(config: TandemConfig) -> dict[str, list[str]]:
    """What each file is for and how to use it, written above its YAML."""
    names = resource_names(config)
    token = (
        [
            f"Token auth: create the Secret once, e.g. `kubectl create secret generic {names['auth_secret']}",
            f"--from-literal={AUTH_TOKEN_KEY}=$(openssl rand -hex 32)`; pods read it as RAY_AUTH_TOKEN.",
        ]
        if config.cluster.auth == "token"
        else []
    )
    return {
        "configmap.yaml": [f"The resolved config; RayJob entrypoints read it at {CONFIG_MOUNT}/{CONFIG_FILE} on the head."],
        "raycluster.yaml": [
            "A long-running cluster for `tandem submit CONFIG train --address http://HEAD:8265`",
            f"(e.g. after `kubectl port-forward svc/{names['cluster']}-head-svc 8265`).",
        ]
        + token,
        "rayjob-train.yaml": ["Step 1: training on its own cluster, deleted after the job: `kubectl apply -k train/`."] + token,
        "rayjob-tune.yaml": ["Step 1 (instead of train/): hyperparameter search on its own cluster: `kubectl apply -k tune/`."] + token,
        "rayjob-predict.yaml": ["After step 1: offline batch inference on its own cluster: `kubectl apply -k predict/`."] + token,
        "rayservice.yaml": serve_config_note(config)
        + [
            f"It serves serving.artifact ({config.serving.artifact}) from cluster.storage, the storage every pod shares.",
        ]
        + token
        + (
            [f"The endpoint's bearer token comes from Secret {names['serving_secret']} (key {SERVING_TOKEN_KEY})."]
            if config.serving.auth.token_env
            else []
        ),
        "kustomization.yaml": [
            "`kubectl apply -k` this folder: one step of the recipe (train or tune, then serve or predict).",
            "Use it as the base of overlays (namespace, image, ...).",
        ]
        + token
        + (
            [
                f"Clients outside the cluster: export RAY_AUTH_TOKEN=$(kubectl get secret {names['auth_secret']} -o "
                f"jsonpath='{{.data.{AUTH_TOKEN_KEY}}}' | base64 -d)",
            ]
            if token
            else []
        ),
    }


def header(config: TandemConfig, filename: str) -> str:
    first = f"{HEADER_MARK} from the Tandem config '{config.name}' (config hash {config.config_hash()}).\n"
    lines = ["Do not edit: change the config and render again (`tandem k8s CONFIG --out DIR`)."] + file_notes(config).get(filename, [])
    return first + "".join(f"# {line}\n" for line in lines)


def render_files(config: TandemConfig) -> dict[str, str]:
    """The text of every file `write_manifests` writes, by path under the output folder (STEP/FILE)."""
    return {
        f"{step}/{name}": header(config, name) + dump_yaml(manifest)
        for step, files in render_steps(config).items()
        for name, manifest in files.items()
    }


def write_manifests(config: TandemConfig, out_dir: str | Path) -> list[Path]:
    """Write every step folder into out_dir; remove files an earlier rendering wrote that are gone now."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = render_files(config)
    for stale in [*out.glob("*.yaml"), *out.glob("*/*.yaml")]:
        if str(stale.relative_to(out)) not in files and stale.read_text().startswith(HEADER_MARK):
            stale.unlink()
    for folder in out.iterdir():
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    written = []
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)  # `kubectl apply -k` never sees half a manifest
        written.append(path)
    return written
