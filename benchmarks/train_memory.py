"""Sparse-phase memory and speed: ours (optimiser state ∝ k) vs the LT-SFT reference's dense approach.

Three cases, each in its own process so that peak RSS (``resource.getrusage``) belongs to that case
alone, on XLM-R base shape (278 M parameters, random weights), CPU, a few steps of short sequences:

- ``full``          a full fine-tuning step (phase 1): every maskable parameter + head, dense AdamW;
- ``dense-masked``  the LT-SFT reference's sparse phase (composable-sft): a dense copy of the original
                    parameters, dense boolean masks, dense gradients multiplied by the mask, dense AdamW;
- ``sparse``        ours (``sftkit.training.sparse.SparseUpdater``) exactly as the trainer runs it.

In language mode, three more cases show what the language-SFT full phase costs before and after issue 12
(decoder untied and frozen in all three, as the LT-SFT recipe trains it):

- ``mlm-all-logits``     the vocabulary projection of every position (``model(**batch).loss``), dense AdamW;
- ``mlm-masked-logits``  logits at the masked positions only (``sftkit.training.mlm``), dense AdamW;
- ``mlm-row-sparse``     masked-only logits + row gradients of the word embeddings + ``RowSparseAdamW``
                         (``sftkit.training.optim``): exactly the trainer's full phase.

Both sparse variants train the same k random entries (spread over every maskable parameter, so every
weight still needs its gradient: the conservative case for us). Targets (issue 4): sparse-phase peak
RSS ≤ 0.6 × dense-masked, step time ≤ 1.1 × a full fine-tuning step.

    python benchmarks/train_memory.py                  # XLM-R base, masked LM, k = 7.6 M (~3 min)
    python benchmarks/train_memory.py --mode task      # sequence classification, k = 14.2 M
    python benchmarks/train_memory.py --quick          # small shape, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import Row, print_rows
from shapes import xlmr_base_config

from sftkit.base_model import untie_decoder
from sftkit.params import maskable_parameters
from sftkit.training.mlm import masked_lm_loss
from sftkit.training.optim import RowSparseAdamW, clip_grad_norm_
from sftkit.training.sparse import SparseUpdater, unique_head_parameters

CASES = ("full", "dense-masked", "sparse")
MLM_CASES = ("mlm-all-logits", "mlm-masked-logits", "mlm-row-sparse")
PAPER_K = {"language": 7_600_000, "task": 14_200_000}


def _model(mode: str, quick: bool):
    from transformers import XLMRobertaForMaskedLM, XLMRobertaForSequenceClassification

    torch.manual_seed(0)
    config = xlmr_base_config(quick)
    if mode == "language":
        return XLMRobertaForMaskedLM(config)
    config.num_labels = 3
    return XLMRobertaForSequenceClassification(config)


def _batches(model, mode: str, count: int, batch: int, length: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    batches = []
    for _ in range(count):
        ids = torch.randint(5, vocab, (batch, length), generator=generator)
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if mode == "language":
            labels = ids.clone()
            labels[torch.rand(ids.shape, generator=generator) >= 0.15] = -100
            item["labels"] = labels
        else:
            item["labels"] = torch.randint(0, 3, (batch,), generator=generator)
        batches.append(item)
    return batches


def _random_masks(model, k: int) -> dict[str, torch.Tensor]:
    params = dict(maskable_parameters(model))
    density = k / sum(p.numel() for p in params.values())
    generator = torch.Generator().manual_seed(2)
    return {name: torch.rand(p.shape, generator=generator) < density for name, p in params.items()}


def _trainable(model) -> list[torch.Tensor]:
    for param in model.parameters():
        param.requires_grad_(False)
    decoder = model.get_output_embeddings()
    frozen = decoder.weight if decoder is not None and not decoder.weight.requires_grad else None
    head = [p for _, p in unique_head_parameters(model) if p is not frozen]
    params = [p for _, p in maskable_parameters(model)] + head
    for param in params:
        param.requires_grad_(True)
    return params


def run_case(case: str, mode: str, quick: bool, k: int, steps: int, batch: int, length: int) -> dict[str, float]:
    """One case in this process: median step time and the process's peak RSS."""
    model = _model(mode, quick)
    model.train()
    batches = _batches(model, mode, steps, batch, length)
    if case in MLM_CASES:
        untie_decoder(model, freeze=True)
        params = _trainable(model)
        row_sparse = case == "mlm-row-sparse"
        model.get_input_embeddings().sparse = row_sparse
        optimizer = (RowSparseAdamW if row_sparse else torch.optim.AdamW)(params, lr=5e-5, weight_decay=0.0)

        def step(item):
            loss = model(**item).loss if case == "mlm-all-logits" else masked_lm_loss(model, item)
            loss.backward()
            clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    elif case == "full":
        params = _trainable(model)
        optimizer = torch.optim.AdamW(params, lr=5e-5)

        def step(item):
            model(**item).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    elif case == "dense-masked":
        params = _trainable(model)
        maskable = dict(maskable_parameters(model))
        masks = _random_masks(model, k)
        originals = {id(p): p.detach().clone() for p in params}  # kept by the reference to compute φ
        optimizer = torch.optim.AdamW(params, lr=5e-5)

        def step(item):
            model(**item).loss.backward()
            for name, param in maskable.items():
                param.grad *= masks[name]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        assert originals
    else:
        masks = _random_masks(model, k)
        updater = SparseUpdater(model, masks, l1=0.1, l1_scale=sum(m.numel() for m in masks.values()))
        del masks  # as the trainer does: the updater keeps indices only
        params = updater.parameters()
        optimizer = torch.optim.AdamW(params, lr=5e-5)

        def step(item):
            loss = masked_lm_loss(model, item) if mode == "language" else model(**item).loss  # as the trainer
            (loss + updater.regularisation()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updater.write_back()

    times = []
    for item in batches:
        started = time.perf_counter()
        step(item)
        times.append(time.perf_counter() - started)
    warm = times[1:] if len(times) > 1 else times  # the first step allocates the optimiser state
    return {
        "case": case,
        "step_seconds": statistics.median(warm),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _in_subprocess(case: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--case", case, "--mode", args.mode, "--k", str(args.k)]
    command += ["--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length)]
    command += ["--quick"] if args.quick else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("language", "task"), default="language")
    parser.add_argument("--quick", action="store_true", help="small shape for CI")
    parser.add_argument("--k", type=int, default=None, help="entries to train (default: the paper's k)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--case", choices=CASES + MLM_CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.k is None:
        args.k = PAPER_K[args.mode] // (50 if args.quick else 1)
    if args.case:
        print(json.dumps(run_case(args.case, args.mode, args.quick, args.k, args.steps, args.batch, args.length)))
        return
    cases = CASES + (MLM_CASES if args.mode == "language" else ())
    results = {case: _in_subprocess(case, args) for case in cases}
    ours, dense, full = results["sparse"], results["dense-masked"], results["full"]
    gib = 2**30
    memory_ratio = ours["peak_rss_bytes"] / dense["peak_rss_bytes"]
    time_ratio = ours["step_seconds"] / full["step_seconds"]
    rows = [
        Row(
            "sparse-phase peak RSS (GiB)",
            ours["peak_rss_bytes"] / gib,
            dense["peak_rss_bytes"] / gib,
            "LT-SFT dense masked grad + dense AdamW",
            memory_ratio,
            "≤ 0.6",
            None if args.quick else memory_ratio <= 0.6,
        ),
        Row(
            "sparse-phase step time (s)",
            ours["step_seconds"],
            full["step_seconds"],
            "full fine-tuning step",
            time_ratio,
            "≤ 1.1",
            None if args.quick else time_ratio <= 1.1,
        ),
        Row(
            "LT-SFT reference step time (s)",
            dense["step_seconds"],
            full["step_seconds"],
            "full fine-tuning step",
            dense["step_seconds"] / full["step_seconds"],
            "info",
        ),
        Row(
            "full fine-tuning peak RSS (GiB)",
            full["peak_rss_bytes"] / gib,
            dense["peak_rss_bytes"] / gib,
            "LT-SFT dense masked grad + dense AdamW",
            full["peak_rss_bytes"] / dense["peak_rss_bytes"],
            "info",
        ),
    ]
    if args.mode == "language":
        before, masked, after = (results[case] for case in MLM_CASES)
        rows += [
            Row(
                "MLM full-phase step, masked-only logits (s)",
                masked["step_seconds"],
                before["step_seconds"],
                "all-position logits",
                masked["step_seconds"] / before["step_seconds"],
                "info",
            ),
            Row(
                "MLM full-phase peak RSS, masked-only logits (GiB)",
                masked["peak_rss_bytes"] / gib,
                before["peak_rss_bytes"] / gib,
                "all-position logits",
                masked["peak_rss_bytes"] / before["peak_rss_bytes"],
                "info",
            ),
            Row(
                "MLM full-phase step, + row-sparse AdamW (s)",
                after["step_seconds"],
                before["step_seconds"],
                "all-position logits, dense AdamW",
                after["step_seconds"] / before["step_seconds"],
                "info",
            ),
            Row(
                "MLM full-phase peak RSS, + row-sparse AdamW (GiB)",
                after["peak_rss_bytes"] / gib,
                before["peak_rss_bytes"] / gib,
                "all-position logits, dense AdamW",
                after["peak_rss_bytes"] / before["peak_rss_bytes"],
                "info",
            ),
        ]
    # The small shape only checks that the cases run: its peaks are mostly the interpreter and libraries.
    shape = "small shape (--quick, no verdict)" if args.quick else "XLM-R base shape"
    title = f"train_memory: {args.mode}, {shape}, k = {args.k:,}, batch {args.batch} × {args.length} tokens, CPU"
    print_rows(rows, as_json=args.json, title=title)


if __name__ == "__main__":
    main()
