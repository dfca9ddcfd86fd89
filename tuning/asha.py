"""ASHA that decides a rung only once the rung has enough results to compare.

Ray's asynchronous ASHA decides each trial the moment it reaches a rung, against whatever the
rung has recorded so far. The first trial at a rung has nothing to compare with and always goes
on; the second goes on if it beats the first, and so on. With 12 random samples, 9 epochs and a
reduction factor of 3, that bought 0.30x and 0.50x FIFO's epochs in two seeds, where synchronous
successive halving spends about 0.26x: the early arrivals at each rung were promoted unjudged.

`PatientASHA` keeps ASHA's rungs and asynchrony with two changes. A rung with fewer than
`min_results` results (default: the reduction factor) pauses a trial that reaches it instead of
promoting it; when the rung has its `min_results`, the waiting trials and the one that arrived
are decided together (paused ones that go on resume from their checkpoint). And a trial goes on
only if it ranks among the best floor(n / reduction_factor) of the n results at its rung, as
successive halving keeps its top n/eta, where Ray's cutoff (an interpolated percentile of the
earlier results) let 2 of 4 trials pass a reduction factor of 3. Every later arrival is decided
at once, as in Ray's ASHA. When nothing else can reach the rung (no trial pending or running), the
waiting ones are decided with what the rung has, so a search never waits for ever.

The price is a restart (a new Train run from the trial's checkpoint) for each promoted waiting
trial, at most `min_results - 1` per rung. `rung_min_results: 1` is Ray's ASHA unchanged.

A driver that dies loses nothing: `saved_state()` (every rung's recorded results, the waiting and
promoted trials, the stop count) goes into Tune's experiment state with each snapshot
(tuning/housekeeping.py `SchedulerState`) and `restore_state()` puts it back on `--resume`. Tune
itself pickles the scheduler only as it was when the search started, so a restored ASHA would
otherwise judge the rest of the search against empty rungs (ray-project/ray#30838). A trial that
waited at a rung comes back PENDING; it stays waiting until its rung decides.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

logger = logging.getLogger("tandem.tuning")


class PatientASHA(AsyncHyperBandScheduler):
    """AsyncHyperBandScheduler (one bracket) whose rungs wait for `min_results` results; see module doc."""

    def __init__(self, *, min_results: int, samples: int, max_concurrent: int | None = None, **kwargs: Any):
        super().__init__(brackets=1, **kwargs)
        self.min_results = max(1, int(min_results))
        self.samples = samples  # trials the search will create in all
        self.max_concurrent = max_concurrent  # live trials the searcher allows (paused ones count)
        self.waiting: dict[str, float] = {}  # trial id -> the milestone it waits at (trial PAUSED)
        self.promoted: set[str] = set()  # waiting trials that made the cut: resume them first

    def saved_state(self) -> dict[str, Any]:
        """What a resumed search needs: the rungs (one bracket, shared by every trial's entry), the
        trials waiting at a rung, the promoted ones and the stop count."""
        return {
            "brackets": self._brackets,
            "trial_info": self._trial_info,
            "num_stopped": self._num_stopped,
            "waiting": dict(self.waiting),
            "promoted": set(self.promoted),
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        self._brackets, self._trial_info, self._num_stopped = state["brackets"], state["trial_info"], state["num_stopped"]
        self.waiting, self.promoted = dict(state["waiting"]), set(state["promoted"])

    def rungs(self) -> dict[str, dict[str, float]]:
        """Each rung's recorded results by trial (the metric as reported, not ASHA's signed score)."""
        return {f"{m:g}": {t: self._metric_op * score for t, score in recorded.items()} for m, recorded in sorted(self._brackets[0]._rungs)}

    def _can_arrive(self, trial: Trial) -> bool:
        """Running, or pending and not one that waits at a rung (after a resume it is PENDING, not PAUSED)."""
        return trial.status == Trial.RUNNING or (trial.status == Trial.PENDING and trial.trial_id not in self.waiting)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        self.promoted.discard(trial.trial_id)  # it runs again
        if self._time_attr not in result or self._metric not in result or result[self._metric] is None:
            return TrialScheduler.CONTINUE
        if result[self._time_attr] >= self._max_t and self._stop_last_trials:
            self._num_stopped += 1
            return TrialScheduler.STOP
        now, score = result[self._time_attr], self._metric_op * result[self._metric]
        for milestone, recorded in self._trial_info[trial.trial_id]._rungs:  # highest milestone first
            if now < milestone or trial.trial_id in recorded:
                continue
            recorded[trial.trial_id] = score
            if len(recorded) < self.min_results and self._another_can_arrive(tune_controller, trial):
                self.waiting[trial.trial_id] = milestone
                return TrialScheduler.PAUSE
            waiting = [t for t in tune_controller.get_trials() if self.waiting.get(t.trial_id) == milestone]
            if not self._goes_on(trial.trial_id, recorded):
                self._num_stopped += 1
                action = TrialScheduler.STOP
            else:
                action = TrialScheduler.CONTINUE
            self._decide(tune_controller, waiting, recorded)
            return action
        return TrialScheduler.CONTINUE

    def _another_can_arrive(self, tune_controller: Any, trial: Trial) -> bool:
        """A trial running or pending now, or one the searcher can still start once this one pauses
        (the searcher counts paused trials as live): else waiting would only cost a restart."""
        trials = tune_controller.get_trials()
        if any(t is not trial and self._can_arrive(t) for t in trials):
            return True
        live = sum(t.status not in (Trial.TERMINATED, Trial.ERROR) for t in trials)
        return len(trials) < self.samples and (self.max_concurrent is None or live < self.max_concurrent)

    def _goes_on(self, trial_id: str, recorded: dict[str, float]) -> bool:
        """Among the best floor(n / reduction_factor) of the n results the rung recorded (itself
        included; at least the best one goes on). By rank, as successive halving keeps its top
        n/eta: Ray's interpolated percentile lets 2 of 4 pass a reduction factor of 3."""
        score = recorded[trial_id]
        better = sum(1 for other, value in recorded.items() if other != trial_id and value > score)
        return better < max(1, math.floor(len(recorded) / self._reduction_factor))

    def _decide(self, tune_controller: Any, waiting: list[Trial], recorded: dict[str, float]) -> None:
        for trial in waiting:
            del self.waiting[trial.trial_id]
            if self._goes_on(trial.trial_id, recorded):
                self.promoted.add(trial.trial_id)
            else:
                self._num_stopped += 1
                tune_controller.stop_trial(trial)

    def _decide_if_nothing_can_arrive(self, tune_controller: Any) -> None:
        trials = tune_controller.get_trials()
        if not self.waiting or any(self._can_arrive(t) for t in trials):
            return
        for milestone in sorted(set(self.waiting.values())):
            recorded = next(r for m, r in self._brackets[0]._rungs if m == milestone)
            waiting = [t for t in trials if self.waiting.get(t.trial_id) == milestone]
            logger.info(
                "ASHA: deciding %d waiting trial(s) at epoch %s on %d result(s): no other trial can reach it",
                len(waiting),
                milestone,
                len(recorded),
            )
            self._decide(tune_controller, waiting, recorded)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        self._decide_if_nothing_can_arrive(tune_controller)
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status in (Trial.PAUSED, Trial.PENDING) and trial.trial_id in self.promoted:
                return trial
        for trial in trials:
            if trial.status == Trial.PENDING and trial.trial_id not in self.waiting:
                return trial
        return None

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self.waiting.pop(trial.trial_id, None)
        self.promoted.discard(trial.trial_id)
        if self._time_attr in result and self._metric in result and result[self._metric] is not None:
            super().on_trial_complete(tune_controller, trial, result)
        else:
            self._trial_info.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.waiting.pop(trial.trial_id, None)
        self.promoted.discard(trial.trial_id)
        self._trial_info.pop(trial.trial_id, None)
