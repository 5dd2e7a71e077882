"""``sftkit train`` (two-phase DEFT-X / LT-SFT training into the registry) and ``sftkit eval``."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sftkit.cli.context import activity, console, err_console, print_json, resolve, state
from sftkit.cli.training_progress import training_reporter
from sftkit.errors import BadInputError

if TYPE_CHECKING:
    from sftkit.registry import SFTRecord

EXAMPLES_TRAIN = """
[b]Examples[/b]

  sftkit train --lang ace --rank 90var --corpus ace.txt
  sftkit train --task sa --source-lang id --train smsa.tsv --validation nusax/indonesian/valid.csv
  sftkit train --task sa --source id=smsa.tsv --source jav=nusax/javanese/train.csv    [dim]# multi-source[/dim]
  sftkit train --task sa --sources sources.json --source-sampling uniform
  sftkit train --task ner --source-lang id --train wikiann-id.conll                    [dim]# token task[/dim]
  sftkit train --task sa --train smsa.tsv --batch-size 8 --grad-accum 2 --precision bf16
  sftkit train --lang ace --method lt-sft --k 2.8% --corpus ace.txt --base bert-base-multilingual-cased
  sftkit train --lang ace --recipe quick --base ./tiny --corpus ace.txt --no-register -o ace-sft/
  torchrun --nproc_per_node=4 --no-python sftkit train --lang ace --corpus ace.txt    [dim]# DDP[/dim]

[b]The paper's variants[/b] (DEFT-X, Tables 4 and 5)

  sftkit train --task sa --train smsa.tsv                       [dim]# w/o source-language initialisation[/dim]
  sftkit train --lang ace --keep 0 --corpus ace.txt             [dim]# w/o higher-order components (L only)[/dim]
  sftkit train --lang ace --no-sparse-phase --corpus ace.txt    [dim]# w/o sparse fine-tuning[/dim]
  sftkit train --lang ace --no-sparse-phase --k all …           [dim]# w/o magnitude pruning + sparse FT[/dim]

An interrupted run continues with the same command plus [b]--resume[/b]. Recipes: paper-lang, paper-sa,
paper-nli (the paper's Appendix C) and quick (CPU smoke test: 10 steps of 8 × 64 tokens per phase, a
language SFT on multilingual-e5-small in under 3 minutes); flags override any recipe value.

Off a terminal (a log file, nohup, SLURM, CI) progress is printed as plain lines: each phase's step, loss,
learning rate, tokens/s, elapsed time and ETA every SFTKIT_LOG_INTERVAL seconds (default 30), and every
validation; -q silences them.
"""

EXAMPLES_EVAL = """
[b]Examples[/b]

  sftkit eval model/ --data nusax/acehnese/test.csv
  sftkit eval sa --data nusax/indonesian/test.csv --json     [dim]# a task SFT composed on its base[/dim]
  sftkit eval model-quy/ --data americasnli/test/quy.tsv
  sftkit eval ner-ace/ --data ace-test.conll --json           [dim]# a token classifier: entity P/R/F1[/dim]
