"""``sftkit overlap``: which parameter entries SFTs share (paper Figs. 2–3), as tables, JSON or a plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sftkit.cli.context import activity, console, err_console, load_sft, print_json, state
from sftkit.errors import BadInputError

if TYPE_CHECKING:
    from rich.table import Table

    from sftkit.overlap import Labelled, MethodComparison, OverlapMatrix, PairOverlap

EXAMPLES = """
[b]Examples[/b]

  sftkit overlap ace nli                   [dim]# one pair: totals[/dim]
  sftkit overlap ace nli --by module       [dim]# … per module (or --by layer)[/dim]
  sftkit overlap ace ban bjn mad min --plot fig3.png     [dim]# matrix (Fig. 3)[/dim]
  sftkit overlap ace@dx ace@lt ban@dx ban@lt -t nli@dx -t nli@lt --plot f2.png
                                 [dim]# language vs task SFT, per method (Fig. 2)[/dim]
  sftkit overlap ace nli --json | jq .pairs[0].total.overlap

[b]Definitions[/b]  A, B = tuned entries of the sparse encoder deltas (heads ignored)

  overlap % = shared / min(|A|, |B|)      Jaccard = shared / |A ∪ B|
  % of A = shared / |A|                   % of B = shared / |B|
  sign agreement = shared entries with sign(φ_A) = sign(φ_B), in %
  |A|/|B| = mean |φ_A| / mean |φ_B| over the shared entries

JSON: schema "sftkit.overlap/1", documented in docs/overlap.md.
"""

# (key, short header for breakdown tables, long name, definition) — shared by both pair layouts.
_STATISTICS = (
    ("entries_a", "|A|", "entries of A", ""),
    ("entries_b", "|B|", "entries of B", ""),
    ("shared", "shared", "shared entries", "|A ∩ B|"),
    ("frac_of_a", "%A", "% of A", "shared / |A|"),
    ("frac_of_b", "%B", "% of B", "shared / |B|"),
    ("jaccard", "Jacc%", "Jaccard %", "shared / |A ∪ B|"),
    ("overlap", "ovl%", "overlap %", "shared / min(|A|, |B|)"),
    ("sign_agreement", "sign%", "sign agreement %", "shared entries with sign(φ_A) = sign(φ_B)"),
    ("abs_ratio", "|φA|/|φB|", "mean |φ| ratio", "mean |φ_A| / mean |φ_B| on shared entries"),
)


def overlap_command(
    ctx: typer.Context,
    references: Annotated[
        list[str] | None,
        typer.Argument(help="SFT references or directories: 2 for a pair, 3+ for a matrix, 1+ with --task."),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            "-t",
            help="Task SFT to compare every language SFT with, matched by training method; repeat once per "
            "method (Fig. 2).",
        ),
    ] = None,
    by: Annotated[str | None, typer.Option("--by", help="Break down per 'layer' or per 'module'.")] = None,
    stat: Annotated[
        str,
        typer.Option(
            "--stat",
            help="Statistic of matrices, Fig. 2 tables and plots: overlap, jaccard, frac_of_a, frac_of_b, shared, "
            "sign_agreement, abs_ratio.",
        ),
    ] = "overlap",
    json_output: Annotated[bool, typer.Option("--json", help="Print the sftkit.overlap/1 JSON document.")] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Write a figure (PNG, SVG, PDF): heatmap for a matrix, bars for a pair or for --task."
        ),
    ] = None,
) -> None:
    """How many parameter entries SFTs both change: [b]overlap % = shared / min(|A|, |B|)[/b].

    Only the sparse encoder deltas count (dense head tensors are ignored); statistics come from the sorted \
