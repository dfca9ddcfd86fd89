"""Artifacts and files under faults and tampering: atomic writes, checksums, folder escapes, safe loads.

Real files, real torch/onnxruntime loads, a real process killed with SIGKILL mid-write; no mocks
beyond one failing file handle that stands in for a full disk.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.artifacts import (
    MANIFEST,
    MODEL_FILE,
    ArtifactError,
    atomic_save_torch,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_model,
    load_state_dict,
    read_manifest,
    save_model_artifact,
    verify_artifact,
    write_manifest,
)
from tests.reliability.figures import record

pytestmark = [pytest.mark.reliability]

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"builder": "training.models:mlp", "args": {"hidden": [16]}, "input_shape": [64], "num_classes": 10}
FIGURES: dict[str, dict[str, int]] = {}


def tally(check: str, **counts: int) -> None:
    """Add to one check's figures (parametrized cases add up) and record them."""
    figures = FIGURES.setdefault(check, {})
    for key, n in counts.items():
        figures[key] = figures.get(key, 0) + n
    record(check, **figures)


def tiny_artifact(folder: Path, seed: int = 0) -> Path:
    from training.models import mlp

    torch.manual_seed(seed)
    model = mlp((64,), 10, hidden=[16])
    save_model_artifact(folder, model.state_dict(), SPEC, {"metrics": {"val_accuracy": 0.5}})
    return folder


def add_onnx(folder: Path, seed: int = 0) -> None:
    """A real ONNX model ([N, 64] -> [N, 10] logits) in the artifact, listed in its manifest."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).normal(size=(64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    atomic_write_bytes(folder / "model.onnx", model.SerializeToString())
    write_manifest(folder, {})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------
# atomic writes: a failure mid-write leaves the old file or none, never a partial one
# ---------------------------------------------------------------------------------------------


class FullDisk:
    """Stands in for os.fdopen: the returned handle writes half of the data, then fails like ENOSPC."""

    def __init__(self) -> None:
        self.real = os.fdopen
        self.partial_bytes = 0

    def __call__(self, fd, *args, **kwargs):
        handle = self.real(fd, *args, **kwargs)
        outer = self

        class Half:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def write(self, data):
                handle.write(data[: len(data) // 2])
                handle.flush()
                outer.partial_bytes = os.fstat(handle.fileno()).st_size
                raise OSError(errno.ENOSPC, "No space left on device (injected)")

        return Half()


WRITERS = {
    "atomic_write_bytes": lambda path, n: atomic_write_bytes(path, bytes([n % 256]) * 200_000),
    "atomic_write_text": lambda path, n: atomic_write_text(path, f"version {n}\n" * 20_000),
    "atomic_write_json": lambda path, n: atomic_write_json(path, {"version": n, "rows": list(range(20_000))}),
    "atomic_save_torch": lambda path, n: atomic_save_torch({"w": torch.full((50_000,), float(n))}, path),
}


@pytest.mark.parametrize("existing", [True, False], ids=["over-an-old-file", "new-file"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_write_that_fails_midway_leaves_the_old_file_or_none(tmp_path, monkeypatch, writer, existing):
    path = tmp_path / "artifact.bin"
    if existing:
        WRITERS[writer](path, 1)
    before = path.read_bytes() if existing else None
    disk = FullDisk()
    monkeypatch.setattr(os, "fdopen", disk)
    with pytest.raises(OSError, match="No space left"):
        WRITERS[writer](path, 2)
    monkeypatch.undo()
    assert disk.partial_bytes > 0  # the failure really came midway, with half the bytes on disk
    assert (path.read_bytes() if path.exists() else None) == before
    assert leftovers(tmp_path) == []  # the half-written temp file is removed, not left to pile up
    tally("artifact_write_failing_midway", writes_failed_midway=1, partial_files_left=0)


def test_save_model_artifact_failing_midway_keeps_the_old_model_loadable(tmp_path, monkeypatch):
    folder = tiny_artifact(tmp_path / "artifacts", seed=0)
    old_version = read_manifest(folder)["version"]
    monkeypatch.setattr(os, "fdopen", FullDisk())
    from training.models import mlp

    with pytest.raises(OSError):
        save_model_artifact(folder, mlp((64,), 10, hidden=[16]).state_dict(), SPEC)
    monkeypatch.undo()
    verify_artifact(folder)
    model, manifest = load_model(folder)
    assert manifest["version"] == old_version and leftovers(folder) == []


def test_new_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644


CHILD = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from cluster.artifacts import atomic_save_torch, save_model_artifact
    target, kind = Path(sys.argv[1]), sys.argv[2]
    print("writing", flush=True)
    n = 1
    while True:
        n += 1
        state = {"w": torch.full((3_000_000,), float(n))}  # 12 MB per write
        print(f"begin {n - 1}", flush=True)
        if kind == "file":
            atomic_save_torch(state, target)
        else:
            save_model_artifact(target, {"0.weight": torch.full((16, 64), float(n)), "0.bias": torch.zeros(16),
                                         "2.weight": torch.zeros(10, 16), "2.bias": torch.zeros(10), "pad": state["w"]},
                                {"builder": "x:y", "args": {}, "input_shape": [64], "num_classes": 10})
        print(f"saved {n - 1}", flush=True)
    """
)