"""

_WHAT, _METHOD, _DATA, _SCHEDULE, _OUTPUT = "What to train", "Method", "Data", "Schedule (overrides)", "Output"
_MODES = "Training modes (multi-source, the paper's ablations, accumulation, batching, precision)"


def _home(ctx: typer.Context) -> Path:
    home = state(ctx).home or os.environ.get("SFTKIT_HOME") or "~/.sftkit"
    return Path(home).expanduser()


def _source(ctx: typer.Context, reference: str) -> tuple[SFTRecord, Any, dict[str, Any]]:
    from sftkit.cli.commands.compose import qualify

    record = resolve(ctx, qualify(reference, "lang"))
    if record.kind != "language":
        raise BadInputError(
            f"--source-lang {reference} is a {record.kind} SFT ({record.reference}), not a language SFT"
        )
    sft = state(ctx).registry().load(record)
    lineage = {"reference": record.reference, "sha256": record.sha256, "language": record.language}
    return record, sft, lineage


def train_command(
    ctx: typer.Context,
    lang: Annotated[
        str | None,
        typer.Option("--lang", help="Train a language SFT (MLM) for this language code.", rich_help_panel=_WHAT),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option("--task", help="Train a task SFT (e.g. sa, nli; ner, pos tag words).", rich_help_panel=_WHAT),
    ] = None,
    base: Annotated[
        str,
        typer.Option(envvar="SFTKIT_BASE", help="Base model: Hub id or local directory.", rich_help_panel=_WHAT),
    ] = "xlm-roberta-base",
    revision: Annotated[str | None, typer.Option(help="Base model revision (Hub).", rich_help_panel=_WHAT)] = None,
    source_lang: Annotated[
        str | None,
        typer.Option(
            "--source-lang",
            help="Task SFTs: start from this registered language SFT (θ0 + φ_source).",
            rich_help_panel=_WHAT,
        ),
    ] = None,
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source",
            help="Multi-source task SFTs: LANG=DATA, repeatable; each batch comes from one source with its registered "
            "language SFT applied (θ_start = θ0).",
            rich_help_panel=_MODES,
        ),
    ] = None,
    sources_file: Annotated[
        Path | None,
        typer.Option(
            "--sources",
            help='Multi-source task SFTs from a JSON file: {"LANG": {"train": DATA, "validation": DATA, "sft": REF}}.',
            rich_help_panel=_MODES,
        ),
    ] = None,
    source_sampling: Annotated[
        str | None,
        typer.Option(
            help="Multi-source: proportional (to each source's data, as the LT-SFT reference; default) or uniform.",
            rich_help_panel=_MODES,
        ),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            help="paper-lang | paper-sa | paper-nli | quick (default: the paper's for the kind).", rich_help_panel=_WHAT
        ),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="deftx | lt-sft (lt-sft ⇔ --rank none).", rich_help_panel=_METHOD)
    ] = None,
    rank: Annotated[
        str | None, typer.Option(help="SVD rank: 90var (variance share), 100 (fixed), none.", rich_help_panel=_METHOD)
    ] = None,
    keep: Annotated[
        float | None,
        typer.Option(
            help="Share of the SVD residual kept per matrix (default 0.05; 0 = the low-rank part only, the "
            "paper's 'w/o higher-order components').",
            rich_help_panel=_METHOD,
        ),
    ] = None,
    k: Annotated[
        str | None,
        typer.Option(
            "--k",
            help="Entries to tune: a count (7.6M), a fraction of maskable entries (0.028, 2.8%) or all.",
            rich_help_panel=_METHOD,
        ),
    ] = None,
    l1: Annotated[
        float | None,
        typer.Option("--l1", help="L1 weight λ towards θ_start (both phases, as LT-SFT).", rich_help_panel=_METHOD),
    ] = None,
    freeze_decoder: Annotated[
        bool | None,
        typer.Option(
            "--freeze-decoder/--no-freeze-decoder",
            help="Language SFTs: untie the MLM decoder from the word embeddings and freeze it, as the LT-SFT "
            "reference does (default); --no-freeze-decoder keeps it tied, so every vocabulary row moves.",
            rich_help_panel=_METHOD,
        ),
    ] = None,
    head_warmup_steps: Annotated[
        int | None,
        typer.Option(
            "--head-warmup-steps",
            help="Language SFTs: fit a freshly initialised MLM head (mE5, MiniLM…) for N steps with the encoder "
            "frozen before phase 1 (default: 200 when the base has no MLM head, else 0; 0 = off; --max-steps caps it).",
            rich_help_panel=_METHOD,
        ),
    ] = None,
    reuse_full_phase: Annotated[
        bool,
        typer.Option(
            "--reuse-full-phase",
            help="Keep phase 1 under $SFTKIT_HOME/full-phase and reuse it for runs that differ only in method, "
            "rank, keep or k (same data, seed and schedule): comparing methods costs one full phase.",
            rich_help_panel=_METHOD,
        ),
    ] = False,
    corpus: Annotated[
        str | None,
        typer.Option(
            help="Language SFTs: text file (one example per line), CSV/TSV/JSONL or hf:….", rich_help_panel=_DATA
        ),
    ] = None,
    train_file: Annotated[
        str | None,
        typer.Option(
            "--train",
            help="Task SFTs: labelled CSV/TSV/JSONL or hf:owner/name[:config][@split]; token tasks (NER, POS): "
            "CoNLL (word<TAB>tag per line, a blank line between sentences; .conll) or JSONL with tokens and tags "
            "lists.",
            rich_help_panel=_DATA,
        ),
    ] = None,
    task_type: Annotated[
        str | None,
        typer.Option(
            "--task-type",
            help="sequence (a label per text) | token (a tag per word); default: token for --task ner/pos or "
            "CoNLL/JSONL-with-tokens data, else sequence.",
            rich_help_panel=_DATA,
        ),
    ] = None,
    validation: Annotated[
        str | None,
        typer.Option(help="Validation data (default: hold out part of the training data).", rich_help_panel=_DATA),
    ] = None,
    text_column: Annotated[
        str | None, typer.Option(help="Text column (default text; premise for pairs).", rich_help_panel=_DATA)
    ] = None,
    text_pair_column: Annotated[
        str | None, typer.Option(help="Second text column of pairs (default hypothesis).", rich_help_panel=_DATA)
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="Label column (default label).", rich_help_panel=_DATA)
    ] = None,
    epochs: Annotated[float | None, typer.Option(rich_help_panel=_SCHEDULE)] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            help="Cap on steps per phase (the sparse phase's unless --sparse-steps sets it), the head warm-up "
            "included.",
            rich_help_panel=_SCHEDULE,
        ),
    ] = None,
    min_steps: Annotated[int | None, typer.Option(help="Floor on steps per phase.", rich_help_panel=_SCHEDULE)] = None,
    sparse_steps: Annotated[
        int | None,
        typer.Option(
            help="Steps of the sparse phase, which restarts from θ0 with only k entries free and can need longer "
            "than phase 1 to get back to its loss (default: as many as phase 1). Phase 1 is shared with runs that "
            "differ only in this.",
            rich_help_panel=_SCHEDULE,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Examples per optimiser step, across all processes; with --grad-accum N, per micro-batch "
            "(a step then sees N × this). Given alone it replaces the recipe's batch and accumulation.",
            rich_help_panel=_SCHEDULE,
        ),
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate (linear decay).", rich_help_panel=_SCHEDULE)
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per example / block.", rich_help_panel=_SCHEDULE)
    ] = None,
    eval_steps: Annotated[
        int | None, typer.Option(help="Validate (and checkpoint) every N steps.", rich_help_panel=_SCHEDULE)
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(rich_help_panel=_SCHEDULE)] = None,
    warmup_ratio: Annotated[float | None, typer.Option(rich_help_panel=_SCHEDULE)] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 42).", rich_help_panel=_SCHEDULE)] = None,
    device: Annotated[
        str | None, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:1…", rich_help_panel=_SCHEDULE)
    ] = None,
    sparse_phase: Annotated[
        bool | None,
        typer.Option(
            "--sparse-phase/--no-sparse-phase",
            help="--no-sparse-phase: φ = the (denoised) δ at the mask, no retraining (the paper's 'w/o sparse "
            "fine-tuning'); with --k all, φ is the whole denoised δ.",
            rich_help_panel=_MODES,
        ),
    ] = None,
    grad_accum: Annotated[
        int | None,
        typer.Option(
            "--grad-accum",
            help="Micro-batches per optimiser step (both phases): an optimiser step sees batch-size × N examples.",
            rich_help_panel=_MODES,
        ),
    ] = None,
    group_by_length: Annotated[
        bool | None,
        typer.Option(
            "--group-by-length/--no-group-by-length",
            help="Batches of similar length (default; less padding, faster on CPU); --no-group-by-length: "
            "random batches.",
            rich_help_panel=_MODES,
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="fp32 (default) | bf16 | fp16 (CUDA only): forward passes under torch.autocast; weights, δ, "
            "masks and stored values stay float32.",
            rich_help_panel=_MODES,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the interrupted run of this exact command from its last checkpoint (it says which phase "
            "and step).",
            rich_help_panel=_OUTPUT,
        ),
    ] = False,
    checkpoint_minutes: Annotated[
        float,
        typer.Option(
            "--checkpoint-minutes",
            min=0,
            help="Also checkpoint after this many minutes without one, in every phase (0: only at evaluations).",
            rich_help_panel=_OUTPUT,
        ),
    ] = 10.0,  # trainer.DEFAULT_CHECKPOINT_MINUTES (importing it here would load torch at start-up)
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also save the SFT directory here.", rich_help_panel=_OUTPUT)
    ] = None,
    no_register: Annotated[
        bool,
        typer.Option("--no-register", help="Do not add the SFT to the registry (needs -o).", rich_help_panel=_OUTPUT),
    ] = False,
    tag: Annotated[
        list[str] | None,
        typer.Option("--tag", help="Alias to attach in the registry; repeatable.", rich_help_panel=_OUTPUT),
    ] = None,
) -> None:
    """Train a language SFT (masked LM on raw text) or a task SFT (classification or tagging), DEFT-X or LT-SFT.

    Phase 1 fine-tunes fully, DEFT-X denoises δ and picks the k largest entries, phase 2 trains only \
