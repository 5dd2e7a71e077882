"""TIES / DARE merges and ``--tune`` on the NusaX miniature's SFTs (issue 20): do they beat θ0 + φ_T + φ_L?

Reads a cache directory of ``benchmarks/nusax_mini.py`` (``benchmarks/out/nusax_mini/<kind>-<setting>-<base>-<digest>/``
with ``budget.json`` and ``state.json``, whose ``sft_paths`` name the SFTs in the shared ``sft/`` cache) and,
for each core method (LT-SFT, DEFT-X 90var), task seed and target, composes the task SFT with the target's
language SFT on the miniature's θ0 (its fitted base):

- ``ties`` and ``dare-ties`` at D ∈ {0.3, 0.6, 0.9}, weights 1 and 1 (DARE seed 0);
- ``sum`` and ``ties`` tuned (``sftkit.tuning.tune``, sftkit's default candidates: w_L ∈ {0, .25, .5, .75, 1}, for
  ties also D ∈ {.2, .4, .6, .8, 1}, the full grid) on 100 rows of the target's NusaX *validation* split (a seeded
  sample; never test), by macro-F1 in float32;

then predicts the miniature's test rows with nusax_mini's ``predict`` (its precision and length), and reports macro-F1
per target (mean ± std over task seeds) and nusax_mini's paired bootstrap CIs (``paired_bootstrap``) of each row
against θ0 + φ_T + φ_L (``sum``, weights 1) and against θ0 + φ_T. Those two rows' predictions come from the
miniature's ``state.json`` (only read) or, when it lacks them, are made here the same way. Predictions, dev scores
and the tuned choices go to ``<cache>/merge_state.json`` (a rerun resumes), the report to ``<cache>/merge.json``
and, for a core cache, ``benchmarks/results/nusax_merge_<cache name>.json``.

    python benchmarks/nusax_merge.py --cache benchmarks/out/nusax_mini/core-table9-me5-small-<digest>
    python benchmarks/nusax_merge.py --quick --seeds 1   # nusax_mini's smoke sizes (SMOKE_SIZES), trained if missing
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))

import nusax_data  # noqa: E402  (sibling scripts, importable once their folder is on the path)
import nusax_mini as mini  # noqa: E402

DENSITIES = (0.3, 0.6, 0.9)
DEV_ROWS = 100
SETTINGS: dict[str, dict[str, Any]] = {
    **{f"{m} D {d}": {"merge": m, "density": d} for m in ("ties", "dare-ties") for d in DENSITIES},
    "sum, w_L tuned on dev": {"merge": "sum", "tune": True},
    "ties, w_L and D tuned on dev": {"merge": "ties", "tune": True},
}


def merged_row(method: str, setting: str) -> str:
    return f"{method}: θ0 + φ_T + φ_L, {setting}"


class Cache:
    """A miniature's cache directory, read only: its budget, θ0, SFTs, test rows and core predictions."""

    def __init__(self, directory: Path) -> None:
        recorded = json.loads((directory / "budget.json").read_text())
        names = {field.name for field in fields(mini.Budget)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in names}
        self.directory, self.budget, self.base = directory, mini.Budget(**values), recorded["fitted_base"]
        core = directory / "state.json"
        self.core = json.loads(core.read_text()) if core.is_file() else {"scores": {}}

    def sft(self, name: str):
        from sftkit.sft import SparseFineTuning

        recorded = self.core.get("sft_paths", {}).get(name)  # the miniature's shared SFT cache, by its own key
        if recorded is None or not Path(recorded).is_dir():
            mini.fail(f"SFT {name} of {self.directory} is missing: run benchmarks/nusax_mini.py for this budget first")
        return SparseFineTuning.load(recorded)

    def task(self, method: str, seed: int):
        return self.sft(f"task-{mini.method_key(method)}-s{seed}")

    def language(self, language: str, method: str):
        return self.sft(f"lang-{language}-{mini.method_key(method)}")

    def test_rows(self, language: str) -> list[tuple[str, str]]:
        return mini._rows(nusax_data.nusax_path(language, "test"))[: self.budget.test_rows]

    def core_predictions(self, row: str, seed: int, language: str) -> list[int] | None:
        return (self.core["scores"].get(f"{row}|{seed}|{language}") or {}).get("predictions")


def dev_rows(language: str) -> list[tuple[str, str]]:
    """A seeded sample of DEV_ROWS rows of the target's NusaX validation split (never its test split)."""
    rows = mini._rows(nusax_data.nusax_path(language, "valid"))
    return random.Random(f"dev-{language}").sample(rows, min(DEV_ROWS, len(rows)))


