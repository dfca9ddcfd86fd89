"""The terminal of the long verbs (train, tune, run): Tandem's lines on screen, the libraries' in a log.

Ray forwards every worker's and actor's output to the driver ("(RayTrainWorker pid=N) ..."), and
Ray, Ray Train, DeepSpeed and torch print their own progress and warnings there too; around
Tandem's per-epoch lines that was most of the screen. Inside `quiet_terminal(log_path)`:

- file descriptors 1 and 2 point at the log, so output written below Python (Ray's C++ core,
  a library's C extension) lands there;
- sys.stdout and sys.stderr become a line router: every line goes to the log (colour codes dropped), and a Tandem line
  ("[tandem] ..." once Ray's "(Actor pid=N)" prefix is dropped) goes to the terminal as well;
- `terminal_out` and `terminal_err` stay the real terminal: the CLI's Rich consoles write there,
  and so do Tandem's own warnings (the "tandem.*" loggers, WARNING and above);
- `move_log(folder)` moves the log into the run folder once that exists, and says where it is.

A process without a TTY (`ray job submit`, CI) gets plain lines: Ray's colour codes are dropped.
Leaving the block (an exception included) restores everything first, so a traceback still
reaches the terminal. Imports nothing from Tandem.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

TANDEM_MARK = "[tandem]"
LOG_NAME = "console.log"
# Ray's prefix on forwarded output, with or without colour: "\x1b[36m(TrainController pid=12)\x1b[0m ".
_RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)*\([^)]*\)(?:\x1b\[[0-9;]*m)*\s*")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Terminal(io.TextIOBase):
    """The real terminal stream: the saved one while quiet, else whatever sys.stdout/err is now."""

    def __init__(self, which: str):
        self.which = which
        self.saved: TextIO | None = None

    def _target(self) -> TextIO:
        return self.saved or (sys.stdout if self.which == "out" else sys.stderr)

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return self._target().isatty()


terminal_out = _Terminal("out")
terminal_err = _Terminal("err")
_active: dict[str, object] = {}


def tandem_line(line: str) -> str | None:
    """The line as the terminal shows it when it is one of Tandem's, else None."""
    text = _RAY_PREFIX.sub("", line, count=1)
    if not text.startswith(TANDEM_MARK):
        return None
    return text


class _LineRouter(io.TextIOBase):
    """sys.stdout/sys.stderr while quiet: whole lines to the log, Tandem's also to the terminal."""

    def __init__(self, log: TextIO, terminal: _Terminal):
        self.log, self.terminal, self.pending, self.lock = log, terminal, "", threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                self._route(line)
        return len(text)

    def _route(self, line: str) -> None:
        self.log.write(_ANSI.sub("", line) + "\n")
        shown = tandem_line(line)
        if shown is not None:
            self.terminal.write((shown if self.terminal.isatty() else _ANSI.sub("", shown)) + "\n")
            self.terminal.flush()

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def finish(self) -> None:
        """Route a last line that never got its newline."""
        with self.lock:
            if self.pending:
                self._route(self.pending)
                self.pending = ""
        self.flush()

    def isatty(self) -> bool:
        return False  # libraries that draw progress bars on a TTY write plain lines to the log

    def fileno(self) -> int:
        return self.log.fileno()


@contextlib.contextmanager
def quiet_terminal(log_path: Path, verbose: bool = False) -> Iterator[Path | None]:
    """Route the process's output as the module docstring says; `verbose` leaves it all on screen."""
    if verbose or _active:
        yield None
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed in finally
    saved_streams = sys.stdout, sys.stderr
    terminal_out.saved = open(saved_fds[0], "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    terminal_err.saved = open(saved_fds[1], "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout, sys.stderr = _LineRouter(log, terminal_out), _LineRouter(log, terminal_err)
    _active.update(log=log, path=log_path)
    warnings_handler = logging.StreamHandler(terminal_err)
    warnings_handler.setLevel(logging.WARNING)
    warnings_handler.setFormatter(logging.Formatter(f"{TANDEM_MARK} %(levelname)s %(message)s"))
    logging.getLogger("tandem").addHandler(warnings_handler)
    try:
        with warnings.catch_warnings():
            # A library's warning is for the log (its text still lands there through stderr).
            warnings.showwarning = _warning_to_log
            yield log_path
    finally:
        logging.getLogger("tandem").removeHandler(warnings_handler)
        for router in (sys.stdout, sys.stderr):
            if isinstance(router, _LineRouter):
                router.finish()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for stream in (terminal_out, terminal_err):
            stream.saved.flush()
            stream.saved = None
        for fd in saved_fds:
            os.close(fd)
        log.close()
        _active.clear()


def _warning_to_log(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings' signature
    log = _active.get("log")
    if log is not None:
        log.write(warnings.formatwarning(message, category, filename, lineno, line))


def move_log(folder: Path) -> Path | None:
    """Move the quiet log into `folder` (a run folder, once it exists) and print where it is.

    The open file keeps being written after the rename (same file system: a rename, not a copy);
    outside `quiet_terminal` this does nothing."""
    current = _active.get("path")
    if current is None:
        return None
    target = Path(folder) / LOG_NAME
    count = 1
    while target.exists() and Path(current) != target:  # a resumed run keeps the earlier runs' logs
        count += 1
        target = Path(folder) / f"console-{count}.log"
    if Path(current) != target:
        try:
            os.replace(current, target)
        except OSError:  # another file system: the log stays where it is, still named below
            target = Path(current)
        _active["path"] = target
    print(f"{TANDEM_MARK} log of Ray, DeepSpeed and the workers: {target} (-v shows it here)", flush=True)
    return target
