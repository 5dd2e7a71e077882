"""Which part of the language SFT costs the NusaX miniature its composition? (issue 19's reading)

On the miniature, θ0 + φ_T + φ_L scores below θ0 + φ_T. A language SFT's entries sit in two places: the word
embeddings (rows of the tokens its language's text uses: what teaching θ0 a language's words changes) and
the transformer layers (what the MLM objective reshapes in the encoder the task head reads). This script
splits each language SFT φ_L of a ``benchmarks/nusax_mini.py`` cache into those two parts,
φ_L = φ_L[embeddings] + φ_L[layers] (every entry in exactly one), composes each part with the task SFT on the
miniature's θ0, and reports, per core method, task seed and target, macro-F1 on the test rows and
nusax_mini's paired bootstrap CIs of each part's row against θ0 + φ_T and against θ0 + φ_T + φ_L, plus each
language SFT's share of entries and of |φ| per part. Predictions of θ0 + φ_T and θ0 + φ_T + φ_L come from the
miniature's ``state.json``; the parts' go to ``<cache>/parts_state.json`` (a rerun resumes), the report to
``<cache>/parts.json`` and, for a core cache, ``benchmarks/results/nusax_parts_<cache name>.json``.

    python benchmarks/nusax_parts.py --cache benchmarks/out/nusax_mini/core-table9-me5-small-<digest>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))

import nusax_merge as merge  # noqa: E402
import nusax_mini as mini  # noqa: E402

PARTS: dict[str, Callable[[str], bool]] = {
    "embeddings": lambda name: name.startswith("embeddings."),
    "layers": lambda name: not name.startswith("embeddings."),
}


def part_row(method: str, part: str) -> str:
    return f"{method}: θ0 + φ_T + φ_L[{part}]"


def restricted(sft, part: str):
    """The entries of ``sft`` in one part, as an SFT of their own (a language SFT has no dense tensors: its
    MLM decoder is frozen)."""
    from sftkit.sft import SparseFineTuning

    keep = PARTS[part]
    return SparseFineTuning({name: delta for name, delta in sft.diffs.items() if keep(name)}, {}, sft.metadata)


def anatomy(sft) -> dict[str, dict[str, float]]:
    """Each part's share of the SFT's entries and of its summed |φ|."""
    entries = {part: 0 for part in PARTS}
    mass = {part: 0.0 for part in PARTS}
    for name, delta in sft.diffs.items():
        part = next(part for part, keep in PARTS.items() if keep(name))
        entries[part] += delta.values.numel()
        mass[part] += float(delta.values.abs().sum())
    total_entries, total_mass = sum(entries.values()), sum(mass.values())
    return {
        part: {"entries": entries[part] / total_entries, "abs_mass": mass[part] / total_mass if total_mass else 0.0}
        for part in PARTS
    }


def evaluate_cell(run: merge.Run, method: str, seed: int, language: str) -> None:
    from sftkit.compose import compose

    base = run.cache.base
    task, sft = run.cache.task(method, seed), run.cache.language(language, method)
    run.predictions(mini.alone_row(method), seed, language, lambda: compose(base, [task]))
    run.predictions(mini.composed_row(method), seed, language, lambda: compose(base, [task, sft]))
    for part in PARTS:
        run.predictions(
            part_row(method, part), seed, language, lambda p=part: compose(base, [task, restricted(sft, p)])
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cache", type=Path, required=True, help="a nusax_mini cache directory (budget.json, state.json)"
    )
    merge.add_seed_arguments(parser)
    args = parser.parse_args(argv)
    merge.prepare(parser, args)
    from sftkit.base_model import quiet_transformers

    started, seeds = time.perf_counter(), list(range(args.seeds))
    with quiet_transformers():
        run = merge.Run(merge.Cache(args.cache), state_name="parts_state.json")
        targets = run.cache.budget.targets
        for seed in seeds:
            for method in mini.CORE_METHODS:
                for language in targets:
                    evaluate_cell(run, method, seed, language)
        rows = [
            row
            for method in mini.CORE_METHODS
            for row in (mini.alone_row(method), mini.composed_row(method), *(part_row(method, p) for p in PARTS))
        ]
        table = merge.f1_table(run, seeds, targets, rows)
        effects = {}
        for method in mini.CORE_METHODS:
            for part in PARTS:
                for against, name in (
                    (mini.alone_row(method), "θ0 + φ_T"),
                    (mini.composed_row(method), "θ0 + φ_T + φ_L"),
                ):
                    effects[f"{part_row(method, part)} − {name}"] = merge.paired_effect(
                        run, part_row(method, part), against, seeds, targets, args.resamples
                    )
        shares = {
            f"lang-{language}-{mini.method_key(method)}": anatomy(run.cache.language(language, method))
            for method in mini.CORE_METHODS
            for language in targets
        }
    report = {
        "cache": str(args.cache),
        "budget": asdict(run.cache.budget),
        "seeds": seeds,
        "parts": {"embeddings": "entries of embeddings.* parameters", "layers": "every other entry (encoder.*)"},
        "macro_f1": {row: {lang: list(cell) for lang, cell in cells.items()} for row, cells in table.items()},
        "effects": effects,
        "language_sft_parts": shares,
        "wall_seconds": time.perf_counter() - started,
        "load_average": os.getloadavg(),
    }
    (args.cache / "parts.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.cache.name.startswith("core-"):
        mini.RECORDS.mkdir(exist_ok=True)
        record = mini.RECORDS / f"nusax_parts_{args.cache.name}.json"
        record.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(mini.markdown(table, replace(run.cache.budget, targets=targets), seeds))
    print()
    print(mini.effects_markdown(effects, targets))
    print("(**bold**: the 95 % CI excludes 0)")
    print("\nshare of each language SFT's entries / |φ| in the embeddings:")
    for name, parts in shares.items():
        print(f"  {name}: {100 * parts['embeddings']['entries']:.1f} % / {100 * parts['embeddings']['abs_mass']:.1f} %")
    print(f"\nwall time {report['wall_seconds'] / 60:.1f} min; report: {args.cache / 'parts.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
