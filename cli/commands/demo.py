"""``sftkit demo``: the whole method, offline, on the embedded toy world (``sftkit.toy``).

Starts from the toy θ0 that ships with sftkit (a tiny XLM-R-shaped encoder pretrained on a source
language and its relatives, hardly on the targets: ``sftkit.toy`` says how the toy maps onto XLM-R and
Acehnese), generates the seed's data, trains language SFTs (source ``src`` and targets ``ace``, ``ban``)
and a sentiment task SFT with DEFT-X and with LT-SFT into a registry in ``--home``, shows their overlap,
composes θ0 + φ_T + φ_L for every target language and method, evaluates zero-shot, exports one composed
model, runs a transformers pipeline on it, and prints what to try next. Every number is measured in the run.

About three minutes of CPU time (most of it the language SFTs, which need 1 000 steps per phase to learn
their targets' words), kept there by sharing work the method itself allows, not by skipping stages: LT-SFT
and DEFT-X run the identical phase 1 (full fine-tuning) on the same data and seed, so each language's
phase 1 is trained once and reused through the trainer's full-phase cache (keyed by the phase-1 settings,
data, base and source SFT: the two task SFTs start from different source SFTs, so each trains its own).
On two cores it takes half that wall time: ``--workers 2`` (the default there) trains two SFTs at once in
worker processes, each as soon as what it needs exists (``demo_jobs``), with the same results as one
worker. ``benchmarks/demo_seeds.py`` runs it for seeds 0–4.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from sftkit.cli.context import console, print_json, progress

METHODS = {"deftx": "90var", "lt-sft": "none"}  # method → rank spec
DEMO_MARKER = ".sftkit-demo"
SIZES = {"corpus": 1500, "train": 1200, "validation": 300, "test": 400}
# Every setting that decides a number is spelled out here rather than taken from the ``quick`` recipe, so
# the demo does not drift when the recipe does. Each was measured on the toy (benchmarks/RESULTS.md, issue 18):
# - A language SFT has to teach θ0 the target's words it never saw, as the paper's language SFTs (tens of
#   thousands of steps) do. A target-only word's embedding has cosine 0.36 with its source translation's in θ0,
#   0.60 for a relative's word θ0 learnt in pretraining. 100 steps at lr 1e-3 left it at 0.37, and the language
#   SFT did not help (13 of 20 cases, +0.01 macro-F1); 1 000 steps at θ0's pretraining lr (3e-3) on batches of
#   32 blocks of 16 tokens (θ0's pretraining blocks) reach 0.56, and it helps. k = 10 % of the maskable
#   entries: at the paper's share (2.8 %) less of what phase 1 learnt fits the sparse phase (with a 500-step
#   sparse phase, seeds 0 / 1: +0.019 / +0.004 on average against +0.029 / +0.013 at 10 %). L1 0.1 is the
#   paper's language-SFT weight.
# - The task SFT: lr 2e-3 (two thirds of θ0's pretraining peak: an SFT adapts θ0, it must not overwrite
#   it), and k set as the paper sets K, where the sparse phase recovers what phase 1 learnt: at the paper's
#   share (5.1 %) the toy's sparse task SFT stopped at validation macro-F1 0.77–0.78 after phase 1's 0.85–0.86
#   (seed 0); at 15 % it ends within 0.04 of phase 1 or above it. A 140 k-parameter toy needs a larger share
#   of itself than XLM-R does.
SCHEDULES = {
    "language": {
        "lr": 3e-3,
        "max_steps": 1000,
        "min_steps": 1000,
        "eval_steps": 250,
        "batch_size": 32,  # blocks of 16 tokens: θ0's pretraining blocks (sftkit.toy.PRETRAINING), 512 a step
        "max_length": 16,
        "k": 0.1,
        "l1": 0.1,
    },
    "task": {"lr": 2e-3, "max_steps": 300, "eval_steps": 75, "batch_size": 32, "max_length": 64, "k": 0.15},
}


def _step_reporter(bar: Any, task: Any) -> Any:
    """A trainer reporter advancing one progress task as steps go by (both phases count; which phases ran is
    recorded by ``demo_jobs``)."""
    from sftkit.training.trainer import NullReporter

    class StepReporter(NullReporter):
        def __init__(self) -> None:
            self.offset = self.last = 0

        def phase_started(self, phase: str, total_steps: int, done_steps: int) -> None:
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
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Train this many SFTs at once, each in its own process on one thread (default: 2, or 1 on a "
            "one-CPU machine). The results do not depend on it.",
        ),
    ] = min(2, os.cpu_count() or 1),
    json_output: Annotated[bool, typer.Option("--json", help="Print the measured results as JSON.")] = False,
) -> None:
    """Run the whole pipeline offline on an embedded toy setup and print what it measured.

    Trains language SFTs (src, ace, ban) and a sentiment task SFT with DEFT-X and LT-SFT on a tiny encoder, \
