"""Registry commands: ``list``, ``show``, ``tag``, ``rm``, ``verify``, ``gc``, ``cache`` and
``db upgrade|status|migrate-artifacts``.

None of them imports torch: densities come from the safetensors header (``sftkit.artifact``, ``sftkit.density``).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sftkit.cli.context import activity, console, err_console, print_json, progress, resolve, state
from sftkit.errors import BadInputError
from sftkit.registry.query import SORT_KEYS

if TYPE_CHECKING:
    from rich.table import Table

    from sftkit.registry import SFTRecord

PANEL = "Registry"

LIST_EXAMPLES = """
[b]Examples[/b]

  sftkit list                              [dim]# everything, newest first[/dim]
  sftkit list --kind task --task sa        [dim]# all versions of the SA task SFT[/dim]
  sftkit list --lang ace --sort version --asc
  sftkit list --tag paper --json | jq '.[].path'
"""

SHOW_EXAMPLES = """
[b]References[/b]  ace · sa · lang:ace · task:nli · lang:ace@3 · ace@latest · ace@best · sha256:1a2b3c · ./dir

[b]Examples[/b]

  sftkit show ace                          [dim]# newest language SFT for ace[/dim]
  sftkit show task:sa@2 --json
"""

TAG_EXAMPLES = """
A tag is an alias: within one language/task and base model it names exactly one version, so tagging
another version moves it. [b]Examples[/b]

  sftkit tag lang:ace@3 best               [dim]# then: sftkit compose --lang ace@best …[/dim]
  sftkit tag ace@3 best --remove
