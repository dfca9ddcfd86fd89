"""What the README shows that is generated: the config reference (from the pydantic models' field
descriptions) and every benchmark's table (from `benchmarks/results/NAME.md`).

`python -m tandem.reference` rewrites the block between the README's reference markers and each
`<!-- results:NAME -->` ... `<!-- /results:NAME -->` block; unit tests keep the README equal to
the models and to the results files, so neither drifts from what the code and the benchmarks
last wrote. A results file's first heading is left out (the README section has its own) and its
other headings go one level down.
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
RESULTS = README.parent / "benchmarks" / "results"


def _entry(name: str, model: BaseModel) -> str:
    """A default entry of a list or dict of models, with the values it sets that differ from the
    per-field defaults listed under it (e.g. the implicit `cpu` node group's 2 CPUs)."""
    changed = [
        f"{key}: {getattr(model, key)!r}"
        for key, field in type(model).model_fields.items()
        if key != "name" and not field.is_required() and getattr(model, key) != field.get_default(call_default_factory=True)
    ]
    return f"`{name}`" + (f" ({', '.join(changed)})" if changed else "")


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return "; ".join(_entry(getattr(v, "name", str(i)), v) for i, v in enumerate(value))
    if isinstance(value, dict) and value and isinstance(next(iter(value.values())), BaseModel):
        return "; ".join(_entry(name, v) for name, v in value.items())
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


def results_markers(name: str) -> tuple[str, str]:
    return f"<!-- results:{name} -->", f"<!-- /results:{name} -->"


def results_names() -> list[str]:
    """Every benchmark that wrote a markdown table."""
    return sorted(p.stem for p in RESULTS.glob("*.md"))


def results_markdown(name: str) -> str:
    """benchmarks/results/NAME.md as the README shows it."""
    lines = (RESULTS / f"{name}.md").read_text().strip().splitlines()
    if lines and lines[0].startswith("#"):
        lines = lines[1:]
    return "\n".join("#" + line if line.startswith("#") else line for line in lines).strip()


def _replace_block(text: str, begin: str, end: str, body: str) -> str:
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + body + "\n" + text[stop:]


def update_readme(path: Path = README) -> bool:
    text = path.read_text()
    new = _replace_block(text, BEGIN, END, config_reference_markdown())
    for name in results_names():
        begin, end = results_markers(name)
        if begin in new:
            new = _replace_block(new, begin, end, results_markdown(name))
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update_readme()
    print("README reference and benchmark tables updated" if changed else "README reference and benchmark tables already current")
    sys.exit(0)
