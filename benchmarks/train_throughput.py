"""Training throughput on this CPU (issue 19): real tokens per second of the trainer on mE5-small over SMSA.

Every case is the real trainer (``sftkit.training.train``) on multilingual-e5-small (converted offline by
``bases.py``), in its own interpreter, on the same seeded sample of SMSA train sentences, one epoch per
phase (LT-SFT, so no SVD between the phases; the method does not change a step):

- ``task-fp32-random``   a task SFT as it trained before issue 19: fp32, random batches (the baseline);
- ``task-fp32-grouped``  length-grouped batches alone;
- ``task-bf16-random``   bf16 autocast alone;
- ``task-bf16-grouped``  both: what the issue asks to be ≥ 2× the baseline;
- ``language-fp32`` / ``language-bf16``  a language SFT (MLM on fixed-length blocks of the same sentences;
  grouping is a no-op there, so only the precision differs).

Throughput = real (non-padding) tokens of a phase's steps / their wall time, timed between the trainer's
per-step reports; the first step of each phase (optimiser state allocation) is left out and validation
runs only after the last step. All task cases train on the same sentences for one epoch, so they see the
same real tokens and differ only in padding and precision. The padding rows count the tokens a batch
computes per real token over one epoch, for the sample and for all of SMSA train.

    python benchmarks/train_throughput.py           # 320 sentences: 20 task + 15 MLM steps per phase per case
    python benchmarks/train_throughput.py --sentences 160 --json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bases
from _common import machine_note, run_case
from _table import Row, print_rows
from nusax_data import smsa_path

from sftkit.training import make_config, train
from sftkit.training.data import load_labelled
from sftkit.training.features import BatchOrder, tokenize_corpus, tokenize_labelled
from sftkit.training.trainer import NullReporter

TASK_CASES = ("task-fp32-random", "task-fp32-grouped", "task-bf16-random", "task-bf16-grouped")
LANGUAGE_CASES = ("language-fp32", "language-bf16")
PHASES = ("full", "sparse")
SEED = 1
MAX_LENGTH = 128  # the miniature's task length (issue 19, section 2); MLM blocks of the same length
BATCH = {"task": 16, "language": 8}  # the paper's SA and MLM batch sizes
TARGET = 2.0


class _StepClock(NullReporter):
    """The trainer's reporter: the wall-clock time of every step report, by phase."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.phase = ""

    def phase_started(self, phase: str, total_steps: int, done_steps: int) -> None:
        self.phase = phase
        self.times[phase] = [time.perf_counter()]

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        self.times[self.phase].append(time.perf_counter())


def smsa_sample(count: int, split: str = "train") -> list[tuple[str, str]]:
    """``count`` (text, label) rows of an SMSA split, a seeded sample (all rows when ``count`` is 0)."""
    examples = load_labelled(smsa_path(split)).examples
    rows = [(example.text, example.label) for example in examples]
    return random.Random(SEED).sample(rows, count) if count else rows