"""

RM_EXAMPLES = """
Removing an SFT that a task SFT names as its source is refused unless [b]--force[/b] (the task SFT keeps
the source's reference as text). Version numbers are never reused.

  sftkit rm lang:ace@2
"""

MAINTENANCE = """
[b]verify[/b] re-hashes every artifact where it is kept, remote ones included (exit 1 if any is missing or
changed); [b]gc[/b] deletes artifacts no row references (left by interrupted adds and removals) once they are
older than [b]--grace[/b] (default 24h: an add on another machine may still be uploading); [b]db upgrade[/b]
migrates the schema.
"""

CACHE_HELP = """
Remote artifacts (--artifact-url s3://…) are read through [b]$SFTKIT_HOME/cache[/b]: downloaded once, verified
by their sha256, then reused. [b]--prune[/b] evicts the least recently used ones beyond [b]--max-size[/b].

  sftkit cache                             [dim]# what is cached[/dim]
  sftkit cache --prune --max-size 5G
"""

MIGRATE_HELP = """
[b]migrate-artifacts[/b] copies every artifact to the new location, verifying each copy by its sha256, then
records the new location in the registry: every machine that opens it uses it from then on. Interrupted, it
resumes where it stopped (copies already there and intact are kept). The old copies stay where they were.
[b]migrate-rows[/b] copies the rows into an empty database. A laptop's registry becomes a team's:

  sftkit db migrate-artifacts --to s3://team-bucket/sftkit
  sftkit db migrate-rows --to postgresql://sftkit@db.example.org/sftkit
"""

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

_SORTS = ", ".join(SORT_KEYS)


# ---------------------------------------------------------------------------------------------- formatting
def _count(value: float | int | None) -> str:
    if value is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:g}"


def _bytes(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _quantity(text: str, units: dict[str, int], what: str, example: str) -> float:
    """``90`` / ``30m`` / ``24h`` (durations) or ``500M`` / ``10G`` (sizes) as a number of base units."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]?)[bB]?\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in units:
        raise BadInputError(f"{text!r} is not a {what} (e.g. {example})")
    return float(match.group(1)) * units[unit]


def _percent(fraction: float | None) -> str:
    if fraction is None or math.isnan(fraction):
        return "–"
    return f"{100 * fraction:.3g}%"


def _value(value: Any) -> str:
    """Compact text for a table cell, with rich markup characters escaped."""
    from rich.markup import escape

    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{escape(str(key))}={_value(item)}" for key, item in value.items()) or "–"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(item) for item in value) or "–"
    return escape(str(value))


def _table(*columns: str, title: str | None = None) -> Table:
    from rich.table import Table

    table = Table(*columns, title=title, title_justify="left", title_style="bold", header_style="bold")
    return table


def _short_base(base: str | None) -> str | None:
    """A base's last path component or repo name: full local paths leave 80 columns no room for the rest."""
    from pathlib import PurePath

    return (PurePath(base).name or base) if base else base


def _records_table(records: list[SFTRecord], wide: bool) -> Table:
    from rich import box

    table = _table("reference", "base", "method", "rank", "entries", "density", "tags", "created")
    # Rules and padding take a third of 80 columns with eight columns: one space between them keeps
    # a typical row (lang:ace@12, multilingual-e5-small, 90var …) on one line.
    table.box, table.show_edge, table.padding = box.SIMPLE_HEAD, False, (0, 0)
    table.columns[0].no_wrap = table.columns[7].no_wrap = True
    table.columns[1].no_wrap = not wide
    table.columns[1].overflow = "fold"  # a full base (--wide) wraps rather than losing its end
    for record in records:
        table.add_row(
            f"[bold]{record.reference}[/bold]",
            _value(record.base_model if wide else _short_base(record.base_model)),
            _value(record.method),
            _value(record.rank),
            _count(record.num_entries),
            _percent(record.density),
            ", ".join(record.tags) or "",
            f"{record.created:%Y-%m-%d}" if record.created else "–",
        )
    return table


# ---------------------------------------------------------------------------------------------- commands
def list_command(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Option(help="language (or lang) | task")] = None,
    lang: Annotated[str | None, typer.Option("--lang", help="Language code.")] = None,
    task: Annotated[str | None, typer.Option(help="Task name.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model.")] = None,
    method: Annotated[str | None, typer.Option(help="deftx | lt-sft")] = None,
    tag: Annotated[str | None, typer.Option(help="Only SFTs with this tag.")] = None,
    sort: Annotated[str, typer.Option(help=f"One of: {_SORTS}.")] = "created",
    ascending: Annotated[bool, typer.Option("--asc", help="Ascending order (default: descending).")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many rows.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON array of records.")] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Full base models (default: the last part of a path or Hub id).")
    ] = False,
) -> None:
    """List registered SFTs, newest first."""
    registry = state(ctx).listing()
    records = registry.find(
        kind=kind,
        language=lang,
        task=task,
        base_model=base,
        method=method,
        tag=tag,
        sort=sort,
        descending=not ascending,
        limit=limit,
    )
    if json_output:
        print_json([record.to_dict() for record in records])
    elif not records:
        filtered = any(v is not None for v in (kind, lang, task, base, method, tag))
        console.print(
            "No SFT matches these filters."
            if filtered
            else f"The registry ({_value(registry.url)}) is empty: `sftkit train …` or `sftkit import DIR` fills it."
        )
    else:
        console.print(_records_table(records, wide))


def _schedule(trainer: dict[str, Any]) -> str | None:
    """Steps per phase, batch × accumulation and precision, as the trainer recorded them."""
    if "batch_size" not in trainer:
        return None  # imported, or trained by an sftkit that did not record it
    batch = f"batch {trainer['batch_size']} × {trainer.get('grad_accum', 1)} micro-batches"
    steps = trainer.get("steps_per_phase")
    phases = "per phase" if trainer.get("sparse_phase", True) else "in phase 1 only"
    return f"{steps} {phases}, {batch}, {trainer.get('precision', 'fp32')}" if steps else batch


def _phase_metrics(metrics: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, Table]]]:
    """Split a trainer's metrics into plain values and one table per phase (its best and last evaluation).

    A phase summary is ``{steps, best_step, <best metric>, history: [{step, …}]}``; printed inline it is
    one unreadable line, so each becomes rows ``best`` and ``last`` under the metric names.
    """
    plain: dict[str, Any] = {}
    tables = []
    for phase, summary in metrics.items():
        history = summary.get("history") if isinstance(summary, dict) else None
        if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
            plain[phase] = summary
            continue
        best_metric = next((key for key in summary if key not in ("steps", "best_step", "history")), None)
        heading = f"[bold]{phase} phase[/bold] · {summary.get('steps', '?')} steps"
        if best_metric is not None and summary.get("best_step") is not None:
            heading += f" · best {best_metric} {_value(summary[best_metric])} at step {summary['best_step']}"
        columns = list(dict.fromkeys(key for entry in history for key in entry if key != "step"))
        table = _table("", "step", *columns)
        best = next((entry for entry in history if entry.get("step") == summary.get("best_step")), None)
        for label, entry in (("best", best), ("last", history[-1] if history else None)):
            if entry is not None:
                table.add_row(label, _value(entry.get("step")), *(_value(entry.get(column)) for column in columns))
        tables.append((heading, table))
    return plain, tables


