"""Search spaces written as dotted paths into the config itself, checked before any trial starts.

    tuning:
      space:
        training.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
        model.args.hidden:     {choice: [[128], [256, 256]]}

Kinds: `uniform: [low, high]`, `loguniform: [low, high]` (0 < low), `randint: [low, high)` (high
excluded, like Python's range and Tune's randint), `choice: [v, ...]`, `grid: [v, ...]`.

`parse_space` checks every entry against the config before Ray is touched: the path must lead to
a field (or a new key of a free-form mapping such as model.args), and every value the entry can
produce (both bounds, a typical interior value, every choice) must pass the field's own validation
through `config_with`. All problems come back together in one ConfigError, each naming
`tuning.space['<path>']`.

Choices whose values are not plain scalars (e.g. hidden widths `[128]`) are searched as indices
into the value list and decoded in the trial, because Optuna's categorical distribution only
holds None, bool, int, float and str.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from cluster.config import ConfigError, Problem, TandemConfig, config_with, parse_override

SEARCHABLE = ("model", "data", "training")  # what a trial trains; cluster/serving/export do not change it
CONTINUOUS = ("uniform", "loguniform")
DISCRETE = ("choice", "grid")
# A value well inside a continuous range: catches an int field given a float range, which
# both bounds (often whole numbers) would not.
INTERIOR = 0.37


@dataclass(frozen=True)
class SpaceEntry:
    """One searched field: its dotted path, its kind and the kind's arguments."""

    path: str
    kind: str
    args: tuple[Any, ...]
    encoded: bool = False  # choice/grid searched by index, decoded in the trial

    def decode(self, sampled: Any) -> Any:
        return self.args[int(sampled)] if self.encoded else sampled

    @property
    def grid_size(self) -> int:
        return len(self.args) if self.kind == "grid" else 1


