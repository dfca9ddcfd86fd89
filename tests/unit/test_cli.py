"""The CLI as a user runs it: the installed `tandem` command in a subprocess, exit codes and
messages, no tracebacks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TANDEM = [str(Path(sys.executable).parent / "tandem")]


def tandem(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(TANDEM + list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


def command_rows(help_text: str) -> set[str]:
    """The verbs in the first column of the help's Commands panel (not words of its descriptions)."""
    panel = help_text.split(" Commands ", 1)[1]
    return set(re.findall(r"^│ ([a-z][a-z0-9-]*)  ", panel, flags=re.MULTILINE))


def test_help_lists_every_verb():
    assert command_rows(tandem("--help").stdout) == {
        "validate",
        "show-config",
        "train",
        "tune",
        "export",
        "serve",
        "serve-config",
        "bench",
        "profile",
        "run",
        "submit",
        "k8s",
        "check",
        "jobs",
        "predict",
        "import",
    }


def test_validate_packaged_default_from_any_directory(tmp_path):
    result = tandem("validate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "ZeRO-2" in result.stdout


def test_validate_bad_config_prints_every_problem_and_exits_2():
    result = tandem("validate", "examples/bad.yaml")
    assert result.returncode == 2
    for path in ("training.deepspeed.zero_stage", "training.optimiser", "training.node_group"):
        assert path in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_show_config_is_accepted_back(tmp_path):
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(tandem("show-config", "--set", "training.epochs=3").stdout)
    assert yaml.safe_load(resolved.read_text())["training"]["epochs"] == 3
    assert tandem("validate", str(resolved)).returncode == 0


def test_missing_file_and_broken_yaml_are_clean_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: {epochs: [1, 2\n")
    for path, message in ((tmp_path / "nope.yaml", "no such file"), (broken, "not valid YAML at line")):
        result = tandem("validate", str(path))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr


def test_bad_override_fails_before_any_work():
    result = tandem("train", "--set", "training.epochs=zero")
    assert result.returncode == 2 and "training.epochs: 'zero'" in result.stderr


def test_bench_without_url_says_nothing_answers_at_the_configured_endpoint():
    from serving.deploy import free_port

    port = free_port()
    done = tandem("bench", "--set", f"serving.port={port}", "--set", "serving.route_prefix=/digits")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"nothing answers at http://127.0.0.1:{port}/digits/healthz" in done.stderr and "Traceback" not in done.stderr
    assert "tandem serve" in done.stderr


def test_k8s_refuses_the_stock_image_and_pod_local_storage_and_renders_the_recipe_when_set(tmp_path):
    refused = tandem("k8s", "--out", str(tmp_path / "refused"))
    assert refused.returncode == 1 and not (tmp_path / "refused").exists()
    assert "error: cluster.image:" in refused.stderr and "error: cluster.storage:" in refused.stderr
    ready = [
        "--set",
        "cluster.image=registry.example.com/tandem:0.1.0-ray2.60.0",
        "--set",
        "cluster.storage=/mnt/tandem",
        "--set",
        "cluster.kubernetes.storage_claim=tandem-runs",
        "--set",
        "cluster.kubernetes.ray_version=2.60.0",
    ]
    done = tandem("k8s", "--out", str(tmp_path / "k8s"), *ready)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "k8s").iterdir()) == ["cluster", "serve", "train"]
    draft = tandem("k8s", "--out", str(tmp_path / "draft"), "--draft")
    assert draft.returncode == 0 and "warning: cluster.image:" in draft.stderr, draft.stdout + draft.stderr


def test_jobs_without_a_job_id_or_with_an_unknown_action_prints_its_usage_and_exits_1():
    for args in (("jobs", "stop"), ("jobs", "restart", "some-job")):
        done = tandem(*args)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "error usage: tandem jobs list | tandem jobs status|logs|stop JOB_ID" in done.stderr
        assert "Traceback" not in done.stdout + done.stderr


def test_check_for_submit_leaves_out_the_kubernetes_checks_that_fail_the_packaged_example():
    submit = tandem("check", "--for", "submit")
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "cluster.image" not in submit.stdout and "relative" in submit.stdout  # storage: a submitted job's warning
    kubernetes = tandem("check", "--for", "kubernetes")
    assert kubernetes.returncode == 1 and "error: cluster.image:" in kubernetes.stdout
    assert "relative" not in kubernetes.stdout
    everything = tandem("check")
    assert everything.returncode == 1 and "error: cluster.image:" in everything.stdout and "relative" in everything.stdout
    wrong = tandem("check", "--for", "k8s")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "--for submit" in tandem("check", "--help").stdout


def test_check_for_takes_exactly_the_checks_targets():
    from typing import get_args

    from tandem.checks import Target
    from tandem.cli import CheckTarget

    assert set(get_args(CheckTarget)) == set(get_args(Target))


def test_submit_help_names_every_stage_it_accepts():
    from tandem.submit import STAGES

    help_text = " ".join(tandem("submit", "--help").stdout.replace("│", " ").split())
    assert " | ".join(STAGES) in help_text


def test_k8s_writes_beside_the_user_by_default_never_into_the_repos_k8s_folder(tmp_path):
    done = tandem("k8s", "--draft", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "k8s-digits").iterdir()) == ["cluster", "serve", "train"]
    assert not (tmp_path / "k8s").exists()
