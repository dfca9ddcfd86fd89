"""Loading a config: YAML (duplicate keys refused), `--set` overrides, validation of every section.

`load_config` reports every problem at once as one `ConfigError`.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import TypeAdapter, ValidationError

from cluster.config.checks import cross_field_problems
from cluster.config.problems import ConfigError, Problem, _dotted, problems_from_validation
from cluster.config.schema import PACKAGED_EXAMPLE, TandemConfig


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`a.b[0].c=value` -> (['a', 'b', 0, 'c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError([Problem(path="--set", value=text, message="an override is PATH=VALUE, e.g. --set training.epochs=3")])
    key, raw = text.split("=", 1)
    parts: list[str | int] = []
    for piece in key.strip().split("."):
        name, *indices = piece.replace("]", "").split("[")
        if name:
            parts.append(name)
        parts += [int(i) for i in indices if i.isdigit()]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def set_path(tree: dict[str, Any], parts: list[str | int], value: Any) -> None:
    """Set a value at a path in a plain dict/list tree, creating dicts on the way."""
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[part]  # type: ignore[index]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    problems = []
    for text in overrides or []:
        try:
            parts, value = parse_override(text)
            set_path(raw, parts, value)
        except ConfigError as exc:
            problems += exc.problems
        except (IndexError, KeyError, TypeError, AttributeError):
            problems.append(
                Problem(path="--set", value=text, message="the path does not lead into the config; check the dotted path and list indices")
            )
    if problems:
        raise ConfigError(problems)
    return raw


def _load_yaml(text: str) -> tuple[Any, list[Problem]]:
    """The YAML document, and a Problem for every mapping key given twice in it.

    YAML requires unique keys, but PyYAML keeps the last value silently: `epochs: 3` followed by
    `epochs: 30` would train for 30 with no word. The check walks the parsed nodes (which know
    their lines) before they become Python values; a merge key (`<<: *anchor`) is not a duplicate.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        problems = _duplicate_keys(node, (), set()) if node is not None else []
        return (loader.construct_document(node) if node is not None else None), problems
    finally:
        loader.dispose()


def _duplicate_keys(node: yaml.Node, loc: tuple[Any, ...], visited: set[int]) -> list[Problem]:
    if id(node) in visited:  # an alias seen before (or inside its own anchor): walked once
        return []
    visited.add(id(node))
    problems: list[Problem] = []
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += _duplicate_keys(item, loc + (index,), visited)
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in first_line:
                problems.append(
                    Problem(
                        path=_dotted(loc + (key,)),
                        message=f"duplicate key at line {line} (first given at line {first_line[key]}); "
                        "YAML would silently keep only the last value, so keep one of them",
                    )
                )
            else:
                first_line[key] = line
            problems += _duplicate_keys(value_node, loc + (key,), visited)
    return problems


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError([Problem(path="<file>", value=str(path), message="no such file; give the path of a Tandem YAML config")])
    try:
        raw, duplicates = _load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            [Problem(path="<file>", value=str(path), message=f"not valid YAML{where}: {getattr(exc, 'problem', exc)}")]
        ) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem(path="<file>", value=str(path), message="not a text file (not UTF-8); give a YAML config")]) from None
    except OSError as exc:  # a folder, no permission, ...
        raise ConfigError(
            [
                Problem(
                    path="<file>", value=str(path), message=f"cannot be read ({exc.strerror or exc}); give the path of a Tandem YAML config"
                )
            ]
        ) from None
    except RecursionError:
        raise ConfigError(
            [Problem(path="<file>", value=str(path), message="nested too deeply to parse; a Tandem config is a few levels of sections")]
        ) from None
    if duplicates:
        raise ConfigError(duplicates, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            [Problem(path="<root>", value=raw, message="a config is a YAML mapping of sections (cluster, model, data, training, ...)")],
            str(path),
        )
    return raw


MAX_CONFIG_VALUES = 100_000