@dataclass(frozen=True)
class SearchSpace:
    entries: tuple[SpaceEntry, ...]

    @property
    def paths(self) -> list[str]:
        return [e.path for e in self.entries]

    @property
    def grid_points(self) -> int:
        return math.prod(e.grid_size for e in self.entries)

    def entry(self, path: str) -> SpaceEntry:
        return next(e for e in self.entries if e.path == path)

    def decode(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Tune's sampled values -> config values (choice indices become the chosen values)."""
        return {e.path: e.decode(sampled[e.path]) for e in self.entries if e.path in sampled}


def space_problem(path: str, message: str, value: Any = None) -> Problem:
    return Problem(path=f"tuning.space['{path}']", value=value, message=message)


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------


def parse_space(config: TandemConfig) -> SearchSpace:
    """The validated search space of `config.tuning`; a ConfigError lists every bad entry."""
    if config.tuning is None:
        raise ConfigError([Problem(path="tuning", message="no tuning section; add tuning: {space: {...}} to search hyperparameters")])
    if not config.tuning.space:
        raise ConfigError(
            [
                Problem(
                    path="tuning.space", message="the search space is empty; add e.g. training.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}"
                )
            ]
        )
    entries, problems = [], []
    for path, spec in config.tuning.space.items():
        entry, entry_problems = _parse_entry(config, path, spec)
        problems += entry_problems
        if entry is not None:
            entries.append(entry)
    if problems:
        raise ConfigError(problems)
    return SearchSpace(tuple(entries))


def _parse_entry(config: TandemConfig, path: str, spec: dict[str, Any]) -> tuple[SpaceEntry | None, list[Problem]]:
    ((kind, args),) = spec.items()  # TuningConfig already checked: exactly one known kind
    if kind not in DISCRETE and isinstance(args, list):
        args = [_yaml_number(a) for a in args]
    if path.split(".")[0] not in SEARCHABLE:
        return None, [
            space_problem(
                path, f"only {', '.join(SEARCHABLE[:-1])} or {SEARCHABLE[-1]} change what a trial trains; search a path under one of them"
            )
        ]
    shape_problem = _argument_problem(kind, args)
    if shape_problem:
        return None, [space_problem(path, shape_problem, args)]
    path_problem = _path_problem(config, path)
    if path_problem:
        return None, [space_problem(path, path_problem)]
    encoded = kind in DISCRETE and not all(v is None or isinstance(v, (bool, int, float, str)) for v in args)
    entry = SpaceEntry(path=path, kind=kind, args=tuple(args), encoded=encoded)
    return entry, _value_problems(config, entry)


def _yaml_number(value: Any) -> Any:
    """'1e-4' -> 1e-4. YAML 1.1 (PyYAML) reads exponents without a dot as strings; --set does too."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _argument_problem(kind: str, args: Any) -> str | None:
    """The kind's arguments have the right shape and order, or a message with the fix."""
    if kind in DISCRETE:
        if not isinstance(args, list) or not args:
            return f"{kind} takes a non-empty list of values, e.g. {{{kind}: [16, 32]}}"
        return None
    if not isinstance(args, list) or len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        return f"{kind} takes [low, high], two numbers, e.g. {{{kind}: [1.0e-4, 1.0e-2]}}"
    low, high = args
    if not low < high:
        return f"{kind} needs low < high; got low {low} and high {high}"
    if kind == "loguniform" and low <= 0:
        return f"loguniform needs 0 < low (it samples log(value)); got low {low}; use uniform for ranges that reach 0"
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        return f"randint takes whole numbers [low, high); got {args}"
    return None


def _path_problem(config: TandemConfig, path: str) -> str | None:
    """Whether `path` leads to a field of the config (or a new key of a free-form mapping)."""
    parts, _ = parse_override(f"{path}=")
    node: Any = config
    walked: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(walked) or "the config"
        if isinstance(node, BaseModel):
            fields = list(type(node).model_fields)
            if part not in fields:
                close = difflib.get_close_matches(str(part), fields, n=1)
                hint = f"did you mean '{'.'.join([*walked, close[0]])}'? " if close else ""
                return f"{where} has no field '{part}'; {hint}its fields: {', '.join(fields)}"
            node = getattr(node, part)
        elif isinstance(node, dict):
            if part not in node:
                if last:
                    # A free-form mapping (model.args, data.args, ...): a new key is a new keyword
                    # argument; the model/data preflight checks that the builder accepts it.
                    return None
                return f"{where} has no key '{part}'; add it to the config before searching inside it"
            node = node[part]
        elif isinstance(node, list):
            if not isinstance(part, int) or not 0 <= part < len(node):
                return f"{where} is a list of {len(node)}; use an index from 0 to {len(node) - 1}"
            node = node[part]
        elif node is None:
            return f"{where} is not set (null); set it in the config before searching inside it"
        else:
            return f"{where} is a single value ({node!r}), not a section; search '{where}' itself"
        walked.append(f"[{part}]" if isinstance(part, int) else str(part))
    if isinstance(node, BaseModel):
        return f"{path} is a whole section; search one of its fields, e.g. {path}.{next(iter(type(node).model_fields))}"
    return None


def probe_values(entry: SpaceEntry) -> list[Any]:
    """Values that stand for everything the entry can produce: bounds, an interior value, every choice."""
    if entry.kind in DISCRETE:
        return list(entry.args)
    low, high = entry.args
    if entry.kind == "randint":
        return [int(low), int(high) - 1]
    if entry.kind == "loguniform":
        return [low, high, low * (high / low) ** INTERIOR]
    return [low, high, low + (high - low) * INTERIOR]


def _value_problems(config: TandemConfig, entry: SpaceEntry) -> list[Problem]:
    problems = []
    for value in probe_values(entry):
        try:
            config_with(config, {entry.path: value})
        except ConfigError as exc:
            reasons = "; ".join(f"{p.path}: {p.message}" for p in exc.problems)
            fix = " (an integer field takes randint or choice)" if entry.kind in CONTINUOUS and "integer" in reasons else ""
            problems.append(
                space_problem(entry.path, f"{entry.kind} can produce {value!r}, which the config rejects: {reasons}{fix}", entry.args)
            )
            break  # one failing value says enough about this entry
    return problems


# ---------------------------------------------------------------------------------------------
# Tune's view of the space, and the way back
# ---------------------------------------------------------------------------------------------


def tune_domain(entry: SpaceEntry) -> Any:
    """The Ray Tune search-space object for one entry."""
    from ray import tune

    values = list(range(len(entry.args))) if entry.encoded else list(entry.args)
    if entry.kind == "uniform":
        return tune.uniform(*entry.args)
    if entry.kind == "loguniform":
        return tune.loguniform(*entry.args)
    if entry.kind == "randint":
        return tune.randint(int(entry.args[0]), int(entry.args[1]))
    if entry.kind == "choice":
        return tune.choice(values)
    return tune.grid_search(values)


def param_space(space: SearchSpace, search: str = "random") -> dict[str, Any]:
    """Tune's param_space: one flat key per dotted path (search 'grid' enumerates choices too)."""
    out = {}
    for entry in space.entries:
        kind = "grid" if search == "grid" and entry.kind == "choice" else entry.kind
        out[entry.path] = tune_domain(SpaceEntry(entry.path, kind, entry.args, entry.encoded))
    return out


def trial_config(config: TandemConfig, space: SearchSpace, sampled: dict[str, Any], fixed: dict[str, Any] | None = None) -> TandemConfig:
    """The config one trial trains: the sampled values (decoded) and `fixed` updates applied and validated."""
    return config_with(config, {**(fixed or {}), **space.decode(sampled)})


def count_trials(space: SearchSpace, samples: int, search: str) -> int:
    """Trials the search will run: Tune repeats the whole grid `samples` times; grid search
    enumerates every grid and choice combination once."""
    if search == "grid":
        return math.prod(len(e.args) for e in space.entries)
    return samples * space.grid_points