those (memory ∝ k). The result is registered and its reference printed.
    """
    from sftkit.registry.references import check_name

    if (lang is None) == (task is None):
        raise BadInputError("give exactly one of --lang CODE (language SFT) or --task NAME (task SFT)")
    kind = "language" if lang else "task"
    name = check_name(lang or task, "--lang" if lang else "--task")
    if no_register and output is None:
        raise BadInputError("--no-register needs --output DIR, or the trained SFT would be lost")
    if output is not None and output.exists():
        raise BadInputError(f"--output {output} already exists; choose a new directory")
    if kind == "task" and corpus:
        raise BadInputError("task SFTs train on labelled data: use --train FILE (--corpus is for --lang)")
    if corpus and train_file:
        raise BadInputError("give the corpus once: --corpus FILE")
    if kind == "language" and (source_lang or source or sources_file):
        raise BadInputError("source-language SFTs (--source-lang, --source, --sources) apply to task SFTs (--task)")
    multi = _multi_sources(source or [], sources_file)
    if multi and source_lang:
        raise BadInputError("give one source (--source-lang) or several (--source / --sources), not both")
    if multi and train_file:
        raise BadInputError("a multi-source SFT reads each source's data from --source LANG=DATA, not --train")
    if multi and validation:
        raise BadInputError(
            'a multi-source SFT validates on each source\'s data: give it per source as "validation" in a '
            "--sources file (by default each source holds out part of its training data)"
        )
    if source_sampling is not None and not multi:
        raise BadInputError("--source-sampling chooses between several sources (--source / --sources)")
    if keep is not None and (method == "lt-sft" or (rank is not None and rank.lower() == "none")):
        raise BadInputError("--keep sets DEFT-X's denoising; LT-SFT (--rank none) does not denoise")
    if Path(base).expanduser().is_dir():  # a local base is recorded absolutely: compose/eval run from anywhere
        base = str(Path(base).expanduser().resolve())
    data = corpus or train_file
    columns = {"text_column": text_column, "text_pair_column": text_pair_column}
    if data is None and not multi:
        from sftkit.training.catalog import default_source

        default = default_source(kind, name)
        data, validation = default.train, validation or default.validation
        columns = {
            "text_column": text_column or default.text_column,
            "text_pair_column": text_pair_column or default.text_pair_column,
        }

    from sftkit.training import make_config

    try:
        config = make_config(
            language=name if kind == "language" else None,
            task=name if kind == "task" else None,
            recipe=recipe,
            base_model=base,
            base_revision=revision,
            method=method,
            rank=rank,
            keep=keep,
            k=k,
            sources={
                language: {"train": spec["train"], "validation": spec.get("validation")}
                for language, spec in multi.items()
            }
            or None,
            source_sampling=source_sampling,
            sparse_phase=sparse_phase,
            l1=l1,
            freeze_decoder=freeze_decoder,
            head_warmup_steps=head_warmup_steps,
            train=data,
            validation=validation,
            label_column=label_column,
            task_type=task_type,
            epochs=epochs,
            max_steps=max_steps,
            min_steps=min_steps,
            sparse_steps=sparse_steps,
            batch_size=batch_size,
            lr=lr,
            max_length=max_length,
            eval_steps=eval_steps,
            weight_decay=weight_decay,
            warmup_ratio=warmup_ratio,
            seed=seed,
            device=device,
            grad_accum=grad_accum,
            group_by_length=group_by_length,
            precision=precision,
            **columns,
        )
    except BadInputError as exc:
        raise BadInputError(_as_flags(str(exc))) from exc
    source_record, source_sft, lineage = _source(ctx, source_lang) if source_lang else (None, None, None)
    resolved = {language: _source(ctx, spec.get("sft") or language) for language, spec in multi.items()}
    for language, (record, _, _) in resolved.items():
        if record.language != language:
            raise BadInputError(
                f"source {language!r}: {record.reference} is a language SFT for {record.language!r}, not {language!r}"
            )
    source_lineages = {language: found[2] for language, found in resolved.items()}
    run_id = config.with_changes(extra={"source": lineage or source_lineages}).digest()
    work_dir = _home(ctx) / "runs" / run_id
    main_process = int(os.environ.get("RANK", "0")) == 0

    from sftkit.training import train

    st = state(ctx)
    try:
        with training_reporter(ctx, config.best_metric) if main_process else nullcontext() as reporter:
            result = train(
                config,
                source=source_sft,
                source_lineage=lineage,
                sources={language: found[1] for language, found in resolved.items()} or None,
                source_lineages=source_lineages or None,
                work_dir=work_dir,
                resume=resume,
                reporter=reporter,
                full_phase_cache=_home(ctx) / "full-phase" if reuse_full_phase else None,
                checkpoint_minutes=checkpoint_minutes,
            )
    except KeyboardInterrupt:
        if main_process:
            from sftkit.training.checkpoint import RunDirectory

            if RunDirectory(work_dir).has_progress():
                phase, step = RunDirectory(work_dir).resume_point()
                # No step yet: what is kept is the stage before (the selection, or the fitted warm-up head).
                before = "full phase done" if phase == "sparse" else "head warm-up done"
                kept = f"{phase} phase, step {step}" if step else before
                err_console.print(
                    f"checkpoints kept in {work_dir} ({kept}): run the same command with --resume to continue",
                    highlight=False,
                    soft_wrap=True,
                )
            else:
                RunDirectory(work_dir).remove()
                err_console.print("interrupted before the first checkpoint: nothing to resume")
        raise
    if not main_process:
        return
    sft = result.sft
    if output is not None:
        sft.save(output)
    if not st.quiet:
        err_console.print(
            f"trained {kind} SFT {name!r}: {sft.num_entries:,} entries "
            f"({sft.metadata.density:.2%} of {sft.metadata.maskable_entries:,}), method {config.method}, "
            f"rank {config.rank}"
            + (f", variant {config.variant!r}" if config.variant else "")
            + _language_summary(sft)
            + (f" → saved to {output}" if output else ""),
            highlight=False,
            soft_wrap=True,  # one line in a log
        )
    if no_register:
        console.print(str(output))
        return
    record = st.registry().add(sft, tags=tuple(tag or ()), source=source_record)
    console.print(record.reference)


def _as_flags(message: str) -> str:
    """A configuration error in the CLI's words: ``grad_accum must …`` → ``--grad-accum must …``."""
    from dataclasses import fields

    from sftkit.training.config import TrainConfig

    for field in fields(TrainConfig):
        if message.startswith(f"{field.name} "):
            return f"--{field.name.replace('_', '-')}{message[len(field.name) :]}"
    return message


