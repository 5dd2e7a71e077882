"""Two CPU processes (gloo): ``sftkit train`` under ``torchrun --nproc_per_node=2`` writes one SFT, once;
two processes train what one process does on the same items; they step exactly the parameters it steps.

The trainer itself checks that every process ends with the same masks and φ (it fails otherwise), so a
clean exit already says the ranks agreed; here we check what rank 0 alone wrote.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from ddp_workers import run_two, step_adamw, train_sft

from sftkit import toy
from sftkit.registry import Registry
from sftkit.sft import SparseFineTuning
from sftkit.training import make_config, train


@pytest.mark.slow
def test_two_cpu_processes_train_one_sft(tiny_base, toy_languages, tmp_path):
    corpus = toy.write_corpus(tmp_path / "ace.txt", toy.corpus(toy_languages["ace"], 150))
    home = tmp_path / "home"
    env = {**os.environ, "SFTKIT_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("SFTKIT_REGISTRY_URL", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--no-python",
        sys.executable,
        "-c",
        "from sftkit.cli.main import main; main()",
        "train",
        "--lang",
        "ace",
        "--corpus",
        str(corpus),
        "--base",
        str(tiny_base),
        "--recipe",
        "quick",
        "--max-steps",
        "4",
        "--eval-steps",
        "2",
        "--batch-size",
        "8",
        "--grad-accum",
        "2",  # accumulation under DDP: the first micro-batch of each step runs under no_sync()
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["lang:ace@1"]  # only rank 0 registers and prints
    records = Registry.open(home=home).find()
    assert [r.reference for r in records] == ["lang:ace@1"]
    record = records[0]
    assert record.num_entries == record.k
    assert record.trainer["world_size"] == 2
    assert (record.trainer["batch_size"], record.trainer["grad_accum"]) == (8, 2)
    assert not any((home / "runs").iterdir())


def _without_dropout(base, directory):
    """A copy of ``base`` without dropout, so that a step's gradient depends on its items alone."""
    shutil.copytree(base, directory)
    config = json.loads((directory / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _tagged(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Sentences of 2 to 12 toy words (so processes hold unequal numbers of labelled words), a tag per word."""
    words = toy.make_languages()[toy.SOURCE_LANGUAGE].words
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        chosen = rng.choices(range(60), k=rng.randint(2, 12))
        sentences.append(([words[i] for i in chosen], ["B-LOC" if i < 20 else "O" for i in chosen]))
    return sentences


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains_on_the_same_items(tiny_base, tmp_path):
    """One process with batch 4 × 2 micro-batches against two processes with 4 each (the same items: rank r
    holds micro-batch r): the gradient is the mean over all the step's labelled words in both, so φ agrees."""
    base = _without_dropout(tiny_base, tmp_path / "base")
    options = {"base_model": str(base), "recipe": "quick", "max_steps": 2, "eval_steps": 2, "k": "all"}
    # Weight decay: dense AdamW in both runs (one process would step word embeddings with RowSparseAdamW).
    options |= {"method": "lt-sft", "labels": ["O", "B-LOC", "I-LOC"], "weight_decay": 0.01}
    data = {"train_data": _tagged(16, 0), "validation_data": _tagged(4, 1)}
    one = train(make_config(task="ner", batch_size=4, grad_accum=2, **options), **data).sft
    run_two(train_sft, make_config(task="ner", batch_size=8, grad_accum=1, **options), data, str(tmp_path / "two"))
    two = SparseFineTuning.load(tmp_path / "two")
    assert set(two.diffs) == set(one.diffs) and set(two.full) == set(one.full)
    for name, delta in one.diffs.items():
        assert torch.equal(two.diffs[name].indices, delta.indices), name
        torch.testing.assert_close(two.diffs[name].values, delta.values, rtol=1e-4, atol=1e-6, msg=name)
    for name, tensor in one.full.items():
        torch.testing.assert_close(two.full[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_processes_step_exactly_the_parameters_one_process_steps(tmp_path):
    """AdamW with weight decay over four parameters: one with a gradient on both processes every step, one on
    rank 0 only at step 2, one on both at step 1 and on neither at step 2 (moments, no gradient), one never.
    One process on both processes' items steps the mean where either has a gradient, and nothing else."""
    generator = torch.Generator().manual_seed(0)

    def grad() -> torch.Tensor:
        return torch.randn(3, generator=generator)

    params = [torch.randn(3, generator=generator) for _ in range(4)]
    grads = [
        [[grad(), None, grad(), None], [grad(), None, grad(), None]],
        [[grad(), grad(), None, None], [grad(), None, None, None]],
    ]
    run_two(step_adamw, params, grads, str(tmp_path))
    expected = [param.clone().requires_grad_(True) for param in params]
    optimizer = torch.optim.AdamW(expected, lr=0.1, weight_decay=0.1)
    for step in grads:
        for index, param in enumerate(expected):
            given = [ranks[index] for ranks in step if ranks[index] is not None]
            param.grad = sum(given) / 2 if given else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert torch.equal(expected[3], params[3])  # never a gradient: not even weight decay moves it
    for rank in range(2):
        stepped = torch.load(tmp_path / f"rank{rank}.pt")
        for index, (got, want) in enumerate(zip(stepped, expected, strict=True)):
            assert torch.equal(got, want.detach()), (rank, index)
