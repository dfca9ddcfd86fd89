"""Search spaces from dotted config paths, the scheduler/search checks and the trial resource plan; no Ray."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, TandemConfig, load_config
from tuning.resources import TRIAL_FUNCTION_CPU, plan_trials
from tuning.schedulers import plan_problems
from tuning.space import count_trials, parse_space, probe_values, trial_config


def with_tuning(tuning: str, *overrides: str) -> TandemConfig:
    return load_config(None, [f"tuning={tuning}", *overrides])


def space_problems(tuning: str, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_space(with_tuning(tuning, *overrides))
    return [str(p) for p in info.value.problems]


def node(cpus: float, gpus: float = 0, **groups: float) -> dict:
    return {"Alive": True, "Resources": {"CPU": cpus, "GPU": gpus, **{f"group_{k}": v for k, v in groups.items()}}}


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------


def test_every_kind_parses_and_probes_its_bounds():
    space = parse_space(
        with_tuning(
            "{space: {training.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}, training.optimizer.weight_decay: {uniform: [0, 0.1]},"
            " training.epochs: {randint: [2, 5]}, data.batch_size: {choice: [32, 64]}, training.deepspeed.zero_stage: {grid: [1, 2]}}}"
        )
    )
    assert space.paths == [
        "training.optimizer.lr",
        "training.optimizer.weight_decay",
        "training.epochs",
        "data.batch_size",
        "training.deepspeed.zero_stage",
    ]
    lr = space.entry("training.optimizer.lr")
    assert lr.args == (1e-4, 1e-2) and probe_values(lr)[:2] == [1e-4, 1e-2]
    assert 1e-4 < probe_values(lr)[2] < 1e-2
    assert probe_values(space.entry("training.epochs")) == [2, 4]  # randint excludes high, like range()
    assert space.grid_points == 2


def test_yaml_exponents_without_a_dot_are_numbers():
    # PyYAML reads 1e-4 as the string '1e-4'; a space must still accept it.
    space = parse_space(with_tuning("{space: {training.optimizer.lr: {loguniform: [1e-4, 1e-2]}}}"))
    assert space.entry("training.optimizer.lr").args == (1e-4, 1e-2)


def test_list_choices_are_searched_by_index_and_decoded():
    space = parse_space(with_tuning("{space: {model.args.hidden: {choice: [[16], [32, 32]]}, data.batch_size: {choice: [32, 64]}}}"))
    hidden = space.entry("model.args.hidden")
    assert hidden.encoded and not space.entry("data.batch_size").encoded
    assert space.decode({"model.args.hidden": 1, "data.batch_size": 64}) == {"model.args.hidden": [32, 32], "data.batch_size": 64}


def test_trial_config_applies_decoded_values_and_plan_updates():
    config = with_tuning("{space: {model.args.hidden: {choice: [[16], [32]]}, training.optimizer.lr: {uniform: [0.001, 0.01]}}}")
    space = parse_space(config)
    trial = trial_config(
        config, space, {"model.args.hidden": 1, "training.optimizer.lr": 0.005}, {"training.workers": 1, "training.cpus_per_worker": 0.45}
    )
    assert trial.model.args["hidden"] == [32] and trial.training.optimizer.lr == 0.005
    assert trial.training.workers == 1 and trial.training.cpus_per_worker == 0.45
    assert config.training.workers == 2, "the base config is never changed"


def test_a_new_keyword_of_a_free_form_mapping_is_allowed():
    # model.args is the builder's keyword arguments: dropout is not in the example config, mlp takes it.
    assert parse_space(with_tuning("{space: {model.args.dropout: {uniform: [0.0, 0.5]}}}")).paths == ["model.args.dropout"]


# ---------------------------------------------------------------------------------------------
# errors: each names tuning.space['<path>'] and the fix; all come together
# ---------------------------------------------------------------------------------------------


def test_a_path_that_does_not_exist_names_the_path_and_the_closest_field():
    (problem,) = space_problems("{space: {training.optimizer.lrr: {loguniform: [1.0e-4, 1.0e-2]}}}")
    assert problem.startswith("tuning.space['training.optimizer.lrr']")
    assert "did you mean 'training.optimizer.lr'" in problem


def test_a_value_the_field_rejects_is_an_error_naming_the_path():
    (problem,) = space_problems("{space: {training.optimizer.lr: {uniform: [-0.1, 0.1]}}}")
    assert "tuning.space['training.optimizer.lr']" in problem and "-0.1" in problem and "greater than 0" in problem


def test_a_float_range_on_an_integer_field_is_caught_by_its_interior_value():
    # Both bounds are whole numbers; the interior probe is not.
    (problem,) = space_problems("{space: {training.epochs: {uniform: [2, 6]}}}")
    assert "tuning.space['training.epochs']" in problem and "integer" in problem and "randint or choice" in problem


def test_bad_arguments_of_each_kind():
    problems = space_problems(
        "{space: {training.optimizer.lr: {loguniform: [0, 0.1]}, training.optimizer.weight_decay: {uniform: [0.2, 0.1]},"
        " training.epochs: {randint: [1.5, 4]}, data.batch_size: {choice: []}, training.grad_clip: {uniform: [1]}}}"
    )
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "loguniform needs 0 < low" in text
    assert "low < high" in text
    assert "randint takes whole numbers" in text
    assert "non-empty list" in text
    assert "[low, high], two numbers" in text


def test_every_problem_is_reported_at_once():
    problems = space_problems(
        "{space: {training.optimizer.lrr: {uniform: [0.1, 0.2]}, data.batch_size: {choice: [0, 64]},"
        " training.distill.alpha: {uniform: [0.1, 0.5]},"
        " training.optimizer: {choice: [1]}}}"
    )
    assert len(problems) == 4
    assert any("training.distill is not set" in p for p in problems)
    assert any("whole section" in p for p in problems)
    assert any("data.batch_size" in p and "greater than 0" in p for p in problems)


def test_a_missing_or_empty_space_is_an_error():
    with pytest.raises(ConfigError, match="no tuning section"):
        parse_space(load_config(None))
    with pytest.raises(ConfigError, match="tuning.space.*empty"):
        parse_space(with_tuning("{space: {}}"))


def test_unknown_kinds_and_sections_are_config_errors_at_load():
    with pytest.raises(ConfigError, match=r"tuning.space.*must be one of"):
        with_tuning("{space: {training.optimizer.lr: {normal: [0, 1]}}}")
    with pytest.raises(ConfigError, match="not a config section that can be searched"):
        with_tuning("{space: {tuning.samples: {choice: [1, 2]}}}")


def test_only_what_a_trial_trains_can_be_searched():
    (problem,) = space_problems("{space: {serving.port: {choice: [8000, 8001]}}}")
    assert problem.startswith("tuning.space['serving.port']") and "model, data or training" in problem


# ---------------------------------------------------------------------------------------------
# scheduler and search combinations
# ---------------------------------------------------------------------------------------------


def plan_messages(tuning: str, *overrides: str) -> list[str]:
    config = with_tuning(tuning, *overrides)
    return [str(p) for p in plan_problems(config, parse_space(config))]


LR = "training.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}"


def test_a_sound_plan_has_no_problems():
    assert plan_messages(f"{{scheduler: {{name: asha, grace_period: 1}}, search: {{name: optuna}}, space: {{{LR}}}}}") == []
    assert (
        plan_messages(f"{{scheduler: {{name: pbt, perturbation_interval: 2}}, space: {{{LR}}}}}", "training.checkpoint.every_epochs=1")
        == []
    )


def test_metric_must_be_reported_and_match_the_mode():
    (problem,) = plan_messages(f"{{metric: val_acc, mode: max, space: {{{LR}}}}}")
    assert problem.startswith("tuning.metric") and "did you mean 'val_accuracy'" in problem
    (problem,) = plan_messages(f"{{metric: val_accuracy, mode: min, space: {{{LR}}}}}")
    assert "tuning.mode" in problem and "max" in problem


def test_grid_search_cannot_enumerate_ranges_and_optuna_has_no_grid():
    (problem,) = plan_messages(f"{{search: {{name: grid}}, space: {{{LR}}}}}")
    assert "tuning.space['training.optimizer.lr']" in problem and "cannot enumerate loguniform" in problem
    (problem,) = plan_messages("{search: {name: optuna}, space: {data.batch_size: {grid: [32, 64]}}}")
    assert "optuna" in problem and "choice" in problem


def test_pbt_traps():
    problems = plan_messages(
        "{scheduler: {name: pbt, perturbation_interval: 3}, search: {name: optuna}, space: {model.args.hidden: {choice: [[16], [32]]}}}",
        "training.epochs=3",
        "training.checkpoint.every_epochs=2",
    )
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "tuning.scheduler.perturbation_interval" in text and "never exploit" in text
    assert "training.checkpoint.every_epochs" in text and "divisor of 3" in text
    assert "tuning.search.name" in text
    assert "tuning.space['model.args.hidden']" in text and "same architecture" in text


def test_asha_grace_period_must_leave_room_to_stop():
    (problem,) = plan_messages(f"{{scheduler: {{name: asha, grace_period: 4}}, space: {{{LR}}}}}", "training.epochs=4")
    assert problem.startswith("tuning.scheduler.grace_period")


def test_trial_counts():
    config = with_tuning("{samples: 3, space: {training.optimizer.lr: {grid: [0.001, 0.01]}, data.batch_size: {choice: [32, 64, 128]}}}")
    space = parse_space(config)
    assert count_trials(space, 3, "random") == 6  # Tune repeats the grid per sample
    assert count_trials(space, 3, "grid") == 6  # grid search enumerates choices too: 2 x 3


# ---------------------------------------------------------------------------------------------
# the resource plan
# ---------------------------------------------------------------------------------------------


def planned(tuning: str, nodes: list[dict], n_trials: int = 8, use_gpu: bool = False, *overrides: str):
    return plan_trials(with_tuning(tuning, *overrides), nodes, use_gpu, n_trials)


def test_two_cores_run_two_one_worker_trials_with_fractional_cpus():
    plan = planned(f"{{max_concurrent_trials: 2, space: {{{LR}}}}}", [node(2)])
    assert plan.max_concurrent == 2 and plan.workers == 1
    assert plan.cpus_per_worker == 0.99  # two trial functions' 0.01 CPU fit beside the workers
    assert plan.max_concurrent * (plan.workers * plan.cpus_per_worker + TRIAL_FUNCTION_CPU) <= 2


def test_without_a_limit_as_many_trials_run_as_fit_at_the_worker_size():
    plan = planned(f"{{workers_per_trial: 2, space: {{{LR}}}}}", [node(8)], 8, False, "training.cpus_per_worker=1")
    # 4 trials of 2 workers x 1 CPU fill 8 CPUs; workers shrink by 1% so the trial functions fit too.
    assert plan.max_concurrent == 4 and plan.cpus_per_worker == 0.99
    assert planned(f"{{space: {{{LR}}}}}", [node(8)], n_trials=2).max_concurrent == 2  # never more than the trials


def test_a_trial_that_cannot_fit_is_a_config_error():
    with pytest.raises(ConfigError, match=r"tuning.workers_per_trial.*one trial needs 3 worker\(s\) of 4 CPU"):
        planned(f"{{workers_per_trial: 3, cpus_per_worker: 4, space: {{{LR}}}}}", [node(8)])
    with pytest.raises(ConfigError, match=r"tuning.workers_per_trial.*strict_spread"):
        planned(f"{{workers_per_trial: 2, space: {{{LR}}}}}", [node(8)], 8, False, "training.placement=strict_spread")
    with pytest.raises(ConfigError, match=r"training.use_gpu.*no GPU"):
        planned(f"{{space: {{{LR}}}}}", [node(8)], 8, True)


def test_too_many_concurrent_trials_is_a_config_error_with_the_number_that_fits():
    with pytest.raises(ConfigError, match=r"tuning.max_concurrent_trials.*lower max_concurrent_trials to 3"):
        planned(f"{{max_concurrent_trials: 4, cpus_per_worker: 2, space: {{{LR}}}}}", [node(8)])
    with pytest.raises(ConfigError, match=r"tuning.max_concurrent_trials.*CPU per worker"):
        planned(f"{{max_concurrent_trials: 64, space: {{{LR}}}}}", [node(2)], n_trials=64)


def test_pinned_trials_only_count_their_node_group():
    nodes = [node(1), node(4, gpu=1000), node(4, cpu=1000)]
    plan = planned(f"{{max_concurrent_trials: 2, cpus_per_worker: 1, space: {{{LR}}}}}", nodes, 8, False, "training.node_group=cpu")
    assert plan.eligible_cpus == 4 and plan.eligible_nodes == 1
    with pytest.raises(ConfigError, match=r"training.node_group.*no alive node"):
        planned(f"{{space: {{{LR}}}}}", [node(4, gpu=1000)], 8, False, "training.node_group=cpu")


# ---------------------------------------------------------------------------------------------
# results: the best pick, the table, CSV, JSON and the plot (from summaries, no Tune)
# ---------------------------------------------------------------------------------------------


def summary(trial_id: str, lr: float, status: str, losses: list[float], checkpoint: bool = True):
    from tuning.results import TrialSummary

    history = [{"epoch": i + 1, "val_loss": v, "time": 100.0 + i} for i, v in enumerate(losses)]
    return TrialSummary(
        trial_id=trial_id,
        params={"training.optimizer.lr": lr},
        status=status,
        epochs_trained=len(losses),
        epochs_reported=len(losses),
        last_epoch=len(losses),
        metric=losses[-1] if losses else None,
        best_metric=min(losses) if losses else None,
        path=f"/runs/{trial_id}",
        history=history,
        checkpoint=f"/runs/{trial_id}/checkpoint_000001" if checkpoint else None,
    )


def test_results_pick_the_best_checkpointed_trial_and_write_every_file(tmp_path):
    from rich.console import Console

    from tuning.results import pick_best, plot_trials, results_table, write_csv, write_json

    trials = [
        summary("t_00000", 1e-3, "completed", [2.0, 1.5, 1.2]),
        summary("t_00001", 1e-4, "stopped", [2.3]),
        summary("t_00002", 3e-2, "completed", [1.9, 1.1, 0.9], checkpoint=False),  # best value, but nothing to hand on
        summary("t_00003", 1e-1, "error", []),
    ]
    best = pick_best(trials, "min")
    assert best.trial_id == "t_00000"
    assert pick_best(trials, "max").trial_id == "t_00001"

    write_csv(tmp_path / "results.csv", trials, "val_loss", "min")
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[1].startswith("t_00002,completed,3")  # sorted by the metric
    write_json(tmp_path / "results.json", trials, best, {"metric": "val_loss"})
    assert '"best_trial": "t_00000"' in (tmp_path / "results.json").read_text()
    plot_trials(tmp_path / "results.png", trials, best, "val_loss", "test")
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"

    console = Console(record=True, width=200)
    console.print(results_table(trials, best, "val_loss", "min", "title"))
    text = console.export_text()
    assert "training.optimizer.lr" in text and "stopped" in text and "error" in text and "*" in text


def test_resume_refuses_a_different_search_but_not_a_different_cluster(tmp_path):
    from tuning.tuner import check_same_search

    config = with_tuning(f"{{space: {{{LR}}}}}")
    (tmp_path / "config.yaml").write_text(config.to_yaml())
    check_same_search(load_config(None, [f"tuning={{space: {{{LR}}}}}", "cluster.storage=/elsewhere"]), tmp_path)
    with pytest.raises(ConfigError, match=r"training, tuning.*--resume continues"):
        check_same_search(with_tuning(f"{{samples: 3, space: {{{LR}}}}}", "training.epochs=3"), tmp_path)