def spawn_writer(target: Path, kind: str) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(target), kind], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "writing", child.stderr.read()
    return child


def kill_at(child: subprocess.Popen, event: str, folder: Path, between_lines=lambda: None) -> None:
    """SIGKILL the writer at `event`: "inside N" once its Nth save has a temp file in `folder` (the
    kill lands mid-write), "saved N" once N saves have finished. `between_lines` runs after each
    line the writer prints before then. Events, not a timer: a slow machine changes when, not what."""
    phase, number = event.split()
    wanted = f"{'begin' if phase == 'inside' else 'saved'} {number}"
    for line in child.stdout:
        between_lines()
        if line.strip() == wanted:
            break
    else:
        raise AssertionError(f"the writer exited before {wanted!r}: {child.stderr.read()}")
    deadline = time.monotonic() + 60  # bounds a hang only
    while phase == "inside" and not leftovers(folder):
        assert time.monotonic() < deadline and child.poll() is None, "the writer's save never showed a temp file"
        time.sleep(0.001)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def kill_events(rng: np.random.Generator, count: int) -> list[str]:
    """Kill moments: inside the first, second or third save, or just after one finished."""
    return [f"{rng.choice(['inside', 'saved'])} {rng.integers(1, 4)}" for _ in range(count)]


def test_sigkill_while_writing_a_large_artifact_never_leaves_a_partial_file(tmp_path):
    """A process rewriting a 12 MB model file in a loop is killed with SIGKILL at random moments
    (inside a save, or between two). Every read while it runs, and the file after each kill, is a
    whole file (loads with weights_only=True, every value the same version); the kills land
    mid-write (temp files left)."""
    target = tmp_path / MODEL_FILE
    atomic_save_torch({"w": torch.full((3_000_000,), 1.0)}, target)
    reads = 0

    def read_whole() -> None:
        nonlocal reads
        w = torch.load(io.BytesIO(target.read_bytes()), weights_only=True)["w"]
        assert w.numel() == 3_000_000 and bool((w == w[0]).all())
        reads += 1

    kills, mid_write = 0, 0
    # Kill until two kills have landed mid-write, at most 12 times.
    for event in kill_events(np.random.default_rng(0), 12):
        if kills >= 3 and mid_write >= 2:
            break
        kill_at(spawn_writer(target, "file"), event, tmp_path, between_lines=read_whole)
        kills += 1
        mid_write += bool(leftovers(tmp_path))
        w = torch.load(target, weights_only=True)["w"]
        assert w.numel() == 3_000_000 and bool((w == w[0]).all())
        for name in leftovers(tmp_path):
            (tmp_path / name).unlink()
    assert mid_write >= 1, "no kill landed mid-write; the test proved nothing"
    tally("artifact_write_sigkill", sigkills=kills, killed_mid_write=mid_write, reads_during_rewrites=reads, partial_files_seen=0)


