"""Config keys that a user can set, each observed where it takes effect (no Ray started).

Each test sets a key away from its default and asserts what the builder that consumes it hands on:
the DeepSpeed JSON (parsed by DeepSpeed's own config class), the torch optimizer and LR schedule
the training loop builds, the augmentation the loop applies, the KubeRay manifests, the Serve
config, the Ray Tune scheduler and TuneConfig, and the pruning fine-tune of export. Real training
runs with several of these keys at once are in tests/integration/test_config_keys.py.
"""

from __future__ import annotations

import pytest
import torch

from cluster.config import Augment, load_config
from serving.serve_config import build_serve_config
from serving.settings import deployment_options, serve_env
from tests.unit.test_cli import tandem
from training.augment import build_augmentation
from training.ds_config import build_optimizer, build_scheduler, deepspeed_config, import_deepspeed
from training.loop import _compute_dtype, _steps_per_epoch

# ---------------------------------------------------------------------------------------------
# training: DeepSpeed JSON, optimizer, LR schedule, augmentation
# ---------------------------------------------------------------------------------------------


def parsed_by_deepspeed(config):
    """DeepSpeed's own reading of the JSON Tandem derives (world size 1: no process group here)."""
    import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(deepspeed_config(config, 1))


def test_gradient_accumulation_reaches_deepspeed_and_divides_the_steps_per_epoch():
    """training.gradient_accumulation: DeepSpeed's accumulation steps and global batch, and the loop's optimizer steps per epoch."""
    config = load_config(None, ["training.gradient_accumulation=4", "data.batch_size=16"])
    assert deepspeed_config(config, 2)["train_batch_size"] == 16 * 4 * 2
    ds = parsed_by_deepspeed(config)
    assert ds.gradient_accumulation_steps == 4 and ds.train_batch_size == 16 * 4
    # 22 micro-batches make 5 optimizer steps of 4 micro-batches each (the 2 left over are dropped).
    assert _steps_per_epoch(config, 22) == 5
    assert _steps_per_epoch(load_config(None, ["training.gradient_accumulation=4", "training.max_steps_per_epoch=3"]), 22) == 3


def test_offload_optimizer_and_params_reach_deepspeeds_zero_config():
    """training.deepspeed.offload_optimizer / offload_params: DeepSpeed's ZeRO config offloads to the CPU."""
    both = parsed_by_deepspeed(load_config(None, ["training.deepspeed={zero_stage: 3, offload_optimizer: cpu, offload_params: cpu}"]))
    assert both.zero_optimization_stage == 3
    assert both.zero_config.offload_optimizer.device == "cpu"
    assert both.zero_config.offload_param.device == "cpu"
    optimizer_only = parsed_by_deepspeed(load_config(None, ["training.deepspeed={zero_stage: 2, offload_optimizer: cpu}"]))
    assert optimizer_only.zero_config.offload_optimizer.device == "cpu"
    assert optimizer_only.zero_config.offload_param is None
    default = parsed_by_deepspeed(load_config(None))
    assert default.zero_config.offload_optimizer is None and default.zero_config.offload_param is None


def test_bf16_turns_on_deepspeeds_bf16_and_the_loops_input_dtype():
    """training.precision: bf16: DeepSpeed runs bf16 and the loop casts each batch to bfloat16."""
    config = load_config(None, ["training.precision=bf16"])
    assert parsed_by_deepspeed(config).bfloat16_config.enabled is True
    assert _compute_dtype(config) is torch.bfloat16
    assert parsed_by_deepspeed(load_config(None)).bfloat16_config.enabled is False
    assert _compute_dtype(load_config(None)) is torch.float32


