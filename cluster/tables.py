"""Rich tables that stay readable in a log: `readable(table)` wraps every table Tandem prints.

Rich fits a table to the console by squeezing its columns, and a cell wider than its column ends
in "…": piped into `cat`, `tee` or a CI log (80 columns, no terminal), the export parity table
came out as "mod…", "0.…" in every cell. A person at a terminal can widen the window; a log
cannot be widened afterwards. So, at print time:

- the table fits the console at its natural width: printed as the table it is;
- it does not, on a terminal: printed as the table, as before (rich wraps the cells);
- it does not, anywhere else: one record per row, one "header: value" per line, every value in
  full. A table whose first column has no header (a key/value list such as `tandem run`'s
  summary) prints one "key: value" line per row instead.

Imports nothing from Tandem.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

UNBOUNDED = 10**6  # columns: wide enough for any table's natural width


class Readable:
    """A table that prints as records where, as a table, it would be cut (see the module docstring)."""

    def __init__(self, table: Table):
        self.table = table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[RenderableType]:
        if console.is_terminal or fits(self.table, console, options):
            yield self.table
        else:
            yield from as_records(self.table, console)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table)


def readable(table: Table) -> Readable:
    return Readable(table)


def fits(table: Table, console: Console, options: ConsoleOptions) -> bool:
    """True when the table needs no squeezing: every cell on one line at its full width."""
    unbounded = options.update_width(UNBOUNDED)  # measured within options.max_width, every table would "fit"
    return Measurement.get(console, unbounded, table).maximum <= options.max_width


def as_text(cell: Any, console: Console) -> Text:
    """A cell or header as Text, markup read the way the console reads it when printing the table."""
    if isinstance(cell, Text):
        return cell
    if isinstance(cell, str):
        return console.render_str(cell)
    return Text(str(cell))


def is_key_value(table: Table, console: Console) -> bool:
    """No header names the first column: its cells name the rows."""
    if not table.columns:
        return False
    return not table.show_header or not as_text(table.columns[0].header, console).plain


def rows(table: Table) -> Iterable[list[Any]]:
    columns = [list(column.cells) for column in table.columns]
    return (list(row) for row in zip(*columns, strict=True))


def as_records(table: Table, console: Console) -> Iterator[RenderableType]:
    """The title, then each row: a record of "header: value" lines, or one "key: value" line."""
    if table.title:
        yield Text.assemble(as_text(table.title, console), style="bold")
    headers = [as_text(column.header, console) for column in table.columns]
    key_value = is_key_value(table, console)
    for row in rows(table):
        cells = [as_text(cell, console) for cell in row]
        if key_value:
            yield Text.assemble(cells[0], ": ", Text(", ").join(c for c in cells[1:] if c.plain))
        else:
            yield record(headers, cells)


def record(headers: list[Text], cells: list[Text]) -> Text:
    """'- first: value' then '  next: value' lines, leaving out empty cells (like YAML)."""
    lines = [Text.assemble(header, ": ", cell) for header, cell in zip(headers, cells, strict=True) if cell.plain]
    return Text("\n").join(Text.assemble("- " if i == 0 else "  ", line) for i, line in enumerate(lines))