def test_sigkill_during_save_model_artifact_leaves_a_loadable_or_refused_artifact(tmp_path):
    """model.pt and manifest.json are two renames: a kill between them leaves a new model.pt under
    the old manifest, which the checksum refuses. Either way nothing partial is ever loaded. Kills
    go on until at least one landed mid-save (a temp file left, or the pair split) and at least
    one save had completed (the writer's weights, not the first artifact's, verified)."""
    folder = tmp_path / "artifacts"
    tiny_artifact(folder)
    rng = np.random.default_rng(1)
    outcomes = {"verified": 0, "refused": 0}
    mid_save, completed = 0, 0
    for event in kill_events(rng, 12):
        if sum(outcomes.values()) >= 3 and mid_save and completed:
            break
        kill_at(spawn_writer(folder, "artifact"), event, folder)
        left_mid_write = bool(leftovers(folder))
        try:
            verify_artifact(folder)
            state = torch.load(folder / MODEL_FILE, weights_only=True)
            assert set(state) >= {"0.weight", "0.bias"}
            outcomes["verified"] += 1
            completed += "pad" in state  # only the writer's saves hold "pad": one of them finished
        except ArtifactError as exc:
            assert "fails its checksum" in str(exc) and MODEL_FILE in str(exc)
            outcomes["refused"] += 1
            left_mid_write = True  # killed between the two renames
        mid_save += left_mid_write
        for name in leftovers(folder):
            (folder / name).unlink()
    tally(
        "artifact_save_sigkill",
        sigkills=sum(outcomes.values()),
        left_verified=outcomes["verified"],
        left_refused_by_checksum=outcomes["refused"],
        killed_mid_save=mid_save,
        left_a_completed_save=completed,
        partial_loads=0,
    )
    assert mid_save >= 1, f"no kill landed mid-save in {sum(outcomes.values())} kills; the test proved nothing"
    assert completed >= 1, f"no save completed before any of {sum(outcomes.values())} kills; the test proved nothing"


# ---------------------------------------------------------------------------------------------
# checksums: a truncated or altered model.pt / model.onnx is refused with the file and the fix
# ---------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def append(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0")


def empty(path: Path) -> None:
    path.write_bytes(b"")


def swap_for_other_weights(path: Path) -> None:
    """A different, perfectly valid file of the same kind (another seed's weights)."""
    other = path.parent.parent / "other"
    tiny_artifact(other, seed=99)
    add_onnx(other, seed=99)
    path.write_bytes((other / path.name).read_bytes())


TAMPERINGS = {
    "truncated": truncate,
    "one-bit-flipped": flip,
    "one-byte-appended": append,
    "emptied": empty,
    "other-valid-weights": swap_for_other_weights,
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
@pytest.mark.parametrize("name", [MODEL_FILE, "model.onnx"])
def test_a_tampered_model_file_is_refused_naming_the_file_and_the_fix(tmp_path, name, tampering):
    from serving.engines import load_engine

    folder = tiny_artifact(tmp_path / "run" / "artifacts")
    add_onnx(folder)
    engine = {"engine": "torch"} if name == MODEL_FILE else {"engine": "onnxruntime"}
    load_engine(folder, device="cpu", **engine).predict(np.zeros((2, 64), np.float32))  # sound before
    recorded = read_manifest(folder)["files"][name]["sha256"]
    TAMPERINGS[tampering](folder / name)
    loaders = [lambda: load_engine(folder, device="cpu", **engine), lambda: verify_artifact(folder)]
    if name == MODEL_FILE:
        loaders += [lambda: load_model(folder), lambda: load_state_dict(folder)]
    for load in loaders:
        with pytest.raises(ArtifactError) as caught:
            load()
        message = str(caught.value)
        assert str(folder / name) in message and "fails its checksum" in message and recorded in message, message
        assert "train or export it again" in message.lower(), message
    tally("artifact_tampering", files_tampered=1, refused=1, loads_refused=len(loaders))


def test_a_missing_model_file_is_refused_naming_it(tmp_path):
    folder = tiny_artifact(tmp_path / "artifacts")
    (folder / MODEL_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"model\.pt is missing; the manifest lists it"):
        load_model(folder)
    tally("artifact_tampering", files_tampered=1, refused=1, loads_refused=1)


def test_a_pickle_payload_with_a_matching_checksum_is_still_refused_by_weights_only(tmp_path):
    """An attacker who can rewrite the manifest too passes the checksum; weights_only=True is then
    what stops code execution. The payload would create a file; it must not exist afterwards."""
    folder = tiny_artifact(tmp_path / "artifacts")
    proof = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    buffer = io.BytesIO()
    torch.save({"0.weight": Payload()}, buffer)
    (folder / MODEL_FILE).write_bytes(buffer.getvalue())
    write_manifest(folder, {})  # the manifest now vouches for the payload
    with pytest.raises(ArtifactError, match=r"model\.pt holds more than tensors.*weights_only=True"):
        load_model(folder)
    assert not proof.exists()
    tally("artifact_pickle_payload", payloads=1, refused=1, code_executed=0)


# ---------------------------------------------------------------------------------------------
# a manifest that names a file outside its folder is refused
# ---------------------------------------------------------------------------------------------


def point_manifest_at(folder: Path, name: str, target: Path) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(target.read_bytes()).hexdigest(), "bytes": target.stat().st_size}
    (folder / MANIFEST).write_text(json.dumps(manifest))