def show_command(
    ctx: typer.Context,
    reference: Annotated[str, typer.Argument(help="SFT reference or directory.", show_default=False)],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON record with all metadata.")] = False,
) -> None:
    """Metadata, lineage, density per layer and module, and the per-matrix rank report of one SFT."""
    from sftkit.artifact import read_weights_summary
    from sftkit.density import density_by_layer, density_by_module

    registry = state(ctx).registry()
    record = resolve(ctx, reference)
    registry.local_copy(record)  # a remote artifact: fetched once into this machine's cache, verified
    config = record.config()
    registered = record.id is not None
    lineage = registry.lineage(record)[1:] if registered else []
    dependents = registry.dependents(record) if registered else []
    sources = (
        registry.sources(record)
        if registered
        else [str(lineage.get("reference") or lineage.get("language")) for lineage in config.get("source_sfts") or []]
    )
    by_layer, by_module = density_by_layer(record.path), density_by_module(record.path)
    heads = read_weights_summary(record.path).full_tensors
    trainer = config.get("trainer") or {}

    if json_output:
        data = record.to_dict()
        data["config"] = config
        data["lineage"] = [r.reference for r in lineage]
        data["dependents"] = [r.reference for r in dependents]
        data["sources"] = sources
        data["density_by_layer"] = [row.to_dict() for row in by_layer]
        data["density_by_module"] = [row.to_dict() for row in by_module]
        print_json(data)
        return

    metrics, phase_tables = _phase_metrics(record.metrics or {})
    about = _table("", "", title=record.reference)
    about.show_header = False
    about.columns[1].overflow = "fold"  # full paths and hashes, to copy
    rows = [
        ("kind", record.kind),
        ("language" if record.kind == "language" else "task", record.name),
        ("version", record.version if registered else "– (not registered)"),
        ("tags", ", ".join(record.tags) or "–"),
        ("base model", " @ ".join(filter(None, [record.base_model, record.base_revision])) or None),
        ("base fingerprint", record.base_fingerprint),
        ("method", record.method),
        ("rank", record.rank),
        ("keep", record.keep),
        ("k", _count(record.k)),
        ("entries", f"{record.num_entries:,}"),
        ("density", _percent(record.density)),
        ("variant", trainer.get("variant") or ("standard (both phases)" if "sparse_phase" in trainer else None)),
        ("steps", _schedule(trainer)),
        ("labels", config.get("labels")),
        ("head", config.get("head_type")),
        ("dense tensors", f"{len(heads)} ({sum(math.prod(shape) for shape in heads.values()):,} entries)"),
        ("metrics", metrics or None),
        ("trainer", record.trainer),
        ("data", config.get("data")),
        ("size", _bytes(record.size_bytes)),
        ("sha256", record.sha256),
        ("created", f"{record.created:%Y-%m-%d %H:%M:%S %Z}" if record.created else None),
        ("sftkit version", config.get("sftkit_version")),
    ]
    if record.location is not None and record.location != str(record.path):  # a remote artifact
        rows += [("bytes at", record.location), ("local copy", str(record.path))]
    else:
        rows.append(("path", str(record.path)))
    for key, value in rows:
        about.add_row(f"[bold]{key}[/bold]", _value(value))
    console.print(about)
    for heading, table in phase_tables:
        console.print(heading, highlight=False, soft_wrap=True)
        console.print(table)

    if sources:
        console.print(f"[bold]trained on sources[/bold]  {', '.join(sources)}", soft_wrap=True)
    chain = " ← ".join([record.reference, *(r.reference for r in lineage)])
    if record.source_reference and not lineage:
        chain += f" ← {record.source_reference} (not in this registry)"
    console.print(f"[bold]lineage[/bold]  {_value(chain)}", soft_wrap=True)
    if dependents:
        console.print(f"[bold]source of[/bold]  {', '.join(r.reference for r in dependents)}")

    for title, density_rows in (("density per layer", by_layer), ("density per module", by_module)):
        table = _table("group", "entries", "of", "density", title=title)
        for row in density_rows:
            table.add_row(row.group, f"{row.entries:,}", f"{row.size:,}", _percent(row.density))
        console.print(table)

    report = config.get("rank_report") or []
    if report:
        columns = list(dict.fromkeys(key for entry in report for key in entry))
        table = _table(*columns, title="rank report (per matrix)")
        for entry in report:
            table.add_row(*(_value(entry.get(column)) for column in columns))
        console.print(table)
    else:
        console.print("[dim]no rank report (an LT-SFT, or trained without denoising)[/dim]")