def _multi_sources(pairs: list[str], spec_file: Path | None) -> dict[str, dict[str, str]]:
    """``--source LANG=DATA`` flags and a ``--sources`` JSON file → {language: {"train", "validation", "sft"}}."""
    import json

    from sftkit.registry.references import check_name

    sources: dict[str, dict[str, str]] = {}

    def add(language: str, spec: dict[str, str], flag: str) -> None:
        language = check_name(language, flag)
        if language in sources:
            raise BadInputError(f"source language {language!r} given twice")
        sources[language] = spec

    for pair in pairs:
        language, equals, data = pair.partition("=")
        if not equals or not language or not data:
            raise BadInputError(f"--source expects LANG=DATA (e.g. ace=ace-train.csv), not {pair!r}")
        add(language, {"train": data}, "--source")
    if spec_file is not None:

        def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [key for key, _ in pairs]
            repeated = sorted({key for key in keys if keys.count(key) > 1})
            if repeated:
                raise BadInputError(f"--sources {spec_file}: {', '.join(repeated)} given twice")
            return dict(pairs)

        try:
            spec = json.loads(spec_file.read_text(encoding="utf-8"), object_pairs_hook=no_repeats)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInputError(f"--sources {spec_file}: not a readable JSON file ({exc})") from exc
        if not isinstance(spec, dict) or not spec:
            raise BadInputError(f'--sources {spec_file}: expected an object of source languages, e.g. {{"ace": …}}')
        here = spec_file.expanduser().resolve().parent
        for language, entry in spec.items():
            allowed = {"train", "validation", "sft"}
            if not isinstance(entry, dict) or "train" not in entry or set(entry) - allowed:
                raise BadInputError(
                    f'--sources {spec_file}: {language!r} needs {{"train": DATA}} (optional: validation, sft)'
                )
            if any(value is not None and not isinstance(value, str) for value in entry.values()):
                raise BadInputError(f"--sources {spec_file}: the values of {language!r} must be strings (paths, refs)")
            # Data paths are relative to the spec file (hf: datasets and registry references are not paths).
            entry = {
                key: str(here / value) if key != "sft" and not value.startswith("hf:") else value
                for key, value in entry.items()
                if value is not None
            }
            add(language, entry, "--sources")
    return sources


