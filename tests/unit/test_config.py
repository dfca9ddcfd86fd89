"""The configuration: examples validate, every cross-field trap has its message, errors come together."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.config import PACKAGED_EXAMPLE, ConfigError, TandemConfig, load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml") if p.name != "bad.yaml")


def raw_example() -> dict:
    return yaml.safe_load(PACKAGED_EXAMPLE.read_text())


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(raw, source="test.yaml")
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_validates(path):
    assert isinstance(load_config(path), TandemConfig)


def test_packaged_example_is_the_default():
    assert load_config().name == "digits"


def test_resolved_config_round_trips():
    cfg = load_config()
    again = validate_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()


def test_bad_example_reports_all_three_mistakes():
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "examples" / "bad.yaml")
    paths = [p.path for p in info.value.problems]
    assert paths == ["training.deepspeed.zero_stage", "training.optimiser", "training.node_group"]
    text = str(info.value)
    assert "did you mean 'optimizer'" in text and "bad.yaml" in text


def test_overrides_are_typed_through_yaml():
    cfg = load_config(
        None, ["training.epochs=3", "training.optimizer.lr=1e-2", "model.args.hidden=[32]", "serving.deployments[0].cpus=0.25"]
    )
    assert cfg.training.epochs == 3 and cfg.training.optimizer.lr == 0.01
    assert cfg.model.args["hidden"] == [32] and cfg.serving.deployments[0].cpus == 0.25


def test_override_without_equals_is_a_config_error():
    with pytest.raises(ConfigError, match="PATH=VALUE"):
        load_config(None, ["training.epochs"])


def test_unknown_section_suggests_the_closest():
    raw = raw_example() | {"trainig": {}}
    (msg,) = problems_of(raw)
    assert "did you mean 'training'" in msg


def test_missing_node_group_for_training_and_deployment():
    raw = raw_example()
    raw["training"]["node_group"] = "gpu"
    raw["serving"]["deployments"][0]["node_group"] = "cpus"
    msgs = problems_of(raw)
    assert any(m.startswith("training.node_group: 'gpu' — no such node group") for m in msgs)
    assert any(m.startswith("serving.deployments[0].node_group: 'cpus'") and "did you mean 'cpu'" in m for m in msgs)


def test_gpus_on_a_group_without_gpus():
    raw = raw_example()
    raw["serving"]["deployments"][0] |= {"gpus": 1, "node_group": "cpu"}
    raw["training"] |= {"use_gpu": True, "node_group": "cpu"}
    msgs = problems_of(raw)
    assert any(m.startswith("serving.deployments[0].gpus: 1") and "gpus: 0" in m for m in msgs)
    assert any(m.startswith("training.use_gpu") and "has gpus: 0" in m for m in msgs)


def test_batch_larger_than_max_ongoing_requests():
    raw = raw_example()
    raw["serving"]["batching"]["max_batch_size"] = 128
    raw["serving"]["deployments"][0]["max_ongoing_requests"] = 64
    (msg,) = problems_of(raw)
    assert msg.startswith("serving.batching.max_batch_size: 128 — larger than serving.deployments[0].max_ongoing_requests (64)")
    assert "Raise max_ongoing_requests or lower max_batch_size" in msg


def test_min_replicas_above_max():
    raw = raw_example()
    raw["cluster"]["node_groups"]["cpu"] |= {"min_replicas": 3, "max_replicas": 1}
    raw["serving"]["deployments"][0]["autoscaling"] |= {"min_replicas": 4, "max_replicas": 2}
    msgs = problems_of(raw)
    assert any(m.startswith("cluster.node_groups.cpu") and "min_replicas (3) is larger than max_replicas (1)" in m for m in msgs)
    assert any(m.startswith("serving.deployments[0].autoscaling") and "min_replicas (4)" in m for m in msgs)


def test_zero_stage_out_of_range():
    raw = raw_example()
    raw["training"]["deepspeed"]["zero_stage"] = 5
    (msg,) = problems_of(raw)
    assert msg.startswith("training.deepspeed.zero_stage: 5") and "0 (DDP-like), 1, 2 or 3" in msg


def test_fp16_without_gpu():
    raw = raw_example()
    raw["training"]["precision"] = "fp16"
    (msg,) = problems_of(raw)
    assert msg.startswith("training.precision: 'fp16'") and "needs a GPU" in msg


def test_builder_and_source_are_resolved_at_validation():
    raw = raw_example()
    raw["model"]["builder"] = "training.models:mpl"
    raw["data"]["source"] = "no_such_module:digits"
    msgs = problems_of(raw)
    assert any("did you mean 'training.models:mlp'" in m for m in msgs)
    assert any(m.startswith("data.source") and "cannot be imported" in m for m in msgs)


def test_offload_params_needs_zero3():
    raw = raw_example()
    raw["training"]["deepspeed"] |= {"zero_stage": 2, "offload_params": "cpu"}
    (msg,) = problems_of(raw)
    assert "needs zero_stage: 3" in msg


def test_tuning_space_must_point_into_the_config():
    raw = raw_example()
    raw["tuning"] = {"space": {"nonsense.lr": {"loguniform": [1e-4, 1e-2]}, "training.optimizer.lr": {"between": [1, 2]}}}
    msgs = problems_of(raw)
    assert len(msgs) == 1 and "must be one of" in msgs[0]


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        validate_config([1, 2, 3])


def test_a_duplicate_key_is_refused_with_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("training:\n  epochs: 3\n  workers: 2\n  epochs: 30\nname: a\nname: b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [str(p) for p in info.value.problems] == [
        "training.epochs — duplicate key at line 4 (first given at line 2); YAML would silently keep only the last value, so keep one of "
        "them",
        "name — duplicate key at line 6 (first given at line 5); YAML would silently keep only the last value, so keep one of them",
    ]
    assert str(path) in str(info.value)
    # A merge key (`<<: *anchor`) overriding a value is not a duplicate.
    merged = tmp_path / "merge.yaml"
    merged.write_text("x: &t {epochs: 3, workers: 1}\ntraining:\n  <<: *t\n  epochs: 4\n")
    from cluster.config import read_yaml

    assert read_yaml(merged)["training"] == {"epochs": 4, "workers": 1}


def test_direct_http_is_one_replica_and_a_gpu_replica_needs_a_gpu_group():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["serving.http_path=direct", "serving.deployments[0].autoscaling.max_replicas=2"])
    (problem,) = info.value.problems
    assert problem.path == "serving.deployments[0].autoscaling.max_replicas" and "set min_replicas and max_replicas to 1" in problem.message
    assert load_config(None, ["serving.http_path=direct", "serving.deployments[0].autoscaling={min_replicas: 1, max_replicas: 1}"])
    with pytest.raises(ConfigError) as info:
        load_config(None, ["serving.deployments[0].gpus=1"])
    (problem,) = info.value.problems
    assert problem.path == "serving.deployments[0].gpus" and "no node group has GPUs" in problem.message
