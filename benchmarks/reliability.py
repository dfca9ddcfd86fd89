"""Reliability report: rerun every `reliability`-marked test and write RELIABILITY.md from its figures.

The tests (tests/reliability/, plus any test marked `reliability`) inject faults, fuzz the config
loader, the CLI and the HTTP API, overload and soak the endpoint and tamper with artifacts; each
records what it injected and measured through tests/reliability/figures.py. This script runs them
with TANDEM_RELIABILITY_OUT pointing at a scratch folder, pairs every figure set with its test's
outcome (from pytest's JUnit XML), and writes:
- RELIABILITY.md at the repository root (the table users read), and
- benchmarks/results/reliability.json (the raw figures).

Run: `python -m benchmarks reliability` (about 15-25 minutes on 2 cores), or with `-k EXPR` to
rerun a subset; a subset updates only its own rows and keeps the others' last figures. A test run
made some other way (the whole suite, say) can be reported without rerunning it: run pytest with
TANDEM_RELIABILITY_OUT=DIR/figures and --junitxml=DIR/junit.xml, then `--collect DIR`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results") / "reliability.json"
REPORT = ROOT / "RELIABILITY.md"


def run_tests(out: Path, keyword: str | None) -> tuple[int, dict[str, str]]:
    """Run pytest -m reliability with the figures folder set; return its exit code and outcome per node id."""
    junit = out / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-m", "reliability", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if keyword:
        command += ["-k", keyword]
    env = {**os.environ, "TANDEM_RELIABILITY_OUT": str(out / "figures")}
    print("running:", " ".join(command[2:]), flush=True)
    code = subprocess.call(command, cwd=ROOT, env=env)
    return code, outcomes(junit) if junit.exists() else {}


def outcomes(junit: Path) -> dict[str, str]:
    """Node id -> passed / failed / skipped / xfailed, read from pytest's JUnit XML."""
    found: dict[str, str] = {}
    for case in ET.parse(junit).iter("testcase"):
        module, name = case.get("classname", ""), case.get("name", "")
        node = module.replace(".", "/") + ".py::" + name
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                status = "xfailed" if "xfail" in (child.get("type", "") + child.get("message", "")) else "skipped"
        found[node] = status
    return found


def collect(figures_dir: Path, status: dict[str, str]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(figures_dir.glob("*.json")) if figures_dir.exists() else []:
        entry = json.loads(path.read_text())
        test = entry.get("test", "")
        # A parametrized id (test_x[a]) and a class (Class::test) both map back to the XML's names.
        rows[path.stem] = {"test": test, "status": status.get(test, "unknown"), "figures": entry.get("figures", {})}
    return rows


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def render(rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Reliability",
        "",
        "Faults injected and survived, fuzz cases tried, overload and soak figures, artifact tampering refused.",
        "Produced by `python -m benchmarks reliability`, which reruns every test marked `reliability`",
        "(tests/reliability/ and the fuzz tests) and records what each one injected and measured;",
        "do not edit by hand. Every row is a real run: real Ray Train + DeepSpeed, real Ray Serve over HTTP.",
        "",
        f"Last run: {meta['date']} on {meta['machine']}; pytest exit code {meta['exit_code']} (0: every test passed).",
        "",
        "| Check | Test | Result | Figures |",
        "|---|---|---|---|",
    ]
    for name, row in sorted(rows.items()):
        figures = "; ".join(f"{k}: {format_value(v)}" for k, v in sorted(row["figures"].items()))
        lines.append(f"| {name} | `{row['test']}` | {row['status']} | {figures.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks reliability", description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="keyword", help="rerun only the tests matching this pytest -k expression")
    parser.add_argument(
        "--collect", type=Path, metavar="DIR", help="report an earlier run's DIR/figures and DIR/junit.xml instead of rerunning"
    )
    args = parser.parse_args(argv)
    if args.collect:
        junit = args.collect / "junit.xml"
        status = outcomes(junit) if junit.exists() else {}
        code = 1 if "failed" in status.values() else 0
        fresh = collect(args.collect / "figures", status)
    else:
        with tempfile.TemporaryDirectory(prefix="tandem-reliability-") as scratch:
            out = Path(scratch)
            code, status = run_tests(out, args.keyword)
            fresh = collect(out / "figures", status)
    previous = json.loads(RESULTS.read_text()).get("rows", {}) if RESULTS.exists() and args.keyword else {}
    rows = {**previous, **fresh}
    meta = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(), "exit_code": code}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, sort_keys=True) + "\n")
    REPORT.write_text(render(rows, meta))
    print(f"wrote {REPORT.relative_to(ROOT)} ({len(rows)} rows) and {RESULTS.relative_to(ROOT)}")
    if code not in (0, 5):
        sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
