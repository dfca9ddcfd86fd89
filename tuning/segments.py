"""The per-trial start/end log, `<trial>/segments.jsonl`: written by the trial, read by the results.

One line per start of a trial (its params, the Tune checkpoint it started from and the trial that
checkpoint belongs to, e.g. a PBT donor) and one per end (completed, stopped or error). It is how
a restored tune shows that finished trials did not run again, and how PBT's exploits are seen.
The trial folder is a local (or mounted) folder or a prefix in an object store (cluster/storage.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cluster.storage import Location, location

SEGMENTS_LOG = "segments.jsonl"


def log_segment(trial_dir: Location | Path | str, record: dict[str, Any]) -> None:
    # One writer per trial (the trial's own actor), so an object store's read-and-rewrite append is safe.
    (location(trial_dir) / SEGMENTS_LOG).append_line(json.dumps({"time": time.time(), **record}, default=str))


def read_segments(trial_dir: Location | Path | str) -> list[dict[str, Any]]:
    try:
        text = (location(trial_dir) / SEGMENTS_LOG).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def donor_trial(checkpoint_path: str | None) -> str | None:
    """The trial a Tune checkpoint belongs to: its folder is <experiment>/<trial id>/checkpoint_N."""
    return Path(checkpoint_path).parent.name if checkpoint_path else None
