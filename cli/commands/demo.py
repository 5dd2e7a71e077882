"""``sftkit demo``: the whole method, offline, on the embedded toy world (``sftkit.toy``).

Builds a tiny XLM-R-shaped encoder and its tokenizer, generates toy multilingual data, trains
language SFTs (source ``src`` and targets ``ace``, ``ban``) and a sentiment task SFT with DEFT-X and
with LT-SFT into a registry, shows their overlap, composes θ0 + φ_T + φ_L for every target language
and method, evaluates, and prints a results table. Every number is measured in the run.

Kept to about a minute on 2 CPU cores (one thread) by sharing work the method itself allows, not by
skipping stages: LT-SFT and DEFT-X run the identical phase 1 (full fine-tuning) on the same data and
seed, so each language's phase 1 is trained once and reused through the trainer's full-phase cache
(keyed by the phase-1 settings, data, base and source SFT: the two task SFTs start from different
source SFTs, so each trains its own). Language SFTs run fewer MLM steps at a higher learning rate
than the toy schedule (``LANGUAGE_SCHEDULE``); every SFT records its settings in its metadata.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from sftkit.cli.context import console, err_console, print_json, progress, state

TARGETS = ("ace", "ban")
METHODS = {"deftx": "90var", "lt-sft": "none"}  # method → rank spec
SIZES = {"corpus": 1500, "train": 1200, "validation": 300, "test": 400}
# On top of the ``quick`` recipe (sized for a real base's smoke run): batches and steps for the toy world.
TASK_SCHEDULE = {"batch_size": 32, "max_steps": 250, "eval_steps": 50}
# Language SFTs (MLM): each phase is the demo's costliest part (64-token blocks); a higher learning rate in
# fewer steps ends at a lower validation MLM loss than the task schedule's.
LANGUAGE_SCHEDULE = {**TASK_SCHEDULE, "lr": 1e-2, "max_steps": 100, "eval_steps": 25}


def _step_reporter(bar: Any, task: Any) -> Any:
    """A trainer reporter advancing one progress task as steps go by (both phases count); ``phases``
    lists the phases the trainer actually ran (no ``full`` when phase 1 came from the cache)."""
    from sftkit.training.trainer import NullReporter

    class StepReporter(NullReporter):
        def __init__(self) -> None:
            self.offset = self.last = 0
            self.phases: list[str] = []

        def phase_started(self, phase: str, total_steps: int, done_steps: int) -> None:
            self.phases.append(phase)
            self.offset, self.last = self.offset + self.last, 0
            bar.update(task, total=self.offset + total_steps * (2 if phase == "full" else 1))

        def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
            self.last = step
            bar.update(task, completed=self.offset + step)

    return StepReporter()


def demo_command(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home", help="Keep the registry, base model and composed model here (default: a temporary dir)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the toy world and of training.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the measured results as JSON.")] = False,
) -> None:
    """Run the whole pipeline offline on an embedded toy setup and print what it measured.

    Trains language SFTs (src, ace, ban) and a sentiment task SFT with DEFT-X and LT-SFT on a tiny encoder, \
