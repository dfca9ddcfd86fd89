"""The config reference in the README, generated from the pydantic models' field descriptions.

`python -m tandem.reference` rewrites the block between the README's reference markers; a unit
test keeps the README equal to the models, so the reference never drifts from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cluster.config import TandemConfig
from cluster.config.problems import _inner_model

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return f"{len(value)} entr{'y' if len(value) == 1 else 'ies'}"
    if isinstance(value, dict) and value and isinstance(next(iter(value.values())), BaseModel):
        return ", ".join(value)
    return f"`{value!r}`" if value not in (None, {}, []) else f"`{value}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        inner = _inner_model(field.annotation)
        is_model = isinstance(inner, type) and issubclass(inner, BaseModel)
        origin = str(field.annotation)
        suffix = "[i]" if is_model and "list[" in origin else ".NAME" if is_model and "dict[" in origin else ""
        rows.append(f"| `{path}{suffix}` | {_default(field)} | {field.description or ''} |")
        if is_model:
            rows += _rows(inner, f"{path}{suffix}")
    return rows


def config_reference_markdown() -> str:
    return "\n".join(["| field | default | meaning |", "|---|---|---|", *_rows(TandemConfig, "")])


def update_readme(path: Path = README) -> bool:
    text = path.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    new = text[:start] + "\n" + config_reference_markdown() + "\n" + text[end:]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update_readme()
    print("README config reference updated" if changed else "README config reference already current")
    sys.exit(0)
