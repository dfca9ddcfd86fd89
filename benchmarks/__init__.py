"""Tandem's performance suite: one module per arm group, each with `main(argv) -> dict`.

`python -m benchmarks NAME [ARGS...]` runs benchmarks/NAME.py; `python -m benchmarks` runs them
all. Every benchmark prints JSON and writes `benchmarks/results/NAME.{json,md,png}`; none is a test.
"""