registers them, shows language-vs-task overlap, composes θ0 + φ_T + φ_L and evaluates zero-shot on the \
target languages, exports a composed model and runs a transformers pipeline on it. About a minute on \
2 CPU cores.
    """
    import torch

    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation overhead
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="sftkit-demo-")) if home is None else home
    try:
        results = _run(ctx, workdir, seed)
    finally:
        if home is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    if json_output:
        print_json(results)
    else:
        _render(results, kept=home)


def _run(ctx: typer.Context, workdir: Path, seed: int) -> dict[str, Any]:
    from sftkit import toy
    from sftkit.compose import compose, compose_to_directory
    from sftkit.overlap import overlap_by_method
    from sftkit.registry import Registry
    from sftkit.training import evaluate, make_config, train_sft

    stage = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal stage
        now = time.perf_counter()
        timings[name] = round(now - stage, 1)
        stage = now

    languages = toy.make_languages({"src": 0.0, "ace": 0.55, "ban": 0.35}, seed=seed)
    corpora = {code: toy.corpus(language, SIZES["corpus"], seed) for code, language in languages.items()}
    labelled = toy.labelled(languages["src"], SIZES["train"] + SIZES["validation"], seed)
    tests = {code: toy.labelled(languages[code], SIZES["test"], seed + 1) for code in ("src", *TARGETS)}
    base = toy.build_tiny_base(workdir / "base", [t for texts in corpora.values() for t in texts], seed=seed)
    registry = Registry.open(home=workdir / "registry")
    st = state(ctx)
    sfts: dict[tuple[str, str], Any] = {}
    references: dict[tuple[str, str], str] = {}
    phase1: dict[str, str] = {}  # reference → "trained" | "reused": what the trainer reported doing
    lap("toy world and base model")
    # Per run and removed after it (also with --home): a later run trains its own phase 1.
    with (
        progress(ctx, transient=True) as bar,
        tempfile.TemporaryDirectory(prefix="full-phase-cache-", dir=workdir) as full_phase_cache,
    ):

        def trained(label: str, config: Any, **data: Any) -> tuple[Any, str]:
            task = bar.add_task(label, total=None)
            reporter = _step_reporter(bar, task)
            sft = train_sft(config, reporter=reporter, full_phase_cache=full_phase_cache, **data)
            bar.remove_task(task)
            return sft, "trained" if "full" in reporter.phases else "reused"

        for method, rank in METHODS.items():
            for code in ("src", *TARGETS):
                config = make_config(
                    language=code,
                    recipe="quick",
                    base_model=str(base),
                    method=method,
                    rank=rank,
                    seed=seed,
                    **LANGUAGE_SCHEDULE,
                )
                sft, how = trained(f"language SFT {code} ({method})", config, train_data=corpora[code])
                record = registry.add(sft)
                sfts[code, method], references[code, method] = sft, record.reference
                phase1[record.reference] = how
            source = registry.resolve(references["src", method])
            config = make_config(
                task="sa", recipe="quick", base_model=str(base), method=method, rank=rank, seed=seed, **TASK_SCHEDULE
            )
            sft, how = trained(
                f"task SFT sa on src ({method})",
                config,
                train_data=labelled[: SIZES["train"]],
                validation_data=labelled[SIZES["train"] :],
                source=sfts["src", method],
                source_lineage={"reference": source.reference, "sha256": source.sha256, "language": "src"},
            )
            record = registry.add(sft, source=source)
            sfts["sa", method], references["sa", method] = sft, record.reference
            phase1[record.reference] = how
        lap("training and registering")

        triples = [(sfts[code, method], sfts["sa", method], method) for method in METHODS for code in TARGETS]
        overlap = overlap_by_method(triples).table("overlap")
        lap("overlap")

        scores: list[dict[str, Any]] = []
        evaluation = bar.add_task("composing and evaluating", total=len(METHODS) * len(TARGETS) * 2)
        for method in METHODS:
            for code in TARGETS:
                for with_language in (False, True):
                    parts = [sfts["sa", method]] + ([sfts[code, method]] if with_language else [])
                    model = compose(str(base), parts)
                    result = evaluate(model, tests[code], tokenizer=str(base))
                    scores.append(
                        {
                            "language": code,
                            "method": method,
                            "composition": "θ0 + φ_T + φ_L" if with_language else "θ0 + φ_T",
                            "macro_f1": result["macro_f1"],
                            "accuracy": result["accuracy"],
                            "n": result["n"],
                        }
                    )
                    bar.advance(evaluation)
        source_model = compose(str(base), [sfts["sa", "deftx"], sfts["src", "deftx"]])
        source_score = evaluate(source_model, tests["src"], tokenizer=str(base))
        lap("composition and evaluation")
        exported = compose_to_directory(
            str(base),
            [sfts["sa", "deftx"], sfts[TARGETS[0], "deftx"]],
            workdir / "models" / f"sa-{TARGETS[0]}",
            references=[references["sa", "deftx"], references[TARGETS[0], "deftx"]],
        )
    from transformers import pipeline

    example = toy.labelled(languages[TARGETS[0]], 1, seed + 2)[0]
    prediction = pipeline("text-classification", model=str(exported))(example[0])[0]
    lap("export and pipeline")
    if not st.quiet:
        err_console.print(f"registry: {len(registry.find())} SFTs in {workdir / 'registry'}", highlight=False)
    return {
        "registry": [
            registry.resolve(ref).to_dict() | {"path": None, "phase_1": phase1[ref]} for ref in references.values()
        ],
        "overlap": {method: dict(zip(TARGETS, values, strict=True)) for method, values in overlap.items()},
        "scores": scores,
        "source_language": {
            "language": "src",
            "macro_f1": source_score["macro_f1"],
            "accuracy": source_score["accuracy"],
        },
        "exported": {"path": str(exported), "text": example[0], "gold": example[1], "prediction": prediction},
        "timings": timings,
    }


def _render(results: dict[str, Any], kept: Path | None) -> None:
    from rich.table import Table

    sfts = Table(title="SFTs trained and registered")
    for column in ("reference", "method", "rank", "entries", "density", "phase 1", "validation (phase 2)"):
        sfts.add_column(column)
    for record in results["registry"]:
        sfts.add_row(
            record["reference"],
            record["method"],
            str(record["rank"]),
            f"{record['num_entries']:,}",
            f"{record['density']:.2%}" if record["density"] is not None else "—",
            "trained" if record["phase_1"] == "trained" else "shared",
            _validation(record["metrics"].get("sparse", {})),
        )
    console.print(sfts)
    if any(record["phase_1"] != "trained" for record in results["registry"]):
        console.print(
            "phase 1 (full fine-tuning) is identical for LT-SFT and DEFT-X given the same data, settings and "
            "start: trained once per language SFT, shared through the trainer's full-phase cache.",
            highlight=False,
        )

    overlap = Table(title="Language-vs-task overlap (shared / min size; paper Fig. 2)", min_width=60)
    overlap.add_column("method")
    for code in TARGETS:
        overlap.add_column(code, justify="right")
    for method, values in results["overlap"].items():
        overlap.add_row(method, *(f"{values[code]:.1%}" for code in TARGETS))
    console.print(overlap)

    table = Table(title="Zero-shot sentiment on toy target languages (task SFT trained on src)")
    for column in ("language", "method", "model", "macro-F1", "accuracy", "n"):
        table.add_column(column, justify="right" if column in ("macro-F1", "accuracy", "n") else "left")
    for row in results["scores"]:
        table.add_row(
            row["language"],
            row["method"],
            row["composition"],
            f"{row['macro_f1']:.3f}",
            f"{row['accuracy']:.3f}",
            str(row["n"]),
        )
    console.print(table)
    source = results["source_language"]
    console.print(
        f"source language src (θ0 + φ_T + φ_src, DEFT-X): macro-F1 {source['macro_f1']:.3f}, "
        f"accuracy {source['accuracy']:.3f}",
        highlight=False,
    )
    exported = results["exported"]
    where = exported["path"] if kept else "a temporary directory (use --home to keep it)"
    console.print(
        f"composed model written to {where}; pipeline('text-classification') on “{exported['text']}” → "
        f"{exported['prediction']['label']} (gold {exported['gold']})",
        highlight=False,
    )
    stages = ", ".join(f"{name} {seconds} s" for name, seconds in results["timings"].items())
    console.print(f"demo finished in {results['seconds']} s ({stages}) — every number above was measured in this run.")


def _validation(metrics: dict[str, Any]) -> str:
    """The best validation score of phase 2, as the trainer recorded it."""
    for key, label in (("loss", "MLM loss"), ("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        if metrics.get(key) is not None:
            return f"{label} {metrics[key]:.3f}"
    return "—"


def register(app: typer.Typer) -> None:
    app.command("demo", rich_help_panel="Start here")(demo_command)
