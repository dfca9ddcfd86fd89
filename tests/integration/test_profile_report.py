"""`tandem profile --from RUN` on a run that Ray Train + DeepSpeed really trained: measured bytes beside the formula."""

from __future__ import annotations

import pytest

from cluster.artifacts import load_model
from cluster.config import load_config
from profiling.profile import profile
from training.ds_config import zero_memory_formula
from training.models import parameter_count

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_profile_of_a_zero3_run_reports_the_runs_stage_and_its_measured_bytes(zero3_run, tmp_path):
    result, _ = zero3_run
    # Profiled with the packaged config (ZeRO-2): the table is for the config, the measured column for the run's own stage.
    report = profile(load_config(None, [f"cluster.storage={tmp_path}"]), source=result.run_dir, quick=True)

    assert report.out_dir == result.run_dir / "profile" and report.html_path.exists()
    zero = report.data["zero"]
    assert zero["configured_stage"] == 2
    measured = zero["run"]
    assert (measured["stage"], measured["workers"], measured["precision"]) == (3, 2, "fp32")
    params = parameter_count(load_model(result.artifact_dir)[0])
    formula = zero_memory_formula(params, 2, 3, "fp32", "adamw")
    # DeepSpeed pads each rank's flat partition to an alignment boundary: a few bytes over the formula.
    assert measured["param_bytes"] == pytest.approx(formula["params"], rel=0.01)
    assert measured["optimizer_bytes"] == pytest.approx(formula["optimizer"], rel=0.01)
    assert report.data["training"]["run"]["step_time_s"] > 0
    assert report.data["training"]["run"]["step_time_vs_in_process"] > 0
