"""``sftkit import / export / push / pull``: composable-sft's LT-SFT format and the Hugging Face Hub."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.markup import escape

from sftkit.artifact import sft_name
from sftkit.cli.context import activity, console, err_console, print_json, resolve, state
from sftkit.errors import BadInputError

if TYPE_CHECKING:
    from sftkit.interop import ReadResult

EXAMPLES_IMPORT = """
[b]Examples[/b]

  sftkit import ./xlmr-lang-sft-ace-small --lang ace --base xlm-roberta-base
  sftkit import ./nli-sft --task nli --labels entailment,neutral,contradiction --base xlm-roberta-base
  sftkit import hf:cambridgeltl/xlmr-lang-sft-ace-small --lang ace
"""
EXAMPLES_EXPORT = """
[b]Examples[/b]

  sftkit export ace --format lt-sft -o ace-ltsft/      [dim]# loadable with composable-sft's SFT(path)[/dim]
  sftkit export task:sa@2 --format sftkit -o sa-sft/
"""
EXAMPLES_HUB = """
[b]Examples[/b]

  sftkit push ace me/xlmr-deftx-ace --private
  sftkit pull cambridgeltl/xlmr-lang-sft-ace-small
  sftkit pull me/xlmr-deftx-ace@v1 --tag shared
