"""RowSparseAdamW + sparse-aware clipping equal dense AdamW + torch's clipping on the same batches."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from sftkit.training.optim import RowSparseAdamW, clip_grad_norm_

VOCAB, DIM, USED_ROWS, STEPS = 1000, 16, 600, 20
LR, MAX_NORM = 1e-2, 0.5


class _Model(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM, sparse=sparse)
        self.hidden = nn.Linear(DIM, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(ids).mean(1))))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each step draws from a different random subset of the first USED_ROWS rows, with repeats."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        subset = torch.randperm(USED_ROWS, generator=generator)[:60]
        ids = subset[torch.randint(len(subset), (8, 12), generator=generator)]
        batches.append((ids, torch.randint(10, (8,), generator=generator)))
    return batches


def _groups(model: _Model) -> list[dict]:
    dense = [*model.hidden.parameters(), *model.out.parameters()]
    return [{"params": [model.embed.weight], "weight_decay": 0.0}, {"params": dense, "weight_decay": 0.01}]


def _setup(sparse: bool) -> tuple[_Model, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    model = _Model(sparse)
    optimizer = (RowSparseAdamW if sparse else torch.optim.AdamW)(_groups(model), lr=LR)
    return model, optimizer, get_linear_schedule_with_warmup(optimizer, 3, STEPS)


def _train(model, optimizer, scheduler, batches, sparse: bool) -> list[float]:
    norms = []
    for ids, labels in batches:
        nn.functional.cross_entropy(model(ids), labels).backward()
        clip = clip_grad_norm_ if sparse else torch.nn.utils.clip_grad_norm_
        norms.append(float(clip(model.parameters(), MAX_NORM)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def test_matches_dense_adamw():
    batches = _batches()
    dense, sparse = _setup(False), _setup(True)
    initial = sparse[0].embed.weight.detach().clone()
    dense_norms = _train(*dense, batches, sparse=False)
    sparse_norms = _train(*sparse, batches, sparse=True)

    assert max(dense_norms) > MAX_NORM  # clipping really happened
    torch.testing.assert_close(sparse_norms, dense_norms, rtol=1e-6, atol=1e-6)
    for (name, expected), (_, actual) in zip(dense[0].named_parameters(), sparse[0].named_parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=name)

    used = torch.unique(torch.cat([ids.flatten() for ids, _ in batches]))
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[used] = False
    assert unused.sum() >= VOCAB - USED_ROWS
    assert torch.equal(sparse[0].embed.weight[unused], initial[unused])
    state = sparse[1].state[sparse[0].embed.weight]
    assert torch.equal(state["rows"], used)  # moments only for the touched rows
    assert state["exp_avg"].shape == (len(used), DIM) and state["step"] == STEPS


def test_state_dict_round_trip_resumes_exactly():
    batches = _batches()
    straight = _setup(True)
    _train(*straight, batches, sparse=True)

    first = _setup(True)
    _train(*first, batches[: STEPS // 2], sparse=True)
    buffer = io.BytesIO()
    torch.save((first[0].state_dict(), first[1].state_dict(), first[2].state_dict()), buffer)
    buffer.seek(0)
    model_state, optimizer_state, scheduler_state = torch.load(buffer, weights_only=True)

    resumed = _setup(True)
    resumed[0].load_state_dict(model_state)
    resumed[1].load_state_dict(optimizer_state)
    resumed[2].load_state_dict(scheduler_state)
    assert resumed[1].state[resumed[0].embed.weight]["rows"].dtype == torch.int64
    _train(*resumed, batches[STEPS // 2 :], sparse=True)
    for expected, actual in zip(straight[0].parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(actual, expected)


def test_weight_decay_with_sparse_gradient_is_refused():
    model = _Model(sparse=True)
    groups = [{"params": model.out.parameters()}, {"params": [*model.embed.parameters(), *model.hidden.parameters()]}]
    optimizer = RowSparseAdamW(groups, lr=LR, weight_decay=0.01)
    before = [param.detach().clone() for param in model.parameters()]
    ids, labels = _batches()[0]
    nn.functional.cross_entropy(model(ids), labels).backward()
    with pytest.raises(ValueError, match="weight_decay=0"):
        optimizer.step()
    for expected, actual in zip(before, model.parameters(), strict=True):
        assert torch.equal(actual, expected)  # refused before any update, even of the dense group


@pytest.mark.parametrize("max_norm", [0.1, 100.0])
def test_clip_grad_norm_matches_torch_on_dense_equivalent(max_norm):
    generator = torch.Generator().manual_seed(2)
    shapes = [(50, 4), (7,), (3, 5)]
    sparse_params = [torch.zeros(shape, requires_grad=True) for shape in shapes]
    dense_params = [torch.zeros(shape, requires_grad=True) for shape in shapes]
    rows = torch.tensor([[3, 17, 3, 40, 17]])  # uncoalesced: repeated rows must be summed before the norm
    sparse_params[0].grad = torch.sparse_coo_tensor(
        rows, torch.randn(5, 4, generator=generator), (50, 4), check_invariants=True
    )
    dense_params[0].grad = sparse_params[0].grad.to_dense()
    for sparse, dense in zip(sparse_params[1:], dense_params[1:], strict=True):
        sparse.grad = torch.randn(sparse.shape, generator=generator)
        dense.grad = sparse.grad.clone()

    total = clip_grad_norm_(sparse_params, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(dense_params, max_norm)
    torch.testing.assert_close(total, expected)
    for sparse, dense in zip(sparse_params, dense_params, strict=True):
        torch.testing.assert_close(sparse.grad.to_dense(), dense.grad)
    assert sparse_params[0].grad.is_sparse and sparse_params[0].grad.is_coalesced()