class Run:
    """Composes, tunes and predicts for one cache; everything it measures is kept in ``merge_state.json``."""

    def __init__(self, cache: Cache, state_name: str = "merge_state.json") -> None:
        from sftkit.base_model import load_tokenizer

        self.cache, self.tokenizer = cache, load_tokenizer(cache.base)
        self.state = mini.State(cache.directory / state_name)

    def kept(self, row: str, seed: int, language: str) -> list[int] | None:
        """The row's test predictions made before: here, or by the miniature itself."""
        return self.state.predictions(row, seed, language) or self.cache.core_predictions(row, seed, language)

    def predictions(self, row: str, seed: int, language: str, build) -> list[int]:
        """The row's test predictions: kept, or made now with ``build()``'s model."""
        found = self.kept(row, seed, language)
        if found is not None:
            return found
        started, budget = time.perf_counter(), self.cache.budget
        texts = [text for text, _ in self.cache.test_rows(language)]
        predicted = mini.predict(build(), self.tokenizer, texts, budget.task_max_length, budget.precision)
        gold = [mini.LABELS.index(label) for _, label in self.cache.test_rows(language)]
        f1 = float(mini.macro_f1_rows([gold], [predicted], len(mini.LABELS))[0])
        self.state.set_score(row, seed, language, {"macro_f1": f1, "n": len(gold), "predictions": predicted})
        mini.log(f"{row} seed {seed} {language}: macro-F1 {100 * f1:.1f} ({time.perf_counter() - started:.0f} s)")
        return predicted

    def tuned(self, key: str, sfts: list, merge: str, language: str) -> dict[str, Any]:
        """The best weights and D on the dev rows (``sftkit.tuning.tune``), kept under ``key``."""
        kept = self.state.data.setdefault("tuning", {})
        if key not in kept:
            from sftkit.training import scorer
            from sftkit.tuning import tune

            started = time.perf_counter()
            rows, length = dev_rows(language), self.cache.budget.task_max_length
            score = scorer(rows, self.tokenizer, mini.LABELS, batch_size=32, max_length=length)
            result = tune(self.cache.base, sfts, lambda model: score(model)["macro_f1"], merge=merge)
            best = result.best
            kept[key] = {
                "weights": list(best.weights),
                "density": best.density,
                "dev_macro_f1": best.score,
                "trials": len(result.trials),
                "search": result.search,
                "seconds": time.perf_counter() - started,
            }
            self.state.save()
            mini.log(f"tuned {key}: w {best.weights}, D {best.density}, dev macro-F1 {100 * best.score:.1f}")
        return kept[key]

    def cell(self, method: str, seed: int, language: str) -> None:
        from sftkit.compose import compose

        base = self.cache.base
        task, sft = self.cache.task(method, seed), self.cache.language(language, method)
        self.predictions(mini.alone_row(method), seed, language, lambda: compose(base, [task]))
        self.predictions(mini.composed_row(method), seed, language, lambda: compose(base, [task, sft]))
        for setting, options in SETTINGS.items():
            row, arguments = merged_row(method, setting), {"merge": options["merge"]}
            if options.get("tune"):
                choice = self.tuned(f"{row}|{seed}|{language}", [task, sft], options["merge"], language)
                weights, arguments["density"] = choice["weights"], choice["density"]
            else:
                weights, arguments["density"] = [1.0, 1.0], options["density"]
            self.predictions(row, seed, language, lambda w=weights, a=arguments: compose(base, [task, sft], w, **a))


def rows_of(methods) -> list[str]:
    return [
        row
        for method in methods
        for row in (mini.alone_row(method), mini.composed_row(method), *(merged_row(method, s) for s in SETTINGS))
    ]


