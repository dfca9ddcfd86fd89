"""Knowledge distillation through the same Ray Train + DeepSpeed trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.artifacts import load_model, read_manifest, save_model_artifact
from cluster.config import ConfigError, load_config
from training.data import digits, split
from training.models import parameter_count
from training.trainer import train

pytestmark = pytest.mark.integration

# A teacher that names every digit d as PERMUTED[d]: where it and the labels disagree, a student
# that follows it was taught by it (labels alone would never produce these answers).
PERMUTED = np.array([3, 7, 0, 9, 1, 8, 2, 5, 4, 6])


def predictions(artifact_dir, config) -> tuple[np.ndarray, np.ndarray]:
    """(the model's answers, the labels) on the held-out split."""
    model, _ = load_model(artifact_dir)
    _, val = split(digits(), config.data.val_fraction, config.data.seed)
    with torch.no_grad():
        return model(torch.from_numpy(val.x)).argmax(1).numpy(), val.y


def permuted_teacher(teacher_dir, folder):
    """The teacher with its output rows reordered so that it answers PERMUTED[d] for digit d."""
    model, manifest = load_model(teacher_dir)
    state = model.state_dict()
    last = [k for k in state if k.endswith(".weight")][-1].rsplit(".", 1)[0]
    inverse = np.argsort(PERMUTED)  # row PERMUTED[d] of the new layer is row d of the old one
    state[f"{last}.weight"] = state[f"{last}.weight"][inverse]
    state[f"{last}.bias"] = state[f"{last}.bias"][inverse]
    save_model_artifact(folder, state, read_manifest(teacher_dir)["model"], {"metrics": {}})
    return folder


@pytest.mark.slow
def test_a_student_with_half_the_parameters_learns_its_teachers_answers_not_only_the_labels(default_example_run, tmp_path):
    teacher, teacher_cfg = default_example_run  # the packaged example's MLP [128, 128], 8 epochs
    assert teacher_cfg.model.args["hidden"] == [128, 128]
    teacher_answers, labels = predictions(permuted_teacher(teacher.artifact_dir, tmp_path / "teacher"), teacher_cfg)
    assert (teacher_answers == PERMUTED[labels]).mean() >= 0.9  # the teacher is good, under other names
    student_cfg = load_config(
        None,
        [
            f"cluster.storage={tmp_path}",
            "training.epochs=6",
            "model.args.hidden=[64]",
            "training.optimizer.lr=5e-3",
            f"training.distill={{teacher: {tmp_path / 'teacher'}, temperature: 2.0, alpha: 0.9}}",
        ],
    )
    student = train(student_cfg)
    assert parameter_count(load_model(student.artifact_dir)[0]) <= parameter_count(load_model(teacher.artifact_dir)[0]) / 2
    answers, labels = predictions(student.artifact_dir, student_cfg)
    follows_teacher, follows_labels = (answers == PERMUTED[labels]).mean(), (answers == labels).mean()
    print(f"student: {follows_teacher:.3f} of answers are the teacher's, {follows_labels:.3f} the labels'")
    # Trained with the label loss alone it would answer the labels (0.93-0.97 here); taught mostly
    # by the teacher (alpha 0.9), it answers what the teacher answers.
    assert follows_teacher >= 0.8 and follows_labels < 0.2, (follows_teacher, follows_labels)


def test_missing_teacher_is_refused_before_workers_start(ray_session, tmp_path):
    from cluster.artifacts import ArtifactError

    cfg = load_config(None, [f"cluster.storage={tmp_path}", f"training.distill={{teacher: {tmp_path / 'nope'}}}"])
    with pytest.raises((ArtifactError, ConfigError), match="nope"):
        train(cfg)
