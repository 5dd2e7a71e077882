"""The memory-lean sparse phase equals the obvious dense implementation (LT-SFT reference style).

The reference below is what composable-sft does: dense gradients multiplied by a dense mask, dense
AdamW over every parameter, dense L1 — plus the one fix we promise, frozen entries restored after
each step so weight decay cannot move them.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sftkit import toy
from sftkit.params import maskable_parameters
from sftkit.training.sparse import SparseUpdater, unique_head_parameters

STEPS = 6
LR, WEIGHT_DECAY, L1, CLIP = 3e-3, 0.01, 0.1, 1.0


def _model_and_batches(tiny_base, toy_languages, kind):
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, DataCollatorWithPadding

    from sftkit.base_model import load_base

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    if kind == "language":
        model = load_base(str(tiny_base), "masked-lm")
        texts = toy.corpus(toy_languages["ace"], 8 * STEPS)
        collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
        encoded = [tokenizer(text, truncation=True, max_length=32) for text in texts]
    else:
        model = load_base(str(tiny_base), "sequence-classification", list(toy.LABELS))
        rows = toy.labelled(toy_languages["src"], 8 * STEPS)
        collate = DataCollatorWithPadding(tokenizer)
        encoded = [
            {**tokenizer(text, truncation=True, max_length=32), "labels": toy.LABELS.index(label)}
            for text, label in rows
        ]
    batches = [collate(encoded[i : i + 8]) for i in range(0, len(encoded), 8)]
    return model, batches


def _random_masks(model, density=0.05, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(p.shape, generator=generator) < density for name, p in maskable_parameters(model)}


def _sparse_run(model, batches, masks):
    from transformers import get_linear_schedule_with_warmup

    scale = sum(p.numel() for _, p in maskable_parameters(model))
    updater = SparseUpdater(model, masks, l1=L1, l1_scale=scale)
    optimizer = torch.optim.AdamW(updater.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = get_linear_schedule_with_warmup(optimizer, 1, STEPS)
    model.train()
    for step, batch in enumerate(batches):
        torch.manual_seed(100 + step)  # same dropout masks as the reference
        loss = model(**batch).loss + updater.regularisation()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(updater.parameters(), CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        updater.write_back()
    updater.close()


def _dense_reference_run(model, batches, masks):
    """Dense masked gradients + dense AdamW over every trainable parameter."""
    from transformers import get_linear_schedule_with_warmup

    maskable = dict(maskable_parameters(model))
    for param in model.parameters():
        param.requires_grad_(False)
    trainable = list(maskable.values()) + [p for _, p in unique_head_parameters(model)]
    for param in trainable:
        param.requires_grad_(True)
    start = {name: p.detach().clone() for name, p in maskable.items()}
    scale = sum(p.numel() for p in maskable.values())
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = get_linear_schedule_with_warmup(optimizer, 1, STEPS)
    model.train()
    for step, batch in enumerate(batches):
        torch.manual_seed(100 + step)
        l1 = sum(((p - start[n]).abs() * masks[n]).sum() for n, p in maskable.items())
        loss = model(**batch).loss + L1 * l1 / scale
        loss.backward()
        for name, param in maskable.items():
            param.grad *= masks[name]
        torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, param in maskable.items():
                param.copy_(torch.where(masks[name], param, start[name]))


@pytest.mark.parametrize("kind", ["language", "task"])
def test_sparse_updater_matches_dense_masked_adamw(tiny_base, toy_languages, kind):
    model, batches = _model_and_batches(tiny_base, toy_languages, kind)
    reference = copy.deepcopy(model)
    start = {name: p.detach().clone() for name, p in maskable_parameters(model)}
    masks = _random_masks(model)

    _sparse_run(model, batches, masks)
    _dense_reference_run(reference, batches, masks)

    ours = dict(maskable_parameters(model))
    theirs = dict(maskable_parameters(reference))
    phi_ours = torch.cat([(ours[n].detach() - start[n]).reshape(-1) for n in start])
    phi_ref = torch.cat([(theirs[n].detach() - start[n]).reshape(-1) for n in start])
    outside = torch.cat([~masks[n].reshape(-1) for n in start])
    assert phi_ref.abs().max() > 1e-4  # the run really moved the masked entries
    assert torch.equal(phi_ours[outside], torch.zeros_like(phi_ours[outside]))  # frozen entries never move
    assert float((phi_ours - phi_ref).norm() / phi_ref.norm()) <= 1e-5
    for (name, head), (_, head_ref) in zip(
        unique_head_parameters(model), unique_head_parameters(reference), strict=True
    ):
        assert torch.allclose(head, head_ref, rtol=1e-5, atol=1e-7), name


def test_optimizer_state_is_proportional_to_k(tiny_base, toy_languages):
    model, batches = _model_and_batches(tiny_base, toy_languages, "task")
    masks = _random_masks(model, density=0.02)
    updater = SparseUpdater(model, masks)
    optimizer = torch.optim.AdamW(updater.parameters(), lr=LR)
    model(**batches[0]).loss.backward()
    optimizer.step()
    k = sum(int(mask.sum()) for mask in masks.values())
    head = sum(p.numel() for _, p in unique_head_parameters(model))
    state_entries = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in optimizer.state.values())
    assert state_entries == 2 * (k + head)
    # no dense gradient survives the backward pass on any maskable parameter
    assert all(p.grad is None for _, p in maskable_parameters(model))
    assert updater.num_entries == k
    deltas = updater.deltas()
    assert sum(d.nnz for d in deltas.values()) == k
    updater.close()
