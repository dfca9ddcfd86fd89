"""Every ```bash and ```python block of README.md and docs/ runs, as written, with Sybil.

Sybil (https://sybil.readthedocs.io) finds the blocks and the `<!-- skip: next "reason" -->`
marks in the pages; a block runs unless the page marks it with the reason it cannot run here (a
Kubernetes cluster, a GPU, Docker) or the test that runs the same command already (the README's
cluster recipe, `tandem run`, which take minutes). Marked blocks still get the static checks of
tests/unit/test_docs.py (verbs, flags, config fragments, imports), and a mark that names a test
must name one that exists.

Each page runs in one sandbox, a user's checkout with `make demo` done: `.venv` (this one),
`examples/` (copied, with fewer epochs: cheap settings, the text unchanged), `my.yaml` (the
packaged example, as the README's "copy of examples/digits.yaml") and `my-tune.yaml` (the same with
the tuning guide's `tuning:` section). A bash block runs with `bash -e -o pipefail` in the sandbox,
a Python block with the venv's python; either must exit 0. Blocks that ask `localhost:8000` find a
`tandem serve` of the sandbox's model there, started on first need (training it first when no page
has yet).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from unittest import SkipTest

import pytest
import yaml

from tests.e2e.conftest import ROOT, VENV_BIN
from tests.unit.test_docs import fenced

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

# Getting started first: its `tandem train` makes the model that later pages' `localhost:8000` serves.
PAGES = [
    "docs/getting-started.md",
    "README.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md") if p.name != "getting-started.md"),
]
SERVE_URL = "http://localhost:8000"  # the packaged example's serving.port, which the pages' curl and clients name
BLOCK_TIMEOUT_S = 600
SERVE_TIMEOUT_S = 300
CHEAP_EPOCHS = 2


class Sandbox:
    """A user's checkout after `make demo`, in a folder of its own, with a `tandem serve` on demand."""

    def __init__(self, root: Path):
        self.root = root
        (root / ".venv").symlink_to(VENV_BIN.parent)
        shutil.copytree(ROOT / "examples", root / "examples")
        for config in (root / "examples").rglob("*.yaml"):
            config.write_text(re.sub(r"^(\s*)epochs: \d+", rf"\g<1>epochs: {CHEAP_EPOCHS}", config.read_text(), flags=re.MULTILINE))
        shutil.copy(root / "examples" / "digits.yaml", root / "my.yaml")
        tuning = yaml.safe_load(fenced((ROOT / "docs/guides/tuning.md").read_text(), "yaml")[0])
        raw = yaml.safe_load((root / "my.yaml").read_text())
        (root / "my-tune.yaml").write_text(yaml.safe_dump({**raw, **tuning}, sort_keys=False))
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="tdm-", dir="/tmp"))  # short: Ray's socket paths
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TANDEM_VERBOSE")}
        self.env.update(
            {
                "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
                "RAY_TMPDIR": str(self.ray_tmp),
                "TANDEM_CACHE_DIR": str(root / ".cache"),
                "RAY_USAGE_STATS_ENABLED": "0",
                "COLUMNS": "200",
            }
        )
        self.server: subprocess.Popen | None = None

    def run(self, args: list[str], what: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            args, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, start_new_session=True
        )
        assert done.returncode == 0, f"{what} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done

    def ensure_serving(self) -> None:
        """`tandem serve` of the sandbox's latest digits model on localhost:8000 (trained first if none)."""
        if self.server is not None and self.server.poll() is None:
            return
        assert not answers(f"{SERVE_URL}/healthz"), "something else already listens on localhost:8000"
        if not list((self.root / "runs" / "digits").glob("*/artifacts/manifest.json")):
            self.run(["tandem", "train", "examples/digits.yaml"], "training the model to serve")
        log = open(self.root / "serve.log", "w")  # noqa: SIM115 - the server writes it until stop()
        self.server = subprocess.Popen(
            ["tandem", "serve", "examples/digits.yaml", "--from", "latest"],
            cwd=self.root,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while not answers(f"{SERVE_URL}/healthz"):
            assert self.server.poll() is None, f"tandem serve exited:\n{(self.root / 'serve.log').read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"tandem serve not ready in {SERVE_TIMEOUT_S} s"
            time.sleep(1)

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
            try:
                self.server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait(timeout=30)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    box = Sandbox(tmp_path_factory.mktemp("docs-sandbox"))
    yield box
    box.stop()


def page_document(page: str, sandbox: Sandbox):
    from sybil import Sybil
    from sybil.parsers.markdown import CodeBlockParser, SkipParser

    def run_bash(example) -> None:
        if "localhost:8000" in example.parsed:
            sandbox.ensure_serving()
        sandbox.run(["bash", "-e", "-o", "pipefail", "-c", example.parsed], f"{page}:{example.line} (bash)")

    def run_python(example) -> None:
        if "localhost:8000" in example.parsed:
            sandbox.ensure_serving()
        sandbox.run([str(VENV_BIN / "python"), "-c", example.parsed], f"{page}:{example.line} (python)")

    parsers = [CodeBlockParser(language="bash", evaluator=run_bash), CodeBlockParser(language="python", evaluator=run_python), SkipParser()]
    return Sybil(parsers=parsers, path=str(ROOT), patterns=[page]).parse(ROOT / page)


@pytest.mark.parametrize("page", PAGES)
def test_every_unmarked_block_of_the_page_runs(page, sandbox):
    """The page's blocks in order; a marked one is counted with its reason, an unmarked one must exit 0."""
    ran, marked = [], []
    for example in page_document(page, sandbox).examples():
        try:
            example.evaluate()
        except SkipTest as reason:
            marked.append((example.line, str(reason)))
            continue
        if not isinstance(example.parsed, tuple):  # a skip mark itself is an example too
            ran.append(example.line)
    for line, reason in marked:
        for named in re.findall(r"(tests/\S+\.py)::(\w+)", reason):
            path, test = ROOT / named[0], named[1]
            assert path.is_file() and f"def {test}(" in path.read_text(), f"{page}:{line} is marked as run by {named}, which does not exist"
    text = (ROOT / page).read_text()
    blocks = len(fenced(text, "bash")) + len(fenced(text, "python"))  # indented ones (inside lists) too
    assert len(ran) + len(marked) == blocks, f"{page}: ran {ran}, marked {marked}; some block was neither"
