"""Which of Ray Train's default callbacks a run leaves out (training/startup.py)."""

from __future__ import annotations

import ray.train.v2.api.data_parallel_trainer as ray_train_trainer

from training.startup import DATASETS_CALLBACK, PLACEMENT_GROUP_CLEANER, RAY_TRAIN_DEFAULTS_ENV, skipped_callbacks, trainer_class


def test_a_run_keeps_the_callbacks_it_needs(monkeypatch):
    monkeypatch.delenv(RAY_TRAIN_DEFAULTS_ENV, raising=False)
    # Ray Data inputs keep the datasets callback; a shared cluster (a tuning trial, a submitted
    # job) keeps the placement-group cleaner.
    assert skipped_callbacks(local_run=True, datasets=False) == (DATASETS_CALLBACK, PLACEMENT_GROUP_CLEANER)
    assert skipped_callbacks(local_run=False, datasets=False) == (DATASETS_CALLBACK,)
    assert skipped_callbacks(local_run=True, datasets=True) == (PLACEMENT_GROUP_CLEANER,)
    assert skipped_callbacks(local_run=False, datasets=True) == ()
    monkeypatch.setenv(RAY_TRAIN_DEFAULTS_ENV, "1")
    assert skipped_callbacks(local_run=True, datasets=False) == ()


def test_the_skipped_names_are_ray_trains_callbacks():
    # A Ray upgrade that renames them would make the filter a silent no-op.
    for name in (DATASETS_CALLBACK, PLACEMENT_GROUP_CLEANER):
        assert isinstance(getattr(ray_train_trainer, name), type), name
    from ray.train.torch import TorchTrainer

    assert trainer_class(()) is TorchTrainer
    assert issubclass(trainer_class((DATASETS_CALLBACK,)), TorchTrainer)