def f1_table(
    run: Run, seeds: list[int], targets: tuple[str, ...], rows: list[str] | None = None
) -> dict[str, dict[str, tuple[float, float]]]:
    """{row: {language | "avg": (mean, std) over seeds of macro-F1 × 100}} (rows: the merge rows by default)."""
    gold = {lang: [mini.LABELS.index(label) for _, label in run.cache.test_rows(lang)] for lang in targets}

    def f1(row: str, seed: int, lang: str) -> float:
        predicted = run.kept(row, seed, lang)
        return 100 * float(mini.macro_f1_rows([gold[lang]], [predicted], len(mini.LABELS))[0])

    def spread(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    table = {}
    for row in rows or rows_of(mini.CORE_METHODS):
        per_seed = [[f1(row, seed, lang) for lang in targets] for seed in seeds]
        cells = {lang: spread([values[i] for values in per_seed]) for i, lang in enumerate(targets)}
        table[row] = cells | {"avg": spread([statistics.fmean(values) for values in per_seed])}
    return table


def effect_table(run: Run, seeds: list[int], targets: tuple[str, ...], resamples: int) -> dict[str, dict[str, Any]]:
    """Each merged row against the plain composition and against the task SFT alone, and each LT-SFT merge against
    DEFT-X's plain composition (does merge-time conflict resolution buy what training-time denoising does?):
    nusax_mini's paired bootstrap."""

    def effect(row: str, against: str) -> dict[str, Any]:
        return paired_effect(run, row, against, seeds, targets, resamples)

    out = {}
    for method in mini.CORE_METHODS:
        for setting in SETTINGS:
            row = merged_row(method, setting)
            for against, name in ((mini.composed_row(method), "sum, w 1"), (mini.alone_row(method), "θ0 + φ_T")):
                out[f"{method}, {setting} − {name}"] = effect(row, against)
    lt_sft, deft_x = mini.CORE_METHODS
    for setting in SETTINGS:
        out[f"{lt_sft}, {setting} − {deft_x}, sum, w 1"] = effect(
            merged_row(lt_sft, setting), mini.composed_row(deft_x)
        )
    return out


def paired_effect(
    run: Run, row: str, against: str, seeds: list[int], targets: tuple[str, ...], resamples: int
) -> dict[str, Any]:
    """Row minus row, per target and on average ("avg"): nusax_mini's paired bootstrap over the kept predictions."""
    gold = {lang: [mini.LABELS.index(label) for _, label in run.cache.test_rows(lang)] for lang in targets}
    per = {}
    for index, language in enumerate((*targets, "avg")):
        languages = targets if language == "avg" else (language,)
        cells = [(gold[lang], run.kept(row, s, lang), run.kept(against, s, lang)) for lang in languages for s in seeds]
        per[language] = mini.paired_bootstrap(cells, resamples=resamples, seed=index)
    return per


def add_seed_arguments(parser: argparse.ArgumentParser) -> None:
    """--seeds and --resamples, as every script reading a miniature's cache takes them."""
    parser.add_argument("--seeds", type=int, default=3, help="task-SFT seeds (their SFTs must be in the cache)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the effects' CIs")


def prepare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what cannot run (one line each), then set torch's threads: shared by the cache-reading scripts."""
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if not nusax_data.DATA_ROOT.is_dir():
        mini.fail(f"the data is not at {nusax_data.DATA_ROOT} (see ../shared/data/MANIFEST.md)")
    if args.cache is not None and not (args.cache / "budget.json").is_file():
        mini.fail(f"{args.cache} is not a nusax_mini cache directory (no budget.json)")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cache", type=Path, help="a nusax_mini cache directory (holds budget.json, sft/, state.json)")
    where.add_argument("--quick", action="store_true", help="nusax_mini's smoke sizes, its SFTs trained if missing")
    parser.add_argument("--base", default="me5-small", help="with --quick: the miniature's --base")
    add_seed_arguments(parser)
    args = parser.parse_args(argv)
    prepare(parser, args)
    from sftkit.base_model import quiet_transformers

    started, seeds = time.perf_counter(), list(range(args.seeds))
    with quiet_transformers():
        directory = args.cache or quick_cache(args.base, args.seeds)
        run = Run(Cache(directory))
        targets = run.cache.budget.targets
        for seed in seeds:
            for method in mini.CORE_METHODS:
                for language in targets:
                    run.cell(method, seed, language)
        table = f1_table(run, seeds, targets)
        effects = effect_table(run, seeds, targets, args.resamples)
    report = {
        "cache": str(directory),
        "budget": asdict(run.cache.budget),
        "seeds": seeds,
        "dev_rows": DEV_ROWS,
        "settings": SETTINGS,
        "macro_f1": {row: {lang: list(cell) for lang, cell in cells.items()} for row, cells in table.items()},
        "effects": effects,
        "tuning": run.state.data.get("tuning", {}),
        "wall_seconds": time.perf_counter() - started,
        "load_average": os.getloadavg(),
    }
    (directory / "merge.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    if directory.name.startswith("core-"):
        mini.RECORDS.mkdir(exist_ok=True)
        (mini.RECORDS / f"nusax_merge_{directory.name}.json").write_text(
            json.dumps(report, indent=1, default=str) + "\n"
        )
    print(mini.markdown(table, replace(run.cache.budget, targets=targets), seeds))
    print()
    print(mini.effects_markdown(effects, targets))
    print("(**bold**: the 95 % CI excludes 0)")
    print(f"\nwall time {report['wall_seconds'] / 60:.1f} min; report: {directory / 'merge.json'}")
    return 0


def quick_cache(base: str, seeds: int) -> Path:
    """nusax_mini's ``--quick`` cache (SMOKE_SIZES), its core SFTs trained there first if missing."""
    budget = replace(mini.QUICK, base=base)
    name = Path(base).name if base not in ("me5-small", "minilm") else base
    directory = mini.OUT / f"quick-table9-{name}-{budget.digest()}"
    mini.Experiment(budget, mini.resolve_base(base), list(range(seeds)), directory).run_core()
    return directory


if __name__ == "__main__":
    sys.exit(main())
