"""The README is for users: its commands exist, its config reference equals the code's, and its
benchmark tables equal the results files the benchmarks last wrote."""

from __future__ import annotations

from pathlib import Path

from tandem.reference import BEGIN, END, config_reference_markdown, results_markdown, results_markers, results_names

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile


def test_config_reference_is_current():
    block = README[README.index(BEGIN) + len(BEGIN) : README.index(END)].strip()
    assert block == config_reference_markdown(), "run `python -m tandem.reference` to regenerate the README reference"


def test_ci_calls_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_benchmark_table_in_the_readme_is_its_results_file():
    assert {"training", "engines", "tuning", "startup", "predict", "serving", "serving_hotpath"} <= set(results_names())
    for name in results_names():
        begin, end = results_markers(name)
        assert begin in README, f"benchmarks/results/{name}.md is not shown in the README; add {begin} ... {end} to its section"
        block = README[README.index(begin) + len(begin) : README.index(end)].strip()
        assert block == results_markdown(name), f"the README's {name} table is stale; run `python -m tandem.reference`"