registers them, shows language-vs-task overlap, composes θ0 + φ_T + φ_L and evaluates zero-shot on the \
target languages, exports a composed model and runs a transformers pipeline on it. About three minutes \
of CPU time: under two minutes on two cores, which train two SFTs at once (--workers).
    """
    import torch

    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation overhead
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="sftkit-demo-")) if home is None else _demo_home(home)
    try:
        results = _run(ctx, workdir, seed, workers)
    finally:
        if home is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["workers"] = workers
    results["home"] = str(workdir) if home is not None else None
    results["next_steps"] = next_steps(str(workdir)) if home is not None else []
    if json_output:
        print_json(results)
    else:
        _render(results)


def _demo_home(home: Path) -> Path:
    """``--home`` as everywhere else: the registry's home (registry.db, store/), here with the demo's base
    model, data and composed model beside it. A directory holding anything but an earlier demo is refused,
    so the demo never mixes toy SFTs into a real registry; an earlier demo's is replaced."""
    from sftkit.errors import BadInputError

    home = home.expanduser().resolve()
    if home.exists() and not home.is_dir():
        raise BadInputError(f"--home {home} is a file, not a directory")
    if home.is_dir() and any(home.iterdir()):
        if not (home / DEMO_MARKER).is_file():
            raise BadInputError(
                f"--home {home} is not empty and was not made by sftkit demo: give a new or empty directory"
            )
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / DEMO_MARKER).write_text("made by sftkit demo; the next demo run with this --home replaces it\n")
    return home


