"""Random SFTs for the merge and tuning tests: overlaps, conflicting signs and a few entries of known sign."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from sftkit.params import head_parameters, maskable_parameters
from sftkit.sft import SFTMetadata, SparseDelta, SparseFineTuning
from sftkit.toy import LABELS

FORCED = "encoder.layer.0.attention.self.query.weight"  # where every SFT stores the same signed entries
WEIGHTS = [1.0, 0.7, 1.3]


def random_sfts(base) -> list[SparseFineTuning]:
    """A task SFT (with head) and two language SFTs: overlapping random entries with conflicting signs, some
    entries stored by one SFT only, and in ``FORCED`` entries 0–19 stored by all, all positive then all negative,
    and 20–29 stored by all, positive but for the task SFT's explicit zeros (a zero has no sign to agree with)."""
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS))
    generator = torch.Generator().manual_seed(0)
    sfts = []
    for position, kind in enumerate(("task", "language", "language")):
        diffs = {}
        for name, param in maskable_parameters(model):
            stored = (torch.rand(param.shape, generator=generator) < 0.3).view(-1)
            values = torch.randn(param.numel(), generator=generator)
            if name == FORCED:
                stored[:30] = True
                values[:10] = torch.rand(10, generator=generator) + 0.1
                values[10:20] = -(torch.rand(10, generator=generator) + 0.1)
                values[20:30] = 0.0 if position == 0 else torch.rand(10, generator=generator) + 0.1
            indices = stored.nonzero().flatten()
            diffs[name] = SparseDelta(tuple(param.shape), indices, values[indices])
        head = {n: torch.randn(p.shape, generator=generator) for n, p in head_parameters(model)} if not position else {}
        metadata = SFTMetadata(
            kind=kind,
            task="sa" if kind == "task" else None,
            language=None if kind == "task" else f"l{position}",
            labels=list(LABELS) if kind == "task" else None,
        )
        sfts.append(SparseFineTuning(diffs, head, metadata))
    return sfts


def tiny_miniature_cache(tmp_path, tiny_base, mini) -> tuple[Path, list[SparseFineTuning]]:
    """A ``benchmarks/nusax_mini.py`` cache directory as the miniature leaves it (budget.json; state.json naming
    its SFTs in a shared SFT cache), with ``random_sfts``' task SFT and first language SFT as every core method's
    seed-0 task SFT and ace language SFT, on the tiny base, scored on 20 test rows. Returns it and those SFTs."""
    import json
    from dataclasses import asdict, replace

    cache = tmp_path / "quick-table9-tiny"
    budget = replace(mini.QUICK, base=str(tiny_base), test_rows=20)
    cache.mkdir()
    (cache / "budget.json").write_text(json.dumps({**asdict(budget), "fitted_base": str(tiny_base)}))
    sfts = random_sfts(tiny_base)
    paths = {}
    for method in mini.CORE_METHODS:
        key = mini.method_key(method)
        for name, sft in ((f"task-{key}-s0", sfts[0]), (f"lang-ace-{key}", sfts[1])):
            sft.save(tmp_path / "sft" / name)
            paths[name] = str(tmp_path / "sft" / name)
    (cache / "state.json").write_text(json.dumps({"scores": {}, "seconds": {}, "sft_paths": paths}))
    return cache, sfts