ESCAPES = ["../secret.pt", "../../run/secret.pt", "sub/../../secret.pt", "ABSOLUTE", "SYMLINK"]


@pytest.mark.parametrize("escape", ESCAPES)
def test_a_manifest_entry_outside_its_folder_is_refused(tmp_path, escape):
    folder = tiny_artifact(tmp_path / "run" / "artifacts")
    secret = tmp_path / "secret.pt"
    secret.write_bytes((folder / MODEL_FILE).read_bytes())  # valid weights, matching checksum
    (tmp_path / "run" / "secret.pt").write_bytes(secret.read_bytes())
    name = {"ABSOLUTE": str(secret), "SYMLINK": "linked.pt"}.get(escape, escape)
    if escape == "SYMLINK":
        (folder / "linked.pt").symlink_to(secret)
    point_manifest_at(folder, name, secret)
    for load in (
        lambda: read_manifest(folder),
        lambda: verify_artifact(folder),
        lambda: load_state_dict(folder, name),
        lambda: load_model(folder),
    ):
        with pytest.raises(ArtifactError, match="points outside its artifact folder"):
            load()
    tally("manifest_escape", escapes_tried=1, refused=1)


def test_a_symlinked_model_pt_pointing_out_is_refused(tmp_path):
    folder = tiny_artifact(tmp_path / "artifacts")
    outside = tmp_path / "elsewhere.pt"
    (folder / MODEL_FILE).rename(outside)
    (folder / MODEL_FILE).symlink_to(outside)  # same bytes, same checksum, but out of the folder
    with pytest.raises(ArtifactError, match=r"'model\.pt' points outside its artifact folder"):
        load_model(folder)
    with pytest.raises(ArtifactError, match="points outside"):
        write_manifest(folder, {})  # nor is such a link ever recorded
    tally("manifest_escape", escapes_tried=1, refused=1)


