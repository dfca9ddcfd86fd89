"""Property-based: whatever file `tandem validate` is given, it answers 0 or 2 and never a traceback.

The config fuzz (test_config_fuzz.py) covers validate_config on Python values; this goes through
the CLI as a user meets it: random YAML documents (mappings or not), mutated valid configs, raw
text that is mostly not YAML, binary junk, hostile YAML (aliases that contain themselves, "billion
laughs", deep nesting, Python tags, Rich markup), empty and missing files, folders, and random
`--set` overrides. In-process through `tandem.cli.main`, and a few as real subprocesses.
"""

from __future__ import annotations

import contextlib
import copy
import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import PACKAGED_EXAMPLE, ConfigError, load_config
from tandem.cli import main
from tests.reliability.figures import record
from tests.unit.test_config_fuzz import ALL_PATHS  # every path into the packaged example

pytestmark = [pytest.mark.reliability]

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load(PACKAGED_EXAMPLE.read_text())
SEEN: Counter = Counter()


def tandem(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr). Any exception escaping main() is
    what a user would see as a traceback, so it is not caught here: the test fails with it."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def expected_problems(path: Path, overrides: list[str] = (), full: bool = True) -> list[str]:
    """The problems `tandem validate` finds in a file, as printed (empty when it is valid): the
    schema's, then (full) training's driver-side preflight (data, model, DeepSpeed) and the search
    space's. Other verbs (show-config) check the schema only."""
    from training.trainer import preflight
    from tuning.tuner import check_tuning

    try:
        config = load_config(path, list(overrides))
        if full:
            preflight(config)
        if full and config.tuning is not None:
            check_tuning(config)
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


def squash(text: str) -> str:
    return " ".join(text.split())


def check_answer(path: Path, *overrides: str, verb: str = "validate") -> int:
    args = [verb, str(path)] + [a for o in overrides for a in ("--set", o)]
    code, out, err = tandem(*args)
    SEEN[f"exit {code}"] += 1
    assert "Traceback" not in out + err
    assert code in (0, 2), (code, out, err)
    problems = expected_problems(path, overrides, full=verb == "validate")
    if code == 2:
        assert err.startswith("config error") and problems, err
        for problem in problems:
            # every problem, each naming its field, as written (whitespace aside: Rich expands tabs)
            assert squash(problem) in squash(err), (problem, err)
    else:
        assert not problems and not err
        if verb == "validate":
            assert out.startswith("valid"), out
    return code


def record_figures() -> None:
    record("cli_fuzz", cases_tried=sum(SEEN.values()), exit_codes=dict(sorted(SEEN.items())), tracebacks=0, other_exit_codes=0)


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["cpu", "gpu", "local", "auto", "fp16", "[/]", "[bold]x", "../x", "training.models:mlp", "\x85", "~"]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=10,
)


YAML_ALPHABET = st.sampled_from(list("abz019 :-,[]{}&*!|>'\"#%@`?\n\t.=_/\\") + ["\x00", "\ufeff", "é", "\u2028"])


def write(tmp: Path, name: str, data: str | bytes) -> Path:
    path = tmp / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(document=values)
def test_random_yaml_documents(tmp_path, document):
    """Any YAML document: a scalar, a list or a mapping of random things."""
    check_answer(write(tmp_path, "random.yaml", yaml.safe_dump(document, allow_unicode=True)))
    record_figures()


@FUZZ
@given(mutations=st.lists(st.tuples(st.sampled_from(ALL_PATHS), values), min_size=1, max_size=3))
def test_mutated_valid_configs_name_the_field(tmp_path, mutations):
    raw = copy.deepcopy(BASE)
    applied = []
    for path, value in mutations:
        node = raw
        try:
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
            applied.append(path)
        except (KeyError, IndexError, TypeError):
            continue
    file = write(tmp_path, "mutated.yaml", yaml.safe_dump(raw, allow_unicode=True))
    if check_answer(file) == 2 and len(applied) == 1:
        # One change made it invalid: the message names that field by its full dotted path.
        _, _, err = tandem("validate", str(file))
        assert names_the_field(applied[0], err), (field_path(applied[0]), err)
    record_figures()


