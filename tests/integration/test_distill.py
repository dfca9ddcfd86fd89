"""Knowledge distillation through the same Ray Train + DeepSpeed trainer."""

from __future__ import annotations

import pytest
import torch

from cluster.artifacts import load_model
from cluster.config import ConfigError, load_config
from training.data import digits, split
from training.models import parameter_count
from training.trainer import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def accuracy(artifact_dir, config) -> float:
    model, _ = load_model(artifact_dir)
    _, val = split(digits(), config.data.val_fraction, config.data.seed)
    with torch.no_grad():
        return float((model(torch.from_numpy(val.x)).argmax(1).numpy() == val.y).mean())


def test_student_with_half_the_parameters_reaches_93_percent(default_example_run, tmp_path):
    teacher, teacher_cfg = default_example_run  # the packaged example's MLP [128, 128], 12 epochs
    assert teacher_cfg.model.args["hidden"] == [128, 128]
    student_cfg = load_config(
        None,
        [
            f"cluster.storage={tmp_path}",
            "training.epochs=12",
            "model.args.hidden=[64]",
            "training.optimizer.lr=5e-3",
            f"training.distill={{teacher: {teacher.artifact_dir}, temperature: 2.0, alpha: 0.5}}",
        ],
    )
    student = train(student_cfg)
    teacher_params = parameter_count(load_model(teacher.artifact_dir)[0])
    student_params = parameter_count(load_model(student.artifact_dir)[0])
    assert student_params <= teacher_params / 2
    assert accuracy(student.artifact_dir, student_cfg) >= 0.93


def test_missing_teacher_is_refused_before_workers_start(ray_session, tmp_path):
    from cluster.artifacts import ArtifactError

    cfg = load_config(None, [f"cluster.storage={tmp_path}", f"training.distill={{teacher: {tmp_path / 'nope'}}}"])
    with pytest.raises((ArtifactError, ConfigError), match="nope"):
        train(cfg)
