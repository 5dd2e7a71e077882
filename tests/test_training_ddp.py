"""``sftkit train`` under ``torchrun --nproc_per_node=2`` on the CPU (gloo): one SFT, written once.

The trainer itself checks that every process ends with the same masks and φ (it fails otherwise), so a
clean exit already says the ranks agreed; here we check what rank 0 alone wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
