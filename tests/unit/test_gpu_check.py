"""`make gpu-check` (tests/gpu/gpu_check.py) where there is no GPU: it says so and exits 0; its check
list; its wheel pins; and its dry run, which runs the checks' code on the CPU (no Ray: the script
refuses to import it, as the GPU machine has none)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu import gpu_check

ROOT = Path(__file__).resolve().parents[2]
GPU_CHECKS = [
    "profile/peaks",
    "profile/train-step",
    "serve/torch-fp32",
    "serve/torch-bf16",
    "train/zero2-bf16",
    "train/zero2-fp16",
    "train/zero3-bf16",
    "train/zero3-fp16",
    "train/two-process",
]
DRY_RUN_CHECKS = ["profile/peaks", "profile/train-step", "serve/torch-fp32", "train/zero2-fp32", "train/zero3-fp32", "train/two-process"]


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.gpu.gpu_check", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def check_lines(stdout: str) -> dict[str, str]:
    """{check name: status} from the script's PASS/FAIL/SKIP lines."""
    return {line.split()[1]: line.split()[0] for line in stdout.splitlines() if line.split()[:1] in (["PASS"], ["FAIL"], ["SKIP"])}


def test_the_check_list_covers_the_issue():
    assert [c.name for c in gpu_check.checks(dry_run=False)] == GPU_CHECKS
    assert [c.name for c in gpu_check.checks(dry_run=True)] == DRY_RUN_CHECKS
    assert all(len(c.means) > 40 and "PASS" in c.means for c in gpu_check.checks(dry_run=False))


def test_list_prints_every_check_with_its_meaning(capsys):
    assert gpu_check.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == GPU_CHECKS


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_says_so_and_exits_0_having_run_nothing(tmp_path):
    result = run_script("--wheels", str(tmp_path / "no-wheels-needed"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "no CUDA device here" in result.stdout and "nothing was run" in result.stdout
    assert not (tmp_path / "out").exists()


def test_without_cuda_main_returns_0_before_touching_the_wheels(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check, "probe_cuda", lambda: (False, "torch 9.9 sees 0 CUDA device(s)"))
    monkeypatch.delenv(gpu_check.SITE_ENV, raising=False)
    monkeypatch.setattr(gpu_check, "install_wheels", lambda folder: pytest.fail("installed wheels without CUDA"))
    assert gpu_check.main(["--wheels", str(tmp_path)]) == 0
    assert "no CUDA device here (torch 9.9 sees 0 CUDA device(s)); nothing was run" in capsys.readouterr().out


def test_wheel_pins_are_this_venvs_versions():
    import pydantic

    pins = dict(pin.split("==") for pin in gpu_check.wheel_pins())
    assert pins["pydantic"] == pydantic.VERSION
    assert set(pins) == set(gpu_check.WHEELS_FROM_THIS_VENV)


def test_check_wheels_refuses_two_versions_of_one_package(tmp_path, capsys):
    for name in ("deepspeed-0.19.8-py3-none-any.whl", "hjson-3.1.0-py3-none-any.whl", "hjson-3.0.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"x")
    assert gpu_check.check_wheels(tmp_path) == 1
    (tmp_path / "hjson-3.0.0-py3-none-any.whl").unlink()
    assert gpu_check.check_wheels(tmp_path) == 0


def test_dry_run_of_the_in_process_checks(tmp_path):
    """The profile and serving checks, on the CPU: a few seconds."""
    result = run_script("--dry-run", "--only", "profile,serve", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert check_lines(result.stdout) == {"profile/peaks": "PASS", "profile/train-step": "PASS", "serve/torch-fp32": "PASS"}
    assert (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_dry_run_of_the_training_checks(tmp_path):
    """The training checks on the CPU (DeepSpeed ZeRO-3 through training.loop.run_worker, saved and
    reloaded; two gloo ranks). ZeRO-2 runs the same function with another stage, and the profile
    and serving checks run in the test above, so neither is repeated here (each launch is a few
    seconds of torch and DeepSpeed start-up)."""
    result = run_script("--dry-run", "--only", "train/zero3,train/two-process", "--out", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert check_lines(result.stdout) == {"train/zero3-fp32": "PASS", "train/two-process": "PASS"}


def _refusing_launch(log_text: str):
    """Stands in for Context.launch: both ranks' first all_reduce failed as NCCL 2.28.9 failed on the H200."""

    def launch(folder, config, world, resume_from=None, probe=False):
        assert probe and world == 2
        folder.mkdir(parents=True, exist_ok=True)
        for rank in range(world):
            (folder / f"rank-{rank}.log").write_text(log_text)
        error = "NCCL error in: .../NCCLUtils.cpp:93, invalid usage (run with NCCL_DEBUG=WARN for details), NCCL version 2.28.9"
        return [{"rank": rank, "refused": error} for rank in range(world)]

    return launch


def test_two_ranks_refused_on_one_gpu_is_a_skip_that_says_why(tmp_path):
    ctx = gpu_check.Context(dry_run=True, out=tmp_path, deadline=1e12)
    ctx.launch = _refusing_launch(
        "host:1:2 [0] init.cc:598 NCCL WARN Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1a000\n"
    )
    with pytest.raises(gpu_check.Skip, match=r"NCCL refuses two ranks on one GPU \('Duplicate GPU detected : rank 1 and rank 0"):
        gpu_check.two_process_check(ctx)
    ctx.launch = _refusing_launch("nothing about the cause\n")
    with pytest.raises(gpu_check.CheckFailed, match="the first all_reduce failed: NCCL error"):
        gpu_check.two_process_check(ctx)
