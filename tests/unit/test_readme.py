"""The README is for users: its commands exist, its config reference equals the code's."""

from __future__ import annotations

from pathlib import Path

from tandem.reference import BEGIN, END, config_reference_markdown

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
