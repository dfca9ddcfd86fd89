"""A torch extension build lock left by a killed builder is removed; a live one is left alone."""

from __future__ import annotations

import os
import sys

from training.ds_config import STALE_EXTENSION_LOCK_S, clear_stale_extension_locks, extension_dirs, use_environment_extension_dir


def test_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    built = tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    built.write_bytes(b"\x7fELF")
    now = stale.stat().st_mtime + STALE_EXTENSION_LOCK_S + 1
    os.utime(fresh, (now - 5, now - 5))  # a build that started five seconds ago

    assert clear_stale_extension_locks(now=now) == [stale]
    assert not stale.exists() and fresh.exists() and built.exists()
    assert clear_stale_extension_locks(now=now) == []


def test_ops_build_inside_the_python_environment_unless_configured(tmp_path, monkeypatch):
    # A build records its environment's paths: a shared home folder made two checkouts rebuild
    # each other's op. The environment's own folder is the default; TORCH_EXTENSIONS_DIR wins.
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    use_environment_extension_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "venv" / "var" / "torch_extensions")
    assert extension_dirs() == [tmp_path / "venv" / "var" / "torch_extensions"]

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    use_environment_extension_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")