"""

LangOption = Annotated[str | None, typer.Option("--lang", "-l", help="Language code: registers a language SFT.")]
TaskOption = Annotated[str | None, typer.Option("--task", "-t", help="Task name: registers a task SFT.")]
LabelsOption = Annotated[
    str | None, typer.Option(help="Comma-separated class labels of a task SFT, in the head's output order.")
]
BaseOption = Annotated[
    str | None,
    typer.Option(
        envvar="SFTKIT_BASE",
        help="Base model (Hub id or directory): loaded to record its fingerprint and map LT-SFT names.",
    ),
]
RevisionOption = Annotated[str | None, typer.Option(help="Revision of the base model.")]
PrefixOption = Annotated[
    str | None, typer.Option(help="Encoder prefix of LT-SFT parameter names (roberta, bert); detected by default.")
]
ExportPrefixOption = Annotated[
    str | None,
    typer.Option(help="Encoder prefix for LT-SFT names (roberta, bert); default: recorded, else the base's config."),
]
DecoderOption = Annotated[
    bool,
    typer.Option(
        "--decoder-as-embeddings",
        help="LT-SFT with --base: turn a tied MLM decoder (lm_head.decoder.weight) in 'abs' into a word-embedding "
        "delta. Off by default, as composable-sft's apply(with_abs=False) ignores a language SFT's abs.",
    ),
]
TagOption = Annotated[list[str] | None, typer.Option("--tag", help="Alias to attach; repeat for several.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the registered record as JSON.")]


def _overrides(lang: str | None, task: str | None, labels: str | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {"language": lang, "task": task}
    if task:
        overrides["kind"] = "task"
    elif lang:
        overrides["kind"] = "language"
    if labels is not None:
        names = [label.strip() for label in labels.split(",")]
        if not all(names):
            raise BadInputError(f"--labels must be comma-separated names, e.g. negative,positive (got {labels!r})")
        overrides["labels"] = names
    return overrides


def _register(
    ctx: typer.Context,
    source: Path,
    hub_origin: dict[str, str] | None,
    overrides: dict[str, Any],
    base: str | None,
    revision: str | None,
    prefix: str | None,
    decoder_as_embeddings: bool,
    tags: list[str] | None,
    json_output: bool,
) -> None:
    from sftkit.interop import detect_format, import_sft

    st = state(ctx)
    found = detect_format(source)
    with activity(ctx, f"importing {found} SFT from {source}"):
        result: ReadResult = import_sft(
            source, overrides, base=base, revision=revision, prefix=prefix, decoder_as_embeddings=decoder_as_embeddings
        )
    meta = result.sft.metadata
    if sft_name(meta.kind, meta.language, meta.task) is None:
        flag = "--lang" if meta.kind == "language" else "--task"
        raise BadInputError(f"the {meta.kind} SFT at {source} has no name: give {flag} NAME")
    if meta.kind == "task" and not meta.labels:
        result.notes.append("no labels recorded: compose needs them (re-import with --labels)")
    if hub_origin is not None and found == "lt-sft":  # converted: say where from (ours is stored as published)
        meta.extra.setdefault("hub", hub_origin)
    record = _add(st.registry(), source, found, result, tags)
    if json_output:
        print_json(record.to_dict() | {"format": found, "notes": result.notes})
        return
    if not st.quiet:
        for note in result.notes:
            err_console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
    console.print(
        f"[green]registered[/green] {escape(record.reference)} ({found}, {result.sft.num_entries:,} entries)",
        highlight=False,
        soft_wrap=True,
    )


def _add(registry, source: Path, found: str, result: ReadResult, tags: list[str] | None):
    """Store an unchanged sftkit directory as is; otherwise save the converted SFT in its own value dtype."""
    from sftkit.sft import VALUE_DTYPES, SparseFineTuning

    if found == "sftkit" and SparseFineTuning.load(source).metadata.to_dict() == result.sft.metadata.to_dict():
        return registry.add(source, tags=tuple(tags or ()))
    values = [delta.values.dtype for delta in result.sft.diffs.values()] + [t.dtype for t in result.sft.full.values()]
    dtype = next((name for name, kind in VALUE_DTYPES.items() if values and kind == values[0]), "float32")
    with tempfile.TemporaryDirectory(prefix="sftkit-import-") as scratch:
        directory = result.sft.save(Path(scratch) / "sft", dtype=dtype)
        return registry.add(directory, tags=tuple(tags or ()))


def import_command(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Argument(help="SFT directory (sftkit or LT-SFT), pytorch_diff.bin, or hf:owner/repo.")
    ],
    lang: LangOption = None,
    task: TaskOption = None,
    labels: LabelsOption = None,
    base: BaseOption = None,
    revision: RevisionOption = None,
    prefix: PrefixOption = None,
    decoder_as_embeddings: DecoderOption = False,
    tag: TagOption = None,
    json_output: JsonOption = False,
) -> None:
    """Register an SFT from a directory or the Hub, in sftkit's or composable-sft's (LT-SFT) format.

    The format is detected; LT-SFT files are loaded with [b]weights_only[/b] and refused if they need more.
    """
    overrides = _overrides(lang, task, labels)
    if source.startswith("hf:"):
        _pull(ctx, source, overrides, base, revision, prefix, decoder_as_embeddings, tag, json_output)
        return
    path = Path(source)
    if not path.exists():
        raise BadInputError(f"{source} does not exist (Hub repos are written hf:owner/repo)")
    _register(ctx, path, None, overrides, base, revision, prefix, decoder_as_embeddings, tag, json_output)


def _pull(ctx, spec, overrides, base, revision, prefix, decoder_as_embeddings, tags, json_output) -> None:
    from sftkit.hub import download, parse_repo_spec, repo_overrides

    repo_id, _ = parse_repo_spec(spec)
    with activity(ctx, f"downloading {repo_id}"):
        snapshot = download(spec)
    given = {key: value for key, value in overrides.items() if value is not None}
    wanted = repo_overrides(snapshot, repo_id, given)
    origin = {"repo_id": repo_id, "commit": snapshot.name}
    _register(ctx, snapshot, origin, wanted, base, revision, prefix, decoder_as_embeddings, tags, json_output)


def pull_command(
    ctx: typer.Context,
    repo: Annotated[str, typer.Argument(help="owner/repo[@revision] on the Hugging Face Hub.")],
    lang: LangOption = None,
    task: TaskOption = None,
    labels: LabelsOption = None,
    base: BaseOption = None,
    revision: RevisionOption = None,
    prefix: PrefixOption = None,
    decoder_as_embeddings: DecoderOption = False,
    tag: TagOption = None,
    json_output: JsonOption = False,
) -> None:
    """Download an SFT from the Hub (sftkit or LT-SFT format) and register it.

    Offline ([b]HF_HUB_OFFLINE=1[/b]) it is served from the local Hugging Face cache.
    """
    _pull(ctx, repo, _overrides(lang, task, labels), base, revision, prefix, decoder_as_embeddings, tag, json_output)


def export_command(
    ctx: typer.Context,
    reference: Annotated[str, typer.Argument(help="SFT reference (ace, task:sa@2, a directory, hf:owner/repo).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write.")],
    format: Annotated[Literal["lt-sft", "sftkit"], typer.Option("--format", "-f", help="Format to write.")] = "lt-sft",
    prefix: ExportPrefixOption = None,
    dtype: Annotated[
        Literal["float32", "float16", "bfloat16"], typer.Option(help="Value dtype (sftkit format only).")
    ] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
) -> None:
    """Write an SFT as an LT-SFT directory (composable-sft) or an sftkit directory, atomically."""
    from sftkit.interop import export_sft

    record = resolve(ctx, reference)
    with activity(ctx, f"loading {record.reference}"):
        sft = state(ctx).registry().load(record)
    with activity(ctx, f"writing {format} to {output}"):
        directory = export_sft(sft, output, format=format, prefix=prefix, overwrite=force, dtype=dtype)
    console.print(
        f"[green]exported[/green] {escape(record.reference)} ({format}) → {escape(str(directory))}",
        highlight=False,
        soft_wrap=True,
    )


def push_command(
    ctx: typer.Context,
    reference: Annotated[str, typer.Argument(help="SFT reference (ace, task:sa@2, a directory).")],
    repo: Annotated[str, typer.Argument(help="Target Hub repo, owner/repo (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    format: Annotated[
        Literal["sftkit", "lt-sft"], typer.Option("--format", "-f", help="Upload in this format.")
    ] = "sftkit",
    prefix: ExportPrefixOption = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
) -> None:
    """Upload an SFT directory with its model card to the Hugging Face Hub (needs hf auth login)."""
    from sftkit.hub import parse_repo_spec, push

    parse_repo_spec(repo)  # a bad repo id fails before anything is loaded
    st = state(ctx)
    record = resolve(ctx, reference)
    with tempfile.TemporaryDirectory(prefix="sftkit-push-") as scratch:
        directory = st.registry().local_copy(record)
        if format == "lt-sft":
            from sftkit.interop import export_sft

            with activity(ctx, f"converting {record.reference} to lt-sft"):
                directory = export_sft(st.registry().load(record), Path(scratch) / "lt-sft", prefix=prefix)
        with activity(ctx, f"uploading to {repo}"):
            url = push(directory, repo, private=private, commit_message=message)
    console.print(f"[green]pushed[/green] {escape(record.reference)} → {escape(url)}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("import", epilog=EXAMPLES_IMPORT, rich_help_panel="Share")(import_command)
    app.command("export", epilog=EXAMPLES_EXPORT, rich_help_panel="Share")(export_command)
    app.command("push", epilog=EXAMPLES_HUB, rich_help_panel="Share")(push_command)
    app.command("pull", epilog=EXAMPLES_HUB, rich_help_panel="Share")(pull_command)
