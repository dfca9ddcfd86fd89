"""The docs site (docs/, mkdocs.yml) builds in strict mode, every page is in its nav, and what its
snippets name exists: `tandem` verbs and flags in the CLI, config fragments in the schema, Python
imports in the code. tests/e2e/test_docs_snippets.py runs the blocks; for those a page marks as not
runnable here (a Kubernetes cluster, a registry, a GPU) these checks are what keeps the text from drifting."""

from __future__ import annotations

import ast
import copy
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
PROJECT_PACKAGES = {"cluster", "training", "tuning", "serving", "profiling", "tandem"}


def fenced(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of a Markdown text (indented ones too, inside lists)."""
    blocks = re.findall(rf"^( *)```{language}\n(.*?)^\1```$", text, flags=re.MULTILINE | re.DOTALL)
    return ["\n".join(line[len(indent) :] for line in body.splitlines()) for indent, body in blocks]


def page_blocks(language: str) -> list[tuple[str, str]]:
    sources = [ROOT / "README.md", *PAGES]
    return [(str(path.relative_to(ROOT)), block) for path in sources for block in fenced(path.read_text(), language)]


def test_the_site_builds_in_strict_mode(tmp_path):
    """A broken link or anchor, a page missing from the nav, or a missing included file fails. Not
    `-q`: it hides the warnings from the count that strict mode fails on."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, f"`make docs` fails:\n{done.stdout}\n{done.stderr}"
    for page in ("index.html", "getting-started/index.html", "guides/serving/index.html", "reference/configuration/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


def test_every_page_is_in_the_nav():
    nav = set(re.findall(r"^\s+(?:- )?[^:#]+:\s+(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.MULTILINE))
    pages = {str(p.relative_to(DOCS)) for p in PAGES}
    assert pages == nav, f"in docs/ but not in mkdocs.yml's nav: {sorted(pages - nav)}; in the nav but missing: {sorted(nav - pages)}"


def tandem_commands(block: str) -> list[list[str]]:
    """Every `tandem ...` command of a shell block, as its words (comments and continuations removed)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("#"):
            continue
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(part)
            except ValueError:
                continue
            if words and words[0].rsplit("/", 1)[-1] == "tandem":
                commands.append(words[1:])
    return commands


@pytest.fixture(scope="module")
def cli():
    import typer

    from tandem.cli import app

    return typer.main.get_command(app)


def test_every_tandem_command_in_the_docs_has_its_verb_and_flags(cli):
    checked = 0
    for source, block in page_blocks("bash"):
        for words in tandem_commands(block):
            words = [w for w in words if w not in ("-v", "--verbose")]
            if not words or words[0] == "--help":
                continue
            verb, args = words[0], words[1:]
            assert verb in cli.commands, f"{source}: `tandem {verb}` is not a verb of the CLI ({sorted(cli.commands)})"
            options = {opt for param in cli.commands[verb].params for opt in (*param.opts, *param.secondary_opts)}
            for arg in args:
                if arg.startswith("-"):
                    assert arg.split("=", 1)[0] in options, f"{source}: `tandem {verb}` has no option {arg} ({sorted(options)})"
            checked += 1
    assert checked >= 15


def _merge(base: dict, fragment: dict) -> dict:
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def test_every_config_fragment_in_the_docs_validates_on_the_packaged_example():
    """A ```yaml block that is part of a Tandem config, merged onto examples/digits.yaml, passes the
    schema and the cross-field rules (Kubernetes objects, which have apiVersion, are left out)."""
    from cluster.config import validate_config
    from cluster.config.loading import read_yaml

    base = read_yaml(ROOT / "examples" / "digits.yaml")
    checked = 0
    for source, block in page_blocks("yaml"):
        fragment = yaml.safe_load(block)
        if not isinstance(fragment, dict) or "apiVersion" in fragment:
            continue
        validate_config(_merge(copy.deepcopy(base), fragment), source=source)
        checked += 1
    assert checked >= 4


def _defines(module: str, name: str) -> bool:
    """Whether a project module defines `name` at its top level (or lists it in __all__), read
    without importing it (importing training or serving would import Ray and torch)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module}"
    tree = ast.parse(Path(spec.origin).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and isinstance(node.value, (ast.List, ast.Tuple)):
                names.update(elt.value for elt in node.value.elts if isinstance(elt, ast.Constant))
    return name in names


def test_every_python_snippet_compiles_and_imports_what_the_code_defines():
    checked = 0
    for source, block in page_blocks("python"):
        tree = ast.parse(block, filename=source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT_PACKAGES:
                for alias in node.names:
                    assert _defines(node.module, alias.name), (
                        f"{source}: `from {node.module} import {alias.name}`: {node.module} has no {alias.name}"
                    )
                    checked += 1
    assert checked >= 2


def test_the_open_inference_protocol_snippet_names_the_model_by_the_config_name():
    from cluster.config import load_config

    name = load_config(ROOT / "examples" / "digits.yaml").name
    calls = [call for _, block in page_blocks("python") for call in re.findall(r"\.infer\(\"([^\"]+)\"", block)]
    assert calls and set(calls) == {name}, f"the v2 model name is the config's name ({name!r}); the docs call {calls}"


def test_the_cluster_recipe_in_the_docs_is_the_readmes():
    """The README's recipe is what tests/e2e/test_readme_cluster_recipe.py runs; the guide shows the same blocks."""
    readme = (ROOT / "README.md").read_text().split("\n## Running on a Ray cluster\n", 1)[1]
    readme = re.split(r"^## ", readme, maxsplit=1, flags=re.MULTILINE)[0]
    guide = (DOCS / "guides" / "cluster.md").read_text()
    assert fenced(readme, "bash") and fenced(readme, "bash") == fenced(guide, "bash")[: len(fenced(readme, "bash"))]


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "-q", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr
    return site


def markdown_headings(page: Path) -> list[str]:
    """The page's level-1 and level-2 headings as they read once rendered (code spans unquoted)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)  # not the comments in code blocks
    return [re.sub(r"`([^`]*)`", r"\1", h).strip() for h in re.findall(r"^#{1,2} (.+)$", text, flags=re.MULTILINE)]


@pytest.mark.parametrize("page", ["getting-started", "guides/serving"])
def test_pages_render_in_headless_chromium_with_their_headings_and_the_theme(built_site, chromium, page, tmp_path):
    import html

    from tests.conftest import run_chromium, screenshot

    url = (built_site / page / "index.html").as_uri()
    dom = run_chromium(chromium, ["--virtual-time-budget=10000", "--dump-dom", url], tmp_path).stdout
    rendered = [re.sub(r"<[^>]+>", "", h).strip() for h in re.findall(r"<h[12][^>]*>(.*?)</h[12]>", dom, flags=re.DOTALL)]
    rendered = [html.unescape(h).rstrip("¶").strip() for h in rendered]
    for heading in markdown_headings(DOCS / f"{page}.md"):
        assert heading in rendered, (heading, rendered)
    assert 'class="md-header' in dom and "md-nav" in dom, "Material's header and navigation were not rendered"
    _, size, colours = screenshot(chromium, url, 1200, 1600, tmp_path)
    assert size == (1200, 1600)
    assert colours > 100, "the screenshot shows a rendered page"
