"""Trial schedulers and search algorithms, built from `tuning.scheduler` and `tuning.search`.

One small builder per name; a new scheduler or searcher is one more function in `SCHEDULERS` or
`SEARCHERS` plus its name in cluster/config.py. Every scheduler measures time in epochs
(`time_attr="epoch"`, the epoch number the training loop reports), so grace periods, max_t and
PBT's perturbation interval are all in epochs.

`plan_problems` checks the combination before any trial starts (PBT with Optuna, a grid search
over a continuous range, ...), one message per trap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cluster.config import Problem, TandemConfig
from cluster.config.checks import ranking_problems
from tuning.space import CONTINUOUS, SearchSpace, count_trials, tune_domain

TIME_ATTR = "epoch"


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def _check_metric_and_mode(config: TandemConfig, space: SearchSpace) -> list[Problem]:
    return ranking_problems("tuning.metric", config.tuning.metric, "tuning.mode", config.tuning.mode, "trial")


def _check_asha(config: TandemConfig, space: SearchSpace) -> list[Problem]:
    scheduler = config.tuning.scheduler
    if scheduler.name not in ("asha", "median"):
        return []
    max_t = scheduler.max_t or config.training.epochs
    if scheduler.grace_period >= max_t:
        return [
            Problem(
                path="tuning.scheduler.grace_period",
                value=scheduler.grace_period,
                message=f"not below max_t ({max_t} epochs), so no trial could ever be stopped early; lower grace_period or raise "
                "training.epochs",
            )
        ]
    return []


def _check_pbt(config: TandemConfig, space: SearchSpace) -> list[Problem]:
    tuning, training = config.tuning, config.training
    if tuning.scheduler.name != "pbt":
        return []
    problems = []
    interval = tuning.scheduler.perturbation_interval
    if interval >= training.epochs:
        problems.append(
            Problem(
                path="tuning.scheduler.perturbation_interval",
                value=interval,
                message=f"not below training.epochs ({training.epochs}); PBT would never exploit. Lower it or train longer",
            )
        )
    if interval % training.checkpoint.every_epochs:
        problems.append(
            Problem(
                path="training.checkpoint.every_epochs",
                value=training.checkpoint.every_epochs,
                message=f"PBT copies the checkpoint taken at each perturbation (every {interval} epochs); set every_epochs to a divisor of "
                f"{interval}",
            )
        )
    if tuning.search.name == "optuna":
        problems.append(
            Problem(
                path="tuning.search.name",
                value="optuna",
                message="PBT explores by mutating running trials, which a model-based searcher cannot follow; use search: random with pbt",
            )
        )
    for path in space.paths:
        if path.startswith("model."):
            problems.append(
                Problem(
                    path=f"tuning.space['{path}']",
                    message="PBT copies weights between trials, so every trial must have the same architecture; search model.* with asha "
                    "or fifo",
                )
            )
    return problems


def _check_search(config: TandemConfig, space: SearchSpace) -> list[Problem]:
    search = config.tuning.search.name
    problems = []
    for entry in space.entries:
        where = f"tuning.space['{entry.path}']"
        if search == "grid" and (entry.kind in CONTINUOUS or entry.kind == "randint"):
            problems.append(
                Problem(
                    path=where,
                    value={entry.kind: list(entry.args)},
                    message=f"search: grid enumerates values and cannot enumerate {entry.kind}; use grid: [values] or search: random",
                )
            )
        if search == "optuna" and entry.kind == "grid":
            problems.append(
                Problem(
                    path=where,
                    value={entry.kind: list(entry.args)},
                    message="search: optuna samples every value and has no grid; use choice: [...] or search: random",
                )
            )
    return problems


PLAN_CHECKS = (_check_metric_and_mode, _check_asha, _check_pbt, _check_search)


def plan_problems(config: TandemConfig, space: SearchSpace) -> list[Problem]:
    return [p for check in PLAN_CHECKS for p in check(config, space)]


# ---------------------------------------------------------------------------------------------
# schedulers
# ---------------------------------------------------------------------------------------------


def _fifo(config: TandemConfig, space: SearchSpace) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def _asha(config: TandemConfig, space: SearchSpace) -> Any:
    import math

    from tuning.asha import PatientASHA

    s = config.tuning.scheduler
    return PatientASHA(
        min_results=s.rung_min_results or math.ceil(s.reduction_factor),
        samples=count_trials(space, config.tuning.samples, config.tuning.search.name),
        time_attr=TIME_ATTR,
        max_t=s.max_t or config.training.epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def _median(config: TandemConfig, space: SearchSpace) -> Any:
    from ray.tune.schedulers import MedianStoppingRule

    return MedianStoppingRule(time_attr=TIME_ATTR, grace_period=config.tuning.scheduler.grace_period)


def _pbt(config: TandemConfig, space: SearchSpace) -> Any:
    from ray import tune

    from tuning.pbt import HandoffPBT

    mutations = {}
    for entry in space.entries:
        domain = tune_domain(entry)
        if entry.kind == "grid":
            # A grid sets the starting values; PBT mutates it as a choice among the same values.
            domain = tune.choice(list(range(len(entry.args))) if entry.encoded else list(entry.args))
        mutations[entry.path] = domain
    return HandoffPBT(
        final_epoch=config.training.epochs,
        exploit=config.tuning.scheduler.exploit,
        time_attr=TIME_ATTR,
        perturbation_interval=config.tuning.scheduler.perturbation_interval,
        hyperparam_mutations=mutations,
    )


SCHEDULERS: dict[str, Callable[[TandemConfig, SearchSpace], Any]] = {"fifo": _fifo, "asha": _asha, "median": _median, "pbt": _pbt}


def build_trial_scheduler(config: TandemConfig, space: SearchSpace, max_concurrent: int | None = None) -> Any:
    """Ray Tune's trial scheduler for tuning.scheduler (fifo, asha, median, pbt); the learning-rate
    schedule inside a trial is training.ds_config.build_scheduler."""
    scheduler = SCHEDULERS[config.tuning.scheduler.name](config, space)
    if max_concurrent is not None and hasattr(scheduler, "max_concurrent"):
        # How many trials may be live at once (PatientASHA waits only where another can arrive).
        scheduler.max_concurrent = max_concurrent
    return scheduler


# ---------------------------------------------------------------------------------------------
# search algorithms
# ---------------------------------------------------------------------------------------------


def _basic(config: TandemConfig, max_concurrent: int) -> Any:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=config.tuning.search.seed, max_concurrent=max_concurrent)


def _optuna(config: TandemConfig, max_concurrent: int) -> Any:
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # TPE by default; the limiter keeps Optuna from suggesting more trials than can run, so each
    # suggestion sees the results of the ones before it.
    return ConcurrencyLimiter(OptunaSearch(seed=config.tuning.search.seed), max_concurrent=max_concurrent)


SEARCHERS: dict[str, Callable[[TandemConfig, int], Any]] = {"random": _basic, "grid": _basic, "optuna": _optuna}


def build_search(config: TandemConfig, max_concurrent: int) -> Any:
    return SEARCHERS[config.tuning.search.name](config, max_concurrent)