def _language_summary(sft: Any) -> str:
    """How a language SFT's MLM head was handled: the decoder and the head warm-up."""

    if sft.metadata.kind != "language":
        return ""
    decoder = "frozen untied decoder" if sft.metadata.trained_with_frozen_decoder else "tied decoder"
    steps = ((sft.metadata.trainer or {}).get("head_warmup") or {}).get("steps") or 0
    return f", {decoder}, head warm-up {steps} steps" if steps else f", {decoder}"


def eval_command(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="A composed model directory, or a task SFT reference/directory.")],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            "-d",
            help="Labelled CSV/TSV/JSONL (NusaX, SMSA, AmericasNLI formats); for a token classifier (NER, POS): "
            "CoNLL or JSONL with tokens and tags.",
        ),
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print the scores as JSON.")] = False,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 64,
    max_length: Annotated[int | None, typer.Option(help="Truncate inputs to this many tokens.")] = None,
    text_column: Annotated[
        str | None, typer.Option(help="Text column (default text; premise for pairs; tokens for token data).")
    ] = None,
    text_pair_column: Annotated[str | None, typer.Option(help="Second text column of pairs.")] = None,
    label_column: Annotated[str, typer.Option(help="Label column (tags for token data).")] = "label",
) -> None:
    """Macro-F1, accuracy and per-class scores of a classifier on labelled data; entity precision, recall and F1
    per type (NER) or word accuracy (POS) of a token classifier.

    A task SFT given alone is composed on its base model first (θ0 + φ_T with its head).
    """
    from sftkit.training import evaluate

    directory = Path(target).expanduser()
    if _is_tagger(ctx, directory, target):
        _eval_tagger(ctx, directory, target, data, json_output, batch_size, max_length, text_column, label_column)
        return
    options = {
        "batch_size": batch_size,
        "max_length": max_length,
        "text_column": text_column,
        "text_pair_column": text_pair_column,
        "label_column": label_column,
    }
    st = state(ctx)
    with activity(ctx, f"evaluating {target} on {data}"):
        if (directory / "config.json").is_file():
            scores = evaluate(directory, data, **options)
            what = str(directory)
        else:
            from sftkit.compose import compose

            record = resolve(ctx, target)
            if record.kind != "task":
                raise BadInputError(f"{record.reference} is a language SFT: evaluate a task SFT or a composed model")
            sft = st.registry().load(record)
            if not record.base_model:
                raise BadInputError(f"{record.reference} names no base model to compose it on")
            model = compose(record.base_model, [sft], references=[record.reference])
            scores = evaluate(model, data, tokenizer=record.base_model, **options)
            what = f"{record.reference} on {record.base_model}"
    if json_output:
        print_json(scores)
        return
    _print_scores(what, data, scores)