def _run(ctx: typer.Context, workdir: Path, seed: int, workers: int) -> dict[str, Any]:
    from sftkit import toy
    from sftkit.cli.commands.demo_jobs import Job, JobKey, run_jobs
    from sftkit.compose import compose, compose_to_directory
    from sftkit.overlap import overlap_by_method
    from sftkit.registry import Registry
    from sftkit.registry.location import DB_NAME, sqlite_url
    from sftkit.sft import SparseFineTuning
    from sftkit.training import evaluate

    stage = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal stage
        now = time.perf_counter()
        timings[name] = round(now - stage, 1)
        stage = now

    family = toy.make_family()  # one world, as there is one XLM-R; the seed draws the data and the training
    source, targets = family.pretraining[toy.SOURCE_LANGUAGE], tuple(family.targets)
    languages = {toy.SOURCE_LANGUAGE: source, **family.targets}
    corpora = {code: toy.corpus(language, SIZES["corpus"], seed) for code, language in languages.items()}
    labelled = toy.labelled(source, SIZES["train"] + SIZES["validation"], seed)
    tests = {code: toy.labelled(language, SIZES["test"], seed + 1) for code, language in languages.items()}
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    for code in targets:
        toy.write_corpus(data / f"{code}.txt", corpora[code])
        toy.write_labelled_csv(data / f"{code}-test.csv", tests[code])
    toy.write_labelled_csv(data / "src-train.csv", labelled[: SIZES["train"]])
    # θ0 ships with sftkit (built by python -m sftkit.toy): copied so that the home holds everything its
    # SFTs name, and every later command on it (compose, eval) finds the base they were trained on.
    base = Path(shutil.copytree(toy.pretrained_base(), workdir / "base"))
    lap("toy world and θ0")
    registry = Registry.open(home=workdir, url=sqlite_url(workdir / DB_NAME), store=workdir / "store")
    jobs = _training_jobs(base, seed, corpora, labelled, targets)
    sfts: dict[JobKey, Any] = {}
    records: dict[JobKey, Any] = {}
    phase1: dict[str, str] = {}  # reference → "trained" | "reused": what the trainer reported doing
    ended: dict[JobKey, tuple[Path, list[str]]] = {}
    # Per run and removed after it (also with --home): a later run trains its own phase 1.
    with (
        progress(ctx, transient=True) as bar,
        tempfile.TemporaryDirectory(prefix="full-phase-cache-", dir=workdir) as full_phase_cache,
        tempfile.TemporaryDirectory(prefix="trained-", dir=workdir) as trained,
    ):
        bars: dict[JobKey, Any] = {}

        def reporter_for(job: Job) -> Any:
            bars[job.key] = bar.add_task(job.label, total=None)
            return _step_reporter(bar, bars[job.key])

        def finished(job: Job, directory: Path, phases: list[str]) -> None:
            bar.remove_task(bars.pop(job.key))
            ended[job.key] = directory, phases
            # Within a name the first method's SFT is registered first (DEFT-X @1, LT-SFT @2), whichever ended first.
            for index, ready in enumerate(jobs):
                earlier = [other.key for other in jobs[:index] if other.key[0] == ready.key[0]]
                if ready.key in ended and ready.key not in records and all(key in records for key in earlier):
                    done_in, phases_run = ended[ready.key]
                    record = registry.add(done_in, source=records[ready.source] if ready.source else None)
                    records[ready.key], sfts[ready.key] = record, SparseFineTuning.load(done_in)
                    phase1[record.reference] = "trained" if "full" in phases_run else "reused"

        def lineage_of(key: JobKey) -> dict[str, Any]:
            return {"reference": records[key].reference, "sha256": records[key].sha256, "language": key[0]}

        run_jobs(
            jobs,
            workers=workers,
            directory=Path(trained),
            full_phase_cache=Path(full_phase_cache),
            reporter_for=reporter_for,
            finished=finished,
            lineage_of=lineage_of,
        )
        references = {key: records[key].reference for method in METHODS for key in _keys(method, targets)}
        lap("training and registering")

        triples = [(sfts[code, method], sfts["sa", method], method) for method in METHODS for code in targets]
        overlap = overlap_by_method(triples).table("overlap")
        lap("overlap")

        scores: list[dict[str, Any]] = []
        evaluation = bar.add_task("composing and evaluating", total=len(METHODS) * len(targets) * 2)
        for method in METHODS:
            for code in targets:
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
            [sfts["sa", "deftx"], sfts[targets[0], "deftx"]],
            workdir / "models" / f"sa-{targets[0]}",
            references=[references["sa", "deftx"], references[targets[0], "deftx"]],
        )
    from transformers import pipeline

    example = toy.labelled(family.targets[targets[0]], 1, seed + 2)[0]
    prediction = pipeline("text-classification", model=str(exported))(example[0])[0]
    lap("export and pipeline")
    return {
        "registry": [
            registry.resolve(ref).to_dict() | {"path": None, "phase_1": phase1[ref]} for ref in references.values()
        ],
        "overlap": {method: dict(zip(targets, values, strict=True)) for method, values in overlap.items()},
        "scores": scores,
        "source_language": {
            "language": "src",
            "macro_f1": source_score["macro_f1"],
            "accuracy": source_score["accuracy"],
        },
        "exported": {"path": str(exported), "text": example[0], "gold": example[1], "prediction": prediction},
        "timings": timings,
    }


def _keys(method: str, targets: tuple[str, ...]) -> list[tuple[str, str]]:
    """The SFTs of one method, in the order the demo lists them: source, targets, task."""
    from sftkit import toy

    return [(code, method) for code in (toy.SOURCE_LANGUAGE, *targets, "sa")]


