"""``sftkit compose``: θ0 + φ_T + φ_L (+ task head) → a Hugging Face model directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

import typer

from sftkit.cli.context import activity, console, print_json, resolve, state
from sftkit.errors import BadInputError

EXAMPLES = """
[b]Examples[/b]

  sftkit compose --task sa --lang ban -o model/
  sftkit compose --task nli@best --lang lang:quy@2 --weights 1,0.8 -o model-quy/
  sftkit compose --lang ace --head none -o ace-encoder/      [dim]# language-adapted encoder, no head[/dim]
  sftkit compose --task ner --lang ace -o ner-ace/           [dim]# a token task SFT: a token classifier[/dim]
"""


def qualify(reference: str, prefix: str) -> str:
    """``sa`` given to --task means the task ``sa``: add the kind unless the user was explicit."""
    explicit = ":" in reference or os.sep in reference or Path(reference).exists()
    return reference if explicit else f"{prefix}:{reference}"


def parse_weights(text: str | None, count: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise BadInputError(f"--weights must be comma-separated numbers, e.g. 1,0.5 (got {text!r})") from None
    if len(weights) != count:
        raise BadInputError(f"--weights has {len(weights)} numbers for {count} SFTs (order: task, languages, extras)")
    return weights


def compose_command(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the composed model to.")],
    task: Annotated[str | None, typer.Option("--task", "-t", help="Task SFT reference (e.g. sa, task:nli@2).")] = None,
    lang: Annotated[
        list[str] | None, typer.Option("--lang", "-l", help="Language SFT reference; repeat to add several.")
    ] = None,
    sft: Annotated[list[str] | None, typer.Option("--sft", help="Any further SFT reference or directory.")] = None,
    weights: Annotated[
        str | None, typer.Option(help="Comma-separated weights wᵢ in the order task, languages, extras (default 1).")
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            envvar="SFTKIT_BASE", help="Base model (Hub id or directory); default: the one the SFTs were trained on."
        ),
    ] = None,
    head: Annotated[
        Literal["sequence-classification", "token-classification", "masked-lm", "none"] | None,
        typer.Option(
            help="Head of the exported model (default: the task SFT's own, sequence-classification or "
            "token-classification for NER / POS).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the composition record as JSON.")] = False,
) -> None:
    """Compose SFTs into a model directory that [b]AutoModelForSequenceClassification.from_pretrained[/b] loads.

    θ = θ0 + Σ wᵢ φᵢ: every SFT's sparse deltas are added to the base, the task SFT's head goes on top, \
language SFTs' MLM heads are dropped. A token task SFT (NER, POS) gives a directory that \
[b]AutoModelForTokenClassification[/b] and pipeline("token-classification") load.
    """
    references = ([qualify(task, "task")] if task else []) + [qualify(x, "lang") for x in lang or []] + list(sft or [])
    if not references:
        raise BadInputError("nothing to compose: give --task and/or --lang (or --sft)")
    weight_list = parse_weights(weights, len(references))
    from sftkit.compose import compose_to_directory
    from sftkit.composition_plan import check_same_base, parts_of

    st = state(ctx)
    records = [resolve(ctx, reference) for reference in references]
    for record in records:
        st.registry().local_copy(record)  # remote artifacts: downloaded (with byte bars) before the spinner
    with activity(ctx, f"loading {len(references)} SFT{'s' if len(references) > 1 else ''}"):
        sfts = [st.registry().load(record) for record in records]
    # SFTs of different bases fit no --base: say so before suggesting one.
    check_same_base(parts_of(sfts, references=[r.reference for r in records]))
    bases = sorted({s.metadata.base_model for s in sfts if s.metadata.base_model})
    base_model = base or (bases[0] if len(bases) == 1 else None)
    if base_model is None and not bases:
        raise BadInputError("the SFTs record no base model: give the one they were trained on with --base")
    if base_model is None:
        raise BadInputError(
            f"the SFTs name different base models ({', '.join(bases)}) but share a base fingerprint (or record "
            "none): give the one they were trained on with --base"
        )
    with activity(ctx, f"composing on {base_model} into {output}"):
        directory = compose_to_directory(
            base_model, sfts, output, weight_list, head=head, references=[r.reference for r in records], overwrite=force
        )
    record = json.loads((directory / "sftkit_compose.json").read_text())
    if json_output:
        print_json(record | {"path": str(directory)})
        return
    if not st.quiet:
        for part in record["sfts"]:
            console.print(f"  {part['kind']:8} {part['reference']:<24} × {part['weight']:g}", highlight=False)
    console.print(f"[green]composed[/green] → {directory}")


def register(app: typer.Typer) -> None:
    app.command("compose", epilog=EXAMPLES, rich_help_panel="Use")(compose_command)
