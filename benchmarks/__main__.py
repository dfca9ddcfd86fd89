"""`python -m benchmarks [NAME [ARGS...]]`: run benchmarks/NAME.py's main(ARGS), or every benchmark
but `reliability` (which `make reliability` runs)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    """Every module of this package; private modules (`_x`) are helpers. Not imported here: they pull in torch, Ray, ..."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def run(name: str, argv: list[str]) -> None:
    choices = available()
    if name not in choices:
        sys.exit(f"no benchmark '{name}'; choose one of: {', '.join(choices)} (or none to run them all)")
    module = importlib.import_module(f"benchmarks.{name}")
    if not hasattr(module, "main"):
        sys.exit(f"benchmarks/{name}.py has no main(argv); add one so `python -m benchmarks {name}` can run it")
    module.main(argv)


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__ + "\nbenchmarks: " + ", ".join(available()))
        return
    if argv:
        run(argv[0], argv[1:])
        return
    # The reliability suite is `make reliability`'s (docs/contributing.md): a test run, not a benchmark.
    for name in [n for n in available() if n != "reliability"]:
        print(f"== benchmarks.{name}", flush=True)
        run(name, [])


if __name__ == "__main__":
    main(sys.argv[1:])
