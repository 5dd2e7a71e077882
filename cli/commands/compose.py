"""``sftkit compose``: θ0 + φ_T + φ_L (+ task head) → a Hugging Face model directory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from sftkit.cli.context import activity, console, print_json, resolve, state
from sftkit.cli.tuning_progress import print_trials, trial_reporter
from sftkit.errors import BadInputError

EXAMPLES = """
[b]Examples[/b]

  sftkit compose --task sa --lang ban -o model/
  sftkit compose --task nli@best --lang lang:quy@2 --weights 1,0.8 -o model-quy/
  sftkit compose --lang ace --head none -o ace-encoder/      [dim]# language-adapted encoder, no head[/dim]
  sftkit compose --task ner --lang ace -o ner-ace/           [dim]# a token task SFT: a token classifier[/dim]
  sftkit compose --task sa --lang ban --merge ties --density 0.6 -o model-ties/
  sftkit compose --task sa --lang ban --merge dare-ties --density 0.3 --merge-seed 1 -o model-dare/
  sftkit compose --task sa --lang ban --tune ban-dev.csv -o model-ban/   [dim]# weight chosen on labelled rows[/dim]
  sftkit compose --task sa --lang min --lang ind --merge ties --tune dev.csv -o mix/   [dim]# no SFT of its own[/dim]
"""


def qualify(reference: str, prefix: str) -> str:
    """``sa`` given to --task means the task ``sa``: add the kind unless the user was explicit."""
    explicit = ":" in reference or os.sep in reference or Path(reference).exists()
    return reference if explicit else f"{prefix}:{reference}"


def parse_numbers(text: str, option: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise BadInputError(f"{option} must be comma-separated numbers, e.g. 1,0.5 (got {text!r})") from None


def parse_weights(text: str | None, count: int) -> list[float] | None:
    if text is None:
        return None
    weights = parse_numbers(text, "--weights")
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
    merge: Annotated[
        str,
        typer.Option(
            help="How the wᵢ φᵢ combine: sum (θ0 + Σ wᵢ φᵢ) or a method of sftkit.merging.METHODS: ties, "
            "dare-linear, dare-ties (README: Merging)."
        ),
    ] = "sum",
    density: Annotated[
        float | None,
        typer.Option(help="Share D of each SFT's entries that ties / dare-* keep, in (0, 1] (default 1, as mergekit)."),
    ] = None,
    merge_seed: Annotated[int | None, typer.Option(help="Seed of DARE's random drop (default 0).")] = None,
    normalize: Annotated[
        bool | None,
        typer.Option(
            "--normalize/--no-normalize",
            help="ties / dare-ties: divide each entry by the weights of the kept values (default on, as mergekit).",
            show_default=False,
        ),
    ] = None,
    tune: Annotated[
        Path | None,
        typer.Option(
            help="Labelled dev set (CSV/TSV/JSONL; CoNLL for NER / POS): search the language SFTs' weights (and D, "
            "unless --density fixes it) on it, then write the best model.",
            rich_help_panel="Tuning",
        ),
    ] = None,
    tune_weights: Annotated[
        str, typer.Option(help="Candidate language-SFT weights.", rich_help_panel="Tuning")
    ] = "0,0.25,0.5,0.75,1",
    tune_densities: Annotated[
        str, typer.Option(help="Candidate densities D (ties, dare-*).", rich_help_panel="Tuning")
    ] = "0.2,0.4,0.6,0.8,1",
    tune_search: Annotated[
        Literal["auto", "grid", "coordinate"],
        typer.Option(
            help="auto: the full grid up to 36 trials, coordinate search (one weight or D at a time) beyond.",
            rich_help_panel="Tuning",
        ),
    ] = "auto",
    tune_rounds: Annotated[
        int, typer.Option(help="Rounds of coordinate search at most.", rich_help_panel="Tuning")
    ] = 3,
    tune_metric: Annotated[
        str | None,
        typer.Option(
            help="Score to maximise (default macro_f1; entity_f1 for NER, accuracy for POS).", rich_help_panel="Tuning"
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the composition record as JSON.")] = False,
) -> None:
    """Compose SFTs into a model directory that [b]AutoModelForSequenceClassification.from_pretrained[/b] loads.

    θ = θ0 + Σ wᵢ φᵢ: every SFT's sparse deltas are added to the base, the task SFT's head goes on top, \
