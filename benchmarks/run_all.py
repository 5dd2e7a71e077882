"""The performance suite: every benchmark of issues 3–7, one after the other, in one table.

Each script runs in its own interpreter (``--json``), so peak memory, threads and imports of one never
leak into another, and a crash in one is reported without losing the others. Rows keep the scripts'
own verdicts; ``select`` rows come out of ``deftx.py``, which measures denoising and selection.

    python benchmarks/run_all.py              # XLM-R base shape; ≤ 15 min on 2 quiet cores; exit 1 if a target fails
    python benchmarks/run_all.py --quick      # small shapes (CI): checks that every script runs, not its timings
    python benchmarks/run_all.py --json       # machine-readable; --markdown for RESULTS.md

Exit status: 1 when a script crashed or printed no rows, or (full run only) when a row misses its target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    args: tuple[str, ...] = ()
    quick: bool = True  # also part of --quick


@dataclass
class Outcome:
    name: str
    command: list[str]
    seconds: float
    returncode: int | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


SUITE = (
    Benchmark("deftx", "deftx.py"),
    Benchmark("compose", "compose.py"),
    Benchmark("train_memory (language)", "train_memory.py", ("--mode", "language")),
    # The task-mode rows repeat the language-mode check on another head; CI's two minutes cannot hold both.
    Benchmark("train_memory (task)", "train_memory.py", ("--mode", "task"), quick=False),
    Benchmark("overlap", "overlap.py"),
    Benchmark("registry", "registry.py"),
)
TIMEOUT_SECONDS = {False: 900, True: 300}


def parse_rows(stdout: str) -> list[dict[str, Any]]:
    """The JSON list of rows a script printed with ``--json`` (libraries may print lines before it)."""
    start = stdout.find("[\n")
    if start < 0:
        raise ValueError("no JSON rows in the output")
    rows, _ = json.JSONDecoder().raw_decode(stdout[start:])
    if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) and "metric" in row for row in rows):
        raise ValueError("the JSON output is not a non-empty list of rows")
    return rows


def benchmark_of(outcome_name: str, row: dict[str, Any]) -> str:
    """deftx.py measures two things: the ``select`` rows are their own benchmark (issue 3)."""
    if outcome_name == "deftx" and row["metric"].lstrip().startswith("select"):
        return "select"
    return outcome_name


def run_one(benchmark: Benchmark, quick: bool) -> Outcome:
    command = [sys.executable, str(HERE / benchmark.script), *benchmark.args, "--json", *(["--quick"] if quick else [])]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=HERE.parent, timeout=TIMEOUT_SECONDS[quick], check=False
        )
    except subprocess.TimeoutExpired:
        seconds = time.perf_counter() - started
        return Outcome(benchmark.name, command, seconds, None, error=f"timed out after {seconds:.0f} s")
    seconds = time.perf_counter() - started
    outcome = Outcome(benchmark.name, command, seconds, done.returncode)
    try:
        outcome.rows = [{"benchmark": benchmark_of(benchmark.name, row), **row} for row in parse_rows(done.stdout)]
    except ValueError as exc:
        outcome.error = f"{exc} (exit {done.returncode}): {done.stderr.strip()[-1500:]}"
    return outcome


def failures(outcomes: list[Outcome], quick: bool) -> list[str]:
    """What makes the suite fail: crashes always; missed targets only at full size."""
    problems = [f"{o.name}: {o.error}" for o in outcomes if o.error]
    if not quick:
        problems += [f"{r['benchmark']}: {r['metric']}" for o in outcomes for r in o.rows if r.get("passed") is False]
    return problems


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _verdict(passed: bool | None, quick: bool) -> str:
    """Quick shapes are too small for the targets: their verdicts are shown in brackets, as no verdict."""
    verdict = {True: "pass", False: "FAIL", None: "—"}[passed]
    return f"({verdict.lower()})" if quick and passed is not None else verdict


def table_rows(outcomes: list[Outcome], quick: bool) -> list[list[str]]:
    rows = []
    for outcome in outcomes:
        if outcome.error:
            rows.append([outcome.name, "CRASHED (see stderr)", "—", "—", "—", "—", "FAIL"])
        for row in outcome.rows:
            baseline = _number(row["baseline"])
            if row["baseline"] is not None and row.get("baseline_name"):
                baseline += f" ({row['baseline_name']})"
            cells = [row["benchmark"], row["metric"].strip(), _number(row["ours"]), baseline]
            rows.append([*cells, f"{row['ratio']:.3g}", row["target"], _verdict(row.get("passed"), quick)])
    return rows


HEADER = ["benchmark", "metric", "ours", "baseline", "ratio", "target", "pass"]


def print_table(outcomes: list[Outcome], title: str, quick: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in HEADER:
        table.add_column(column)
    colours = {"pass": "[green]pass[/green]", "FAIL": "[red]FAIL[/red]"}
    for row in table_rows(outcomes, quick):
        table.add_row(*row[:-1], colours.get(row[-1], row[-1]))
    Console(width=200).print(table)


def print_markdown(outcomes: list[Outcome], title: str, quick: bool) -> None:
    print(f"{title}\n")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in table_rows(outcomes, quick):
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")


def machine_note() -> str:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, ≤ 2 min (CI): checks the scripts run")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the outcome as JSON")
    output.add_argument("--markdown", action="store_true", help="print the table as Markdown (for RESULTS.md)")
    args = parser.parse_args(argv)

    before, started = machine_note(), time.perf_counter()
    outcomes = []
    for benchmark in SUITE:
        if benchmark.quick or not args.quick:
            outcomes.append(run_one(benchmark, args.quick))
            status = outcomes[-1].error or f"{len(outcomes[-1].rows)} rows"
            print(f"{benchmark.name}: {outcomes[-1].seconds:.1f} s, {status}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - started
    problems = failures(outcomes, args.quick)
    shape = "quick shapes: targets are for the full shape, only crashes fail" if args.quick else "XLM-R base shape"
    title = f"sftkit performance suite ({shape}); {wall:.0f} s wall; before: {before}; after: {machine_note()}"
    if args.json:
        document = {
            "quick": args.quick,
            "title": title,
            "wall_seconds": wall,
            "benchmarks": [{k: v for k, v in asdict(o).items() if k != "rows"} for o in outcomes],
            "rows": [row for o in outcomes for row in o.rows],
            "failures": problems,
        }
        print(json.dumps(document, indent=2))
    elif args.markdown:
        print_markdown(outcomes, title, args.quick)
    else:
        print_table(outcomes, title, args.quick)
    for problem in problems:
        print(f"FAILED {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
