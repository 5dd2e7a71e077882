"""Two CPU processes (gloo): ``sftkit train`` under ``torchrun --nproc_per_node=2`` writes one SFT, once;
two processes step exactly the parameters one process steps.

The trainer itself checks that every process ends with the same masks and φ (it fails otherwise), so a
clean exit already says the ranks agreed; here we check what rank 0 alone wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from ddp_workers import run_two, step_adamw

from sftkit import toy
from sftkit.registry import Registry


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
