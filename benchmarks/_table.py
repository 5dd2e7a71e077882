"""The one result-row format every benchmark prints: metric, ours, baseline, ratio, target, pass."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass
class Row:
    metric: str
    ours: float
    baseline: float | None
    baseline_name: str
    ratio: float
    target: str
    passed: bool | None = None


def print_rows(rows: list[Row], as_json: bool = False, title: str = "") -> None:
    if as_json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("metric", "ours", "baseline", "ratio", "target", "pass"):
        table.add_column(column)
    for row in rows:
        baseline = "—" if row.baseline is None else f"{row.baseline:.4g} ({row.baseline_name})"
        verdict = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "—"}[row.passed]
        table.add_row(row.metric, f"{row.ours:.4g}", baseline, f"{row.ratio:.3g}", row.target, verdict)
    Console().print(table)
