"""The per-trial start/end log, `<trial>/segments.jsonl`: written by the trial, read by the results.

One line per start of a trial (its params, the Tune checkpoint it started from and the trial that
checkpoint belongs to, e.g. a PBT donor) and one per end (completed, stopped or error). It is how
a restored tune shows that finished trials did not run again, and how PBT's exploits are seen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

SEGMENTS_LOG = "segments.jsonl"


def log_segment(trial_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(trial_dir) / SEGMENTS_LOG, "a") as handle:
        handle.write(json.dumps({"time": time.time(), **record}, default=str) + "\n")


def read_segments(trial_dir: Path) -> list[dict[str, Any]]:
    path = Path(trial_dir) / SEGMENTS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def donor_trial(checkpoint_path: str | None) -> str | None:
    """The trial a Tune checkpoint belongs to: its folder is <experiment>/<trial id>/checkpoint_N."""
    return Path(checkpoint_path).parent.name if checkpoint_path else None