index arrays, no model is loaded. SFTs trained on different base models are refused.
    """
    from sftkit import overlap, plots

    refs, task_refs = list(references or []), list(task or [])
    overlap.check_grouping(by)
    if stat not in overlap.STATISTICS:
        raise BadInputError(f"unknown --stat {stat!r}; choose one of {', '.join(overlap.STATISTICS)}")
    if task_refs and not refs:
        raise BadInputError(
            "--task needs at least one language SFT to compare with, e.g. sftkit overlap ace --task nli"
        )
    if not task_refs and len(refs) < 2:
        raise BadInputError(f"overlap needs at least 2 SFT references, got {len(refs)} (e.g. sftkit overlap ace nli)")
    if plot is not None:
        plots.check_path(plot)

    st = state(ctx)
    with activity(ctx, "loading SFTs"):
        subjects = [_load(ctx, ref) for ref in refs]
        task_subjects = [_load(ctx, ref) for ref in task_refs]

    if task_subjects:
        comparison = overlap.overlap_by_method(_method_triples(subjects, task_subjects))
        document = comparison.to_json(by)
        if plot is not None:
            plots.plot_methods(comparison, plot, stat)
        if not json_output:
            _show_methods(comparison, by, stat)
    else:
        matrix = overlap.overlap_matrix(subjects)
        document = matrix.to_json(by)
        if plot is not None:
            if len(subjects) == 2:
                label = f"{matrix.labels[0]} vs {matrix.labels[1]}"
                plots.plot_breakdown(matrix.pair(0, 1), plot, by or "layer", stat, label=label)
            else:
                plots.plot_matrix(matrix, plot, stat)
        if not json_output:
            _show_pair(matrix, by) if len(subjects) == 2 else _show_matrix(matrix, by, stat)
    if json_output:
        print_json(document)
    if plot is not None and not st.quiet:
        err_console.print(f"[green]plot[/green] → {plot}", highlight=False)


def _load(ctx: typer.Context, reference: str) -> Labelled:
    from sftkit.overlap import Labelled

    record, sft = load_sft(ctx, reference)
    label = Path(reference).name if Path(reference).is_dir() else reference  # short names in tables and plots
    return Labelled(sft, label or reference, record.reference)


def _method_triples(languages: list[Labelled], tasks: list[Labelled]) -> list[tuple[Labelled, Labelled, str]]:
    """Pair each language SFT with the one --task SFT trained by the same method."""
    by_method: dict[str, Labelled] = {}
    for item in tasks:
        method = item.sft.metadata.method
        if item.sft.metadata.kind != "task":
            raise BadInputError(f"--task {item.label} is a {item.sft.metadata.kind} SFT, not a task SFT")
        if method in by_method:
            raise BadInputError(
                f"--task {by_method[method].label} and --task {item.label} both use method {method!r}; "
                "give one task SFT per method"
            )
        by_method[method] = item
    triples = []
    for item in languages:
        meta = item.sft.metadata
        if meta.kind != "language":
            raise BadInputError(f"{item.label} is a {meta.kind} SFT; with --task give language SFTs")
        if meta.method not in by_method:
            raise BadInputError(
                f"{item.label} was trained with {meta.method!r} but no --task SFT was "
                f"(methods given: {', '.join(sorted(by_method))})"
            )
        triples.append((item, by_method[meta.method], meta.method))
    return triples


# ------------------------------------------------------------------------------------------ rendering
def _table(first: str, columns: list[str], show_header: bool = True) -> Table:
    """A compact table: first column left-aligned, the others right-aligned numbers."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_header=show_header)
    table.add_column(first)
    for column in columns:
        table.add_column(column, justify="right")
    return table


def _show_pair(matrix: OverlapMatrix, by: str | None) -> None:
    """Totals as one statistic per line with its definition; with --by, one row per group."""
    from sftkit.plots import format_value

    pair = matrix.pair(0, 1)
    for side, item in zip("AB", matrix.items, strict=True):
        shown = f" ({item.reference})" if item.reference not in (None, item.label) else ""
        console.print(f"[b]{side}[/b] = {item.label}{shown}", highlight=False)
    if by:
        table = _table(by, [header for _, header, _, _ in _STATISTICS])
        for group, counts in pair.by(by):
            table.add_row(group, *(format_value(getattr(counts, key), key) for key, *_ in _STATISTICS))
        table.add_section()
        table.add_row("total", *(format_value(getattr(pair.total, key), key) for key, *_ in _STATISTICS))
    else:
        table = _table("statistic", ["value"], show_header=False)
        table.add_column("definition", style="dim")
        for key, _, name, definition in _STATISTICS:
            table.add_row(name, format_value(getattr(pair.total, key), key), definition)
    console.print(table)
    console.print("[dim]sparse encoder deltas only (dense heads ignored)[/dim]")


def _show_matrix(matrix: OverlapMatrix, by: str | None, stat: str) -> None:
    from sftkit.plots import TITLES, format_value

    console.print(f"[b]{TITLES[stat]}[/b] (row = A, column = B)", highlight=False)
    table = _table("A \\ B", ["entries", *matrix.labels])
    for item, row in zip(matrix.items, matrix.matrix(stat), strict=True):
        table.add_row(item.label, f"{item.sft.num_entries:,}", *(format_value(value, stat) for value in row))
    console.print(table)
    console.print("[dim]sparse encoder deltas only (dense heads ignored)[/dim]")
    if by:
        columns = {f"{matrix.labels[i]}–{matrix.labels[j]}": pair for (i, j), pair in matrix.pairs.items()}
        _show_groups(columns, by, stat)


def _show_methods(comparison: MethodComparison, by: str | None, stat: str) -> None:
    from sftkit.plots import TITLES, format_value

    console.print(f"[b]language vs task SFT: {TITLES[stat]}[/b]", highlight=False)
    table = _table("language", comparison.methods)
    columns = comparison.table(stat)
    for i, language in enumerate(comparison.languages):
        table.add_row(language, *(format_value(columns[method][i], stat) for method in comparison.methods))
    console.print(table)
    if by:
        _show_groups({f"{row.language}/{row.method}": row.overlap for row in comparison.rows}, by, stat)


def _show_groups(columns: dict[str, PairOverlap], by: str, stat: str) -> None:
    """One statistic per group (rows) and pair (columns)."""
    from sftkit.overlap import group_sort_key
    from sftkit.plots import TITLES, format_value

    cells = {name: dict(pair.by(by)) for name, pair in columns.items()}
    groups = sorted({group for groups in cells.values() for group in groups}, key=group_sort_key(by))
    console.print(f"[b]{TITLES[stat]} by {by}[/b]", highlight=False)
    table = _table(by, list(columns))
    for group in groups:
        values = [cells[name][group].statistic(stat) if group in cells[name] else None for name in columns]
        table.add_row(group, *(format_value(value, stat) for value in values))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("overlap", epilog=EXAMPLES, rich_help_panel="Inspect")(overlap_command)
