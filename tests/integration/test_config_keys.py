"""Training keys that no other run sets, observed end to end in one short Ray Train + DeepSpeed run.

One run carries them all at once (each Train run costs tens of seconds of start-up here): ZeRO-3
with optimizer and parameter offload, bf16, SGD, a linear schedule to min_lr_ratio, gradient
accumulation, and checkpoint retention ranked by a metric of our choosing. What each key does to
the builders is asserted in tests/unit/test_config_keys.py; here the recorded metrics and the
checkpoints left on disk show the workers trained that way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cluster.artifacts import load_model
from cluster.config import load_config
from training.models import parameter_count
from training.trainer import CHECKPOINTS, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS, STEPS, ACCUMULATION, BATCH, WORKERS = 3, 2, 2, 32, 2
LR, MIN_LR_RATIO = 0.05, 0.25


@pytest.fixture(scope="module")
def keyed_run(ray_session, tmp_path_factory):
    config = load_config(
        None,
        [
            f"cluster.storage={tmp_path_factory.mktemp('config-keys')}",
            f"training.epochs={EPOCHS}",
            f"training.workers={WORKERS}",
            f"training.max_steps_per_epoch={STEPS}",
            f"training.gradient_accumulation={ACCUMULATION}",
            f"data.batch_size={BATCH}",
            "data.augment=[]",
            "model.args.hidden=[64]",
            "training.precision=bf16",
            "training.deepspeed={zero_stage: 3, offload_optimizer: cpu, offload_params: cpu}",
            f"training.optimizer={{name: sgd, lr: {LR}, momentum: 0.9, weight_decay: 0.0}}",
            f"training.schedule={{name: linear, warmup_steps: 0, min_lr_ratio: {MIN_LR_RATIO}}}",
            # Keep one checkpoint besides the latest, the one with the highest learning rate: epoch 1's.
            "training.checkpoint={every_epochs: 1, keep: 1, metric: lr, mode: max}",
        ],
    )
    return train(config), config


def test_accumulation_takes_that_many_micro_batches_per_optimizer_step(keyed_run):
    """training.gradient_accumulation: each optimizer step consumed ACCUMULATION micro-batches on every rank."""
    result, _ = keyed_run
    assert [h["step"] for h in result.history] == [STEPS * epoch for epoch in range(1, EPOCHS + 1)]
    for h in result.history:
        assert h["samples_per_rank"] == [STEPS * ACCUMULATION * BATCH] * WORKERS, h


def test_linear_schedule_reaches_min_lr_ratio_at_the_last_step(keyed_run):
    """training.schedule linear + min_lr_ratio: the lr each epoch ended with is the formula's at its step, the floor at the end."""
    result, _ = keyed_run
    total = STEPS * EPOCHS
    for h in result.history:
        expected = LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * (1 - h["step"] / total))
        assert h["lr"] == pytest.approx(expected, rel=1e-6), h
    assert result.history[-1]["lr"] == pytest.approx(LR * MIN_LR_RATIO, rel=1e-6)


def test_bf16_zero3_holds_half_size_parameter_shards_and_sgd_keeps_one_state_tensor(keyed_run):
    """training.precision bf16 and optimizer sgd under ZeRO-3 with offload: each rank holds 2-byte parameter shards, and its
    optimizer state is SGD's momentum plus bf16's fp32 master copy (8 bytes per parameter of the shard; Adam would be 12)."""
    result, _ = keyed_run
    n_params = parameter_count(load_model(result.artifact_dir)[0])
    shard = n_params / WORKERS
    for held in result.metrics["param_bytes_per_rank"]:
        assert abs(held - 2 * shard) / (2 * shard) < 0.05, (held, n_params)
    for held in result.metrics["optimizer_bytes_per_rank"]:
        assert abs(held - 8 * shard) / (8 * shard) < 0.05, (held, n_params)
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in result.history)


def test_checkpoint_metric_and_mode_pick_the_checkpoint_kept_beside_the_latest(keyed_run):
    """training.checkpoint metric lr, mode max, keep 1: Ray Train keeps epoch 1's checkpoint (highest lr) and the latest, not epoch 2's."""
    result, _ = keyed_run
    kept = sorted(
        json.loads(spec.read_text())["metrics"]["epoch"] for spec in Path(result.run_dir, CHECKPOINTS).glob("checkpoint_*/model_spec.json")
    )
    assert kept == [1, EPOCHS]


def test_the_runs_deepspeed_json_offloads_optimizer_and_parameters(keyed_run):
    """training.deepspeed offload_optimizer / offload_params: the DeepSpeed JSON the run recorded (each worker derives the same)."""
    result, _ = keyed_run
    ds = json.loads(Path(result.run_dir, "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True} and ds["gradient_accumulation_steps"] == ACCUMULATION