def field_path(path: tuple) -> str:
    """A path into the config as the error messages write it: training.optimizer.lr, serving.deployments[0].cpus."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def names_the_field(path: tuple, err: str) -> bool:
    """Whether `tandem validate`'s message names the mutated field by its full dotted path.

    Two narrow exceptions, each still naming the field exactly:
    - model.args is the builder's own keyword arguments, opaque to the schema: a builder that
      fails names model.args (the deepest path the config knows), e.g. model.args.hidden[0] = -1;
    - a rule across sibling fields (min_replicas <= max_replicas) is reported on their parent, and
      that problem line names the field's key: "- cluster.node_groups.cpu: ... min_replicas (9) is
      larger than max_replicas (2)".
    """
    if field_path(path) in err:
        return True
    if path[:2] == ("model", "args"):
        return "- model.args:" in err
    parent, key = field_path(path[:-1]), str(path[-1])
    return any(line.lstrip().startswith(f"- {parent}:") and key in line.split(" — ", 1)[-1] for line in err.splitlines())


@FUZZ
@given(text=st.text(YAML_ALPHABET, max_size=80))
def test_text_that_is_mostly_not_yaml(tmp_path, text):
    check_answer(write(tmp_path, "text.yaml", text))
    record_figures()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=300))
def test_binary_junk(tmp_path, junk):
    check_answer(write(tmp_path, "junk.yaml", junk))
    record_figures()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    overrides=st.lists(
        st.tuples(
            st.sampled_from([".".join(map(str, p)).replace(".0", "[0]") for p in ALL_PATHS] + ["", "x", "a..b", "[0]", "training[9]"]),
            st.text(YAML_ALPHABET, max_size=20),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_random_set_overrides(overrides):
    check_answer(PACKAGED_EXAMPLE, *(f"{k}={v}" for k, v in overrides))
    record_figures()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=values)
def test_show_config_prints_yaml_that_validates_or_exits_2(tmp_path, document):
    """show-config serializes the config: a value that validates must also print."""
    file = write(
        tmp_path, "show.yaml", yaml.safe_dump({"model": {"builder": "training.models:mlp", "args": {"x": document}}}, allow_unicode=True)
    )
    if check_answer(file, verb="show-config") == 0:
        _, out, _ = tandem("show-config", str(file))
        again = write(tmp_path, "again.yaml", out)
        # The printed YAML loads back to the same config (validate would go on to build the model,
        # which these made-up args are not for).
        assert load_config(again) == load_config(file)
    record_figures()


def laughs(levels: int = 9) -> str:
    lines = ["    a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "model:\n  builder: training.models:mlp\n  args:\n" + "\n".join(lines) + "\n"


HOSTILE = {
    # name: (file content, or None for a folder / a missing file; a phrase the message must hold)
    "empty file": ("", None),
    "missing file": (None, "no such file"),
    "a folder": ("FOLDER", "cannot be read (Is a directory)"),
    "a list": ("- 1\n- 2\n", "a config is a YAML mapping"),
    "a scalar": ("42\n", "a config is a YAML mapping"),
    "invalid syntax": ("training: {epochs: [1, 2\n", "not valid YAML at line"),
    "tab indentation": ("training:\n\tepochs: 2\n", "not valid YAML"),
    "two documents": ("a: 1\n---\nb: 2\n", "not valid YAML"),
    "python tag": ("name: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
    "unhashable key": ("? [a]\n: 1\n", "not valid YAML"),
    "NUL byte": (b"name: a\x00b\n", "not valid YAML"),
    "invalid UTF-8": (b"name: \xff\xfe\n", "not a text file"),
    "UTF-16": ("name: x\n".encode("utf-16"), "not a text file"),
    "random bytes": (bytes(range(256)) * 4, "not"),
    "alias containing itself": ("model: {builder: training.models:mlp, args: &a {x: [*a]}}\n", "model.args.x[0]"),
    "root alias containing itself": ("a: &x [*x]\n", "contains itself"),
    "billion laughs": (laughs(), "expands to"),
    "deep nesting": ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    "moderate nesting": ("model: {builder: training.models:mlp, args: {x: " + "[" * 300 + "]" * 300 + "}}\n", None),
    "Rich markup in keys": ('"[/]": 1\n"[bold]x": 2\n', "[/]"),
    "Rich markup in a value": ('name: "[red]x[/red]"\n', "'[red]x[/red]'"),
    "bad name": ("name: Bad_Name\n", "name: 'Bad_Name'"),
    "huge integer": ("training: {epochs: 1e999}\n", "training.epochs"),
    "unknown section": ("trainng: {epochs: 2}\n", "did you mean 'training'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_exit_2_with_a_message_not_a_traceback(tmp_path, case):
    content, phrase = HOSTILE[case]
    path = tmp_path / "config.yaml"
    if content == "FOLDER":
        path.mkdir()
    elif content is not None:
        write(tmp_path, path.name, content)
    code, out, err = tandem("validate", str(path))
    SEEN[f"exit {code}"] += 1
    assert "Traceback" not in out + err
    if phrase is None:
        assert code in (0, 2), (code, err)
    else:
        assert code == 2 and err.startswith("config error") and phrase in err, (code, out, err)
    record_figures()


@pytest.mark.parametrize(
    "override",
    [
        "model.args=&a [*a]",
        "name=Bad",
        "=1",
        "training",
        "training.epochs[3].x=1",
        "serving.deployments[99].cpus=1",
        "[/]=1",
        "training.epochs=!!python/name:os.system",
    ],
)
def test_hostile_overrides_exit_2(override):
    code, out, err = tandem("validate", "--set", override)
    SEEN[f"exit {code}"] += 1
    assert code == 2 and "Traceback" not in out + err and err.startswith("config error"), (code, err)
    record_figures()


SUBPROCESS_CASES = {
    "binary junk": bytes(range(256)),
    "alias containing itself": "model: {builder: training.models:mlp, args: &a {x: [*a]}}\n",
    "a list": "- [/]\n",
    "bad name": "name: Bad_Name\n",
}


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_the_installed_command_prints_no_traceback(tmp_path, case):
    path = write(tmp_path, "config.yaml", SUBPROCESS_CASES[case])
    result = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "validate", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.stderr.startswith("config error") and str(path) in result.stderr
    SEEN[f"subprocess exit {result.returncode}"] += 1
    record_figures()