@pytest.mark.parametrize(
    "manifest",
    [
        [],
        "text",
        {"files": []},
        {"files": {"model.pt": "abc"}},
        {"files": {"model.pt": {"sha256": "zz"}}},
        {"files": {"a\u0000b": {"sha256": "0" * 64}}},
    ],
    ids=["a-list", "a-string", "files-a-list", "entry-a-string", "bad-sha256", "nul-in-name"],
)
def test_a_damaged_manifest_is_an_artifact_error_not_a_crash(tmp_path, manifest):
    folder = tiny_artifact(tmp_path / "artifacts")
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest.json"):
        load_model(folder)
    (folder / MANIFEST).write_bytes(b"\xff\xfe{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(folder)


# ---------------------------------------------------------------------------------------------
# static scans of the whole repository
# ---------------------------------------------------------------------------------------------

# Outside a git checkout (an sdist, a container copy): the project's own folders.
SOURCE_DIRS = ("cluster", "training", "serving", "tuning", "profiling", "tandem", "benchmarks", "tests", "examples")


def repo_sources() -> list[Path]:
    """The project's own Python files: what git tracks or would track (`git ls-files`, untracked
    files not ignored included), else the package folders. Never a run folder (`make demo` leaves
    DeepSpeed's zero_to_fp32.py, which loads with weights_only=False, in every checkpoint under
    runs/) nor a virtual environment."""
    if (ROOT / ".git").exists():
        try:
            listed = subprocess.run(
                ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.py"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            listed = None
        if listed is not None:
            return sorted({ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()})
    files = {path for folder in SOURCE_DIRS for path in (ROOT / folder).rglob("*.py")} | set(ROOT.glob("*.py"))
    return sorted(path for path in files if "__pycache__" not in path.parts)


def shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def loads_in(path: Path) -> tuple[list[str], list[str]]:
    """(torch.load calls, unsafe deserializer calls) of one file, as 'file:line: text'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {"torch.load"}  # names under which torch.load is reachable in this file
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            aliases |= {a.asname or a.name for a in node.names if a.name == "load"}
        if isinstance(node, ast.Import):
            aliases |= {f"{a.asname}.load" for a in node.names if a.name == "torch" and a.asname}
    torch_loads, unsafe = [], []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        where = f"{shown(path)}:{node.lineno}: {ast.unparse(node)[:120]}"
        keywords = {k.arg: k.value for k in node.keywords}
        if name in aliases or name.endswith("serialization.load"):
            torch_loads.append(where)
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                unsafe.append(where + "  (torch.load without literal weights_only=True)")
        if name.split(".")[-1] in ("load", "loads", "Unpickler") and name.split(".")[0] in (
            "pickle",
            "cPickle",
            "dill",
            "cloudpickle",
            "joblib",
            "_pickle",
        ):
            unsafe.append(where + "  (pickle-family load)")
        if name in ("np.load", "numpy.load"):
            flag = keywords.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                unsafe.append(where + "  (np.load with allow_pickle)")
    return torch_loads, unsafe


def test_every_torch_load_passes_weights_only_true_and_nothing_unpickles():
    sources = repo_sources()
    assert len(sources) > 50 and any(p.name == "artifacts.py" for p in sources)
    assert not [p for p in sources if shown(p).parts[0] in ("runs", ".venv")], "only the project's own sources are scanned"
    torch_loads, unsafe = [], []
    for path in sources:
        found, bad = loads_in(path)
        torch_loads += found
        unsafe += bad
    assert any("cluster/artifacts.py" in t for t in torch_loads), "the scan must see the artifact loader"
    assert not unsafe, "\n".join(unsafe)
    record(
        "safe_loads_scan", python_files_scanned=len(sources), torch_load_calls=len(torch_loads), without_weights_only_true=0, pickle_loads=0
    )


def test_the_scan_catches_what_it_looks_for(tmp_path):
    probe = tmp_path / "probe.py"  # parsed, never imported
    probe.write_text(
        "import torch, pickle, numpy as np\nfrom torch import load as L\ntorch.load('a')\ntorch.load('a', weights_only=flag)\n"
        "L('a')\npickle.load(f)\nnp.load('a', allow_pickle=True)\ntorch.load('a', weights_only=True)\n"
    )
    found, unsafe = loads_in(probe)
    assert len(found) == 4 and len(unsafe) == 5, unsafe
    probe.write_text(
        "from pathlib import Path\nPath('x').write_text('y')\nopen('x', 'w')\nopen('x', 'a')\nimport torch\ntorch.save(s, 'x.pt')\n"
    )
    assert len(plain_writes(probe)) == 3


# Files the packages write that are not artifacts, with the reason they need no atomic rename.
NON_ARTIFACT_WRITES = {
    "training/loop.py": "the test-only fault-injection marker",
    "serving/loadgen.py": "a temp file of inputs handed to the load-generator subprocess",
    "tandem/reference.py": "a developer tool that rewrites README.md and docs/ in the checkout",
    "cluster/console.py": "the long verbs' console.log, appended line by line while they run, and the terminal's duplicated descriptors",
    "serving/haproxy_front.py": "HAProxy's configuration copy, written atomically by itself (standard library only: it runs on every "
    "HAProxy start)",
}
PACKAGES = ("cluster", "serving", "training", "tuning")


def plain_writes(path: Path) -> list[str]:
    """Calls that write a file in place: Path.write_text/bytes, open(..., 'w'), json.dump, torch.save to a path."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        method = node.func.attr if isinstance(node.func, ast.Attribute) else name
        mode = (
            node.args[1]
            if name in ("open", "os.fdopen") and len(node.args) > 1
            else next((k.value for k in node.keywords if k.arg == "mode"), None)
        )
        writes = method in ("write_text", "write_bytes") or name == "json.dump"
        writes |= name == "open" and isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wx")
        writes |= name == "torch.save" and not (len(node.args) > 1 and isinstance(node.args[1], ast.Name) and "buf" in node.args[1].id)
        if writes:
            found.append(f"{shown(path)}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_the_packages_write_files_only_through_the_atomic_writers():
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            if relative == "cluster/artifacts.py" or relative in NON_ARTIFACT_WRITES:
                continue
            offenders += plain_writes(path)
    assert not offenders, "write these through cluster.artifacts.atomic_write_*:\n" + "\n".join(offenders)