def test_sgd_and_adam_build_their_torch_optimizers_with_the_configured_values():
    """training.optimizer.name sgd / adam: the torch class the loop hands to DeepSpeed, with lr, momentum, betas, weight decay."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = build_optimizer(
        load_config(None, ["training.optimizer={name: sgd, lr: 0.2, momentum: 0.7, weight_decay: 0.001}"]),
        params,
    )
    assert type(sgd) is torch.optim.SGD
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.2, 0.7, 0.001)
    adam = build_optimizer(load_config(None, ["training.optimizer={name: adam, lr: 0.01, betas: [0.8, 0.95], weight_decay: 0.1}"]), params)
    # torch's AdamW subclasses Adam: the exact type, and Adam's coupled (L2) weight decay, tell them apart.
    assert type(adam) is torch.optim.Adam
    assert adam.defaults["betas"] == (0.8, 0.95) and adam.defaults["weight_decay"] == 0.1
    assert adam.defaults["decoupled_weight_decay"] is False


def lrs_at(config, total_steps: int, steps: list[int]) -> dict[int, float]:
    """The learning rate of the loop's scheduler after each of `steps` optimizer steps."""
    optimizer = build_optimizer(config, [torch.nn.Parameter(torch.zeros(1))])
    scheduler = build_scheduler(config, optimizer, total_steps)
    seen = {}
    for step in range(max(steps) + 1):
        if step in steps:
            seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return seen


def test_linear_schedule_warms_up_then_falls_in_a_straight_line_to_min_lr_ratio():
    """training.schedule.name: linear and min_lr_ratio: lr = peak * (m + (1 - m) * (1 - progress)) after warmup, m at the end."""
    config = load_config(None, ["training.optimizer.lr=0.1", "training.schedule={name: linear, warmup_steps: 2, min_lr_ratio: 0.2}"])
    seen = lrs_at(config, total_steps=10, steps=[0, 1, 2, 6, 10, 12])
    peak, floor = 0.1, 0.2
    assert seen[0] == pytest.approx(peak * 1 / 2) and seen[1] == pytest.approx(peak)  # warmup: (step + 1) / warmup_steps
    assert seen[2] == pytest.approx(peak)
    assert seen[6] == pytest.approx(peak * (floor + (1 - floor) * (1 - 4 / 8)))  # halfway through the 8 steps after warmup
    assert seen[10] == pytest.approx(peak * floor) and seen[12] == pytest.approx(peak * floor)


def test_min_lr_ratio_is_where_cosine_ends():
    """training.schedule.min_lr_ratio with cosine: halfway is the midpoint between peak and floor, the end is the floor."""
    config = load_config(None, ["training.optimizer.lr=0.1", "training.schedule={name: cosine, warmup_steps: 0, min_lr_ratio: 0.3}"])
    seen = lrs_at(config, total_steps=8, steps=[0, 4, 8])
    assert seen[0] == pytest.approx(0.1)
    assert seen[4] == pytest.approx(0.1 * (0.3 + 0.7 * 0.5))
    assert seen[8] == pytest.approx(0.1 * 0.3)


def test_step_schedule_multiplies_by_gamma_every_step_size_steps():
    """training.schedule.name: step: lr = peak * gamma ** ((step - warmup) // step_size)."""
    config = load_config(None, ["training.optimizer.lr=0.1", "training.schedule={name: step, warmup_steps: 1, step_size: 3, gamma: 0.5}"])
    seen = lrs_at(config, total_steps=100, steps=[0, 1, 3, 4, 6, 7, 10])
    assert seen == pytest.approx({0: 0.1, 1: 0.1, 3: 0.1, 4: 0.05, 6: 0.05, 7: 0.025, 10: 0.0125})


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`image` (H, W) moved down by dy and right by dx, zeros where nothing moved in."""
    h, w = image.shape
    out = torch.zeros_like(image)
    out[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] = image[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    return out


def test_shift_augmentation_moves_each_digit_by_at_most_pixels():
    """data.augment shift with pixels: each 8x8 digit comes out moved by its own (dy, dx) within +-pixels, zero-filled."""
    config = load_config(None, ["data.augment=[{name: shift, pixels: 2}]"])
    augment = build_augmentation(config.data.augment)
    x = torch.arange(1, 65, dtype=torch.float32).repeat(40, 1)  # 40 copies of one digit-sized image, no zero pixel
    out = augment(x, torch.Generator().manual_seed(0))
    moves = set()
    for row in out:
        image = row.reshape(8, 8)
        (move,) = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(image, shifted(x[0].reshape(8, 8), dy, dx))]
        moves.add(move)
    assert len(moves) > 5  # drawn per image, not one shift for the batch
    assert any(abs(dy) == 2 or abs(dx) == 2 for dy, dx in moves)  # up to `pixels`, not just 1


def negate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A user augmentation for the hook test."""
    return -x


