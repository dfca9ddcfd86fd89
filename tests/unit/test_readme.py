"""The README is for users: short, its two commands exist, its links lead somewhere. What the docs
show that is generated (the configuration reference, the benchmark tables) equals the code and the
results files the benchmarks last wrote."""

from __future__ import annotations

import re
from pathlib import Path

from tandem.reference import (
    BENCHMARKS_PAGE,
    CONFIG_PAGE,
    configuration_page,
    results_markdown,
    results_markers,
    results_names,
)

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile


def test_readme_is_short():
    assert len(README.splitlines()) <= 210, "the README is the first screen; details go to docs/"


def test_readme_links_lead_to_files():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"the README links to {target}, which does not exist"


def test_config_reference_is_current():
    assert CONFIG_PAGE.read_text() == configuration_page(), "run `python -m tandem.reference` to regenerate docs/reference/configuration.md"


def test_ci_calls_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_benchmark_table_in_the_docs_is_its_results_file():
    page = BENCHMARKS_PAGE.read_text()
    assert {"training", "engines", "tuning", "startup", "predict", "serving", "serving_hotpath"} <= set(results_names())
    for name in results_names():
        begin, end = results_markers(name)
        assert begin in page, f"benchmarks/results/{name}.md is not shown in docs/benchmarks.md; add {begin} ... {end} to its section"
        block = page[page.index(begin) + len(begin) : page.index(end)].strip()
        assert block == results_markdown(name), f"the {name} table of docs/benchmarks.md is stale; run `python -m tandem.reference`"