language SFTs' MLM heads are dropped. A token task SFT (NER, POS) gives a directory that \
[b]AutoModelForTokenClassification[/b] and pipeline("token-classification") load. [b]--merge[/b] ties / dare-linear / \
dare-ties merges the wᵢ φᵢ as mergekit does; [b]--tune DEV[/b] chooses the language weights (and D) on labelled rows.
    """
    references = ([qualify(task, "task")] if task else []) + [qualify(x, "lang") for x in lang or []] + list(sft or [])
    if not references:
        raise BadInputError("nothing to compose: give --task and/or --lang (or --sft)")
    weight_list = parse_weights(weights, len(references))
    from sftkit.atomic import check_target
    from sftkit.compose import compose_to_directory
    from sftkit.composition_plan import check_same_base, parts_of
    from sftkit.merging import Merge

    settings = Merge.of(merge, density, merge_seed, normalize)  # refused before any SFT is loaded
    settings.check_count(len(references))
    space = None
    if tune is not None:
        from sftkit.tuning import Space

        candidates = parse_numbers(tune_weights, "--tune-weights"), parse_numbers(tune_densities, "--tune-densities")
        space = Space(tuple(candidates[0]), tuple(candidates[1]), tune_search, tune_rounds)
        space.check()
        if not tune.is_file():
            raise BadInputError(f"--tune: no dev set at {tune}")

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
    tuning = None
    if tune is not None and space is not None:
        given = {"merge": merge, "density": density, "merge_seed": merge_seed, "normalize": normalize}
        check_target(output, force)  # before the search, not after it
        search = Tuned(base_model, sfts, [r.reference for r in records], weight_list, head, given)
        weight_list, settings, tuning = search.run(ctx, tune, space, tune_metric, show=not json_output)
    with activity(ctx, f"composing on {base_model} into {output}"):
        directory = compose_to_directory(
            base_model,
            sfts,
            output,
            weight_list,
            head=head,
            references=[r.reference for r in records],
            overwrite=force,
            tuning=tuning,
            **settings.arguments(),
        )
    record = json.loads((directory / "sftkit_compose.json").read_text())
    if json_output:
        print_json(record | {"path": str(directory)})
        return
    if not st.quiet:
        if settings.method != "sum":
            shown = ", ".join(f"{k} {v}" for k, v in record["merge"].items() if k != "method" and v is not None)
            console.print(f"  merge    {settings.method} ({shown})", highlight=False)
        for part in record["sfts"]:
            console.print(f"  {part['kind']:8} {part['reference']:<24} × {part['weight']:g}", highlight=False)
    console.print(f"[green]composed[/green] → {directory}")


@dataclass(frozen=True)
class Tuned:
    """``--tune``: what is being composed (``merge`` as the user gave it: keywords of ``compose``), searched on a
    dev set before the best is written."""

    base: str
    sfts: list[Any]
    references: list[str]
    weights: list[float] | None
    head: str | None
    merge: dict[str, Any]

    def run(
        self, ctx: typer.Context, dev: Path, space: Any, metric: str | None, show: bool
    ) -> tuple[list[float], Any, dict[str, Any]]:
        """The best weights, the merge with the best D, and the record of the search (``sftkit_compose.json``)."""
        from sftkit.base_model import CLASSIFIER_HEADS, load_tokenizer
        from sftkit.composition_plan import plan
        from sftkit.merging import Merge
        from sftkit.training import scorer
        from sftkit.tuning import tune

        given = self.merge
        settings = Merge.of(given["merge"], given["density"], given["merge_seed"], given["normalize"])
        composition = plan(self.sfts, self.weights, self.head, None, self.references, settings)
        if composition.head not in CLASSIFIER_HEADS:
            raise BadInputError(f"--tune scores a classifier on labelled data, not a {composition.head} model")
        tagger = composition.head == "token-classification"
        labels = composition.labels or []
        metric = metric or (default_tag_metric(labels) if tagger else "macro_f1")
        with activity(ctx, f"reading the dev set {dev}"):
            score = scorer(dev, load_tokenizer(self.base), labels, composition.head)

        def objective(model: Any) -> float:
            scores = score(model)
            if not isinstance(scores.get(metric), int | float):
                numbers = ", ".join(k for k, v in scores.items() if isinstance(v, float))
                raise BadInputError(f"--tune-metric must be one of {numbers}, not {metric!r}")
            return float(scores[metric])

        with trial_reporter(ctx, metric) as on_trial:
            where = {"weights": self.weights, "head": self.head, "references": self.references}
            result = tune(self.base, self.sfts, objective, space, on_trial, **where, **self.merge)
        if show and not state(ctx).quiet:
            print_trials(result, metric, self.references, dev)
        best = result.best
        chosen = Merge.of(settings.method, best.density, settings.seed, settings.normalize)
        return list(best.weights), chosen, result.record(str(dev), metric, self.references)


def default_tag_metric(labels: list[str]) -> str:
    """Entity F1 for a BIO tag set (NER), word accuracy otherwise (POS)."""
    return "entity_f1" if any(label[:2] in ("B-", "I-") for label in labels) else "accuracy"


def register(app: typer.Typer) -> None:
    app.command("compose", epilog=EXAMPLES, rich_help_panel="Use")(compose_command)