def tag_command(
    ctx: typer.Context,
    reference: Annotated[str, typer.Argument(help="SFT reference.", show_default=False)],
    alias: Annotated[str, typer.Argument(help="Tag, e.g. best or paper.", show_default=False)],
    remove: Annotated[bool, typer.Option("--remove", "-d", help="Remove the tag instead.")] = False,
) -> None:
    """Tag a version (tags are aliases: `ace@best`), or remove a tag with --remove."""
    from sftkit.errors import NotFoundError
    from sftkit.registry.records import canonical_reference

    registry = state(ctx).registry()
    if remove:
        record = registry.untag(reference, alias)
        console.print(f"removed tag [bold]{alias}[/bold] from [bold]{record.reference}[/bold]")
        return
    target = resolve(ctx, reference)
    try:
        series_alias = canonical_reference(target.kind, target.name, None) + f"@{alias}"
        previous = registry.resolve(series_alias, base_model=target.base_model)
    except NotFoundError:
        previous = None
    record = registry.tag(target, alias)
    moved = f" (moved from {previous.reference})" if previous is not None and previous.id != record.id else ""
    console.print(f"tagged [bold]{record.reference}[/bold] as [bold]{alias}[/bold]{moved}")


def rm_command(
    ctx: typer.Context,
    reference: Annotated[str, typer.Argument(help="SFT reference.", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Also when other SFTs name it as their source.")] = False,
) -> None:
    """Remove one SFT version and its artifact."""
    record = state(ctx).registry().remove(reference, force=force)
    console.print(f"removed [bold]{record.reference}[/bold] (sha256:{record.short_sha}, {_bytes(record.size_bytes)})")


def verify_command(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print the problems as JSON.")] = False,
) -> None:
    """Re-hash every stored artifact; exit 1 if any is missing, incomplete or changed."""
    registry = state(ctx).registry()
    with progress(ctx) as bar:
        task = bar.add_task("verifying", total=None)
        problems = registry.verify(progress=lambda done, total: bar.update(task, completed=done, total=total))
    if json_output:
        print_json([problem.to_dict() for problem in problems])
    elif problems:
        table = _table("reference", "problem", "location", title=f"{len(problems)} damaged artifact(s)")
        for problem in problems:
            table.add_row(problem.reference, problem.problem, _value(problem.location))
        err_console.print(table)
        err_console.print("Re-add damaged SFTs from their source directories, or remove them (`sftkit rm`).")
    else:
        console.print("[green]all artifacts verified[/green]")
    if problems:
        raise typer.Exit(1)


def gc_command(
    ctx: typer.Context,
    grace: Annotated[
        str, typer.Option(help="Keep what is younger than this (90s, 30m, 24h, 2d): uploads still in flight.")
    ] = "24h",
) -> None:
    """Delete artifacts that no registered SFT references, once older than the grace period."""
    seconds = _quantity(grace, _UNITS, "duration", "90s, 30m, 24h, 2d")
    removed = state(ctx).registry().gc(grace_seconds=seconds)
    for path in removed:
        console.print(f"removed {path}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"{len(removed)} unreferenced store entr{'y' if len(removed) == 1 else 'ies'} removed")


def cache_command(
    ctx: typer.Context,
    prune: Annotated[bool, typer.Option("--prune", help="Evict the least recently used beyond --max-size.")] = False,
    max_size: Annotated[str, typer.Option(help="The bound --prune keeps to (500M, 10G; 0 empties it).")] = "10G",
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """This machine's cache of remote artifacts: what it holds, and --prune to bound it."""
    from sftkit.registry.cache import ArtifactCache
    from sftkit.registry.location import cache_directory, home_directory

    bound = int(_quantity(max_size, _SIZES, "size", "500M, 10G, 0"))
    cache = ArtifactCache(cache_directory(home_directory(state(ctx).home)))
    evicted = cache.prune(bound) if prune else []
    entries = cache.entries()
    total = sum(entry.size_bytes for entry in entries)
    if json_output:
        print_json(
            {
                "path": str(cache.root),
                "entries": len(entries),
                "size_bytes": total,
                "evicted": [entry.sha256 for entry in evicted],
            }
        )
        return
    if prune:
        freed = sum(entry.size_bytes for entry in evicted)
        console.print(f"evicted {len(evicted)} artifact(s), {_bytes(freed)}", highlight=False)
    console.print(f"{cache.root}: {len(entries)} artifact(s), {_bytes(total)}", highlight=False, soft_wrap=True)


def db_migrate_rows_command(
    ctx: typer.Context,
    to: Annotated[str, typer.Option("--to", help="SQLAlchemy URL of an empty database, e.g. postgresql://…")],
) -> None:
    """Copy every row into an empty database (versions, tags, lineage kept); the artifacts stay where they are."""
    from sftkit.registry.relocation import migrate_rows

    registry = state(ctx).registry()
    with activity(ctx, "copying the registry's rows"):
        count = migrate_rows(registry, to)
    console.print(
        f"copied {count} SFT(s) to {_value(to)}; point SFTKIT_REGISTRY_URL at it (this database is left as it was)",
        highlight=False,
        soft_wrap=True,
    )


def db_migrate_artifacts_command(
    ctx: typer.Context,
    to: Annotated[str, typer.Option("--to", help="The new location: s3://bucket/prefix, a path, an fsspec URL.")],
) -> None:
    """Copy every artifact to a new location (verified, resumable) and switch the registry to it."""
    from sftkit.registry.relocation import migrate_artifacts

    registry = state(ctx).registry()
    with progress(ctx) as bar:
        task = bar.add_task("copying artifacts", total=None)
        report = migrate_artifacts(
            registry, to, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    console.print(
        f"moved the registry's artifacts from {report.source} to {report.target}: {report.copied} copied, "
        f"{report.present} already there; the old copies were left in place",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def db_upgrade_command(ctx: typer.Context) -> None:
    """Migrate the registry database to the schema this sftkit needs."""
    before, after = state(ctx).registry().upgrade()
    if before == after:
        console.print(f"the registry database is up to date (schema {after})")
    else:
        console.print(f"upgraded the registry database from schema {before or 'none'} to {after}")


def db_status_command(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Where the registry lives and whether its schema is current."""
    status = state(ctx).registry().status()
    if json_output:
        print_json(status)
        return
    for key, value in status.items():
        console.print(f"[bold]{key}[/bold]: {_value(value)}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("list", epilog=LIST_EXAMPLES, rich_help_panel=PANEL)(list_command)
    app.command("show", epilog=SHOW_EXAMPLES, rich_help_panel=PANEL)(show_command)
    app.command("tag", epilog=TAG_EXAMPLES, rich_help_panel=PANEL)(tag_command)
    app.command("rm", epilog=RM_EXAMPLES, rich_help_panel=PANEL)(rm_command)
    app.command("verify", epilog=MAINTENANCE, rich_help_panel=PANEL)(verify_command)
    app.command("gc", epilog=MAINTENANCE, rich_help_panel=PANEL)(gc_command)
    app.command("cache", epilog=CACHE_HELP, rich_help_panel=PANEL)(cache_command)
    db = typer.Typer(help="Registry database: status, schema upgrade, moving its artifacts.", no_args_is_help=True)
    db.command("upgrade")(db_upgrade_command)
    db.command("status")(db_status_command)
    db.command("migrate-artifacts", epilog=MIGRATE_HELP)(db_migrate_artifacts_command)
    db.command("migrate-rows", epilog=MIGRATE_HELP)(db_migrate_rows_command)
    app.add_typer(db, name="db", rich_help_panel=PANEL)
