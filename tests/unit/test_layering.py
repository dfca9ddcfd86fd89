"""Dependencies flow one way, and no module imports itself back.

Read from the real tree with `ast` (imports inside functions included), the way Ray guards its
packages in `python/ray/train/v2/tests/test_circular_imports.py`. The layers, lowest first:

    cluster            the foundation: errors, config, runtime, artifacts
    training, serving  Ray Train + DeepSpeed; online serving (neither imports the other)
    serving.optimize   export, quantization, pruning, parity (uses training's data and models)
    tuning             Ray Tune around training
    profiling          what training and inference cost (spans both)
    tandem             the CLI and what it drives: pipeline, submit, k8s, checks

A module may import its own package and any lower layer, never a package of its own layer or
above. Rendering manifests and Serve config files needs no server stack: a second test runs
`tandem k8s` and `tandem serve-config` with `ray.serve` and `fastapi` made unimportable.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"cluster": 0, "training": 1, "serving": 1, "serving.optimize": 2, "tuning": 2, "profiling": 3, "tandem": 4}


def modules(root: Path, packages: list[str]) -> dict[str, Path]:
    """Every module of the top-level packages under root, by dotted name (a package by its __init__)."""
    found: dict[str, Path] = {}
    for top in packages:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The tree's modules that `name` imports anywhere in its file (a name imported from a module
    counts as that module, or as the submodule it names)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:  # `import a.b.c` of a module a.b.c, or its closest package
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def import_graph(root: Path, packages: list[str]) -> dict[str, set[str]]:
    known = modules(root, packages)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer_of(module: str, layers: dict[str, int]) -> tuple[str, int]:
    package = max((p for p in layers if module == p or module.startswith(p + ".")), key=len)
    return package, layers[package]


def backward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Imports of a package of the same layer or above, as 'importer -> imported'."""
    found = []
    for importer, targets in graph.items():
        own, level = layer_of(importer, layers)
        for target in sorted(targets):
            other, other_level = layer_of(target, layers)
            if other != own and other_level >= level:
                found.append(f"{importer} -> {target}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per import cycle found by depth-first search (each cycle reported from where it closed)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_real_tree_imports_only_downward_and_has_no_cycles():
    graph = import_graph(ROOT, sorted({p.split(".")[0] for p in LAYERS}))
    assert len(graph) > 50, "the walk found too few modules: is ROOT the repository?"
    assert backward_imports(graph, LAYERS) == []
    assert cycles(graph) == []


def test_the_foundation_orders_itself_errors_then_config_then_the_rest():
    graph = import_graph(ROOT, ["cluster"])
    assert graph["cluster.errors"] == set()
    config_modules = {m for m in graph if m.startswith("cluster.config")}
    assert {t for m in config_modules for t in graph[m]} <= config_modules | {"cluster.errors"}


def test_the_check_catches_a_backward_import_inside_a_function_and_a_cycle(tmp_path):
    files = {
        "cluster/__init__.py": "",
        "cluster/config.py": """
            def load():
                from serving.app import build_app  # the foundation reaching up, hidden in a function
                return build_app
        """,
        "serving/__init__.py": "",
        "serving/app.py": "from cluster.config import load\nfrom . import router\n",
        "serving/router.py": "import serving.app\n",
        "training/__init__.py": "",
        "training/loop.py": "from serving import app\n",  # same layer: training must not import serving
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    graph = import_graph(tmp_path, ["cluster", "serving", "training"])
    assert graph["serving.app"] == {"cluster.config", "serving.router"}
    assert backward_imports(graph, {"cluster": 0, "serving": 1, "training": 1}) == [
        "cluster.config -> serving.app",
        "training.loop -> serving.app",
    ]
    assert ["serving.app", "serving.router", "serving.app"] in cycles(graph)


BLOCKED_SERVER_STACK = """
import sys
sys.modules["ray.serve"] = None   # any `import ray.serve` / `from ray import serve` now raises ImportError
sys.modules["fastapi"] = None
from tandem.cli import main
main(sys.argv[1:])
"""


def test_k8s_and_serve_config_render_without_ray_serve_or_fastapi(tmp_path):
    for args in (
        ["k8s", "--draft", "--out", str(tmp_path / "k8s")],
        ["serve-config", "--for", "cluster", "--out", str(tmp_path / "serve.yaml")],
    ):
        done = subprocess.run([sys.executable, "-c", BLOCKED_SERVER_STACK, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "k8s" / "serve" / "rayservice.yaml").exists()
    assert "import_path: serving.app:build_app" in (tmp_path / "serve.yaml").read_text()


def test_no_product_module_is_over_500_lines():
    """A file that grows past this holds more than one concern: split it along its seams."""
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules(ROOT, sorted({p.split(".")[0] for p in LAYERS})).values()
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}
