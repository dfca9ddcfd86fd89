"""Tuning: Ray Tune around the same Ray Train + DeepSpeed trainer (search spaces from dotted config paths).

    from tuning import tune
    result = tune(load_config("my.yaml"))          # or: tandem tune my.yaml [--resume]
    result.artifact_dir                            # the best trial's model, like a training run's

One file per concern; a new piece goes where its kind lives:

    space.py        search spaces: `tuning.space` entries (uniform, loguniform, randint, choice,
                    grid) parsed and checked against the config, Tune domains, decoding
    schedulers.py   one builder per scheduler (fifo, asha, median, pbt) and searcher (random,
                    grid, optuna), and the checks of their combination: a new scheduler goes here
    resources.py    the trial resource plan: workers per trial, CPUs per worker, trials at once
    asha.py         ASHA whose rungs wait for enough results before promoting (no unjudged
                    promotions of the first trials to arrive)
    pbt.py          PBT whose exploits copy the donor's checkpoint for the exploiter (no
                    retention race) and never land a trial at its last epoch
    trial.py        the trial function (one Train run per start) and the Train -> Tune bridge
    segments.py     each trial's start/end log (segments.jsonl)
    housekeeping.py driver-side Tune callbacks: release orphaned placement groups, peak concurrency
    results.py      the table, results.csv/json, the plot and the tuning manifest
    tuner.py        tune(): check, plan, Tuner.fit / Tuner.restore, report, consolidate the best

Ray is imported inside functions (trial.py, asha.py, pbt.py and housekeeping.py excepted), so importing the
package, as the unit tests do, never touches a cluster.

May import: `cluster` and `training`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tune", "TuneResult"]


def __getattr__(name: str) -> Any:
    # Lazy: `import tuning` stays light; tuner.py pulls in its Ray-side modules only when used.
    if name in __all__:
        from tuning import tuner

        return getattr(tuner, name)
    raise AttributeError(f"module 'tuning' has no attribute '{name}'")
