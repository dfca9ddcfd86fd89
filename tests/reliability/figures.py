"""Reliability figures: each test here records what it injected and what it measured.

`benchmarks/reliability.py` reruns these tests with TANDEM_RELIABILITY_OUT set and turns the
recorded JSON files into the RELIABILITY.md table. In a plain `make test` the variable is unset
and `record` does nothing, so the tests never depend on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "TANDEM_RELIABILITY_OUT"


def record(name: str, **figures: Any) -> None:
    """Write `figures` as <TANDEM_RELIABILITY_OUT>/<name>.json (a later record of one name wins)."""
    out = os.environ.get(ENV)
    if not out:
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    # The test's node id lets the report pair these figures with the test's pass/fail outcome.
    # PYTEST_CURRENT_TEST is "<node id> (call)"; a parametrized id may hold spaces itself.
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    entry = {"test": test, "figures": figures}
    (folder / f"{name}.json").write_text(json.dumps(entry, indent=2, sort_keys=True, default=str) + "\n")
