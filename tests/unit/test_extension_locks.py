"""A torch extension build lock left by a killed builder is removed; a live one is left alone."""

from __future__ import annotations

import os

from training.ds_config import STALE_EXTENSION_LOCK_S, clear_stale_extension_locks


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
