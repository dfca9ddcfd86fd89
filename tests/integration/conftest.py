"""Trained runs shared by the integration tests that only need "a run trained this way".

Each Ray Train run costs tens of seconds of start-up on this 2-core machine; a test that reads a
run (its artifact, metrics, checkpoints) without changing it takes one of these instead of
training its own. A test that changes a run, or whose claim is about how it was trained with
options of its own, still trains its own.
"""

from __future__ import annotations

import pytest

from cluster.config import load_config
from training.trainer import TrainResult, train

# The packaged example as it is (cluster/example.yaml: 8 epochs, 0.97-0.98 validation accuracy).
DEFAULT_EXAMPLE_EPOCHS = 8


@pytest.fixture(scope="session")
def default_example_run(ray_session, tmp_path_factory) -> tuple[TrainResult, object]:
    """The packaged example (ZeRO-2, 2 workers, MLP [128, 128], augmentation) for its 8 epochs, tracked
    in MLflow and TensorBoard: the accuracy test's run, the distillation test's teacher and the
    tracking test's run."""
    config = load_config(
        None,
        [
            f"cluster.storage={tmp_path_factory.mktemp('default-example')}",
            f"training.epochs={DEFAULT_EXAMPLE_EPOCHS}",
            "tracking={mlflow: {}, tensorboard: true}",
        ],
    )
    return train(config), config


@pytest.fixture(scope="session")
def zero3_run(ray_session, tmp_path_factory) -> tuple[TrainResult, object]:
    """The packaged example's model under ZeRO-3 on 2 workers, 2 epochs: the partitioning test's
    run and the profile's "measured on a real run" source."""
    config = load_config(
        None,
        [
            f"cluster.storage={tmp_path_factory.mktemp('zero3')}",
            "training.epochs=2",
            "data.augment=[]",
            "training.deepspeed.zero_stage=3",
        ],
    )
    return train(config), config