def _is_tagger(ctx: typer.Context, directory: Path, target: str) -> bool:
    """A token classifier: a model directory whose architecture is ``…ForTokenClassification``, or a token task SFT."""
    import json

    from sftkit.base_model import head_of_architecture

    if (directory / "config.json").is_file():
        try:
            architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            return False  # the evaluator reports what is wrong with the directory
        return any(head_of_architecture(str(name)) == "token-classification" for name in architectures)
    from sftkit.artifact import CONFIG_NAME

    record = resolve(ctx, target)
    if record.kind != "task":
        return False
    path = state(ctx).registry().local_copy(record)
    if path is None or not (path / CONFIG_NAME).is_file():
        return False  # loading the SFT says what is wrong with it
    try:
        metadata = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and metadata.get("head_type") == "token-classification"


def _eval_tagger(
    ctx: typer.Context,
    directory: Path,
    target: str,
    data: Path,
    json_output: bool,
    batch_size: int,
    max_length: int | None,
    tokens_column: str | None,
    tags_column: str,
) -> None:
    """``sftkit eval`` of a token classifier (NER, POS): ``evaluation.evaluate_tagger``."""
    from sftkit.training.evaluation import evaluate_tagger

    options = {
        "batch_size": batch_size,
        "max_length": max_length,
        "tokens_key": tokens_column or "tokens",
        "tags_key": tags_column if tags_column != "label" else "tags",
    }
    st = state(ctx)
    with activity(ctx, f"evaluating {target} on {data}"):
        if (directory / "config.json").is_file():
            scores, what = evaluate_tagger(directory, data, **options), str(directory)
        else:
            from sftkit.compose import compose

            record = resolve(ctx, target)
            if not record.base_model:
                raise BadInputError(f"{record.reference} names no base model to compose it on")
            model = compose(record.base_model, [st.registry().load(record)], references=[record.reference])
            scores = evaluate_tagger(model, data, tokenizer=record.base_model, **options)
            what = f"{record.reference} on {record.base_model}"
    if json_output:
        print_json(scores)
        return
    _print_tag_scores(what, data, scores)