def test_hook_augmentation_runs_the_users_function_after_the_ones_before_it():
    """data.augment hook with fn: the user's function is applied, in order with the built-in ones."""
    config = load_config(None, ["data.augment=[{name: noise, std: 0.5}, {name: hook, fn: 'tests.unit.test_config_keys:negate'}]"])
    augment = build_augmentation(config.data.augment)
    x = torch.ones(4, 64)
    noise = 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(augment(x, torch.Generator().manual_seed(7)), -(x + noise))
    assert build_augmentation([Augment(name="hook", fn="tests.unit.test_config_keys:negate")])(x, torch.Generator()).eq(-1).all()


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------


def test_job_deadline_auth_secret_and_head_cpus_land_in_the_kuberay_manifests():
    """cluster.kubernetes job_deadline_s, auth_secret, head_cpus: activeDeadlineSeconds, the token Secret everywhere, the head's CPU."""
    from tandem.k8s import AUTH_TOKEN_KEY, render_manifests

    overrides = ["cluster.kubernetes={job_deadline_s: 5400, auth_secret: team-ray-token, head_cpus: 3.5}"]
    manifests = render_manifests(load_config(None, [*overrides, "tuning={space: {training.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}}}"]))
    for name in ("rayjob-train.yaml", "rayjob-tune.yaml"):
        assert manifests[name]["spec"]["activeDeadlineSeconds"] == 5400, name
    assert "activeDeadlineSeconds" not in render_manifests(load_config(None))["rayjob-train.yaml"]["spec"]

    token_ref = {"secretKeyRef": {"name": "team-ray-token", "key": AUTH_TOKEN_KEY}}
    specs = {
        "raycluster": manifests["raycluster.yaml"]["spec"],
        "rayjob": manifests["rayjob-train.yaml"]["spec"]["rayClusterSpec"],
        "rayservice": manifests["rayservice.yaml"]["spec"]["rayClusterConfig"],
    }
    for where, spec in specs.items():
        assert spec["authOptions"] == {"mode": "token", "secretName": "team-ray-token"}, where
        (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
        assert {"name": "RAY_AUTH_TOKEN", "valueFrom": token_ref} in head["env"], where
        for group in spec["workerGroupSpecs"]:
            (worker,) = group["template"]["spec"]["containers"]
            assert {"name": "RAY_AUTH_TOKEN", "valueFrom": token_ref} in worker["env"], where
        assert head["resources"]["requests"]["cpu"] == head["resources"]["limits"]["cpu"] == "3500m", where
    submitter = manifests["rayjob-train.yaml"]["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert {"name": "RAY_AUTH_TOKEN", "valueFrom": token_ref} in submitter["env"]


# ---------------------------------------------------------------------------------------------
# serving
# ---------------------------------------------------------------------------------------------

ONE_REPLICA = "serving.deployments[0].autoscaling={min_replicas: 1, max_replicas: 1}"


def test_direct_http_path_turns_on_direct_ingress_without_haproxy():
    """serving.http_path: direct: Serve's throughput-optimized mode (the replica's own port) and no HAProxy, in the Serve config too."""
    direct = load_config(None, ["serving.http_path=direct", ONE_REPLICA])
    assert serve_env(direct.serving) == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    serve_config = build_serve_config(direct)
    (app,) = serve_config["applications"]
    assert app["runtime_env"]["env_vars"] == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    # No HAProxy, so no HAProxy readiness window for the controller either.
    assert serve_config["controller_options"]["runtime_env"]["env_vars"] == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    haproxy = serve_env(load_config(None, [ONE_REPLICA]).serving)
    assert haproxy["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # the default path, for contrast
    assert serve_env(load_config(None, ["serving.http_path=proxy"]).serving) == {}


def test_access_log_reaches_every_deployments_serve_logging_config():
    """serving.access_log: Serve's per-deployment enable_access_log, which Ray's schema accepts."""
    from ray.serve.schema import ServeDeploySchema

    two = "serving.deployments=[{name: a}, {name: b}]"
    for value in (True, False):
        config = load_config(None, [f"serving.access_log={str(value).lower()}", two])
        options = deployment_options(config)
        assert set(options) == {"Ingress", "a", "b"}
        assert all(o["logging_config"] == {"enable_access_log": value} for o in options.values())
        parsed = ServeDeploySchema.model_validate(build_serve_config(config))
        assert all(d.logging_config.enable_access_log is value for d in parsed.applications[0].deployments)


def test_initial_replicas_reaches_serves_autoscaling_config():
    """serving.deployments[].autoscaling.initial_replicas: Serve's autoscaling_config.initial_replicas, which Ray's model accepts."""
    from ray.serve.config import AutoscalingConfig

    config = load_config(None, ["serving.deployments[0].autoscaling={min_replicas: 1, max_replicas: 4, initial_replicas: 3}"])
    (app,) = build_serve_config(config)["applications"]
    (deployment,) = app["deployments"]
    assert deployment["autoscaling_config"]["initial_replicas"] == 3
    assert AutoscalingConfig(**deployment["autoscaling_config"]).initial_replicas == 3
    (unset,) = build_serve_config(load_config(None, ["serving.deployments[0].autoscaling.max_replicas=4"]))["applications"]
    assert "initial_replicas" not in unset["deployments"][0]["autoscaling_config"]  # Serve starts at min_replicas


# ---------------------------------------------------------------------------------------------
# tuning
# ---------------------------------------------------------------------------------------------

LR_SPACE = "space: {training.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}}"


def built_tuner(tuning: str, *overrides: str):
    """The Ray Tune Tuner `tandem tune` builds for `tuning` (constructing it starts no Ray)."""
    import tempfile
    from pathlib import Path

    from tuning.resources import TrialPlan
    from tuning.space import parse_space
    from tuning.tuner import make_tuner

    config = load_config(None, [f"tuning={tuning}", *overrides])
    plan = TrialPlan(workers=1, cpus_per_worker=0.99, use_gpu=False, max_concurrent=2, eligible_cpus=2, eligible_nodes=1)
    with tempfile.TemporaryDirectory() as folder:
        return make_tuner(config, parse_space(config), plan, Path(folder), callbacks=[])


def test_time_budget_s_is_ray_tunes_time_budget():
    """tuning.time_budget_s: TuneConfig.time_budget_s of the Tuner (Tune stops the search after it)."""
    assert built_tuner(f"{{time_budget_s: 90, {LR_SPACE}}}")._local_tuner._tune_config.time_budget_s == 90
    assert built_tuner(f"{{{LR_SPACE}}}")._local_tuner._tune_config.time_budget_s is None


def test_median_scheduler_is_rays_median_stopping_rule_on_epochs():
    """tuning.scheduler.name: median: Ray's MedianStoppingRule, in epochs, with the configured grace period."""
    from ray.tune.schedulers import MedianStoppingRule

    scheduler = built_tuner(f"{{scheduler: {{name: median, grace_period: 2}}, {LR_SPACE}}}")._local_tuner._tune_config.scheduler
    assert type(scheduler) is MedianStoppingRule
    assert scheduler._time_attr == "epoch" and scheduler._grace_period == 2


def test_asha_max_t_and_rung_min_results_shape_its_rungs_and_promotions():
    """tuning.scheduler max_t and rung_min_results: ASHA's rung milestones stop below max_t; promotions wait for that many results."""
    from tuning.asha import PatientASHA

    tuning = f"{{scheduler: {{name: asha, grace_period: 1, reduction_factor: 3, max_t: 9, rung_min_results: 5}}, {LR_SPACE}}}"
    scheduler = built_tuner(tuning, "training.epochs=30")._local_tuner._tune_config.scheduler
    assert type(scheduler) is PatientASHA
    assert scheduler._max_t == 9  # not training.epochs
    assert rung_milestones(scheduler) == [1, 3, 9]  # grace_period * 3**k up to max_t
    assert scheduler.min_results == 5
    # Unset: max_t is training.epochs (30: one rung more) and a rung waits for ceil(reduction_factor) results.
    default = built_tuner(f"{{scheduler: {{name: asha, grace_period: 1, reduction_factor: 3}}, {LR_SPACE}}}", "training.epochs=30")
    assert rung_milestones(default._local_tuner._tune_config.scheduler) == [1, 3, 9, 27]
    assert default._local_tuner._tune_config.scheduler.min_results == 3


def rung_milestones(scheduler) -> list[int]:
    (bracket,) = scheduler._brackets
    return sorted(int(milestone) for milestone, _ in bracket._rungs)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def test_prune_fine_tune_epochs_runs_the_given_fine_tune_and_keeps_the_zeros(tmp_path):
    """export.prune.fine_tune_epochs: export runs the fine-tune it is given on the pruned model, prunes again, records the epochs."""
    from cluster.artifacts import load_model, read_manifest
    from serving.engines import PRUNED_FILE
    from serving.optimize.export import export
    from tests.unit.artifact_helpers import LOOSE_GATE, MLP_ARGS, export_config, train_artifact

    artifact = train_artifact(tmp_path / "digits" / "run-1" / "artifacts", args=MLP_ARGS, epochs=1)
    asked = []

    def fine_tune(model, config):
        # Stands in for a trainer: moves every weight, the pruned zeros included.
        asked.append(config.export.prune.fine_tune_epochs)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return model

    prune = {"sparsity": 0.5, "fine_tune_epochs": 2}
    config = export_config(tmp_path, args=MLP_ARGS, onnx=False, quantize="none", prune=prune, gate=LOOSE_GATE, latency_batch_sizes=[1])
    export(config, artifact, latency_budget_s=0.01, fine_tune=fine_tune)
    assert asked == [2]
    source, _ = load_model(artifact)
    pruned, _ = load_model(artifact, PRUNED_FILE)
    original = source.state_dict()
    weights = {name: value for name, value in pruned.state_dict().items() if name.endswith("weight")}
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    assert zeros >= 0.5 - 1e-3  # pruned again after the fine-tune moved the zeros
    for name, value in weights.items():
        kept = value != 0
        assert torch.allclose(value[kept], original[name][kept] + 1.0), name  # the survivors carry the fine-tune
    assert read_manifest(artifact)["export"]["prune"]["fine_tune"] == {"epochs": 2}


def test_prune_fine_tune_epochs_by_default_fine_tunes_in_process_and_recovers_accuracy(tmp_path):
    """Without a given fine-tune (what `tandem export` and `tandem run` do), export trains the pruned
    model on the config's data for fine_tune_epochs, the zeros kept: at 90% sparsity it answers
    better than the same pruning left alone (two arms of the same artifact)."""
    from cluster.artifacts import load_model, read_manifest
    from serving.engines import PRUNED_FILE
    from serving.optimize.export import export
    from tests.unit.artifact_helpers import LOOSE_GATE, MLP_ARGS, digits_val, export_config, train_artifact

    artifact = train_artifact(tmp_path / "digits" / "run-1" / "artifacts", args=MLP_ARGS, epochs=5)
    x, y = digits_val()

    def pruned_accuracy_and_zeros(fine_tune_epochs: int) -> tuple[float, float]:
        prune = {"sparsity": 0.9, "fine_tune_epochs": fine_tune_epochs}
        config = export_config(tmp_path, args=MLP_ARGS, onnx=False, quantize="none", prune=prune, gate=LOOSE_GATE, latency_batch_sizes=[1])
        export(config, artifact, latency_budget_s=0.01)
        pruned, _ = load_model(artifact, PRUNED_FILE)
        with torch.no_grad():
            accuracy = float((pruned(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
        weights = [w for name, w in pruned.state_dict().items() if name.endswith("weight")]
        return accuracy, sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)

    left_alone, _ = pruned_accuracy_and_zeros(0)
    fine_tuned, zeros = pruned_accuracy_and_zeros(2)
    assert read_manifest(artifact)["export"]["prune"]["fine_tune"] == {"epochs": 2}
    assert zeros >= 0.9 - 1e-3  # the zeros stayed zeros
    print(f"90% pruned: {left_alone:.3f} left alone, {fine_tuned:.3f} after 2 epochs of fine-tune")
    assert fine_tuned > left_alone, (fine_tuned, left_alone)


# ---------------------------------------------------------------------------------------------
# tracking
# ---------------------------------------------------------------------------------------------


def test_validate_refuses_an_mlflow_file_store_naming_the_field_and_the_sqlite_fix():
    """tracking.mlflow.tracking_uri: file:// (MLflow's documented form; MLflow 3 refuses it at its first call) fails validate."""
    done = tandem("validate", "--set", "tracking.mlflow.tracking_uri=file:///tmp/tandem-mlruns")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "tracking.mlflow.tracking_uri: 'file:///tmp/tandem-mlruns'" in done.stderr and "file store" in done.stderr
    assert "'sqlite:////tmp/tandem-mlruns/mlflow.db'" in done.stderr  # the fix, an absolute sqlite path


def test_a_plain_path_is_a_file_store_too_and_database_uris_pass():
    """tracking.mlflow.tracking_uri: a path without a scheme also goes to MLflow's file store; sqlite, http, databricks pass."""
    from cluster.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(None, ["tracking={mlflow: {tracking_uri: ./mlruns}}"])
    (problem,) = caught.value.problems
    assert problem.path == "tracking.mlflow.tracking_uri" and "sqlite:///./mlruns/mlflow.db" in str(problem)
    for uri in ("sqlite:////tmp/tandem-mlruns/mlflow.db", "http://127.0.0.1:5000", "databricks"):
        assert load_config(None, [f"tracking={{mlflow: {{tracking_uri: '{uri}'}}}}"]).tracking.mlflow.tracking_uri == uri


def test_a_checkpoint_metric_the_loop_never_reports_or_a_mode_that_keeps_the_worst_is_refused():
    """training.checkpoint.metric/mode: a misspelt metric would rank every checkpoint -inf in Ray
    Train (which ones `keep` retains becomes arbitrary); min on val_accuracy keeps the worst."""
    from cluster.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(None, ["training.checkpoint.metric=val_los"])
    (problem,) = caught.value.problems
    assert problem.path == "training.checkpoint.metric" and "did you mean 'val_loss'?" in str(problem)
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["training.checkpoint.metric=val_accuracy"])
    (problem,) = caught.value.problems
    assert problem.path == "training.checkpoint.mode" and "set training.checkpoint.mode: max" in str(problem)
    kept = load_config(None, ["training.checkpoint={metric: val_accuracy, mode: max}"]).training.checkpoint
    assert (kept.metric, kept.mode) == ("val_accuracy", "max")