def _training_jobs(
    base: Path, seed: int, corpora: dict[str, list[str]], labelled: list[Any], targets: tuple[str, ...]
) -> list[Any]:
    """The eight SFTs as jobs, in priority order: the first method's language SFTs first (they train phase 1,
    the longest jobs: about 40 s each on one thread here, the other method's 17 s, a task SFT's 10 s), then
    the source language's chain (its second SFT, the task SFTs on both), then the rest. On two workers
    this keeps both busy to the end: about half the work's time, the work's critical path being a third."""
    from sftkit import toy
    from sftkit.cli.commands.demo_jobs import Job
    from sftkit.training import make_config

    first = next(iter(METHODS))  # its run trains each language's phase 1; the other method's reuses it

    def language(code: str, method: str) -> Job:
        config = make_config(
            language=code,
            recipe="quick",
            base_model=str(base),
            method=method,
            rank=METHODS[method],
            seed=seed,
            **SCHEDULES["language"],
        )
        needs = () if method == first else ((code, first),)
        return Job((code, method), f"language SFT {code} ({method})", config, {"train_data": corpora[code]}, needs)

    def task(method: str) -> Job:
        config = make_config(
            task="sa",
            recipe="quick",
            base_model=str(base),
            method=method,
            rank=METHODS[method],
            seed=seed,
            **SCHEDULES["task"],
        )
        source = (toy.SOURCE_LANGUAGE, method)
        data = {"train_data": labelled[: SIZES["train"]], "validation_data": labelled[SIZES["train"] :]}
        return Job(("sa", method), f"task SFT sa on src ({method})", config, data, (source,), source)

    src, (one, two), other = toy.SOURCE_LANGUAGE, targets, next(m for m in METHODS if m != first)
    return [
        language(src, first),
        language(one, first),
        language(two, first),
        language(src, other),
        task(first),
        task(other),
        language(one, other),
        language(two, other),
    ]


def _render(results: dict[str, Any]) -> None:
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
    targets = tuple(next(iter(results["overlap"].values())))
    for code in targets:
        overlap.add_column(code, justify="right")
    for method, values in results["overlap"].items():
        overlap.add_row(method, *(f"{values[code]:.1%}" for code in targets))
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
    where = exported["path"] if results["home"] else "a temporary directory (use --home to keep it)"
    console.print(
        f"composed model written to {where}; pipeline('text-classification') on “{exported['text']}” → "
        f"{exported['prediction']['label']} (gold {exported['gold']})",
        highlight=False,
    )
    stages = ", ".join(f"{name} {seconds} s" for name, seconds in results["timings"].items())
    workers = f"{results['workers']} worker{'s' if results['workers'] > 1 else ''}"
    console.print(
        f"demo finished in {results['seconds']} s on {workers} ({stages}) — every number above was measured in this "
        "run.",
        highlight=False,
    )
    if results["home"] is None:
        console.print(
            "Everything was in a temporary directory, now removed. To keep the registry, base model, data and "
            "composed model and try further commands on them: sftkit demo --home DIR",
            highlight=False,
        )
    else:
        console.print(f"Next, on what the demo left in {results['home']} (DEFT-X SFTs are @1, LT-SFT @2):")
        for command in results["next_steps"]:
            console.print(f"  {command}", highlight=False, soft_wrap=True)


def next_steps(home: str) -> list[str]:
    """Commands to try next on what the demo left in ``home``, with its exact paths."""
    h = shlex.quote(home)
    return [
        f"sftkit --home {h} list",
        f"sftkit --home {h} show lang:ace@1",
        f"sftkit --home {h} overlap lang:ace@1 lang:ban@1 task:sa@1",
        f"sftkit --home {h} compose --task task:sa@1 --lang lang:ban@1 -o {h}/models/sa-ban",
        f"sftkit eval {h}/models/sa-ban --data {h}/data/ban-test.csv",
        f"sftkit --home {h} train --lang ace --corpus {h}/data/ace.txt --base {h}/base --recipe quick",
    ]


def _validation(metrics: dict[str, Any]) -> str:
    """The best validation score of phase 2, as the trainer recorded it."""
    for key, label in (("loss", "MLM loss"), ("macro_f1", "macro-F1"), ("accuracy", "accuracy")):
        if metrics.get(key) is not None:
            return f"{label} {metrics[key]:.3f}"
    return "—"


def register(app: typer.Typer) -> None:
    app.command("demo", rich_help_panel="Start here")(demo_command)