def _print_tag_scores(what: str, data: Path, scores: dict[str, Any]) -> None:
    from rich.table import Table

    entities = "entity_f1" in scores
    size = f"{scores['entities']} entities in {scores['n']} words" if entities else f"n = {scores['n']} words"
    table = Table(title=f"{what} · {data} · {size}", title_justify="left")
    for column in ("entity type" if entities else "tag", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="right" if column in ("precision", "recall", "F1", "support") else "left")
    for label, row in scores["per_class"].items():
        table.add_row(label, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
    console.print(table)
    if entities:
        console.print(
            f"entity F1 [b]{scores['entity_f1']:.4f}[/b]   precision {scores['entity_precision']:.4f}   "
            f"recall {scores['entity_recall']:.4f}   word accuracy {scores['accuracy']:.4f}"
        )
    else:
        console.print(f"accuracy [b]{scores['accuracy']:.4f}[/b]   macro-F1 {scores['macro_f1']:.4f}")
    if scores.get("unpredicted_words"):
        console.print(f"{scores['unpredicted_words']} words cut off at the length limit were scored as unpredicted")


def _print_scores(what: str, data: Path, scores: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{what} · {data} · n = {scores['n']}", title_justify="left")
    for column in ("label", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for label, row in scores["per_class"].items():
        table.add_row(label, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
    console.print(table)
    console.print(f"macro-F1 [b]{scores['macro_f1']:.4f}[/b]   accuracy [b]{scores['accuracy']:.4f}[/b]")


def register(app: typer.Typer) -> None:
    app.command("train", epilog=EXAMPLES_TRAIN, rich_help_panel="Train")(train_command)
    app.command("eval", epilog=EXAMPLES_EVAL, rich_help_panel="Use")(eval_command)
