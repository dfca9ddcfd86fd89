"""How many trials run at once and what each one asks for, computed from the cluster's nodes.

Tune only sees the trial function's own request; the Train workers each trial starts ask Ray for
their resources later, from inside the trial. If Tune starts more trials than the workers can be
placed for, the extra trials' worker groups wait for resources that never free up ("worker group
startup timed out", retried for ever). So the plan is made here, before any trial starts:

- the trial function asks for `TRIAL_FUNCTION_CPU` (Tune refuses 0) and the Train controller for
  nothing (Ray Train's own default), so only the workers count;
- every worker gets `cpus_per_worker` CPUs (fractions allowed: Ray's CPUs are logical) and one GPU
  when the trial trains on GPUs;
- `max_concurrent` trials are admitted, so that all their workers fit on the eligible nodes
  (the training node group's, when one is set).

A config that cannot place even one trial is a ConfigError naming the fields to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cluster.config import ConfigError, Problem, TandemConfig
from cluster.runtime import node_group_resource

TRIAL_FUNCTION_CPU = 0.01
MIN_CPUS_PER_WORKER = 0.05  # below this a worker is starved: DeepSpeed start-up alone takes seconds of CPU


@dataclass(frozen=True)
class TrialPlan:
    """What every trial asks for and how many run at once."""

    workers: int
    cpus_per_worker: float
    use_gpu: bool
    max_concurrent: int
    eligible_cpus: float
    eligible_nodes: int

    def trial_updates(self) -> dict[str, Any]:
        """Dotted updates that make a trial's config train with this plan's workers."""
        return {"training.workers": self.workers, "training.cpus_per_worker": self.cpus_per_worker}

    def describe(self) -> str:
        gpu = " + 1 GPU" if self.use_gpu else ""
        return (
            f"{self.max_concurrent} trial(s) at once, each {self.workers} worker(s) x {self.cpus_per_worker:g} CPU{gpu} "
            f"(eligible: {self.eligible_cpus:g} CPUs on {self.eligible_nodes} node(s))"
        )


def eligible_nodes(config: TandemConfig, nodes: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Resources of the alive nodes the workers may use (those of the training node group, if set)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    group = config.training.node_group
    if group:
        alive = [r for r in alive if r.get(node_group_resource(group), 0) >= 1]
    return alive


def _slots(nodes: list[dict[str, float]], cpus: float, use_gpu: bool) -> list[int]:
    """Workers of `cpus` CPUs (and one GPU each on GPU) that fit on every node."""
    slots = []
    for node in nodes:
        n = math.floor(node.get("CPU", 0) / cpus + 1e-9)
        if use_gpu:
            n = min(n, math.floor(node.get("GPU", 0)))
        slots.append(n)
    return slots


def trials_that_fit(config: TandemConfig, nodes: list[dict[str, float]], workers: int, cpus: float, use_gpu: bool) -> int:
    """Trials whose workers all fit at once, honoring the placement strategy's hard rules."""
    slots = _slots(nodes, cpus, use_gpu)
    placement = config.training.placement
    if placement == "strict_pack":
        return sum(s // workers for s in slots)
    if placement == "strict_spread":
        hosts = sum(1 for s in slots if s >= 1)
        return 0 if hosts < workers else sum(slots) // workers
    total_cpus = sum(n.get("CPU", 0) for n in nodes)
    # The trial functions' own sliver of CPU comes out of the same pool.
    by_cpu = math.floor((total_cpus + 1e-9) / (workers * cpus + TRIAL_FUNCTION_CPU))
    return min(sum(slots) // workers, by_cpu)


def _floor_to(value: float, step: float = 0.01) -> float:
    return math.floor(value / step + 1e-9) * step


def plan_trials(config: TandemConfig, nodes: list[dict[str, Any]], use_gpu: bool, n_trials: int) -> TrialPlan:
    """The resource plan for `n_trials` trials on these nodes (ray.nodes() entries), or a ConfigError."""
    tuning, training = config.tuning, config.training
    assert tuning is not None
    workers = tuning.workers_per_trial
    pool = eligible_nodes(config, nodes)
    total = sum(n.get("CPU", 0) for n in pool)
    where = f"node group '{training.node_group}'" if training.node_group else "the cluster"
    if not pool:
        raise ConfigError(
            [
                Problem(
                    path="training.node_group",
                    value=training.node_group,
                    message=f"no alive node of {where}; start one or unset training.node_group",
                )
            ]
        )
    if use_gpu and not any(n.get("GPU", 0) >= 1 for n in pool):
        raise ConfigError(
            [
                Problem(
                    path="training.use_gpu",
                    value=training.use_gpu,
                    message=f"{where} has no GPU; set training.use_gpu: false or add GPU nodes",
                )
            ]
        )

    wanted = min(tuning.max_concurrent_trials or n_trials, n_trials)
    if tuning.cpus_per_worker is not None:
        cpus = tuning.cpus_per_worker
    elif tuning.max_concurrent_trials is not None:
        # Shrink workers (never grow them) so the requested number of trials fits.
        cpus = min(training.cpus_per_worker, _floor_to((total - wanted * TRIAL_FUNCTION_CPU) / (wanted * workers)))
    else:
        # As many trials as fit at the configured worker size, then shrink slightly so the
        # trial functions' own CPU slivers fit beside the workers.
        fit = max(1, min(n_trials, math.floor(total / (workers * training.cpus_per_worker) + 1e-9)))
        cpus = min(training.cpus_per_worker, _floor_to((total - fit * TRIAL_FUNCTION_CPU) / (fit * workers)))
    if cpus < MIN_CPUS_PER_WORKER:
        raise ConfigError(
            [
                Problem(
                    path="tuning.max_concurrent_trials",
                    value=tuning.max_concurrent_trials,
                    message=f"{wanted} trials x {workers} worker(s) on {total:g} CPUs leaves {cpus:g} CPU per worker; lower "
                    "max_concurrent_trials or workers_per_trial",
                )
            ]
        )

    fit = trials_that_fit(config, pool, workers, cpus, use_gpu)
    if fit == 0:
        gpu = " and 1 GPU" if use_gpu else ""
        raise ConfigError(
            [
                Problem(
                    path="tuning.workers_per_trial",
                    value=workers,
                    message=(
                        f"one trial needs {workers} worker(s) of {cpus:g} CPU{gpu} ({training.placement} placement) but {where} has "
                        f"{total:g} CPUs on {len(pool)} node(s), the largest {max(n.get('CPU', 0) for n in pool):g}; "
                        "lower tuning.workers_per_trial or tuning.cpus_per_worker, or add nodes"
                    ),
                )
            ]
        )
    if tuning.max_concurrent_trials is not None and fit < wanted:
        raise ConfigError(
            [
                Problem(
                    path="tuning.max_concurrent_trials",
                    value=tuning.max_concurrent_trials,
                    message=f"only {fit} trial(s) of {workers} x {cpus:g} CPU fit on {where} ({total:g} CPUs); lower max_concurrent_trials "
                    f"to {fit} or lower tuning.cpus_per_worker",
                )
            ]
        )
    return TrialPlan(
        workers=workers,
        cpus_per_worker=round(cpus, 4),
        use_gpu=use_gpu,
        max_concurrent=min(fit, wanted),
        eligible_cpus=total,
        eligible_nodes=len(pool),
    )