def _alias_problems(tree: Any) -> list[Problem]:
    """YAML aliases gone wrong: a value that contains itself (an alias inside its own anchor), or
    aliases of aliases that expand to more values than any config holds ("billion laughs"). Both
    pass a field typed Any and then hang or crash whatever prints or serializes the config. Each
    shared value is walked once, so the check costs the distinct values, not the expansion."""
    problems: list[Problem] = []
    sizes: dict[int, int] = {}

    def walk(node: Any, loc: tuple[Any, ...], ancestors: set[int]) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in ancestors:
            problems.append(
                Problem(path=_dotted(loc), message="contains itself (a YAML alias used inside its own anchor); write the value out")
            )
            return 1
        ancestors.add(id(node))
        size = 1 + sum(
            walk(value, loc + (key if isinstance(key, (str, int)) else str(key),), ancestors)
            for key, value in (node.items() if isinstance(node, dict) else enumerate(node))
        )
        ancestors.discard(id(node))
        sizes[id(node)] = size
        return size

    total = walk(tree, (), set())
    if total > MAX_CONFIG_VALUES:
        problems.append(
            Problem(
                path="<root>",
                message=f"expands to {total:,} values (YAML aliases of aliases), over {MAX_CONFIG_VALUES:,}; a config is small, write it "
                "without nested aliases",
            )
        )
    return problems


def validate_config(raw: Any, source: str | None = None) -> TandemConfig:
    """Validate a plain dict; every problem (field and cross-field) is reported in one ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(
            [Problem(path="<root>", value=raw, message="a config is a mapping of sections (cluster, model, data, training, ...)")], source
        )
    try:
        aliases = _alias_problems(raw)
    except RecursionError:
        aliases = [Problem(path="<root>", message="nested too deeply; a Tandem config is a few levels of sections")]
    if aliases:
        raise ConfigError(aliases, source)
    problems: list[Problem] = []
    sections: dict[str, Any] = {}
    for key in raw:
        if not isinstance(key, str) or key not in TandemConfig.model_fields:
            close = difflib.get_close_matches(str(key), list(TandemConfig.model_fields), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            where = f" in {source}" if source else ""
            problems.append(
                Problem(path=str(key), message=f"unknown section{where}; {hint}valid sections: {', '.join(TandemConfig.model_fields)}")
            )
    # Validate each section on its own so one broken section does not hide the others' problems.
    valid = True
    for name, field in TandemConfig.model_fields.items():
        if name not in raw:
            sections[name] = field.get_default(call_default_factory=True)
            continue
        # The field's own constraints (name's pattern) live in its metadata, not its annotation.
        adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)
        try:
            sections[name] = adapter.validate_python(raw[name])
        except ValidationError as exc:
            valid = False
            problems += problems_from_validation(exc, (name,), TandemConfig, source)
            sections[name] = _validate_without_errors(adapter, raw[name], exc)
    problems += cross_field_problems({k: v for k, v in sections.items() if v is not None})
    if problems or not valid:
        raise ConfigError(problems, source)
    try:
        return TandemConfig(**sections)
    except ValidationError as exc:  # a check the per-section pass could not see
        raise ConfigError(problems_from_validation(exc, (), TandemConfig, source), source) from None


def _validate_without_errors(adapter: TypeAdapter, raw: Any, error: ValidationError, rounds: int = 3) -> Any:
    """The section with its broken fields dropped (defaults in their place), or None.

    Only used so that cross-field checks still run on a section that has field errors, and all
    problems are reported together.
    """
    trimmed = copy.deepcopy(raw)
    for _ in range(rounds):
        for item in error.errors():
            loc = [p for p in item["loc"] if not (isinstance(p, str) and (p[:1].isupper() or "[" in p))]
            _delete_path(trimmed, loc)
        try:
            return adapter.validate_python(trimmed)
        except ValidationError as exc:
            error = exc
    return None


def _delete_path(tree: Any, loc: list[Any]) -> None:
    node = tree
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return
    if loc and isinstance(node, dict):
        node.pop(loc[-1], None)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TandemConfig:
    """Read a YAML config (the packaged example when path is None), apply `--set` overrides, validate."""
    path = Path(path) if path is not None else PACKAGED_EXAMPLE
    raw = apply_overrides(read_yaml(path), overrides)
    return validate_config(raw, source=str(path))


def config_with(config: TandemConfig, updates: dict[str, Any]) -> TandemConfig:
    """A copy of config with dotted-path updates applied and validated again (used by tuning)."""
    raw = config.to_dict()
    for dotted, value in updates.items():
        parts, _ = parse_override(f"{dotted}=")
        set_path(raw, parts, value)
    return validate_config(raw)
