"""Config problems: `Problem` (one dotted path, the bad value, the fix) and `ConfigError` (all of them).

`problems_from_validation` turns pydantic's errors into Problems that name the field, the value
and what is expected (the field's description), with a "did you mean" for unknown keys.
"""

from __future__ import annotations

import difflib
import json
import reprlib
from typing import Any

from pydantic import BaseModel, ValidationError

from cluster.errors import TandemError


class Problem(BaseModel):
    path: str
    value: Any = None
    message: str

    def __str__(self) -> str:
        shown = "" if self.value is None else f": {_short(self.value)}"
        path = self.path or "<root>"
        # A key with control characters (a stray \r, an escape sequence) is shown escaped: printed
        # raw it would be invisible, or rewrite the user's terminal. Messages quote keys too.
        return f"{path if path.isprintable() else ascii(path)}{shown} — {_escape_controls(self.message)}"


def _escape_controls(text: str) -> str:
    return "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in text)


class ConfigError(TandemError, ValueError):
    """Every problem of a config at once; `str()` lists them, one per line."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(problems)} problem{'s' if len(problems) != 1 else ''}{where}:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    except (ValueError, RecursionError):  # a YAML alias that contains itself, or very deep nesting
        text = reprlib.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk a pydantic model class along an error location; return the model owning the last key."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            if isinstance(part, int):
                continue
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _description_at(root: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    keys = [p for p in loc if isinstance(p, str)]
    owner = _model_at(root, tuple(keys))
    field = owner.model_fields.get(keys[-1]) if owner and keys else None
    return field.description if field else None


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside `X | None`, `list[X]` or `dict[str, X]`, else the annotation."""
    for arg in getattr(annotation, "__args__", ()) or ():
        inner = _inner_model(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


# Union-member tags pydantic adds to error locations besides model names and 'literal[...]'.
UNION_TAGS = {"constrained-int", "int"}


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part[:1].isupper() or "[" in part or part in UNION_TAGS)


def problems_from_validation(error: ValidationError, prefix: tuple[Any, ...], root: type[BaseModel], source: str | None) -> list[Problem]:
    problems: list[Problem] = []
    for item in error.errors(include_url=False):
        # pydantic adds union-member tags (e.g. 'TuningConfig', 'function-after[...]') to locations; drop them.
        loc = prefix + tuple(p for p in item["loc"] if not _is_union_tag(p))
        path = _dotted(loc)
        kind = item["type"]
        if kind == "extra_forbidden":
            owner = _model_at(root, loc)
            valid = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            where = f" in {source}" if source else ""
            message = f"unknown key{where}; {hint}valid keys here: {', '.join(valid)}"
            problems.append(Problem(path=path, message=message))
            continue
        message = item["msg"].removeprefix("Value error, ")
        if kind == "missing":
            message = "required field is missing; add it"
        elif not item["msg"].startswith("Value error"):
            # pydantic's own messages say what is wrong; the field's description says what is expected.
            described = _description_at(root, loc)
            if described:
                message = f"{message}; expected: {described}"
        problems.append(Problem(path=path, value=item.get("input") if kind != "missing" else None, message=message))
    return _one_per_path(problems)


def _one_per_path(problems: list[Problem]) -> list[Problem]:
    """A value a union refused gets one error per member (`int > 0`, `'auto'`): one line per field,
    the members' complaints joined with 'or'."""
    merged: dict[str, Problem] = {}
    for problem in problems:
        first = merged.get(problem.path)
        if first is None:
            merged[problem.path] = problem
            continue
        head, _, expected = problem.message.partition("; expected: ")
        first_head, _, first_expected = first.message.partition("; expected: ")
        tail = f"; expected: {first_expected or expected}" if first_expected or expected else ""
        first.message = f"{first_head}, or {head[:1].lower()}{head[1:]}{tail}"
    return list(merged.values())


# ---------------------------------------------------------------------------------------------