def _items(kind: str, tokenizer: Any, rows: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The training items exactly as the trainer tokenises them (it is given no held-out split)."""
    if kind == "language":
        return tokenize_corpus(tokenizer, [text for text, _ in rows], MAX_LENGTH)
    labels = sorted({label for _, label in rows})
    examples = load_labelled(rows).examples
    return tokenize_labelled(tokenizer, examples, {label: i for i, label in enumerate(labels)}, MAX_LENGTH)


def _step_tokens(items: list[dict[str, Any]], batch: int, grouped: bool, steps: int) -> list[tuple[int, int]]:
    """(real tokens, padded tokens) of each step, drawn by the trainer's own ``BatchOrder``."""
    lengths = [len(item["input_ids"]) for item in items]
    order = BatchOrder(len(items), batch, SEED, lengths=lengths if grouped else None)
    tokens = []
    for step in range(steps):
        drawn = [lengths[i] for i in order.indices(step)]
        tokens.append((sum(drawn), max(drawn) * len(drawn)))
    return tokens


def run(case: str, sentences: int) -> dict[str, Any]:
    """One case in this process: per phase, timed steps, seconds and real / padded tokens of those steps."""
    from sftkit.base_model import load_tokenizer

    kind, precision = case.split("-")[:2]
    grouped = case.endswith("grouped")
    base = str(bases.ensure_base("me5-small"))
    rows, validation = smsa_sample(sentences), smsa_sample(64, "valid")
    items = _items(kind, load_tokenizer(base), rows)
    steps = -(-len(items) // BATCH[kind])  # one epoch per phase
    schedule = {"epochs": 1.0, "min_steps": 0, "max_steps": steps, "eval_steps": steps}  # validate once, at the end
    common = {
        "base_model": base,
        "method": "lt-sft",
        "k": 0.05,
        "batch_size": BATCH[kind],
        "max_length": MAX_LENGTH,
        "seed": SEED,
        "device": "cpu",
        "precision": precision,
        "group_by_length": grouped,
        **schedule,
    }
    if kind == "task":
        config = make_config(task="sa", recipe="paper-sa", lr=1e-4, **common)
        data: Any = rows
    else:
        config = make_config(language="id", recipe="paper-lang", head_warmup_steps=0, **common)
        data, validation = [text for text, _ in rows], [text for text, _ in validation]
    clock = _StepClock()
    trainer = train(config, train_data=data, validation_data=validation, reporter=clock).sft.metadata.trainer
    assert (trainer["train_examples"], trainer["steps_per_phase"]) == (len(items), steps), "not the data measured"
    tokens = _step_tokens(items, BATCH[kind], grouped, steps)[1:]  # the first step is not timed
    phases = {}
    for phase in PHASES:
        times = clock.times[phase]  # phase start, then the end of every step
        phases[phase] = {
            "steps": len(times) - 2,
            "seconds": times[-1] - times[1],
            "real_tokens": sum(real for real, _ in tokens),
            "padded_tokens": sum(padded for _, padded in tokens),
        }
    return {"case": case, "phases": phases}


def _rate(result: dict[str, Any], *phases: str) -> float:
    """Real tokens per second over ``phases`` together."""
    measured = [result["phases"][phase] for phase in phases]
    return sum(m["real_tokens"] for m in measured) / sum(m["seconds"] for m in measured)


def _padding(items: list[dict[str, Any]], batch: int, grouped: bool) -> float:
    steps = -(-len(items) // batch)
    tokens = _step_tokens(items, batch, grouped, steps)
    return sum(padded for _, padded in tokens) / sum(real for real, _ in tokens)


def padding_rows(sentences: int) -> list[Row]:
    """Tokens computed per real token over one epoch of task batches, random vs grouped (no training)."""
    from sftkit.base_model import load_tokenizer

    tokenizer = load_tokenizer(str(bases.ensure_base("me5-small")))
    rows = []
    for label, count in ((f"the {sentences}-sentence sample", sentences), ("all of SMSA train", 0)):
        items = _items("task", tokenizer, smsa_sample(count))
        grouped, plain = _padding(items, BATCH["task"], True), _padding(items, BATCH["task"], False)
        metric = f"task batches: computed / real tokens, {label} ({len(items):,} sentences)"
        rows.append(Row(metric, grouped, plain, "random batches", grouped / plain, "info"))
    return rows


def throughput_rows(results: dict[str, dict[str, Any]]) -> list[Row]:
    rows = []
    baseline = results["task-fp32-random"]
    for case in TASK_CASES[1:]:
        for phase in PHASES:
            ours, theirs = _rate(results[case], phase), _rate(baseline, phase)
            final = case == "task-bf16-grouped"
            target = f"≥ {TARGET:g}" if final else "info"
            metric = f"task phase {PHASES.index(phase) + 1} ({phase}), {case[5:]}: real tokens/s"
            passed = ours / theirs >= TARGET if final else None
            rows.append(Row(metric, ours, theirs, "fp32, random batches", ours / theirs, target, passed))
    ours, theirs = _rate(results["task-bf16-grouped"], *PHASES), _rate(baseline, *PHASES)
    metric = "task, both phases, bf16-grouped: real tokens/s"
    ratio = ours / theirs
    rows.append(Row(metric, ours, theirs, "fp32, random batches", ratio, f"≥ {TARGET:g}", ratio >= TARGET))
    for phase in PHASES:
        ours, theirs = _rate(results["language-bf16"], phase), _rate(results["language-fp32"], phase)
        metric = f"language phase {PHASES.index(phase) + 1} ({phase}), bf16: real tokens/s"
        rows.append(Row(metric, ours, theirs, "fp32", ours / theirs, "info"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=320, help="SMSA train sentences per case (one epoch)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--case", choices=TASK_CASES + LANGUAGE_CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run(args.case, args.sentences)))
        return
    bases.ensure_base("me5-small")  # convert once, before the timed cases
    before = machine_note()
    script = Path(__file__).resolve()
    results = {}
    for case in TASK_CASES + LANGUAGE_CASES:
        results[case] = run_case(script, case, "--sentences", str(args.sentences))
        print(f"{case}: {json.dumps(results[case]['phases'])}", file=sys.stderr, flush=True)
    task, language = (results[case]["phases"]["full"]["steps"] for case in ("task-fp32-random", "language-fp32"))
    title = (
        f"train_throughput: mE5-small, {args.sentences} SMSA sentences, one epoch per phase ({task} timed task "
        f"steps of {BATCH['task']}, {language} timed MLM steps of {BATCH['language']} × {MAX_LENGTH} per phase), "
        f"CPU; before: {before}; after: {machine_note()}"
    )
    print_rows(throughput_rows(results) + padding_rows(args.sentences), as_json=args.json, title=title)


if __name__ == "__main__":
    main()
